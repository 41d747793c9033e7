"""quiltctl as a user runs it, inside the sandbox, against the real quiltd."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.system.conftest import BUSYBOX_TARBALL, REPO

pytestmark = pytest.mark.system

QUILTCTL = str(REPO / ".venv/bin/quiltctl")


def ctl(sandbox: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = sandbox.run([QUILTCTL, *args], check=check)
    return result


def names(sandbox: Any) -> list[str]:
    return ctl(sandbox, "ps", "-a", "--format", "names").stdout.decode().split()


def test_run_shows_output_and_exits_with_the_containers_code(sandbox: Any, busybox_image: str,
                                                            name: str) -> None:
    result = ctl(sandbox, "run", "--rm", "--name", name, "-e", "GREETING=hello", "busybox",
                 "sh", "-c", 'echo "$GREETING out"; echo to-err >&2; exit 3', check=False)
    assert result.returncode == 3
    assert result.stdout == b"hello out\n"
    assert result.stderr == b"to-err\n"
    assert name not in names(sandbox)  # --rm


def test_detached_life_cycle(sandbox: Any, busybox_image: str, name: str) -> None:
    cid = ctl(sandbox, "run", "-d", "--name", name, "--memory", "64M", "--cpus", "0.5", "-l", "team=a",
              "busybox", "sh", "-c", "echo started; sleep 1000").stdout.decode().strip()
    try:
        assert len(cid) == 16
        running = ctl(sandbox, "ps").stdout.decode().splitlines()
        assert running[0].split() == ["ID", "NAME", "IMAGE", "STATE"]
        assert [cid, name, "busybox", "running"] in [line.split() for line in running[1:]] or \
            [cid, name, "busybox", "starting"] in [line.split() for line in running[1:]]
        (info,) = json.loads(ctl(sandbox, "inspect", name).stdout)
        assert (info["Id"], info["MemoryMax"], info["CPUQuota"], info["Labels"]) == \
            (cid, 64 << 20, 0.5, {"team": "a"})
        listed = json.loads(ctl(sandbox, "ps", "--json", "--filter", "label=team=a").stdout)
        assert [row["name"] for row in listed if row["name"] == name] == [name]
        unit = info["Unit"]
        props = sandbox.run(["systemctl", "show", unit, "-p", "MemoryMax"]).stdout.decode().strip()
        assert props == f"MemoryMax={64 << 20}"
        assert ctl(sandbox, "stop", "-t", "1", name).stdout.decode().strip() == name
        assert ctl(sandbox, "wait", name).stdout.decode().strip() == "143"
        assert name not in ctl(sandbox, "ps", "--format", "names").stdout.decode().split()
        assert name in names(sandbox)
        assert ctl(sandbox, "logs", name).stdout == b"started\n"
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)
    assert name not in names(sandbox)


def test_create_start_logs_tail(sandbox: Any, busybox_image: str, name: str) -> None:
    cid = ctl(sandbox, "create", "--name", name, "busybox", "sh", "-c", "echo one; echo two; echo three") \
        .stdout.decode().strip()
    try:
        assert json.loads(ctl(sandbox, "inspect", cid).stdout)[0]["State"] == "created"
        assert ctl(sandbox, "start", name).stdout.decode().strip() == name
        ctl(sandbox, "wait", name)
        logs = ctl(sandbox, "logs", "-f", name).stdout  # ended: -f returns at once
        assert logs == b"one\ntwo\nthree\n"
        assert ctl(sandbox, "logs", "--tail", "1", name).stdout == b"three\n"
    finally:
        ctl(sandbox, "rm", name, check=False)


def test_images_and_info(sandbox: Any, busybox_image: str) -> None:
    image_id = ctl(sandbox, "images", "import", "bb-copy", BUSYBOX_TARBALL).stdout.decode().strip()
    try:
        listed = {i["name"]: i["id"] for i in json.loads(ctl(sandbox, "images", "ls", "--json").stdout)}
        assert listed["bb-copy"] == image_id
        table = ctl(sandbox, "images").stdout.decode().splitlines()
        assert table[0].split() == ["NAME", "ID", "SIZE"]
        assert any(line.split()[:2] == ["bb-copy", image_id[:12]] for line in table[1:])
    finally:
        ctl(sandbox, "images", "rm", "bb-copy")
    assert "bb-copy" not in ctl(sandbox, "images").stdout.decode()
    info = json.loads(ctl(sandbox, "info", "--json").stdout)
    assert info["StateDirectory"] == "/var/lib/quilt"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["rm", "no-such-container"], 1, "quiltctl: no-such-container: no container 'no-such-container' "
                                      "(NoSuchContainer)"),
    (["run", "no-such-image", "true"], 125, "quiltctl: no image 'no-such-image' (NoSuchImage)"),
    (["run", "busybox", "no-such-program"], 125, "No such file or directory (StartFailed)"),
    (["--address=unix:path=/nonexistent", "ps"], 3, "quiltctl: cannot connect to quiltd"),
    (["exec", "x", "true"], 2, "quiltctl: exec is not available yet"),
    (["kill", "-s", "NOPE", "x"], 2, "unknown signal 'NOPE'"),
])
def test_errors_are_one_line_with_a_documented_code(sandbox: Any, busybox_image: str, args: list[str],
                                                    code: int, message: str) -> None:
    result = ctl(sandbox, *args, check=False)
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert message in err
    assert "Traceback" not in err
    if code != 2:  # argparse prints its usage first
        assert err.count("\n") == 1, err
    for leftover in names(sandbox):  # a failed run leaves its container, failed, as podman does
        if leftover.startswith("busybox-"):
            ctl(sandbox, "rm", leftover)


def test_direct_socket(sandbox: Any, busybox_image: str) -> None:
    sandbox.run(["systemctl", "stop", "quiltd"])
    sandbox.run(["systemctl", "start", "quiltd.socket"])
    try:
        result = ctl(sandbox, "--direct", "run", "--rm", "busybox", "echo", "direct", check=False)
        assert (result.returncode, result.stdout) == (0, b"direct\n"), result.stderr
    finally:
        sandbox.run(["systemctl", "stop", "quiltd.socket", "quiltd"], check=False)
