"""quiltctl as a user runs it, inside the sandbox, against the real quiltd."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
import time
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


def test_run_userns_maps_root_to_an_unprivileged_range(sandbox: Any, busybox_image: str, name: str) -> None:
    result = ctl(sandbox, "run", "--rm", "--userns", "--name", name, "busybox", "cat", "/proc/self/uid_map")
    inside, outside, count = (int(f) for f in result.stdout.split())
    assert (inside, count) == (0, 65536) and outside >= 0x80000, result.stdout


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


def test_images_import_passes_ref(sandbox: Any, busybox_image: str) -> None:
    refused = ctl(sandbox, "images", "import", "--ref", "busybox:latest", "bb-ref", BUSYBOX_TARBALL,
                  check=False)
    assert refused.returncode == 1
    assert b"the option ref is for OCI layouts and docker save archives (InvalidArgument)" in refused.stderr
    assert "bb-ref" not in ctl(sandbox, "images").stdout.decode()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["rm", "no-such-container"], 1, "quiltctl: no-such-container: no container 'no-such-container' "
                                      "(NoSuchContainer)"),
    (["run", "no-such-image", "true"], 125, "quiltctl: no image 'no-such-image' (NoSuchImage)"),
    (["run", "busybox", "no-such-program"], 125, "No such file or directory (StartFailed)"),
    (["--address=unix:path=/nonexistent", "ps"], 3, "quiltctl: cannot connect to quiltd"),
    (["volume", "rm", "no-such-volume"], 1, "quiltctl: no-such-volume: "),
    (["exec", "no-such-container", "true"], 125, "(NoSuchContainer)"),
    (["cp", "a", "b"], 2, "give exactly one of SRC and DEST as CONTAINER:PATH"),
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


def _run_detached(sandbox: Any, name: str, *command: str) -> None:
    """run -d, then wait until running: -d returns while the container may still be starting."""
    ctl(sandbox, "run", "-d", "--name", name, "busybox", *command)
    deadline = time.monotonic() + 30
    while json.loads(ctl(sandbox, "inspect", name).stdout)[0]["State"] != "running":
        assert time.monotonic() < deadline, "the container did not come up"
        time.sleep(0.05)


def test_exec_propagates_the_code_and_takes_options_and_stdin(sandbox: Any, busybox_image: str,
                                                            name: str) -> None:
    _run_detached(sandbox, name, "sleep", "1000")
    try:
        assert ctl(sandbox, "exec", name, "sh", "-c", "echo out; echo err >&2; exit 7", check=False) \
            .returncode == 7
        result = ctl(sandbox, "exec", "-e", "A=b", "-w", "/tmp", "-u", "nobody", name,
                     "sh", "-c", "echo $A; pwd; id -u; echo to-err >&2")
        assert (result.stdout, result.stderr) == (b"b\n/tmp\n65534\n", b"to-err\n")
        data = bytes(range(256)) * 512
        piped = sandbox.run([QUILTCTL, "exec", "-i", name, "sh", "-c", "cat; echo end"], input=data)
        assert piped.stdout == data + b"end\n"
        # Without -i the command's stdin is empty, not ours.
        assert sandbox.run([QUILTCTL, "exec", name, "cat"], input=b"not passed").stdout == b""
        missing = ctl(sandbox, "exec", name, "no-such-program", check=False)
        assert missing.returncode == 127 and b"(ExecFailed)" in missing.stderr
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)


def test_cp_both_ways_with_directories_and_tar_streams(sandbox: Any, busybox_image: str, name: str) -> None:
    tag = secrets.token_hex(3)
    src, out = f"/var/tmp/cp-src-{tag}", f"/var/tmp/cp-out-{tag}"
    host_src = sandbox.host_path(src)
    (host_src / "a").mkdir(parents=True)
    (host_src / "a" / "b.txt").write_bytes(b"bee\n")
    sandbox.host_path(out).mkdir()
    _run_detached(sandbox, name, "sleep", "1000")
    try:
        ctl(sandbox, "cp", src, f"{name}:/tmp")  # an existing directory: into it
        ctl(sandbox, "cp", src, f"{name}:/tmp/renamed")  # a new name: as it
        listing = ctl(sandbox, "exec", name, "cat", f"/tmp/cp-src-{tag}/a/b.txt", "/tmp/renamed/a/b.txt")
        assert listing.stdout == b"bee\nbee\n"
        ctl(sandbox, "cp", f"{name}:/tmp/renamed", out)  # into an existing directory
        ctl(sandbox, "cp", f"{name}:/tmp/renamed/a", f"{out}/new")  # as a new name
        assert (sandbox.host_path(out) / "renamed" / "a" / "b.txt").read_bytes() == b"bee\n"
        assert (sandbox.host_path(out) / "new" / "b.txt").read_bytes() == b"bee\n"
        # Tar streams on stdin and stdout.
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("from-stdin")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"in\n"))
        sandbox.run([QUILTCTL, "cp", "-", f"{name}:/tmp"], input=buf.getvalue())
        stream = ctl(sandbox, "cp", f"{name}:/tmp/from-stdin", "-").stdout
        with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
            member = tar.next()
            assert member is not None and member.name == "from-stdin"
            f = tar.extractfile(member)
            assert f is not None and f.read() == b"in\n"
        # A stopped container too.
        ctl(sandbox, "stop", "-t", "0", name)
        ctl(sandbox, "cp", f"{name}:/tmp/from-stdin", f"{out}/stopped")
        assert (sandbox.host_path(out) / "stopped").read_bytes() == b"in\n"
        missing = ctl(sandbox, "cp", f"{name}:/nope", out, check=False)
        assert missing.returncode == 1 and b"(NoSuchPath)" in missing.stderr
        # --max-bytes caps the stream both ways.
        over = ctl(sandbox, "cp", "--max-bytes", "1k", f"{name}:/tmp/renamed", "-", check=False)
        assert over.returncode == 1 and b"(LimitExceeded)" in over.stderr and len(over.stdout) <= 1024
        over = ctl(sandbox, "cp", "--max-bytes", "1k", src, f"{name}:/tmp", check=False)
        assert over.returncode == 1 and b"(LimitExceeded)" in over.stderr
        ctl(sandbox, "cp", "--max-bytes", "1M", f"{name}:/tmp/from-stdin", f"{out}/capped")
        assert (sandbox.host_path(out) / "capped").read_bytes() == b"in\n"
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)
        sandbox.run(["rm", "-rf", src, out], check=False)


def test_volume_and_network_verbs(sandbox: Any, busybox_image: str, name: str) -> None:
    volume, network = f"{name[:40]}-v", f"{name[:40]}-n"
    assert ctl(sandbox, "volume", "create", volume).stdout.decode().strip() == volume
    listed = json.loads(ctl(sandbox, "volume", "ls", "--json").stdout)
    assert [v["name"] for v in listed if v["name"] == volume] == [volume]
    subnet = ctl(sandbox, "network", "create", "--subnet", "10.99.7.0/24", network).stdout.decode().strip()
    assert subnet == "10.99.7.0/24"
    table = ctl(sandbox, "network", "ls").stdout.decode()
    assert network in table and "10.99.7.0/24" in table
    ctl(sandbox, "volume", "rm", volume)
    ctl(sandbox, "network", "rm", network)
    assert volume not in ctl(sandbox, "volume", "ls").stdout.decode()
    assert network not in ctl(sandbox, "network", "ls").stdout.decode()
    missing = ctl(sandbox, "network", "rm", network, check=False)
    assert missing.returncode != 0 and network in missing.stderr.decode()


def test_run_the_images_command_with_podman_flags(sandbox: Any, busybox_image: str, name: str) -> None:
    env_file = "/var/tmp/quilt-env-" + secrets.token_hex(3)
    sandbox.host_path(env_file).write_text("# comment\nFROM_FILE=yes\nSHARED=file\n")
    try:
        # The entrypoint as a program, the command as its arguments; -u, -w, -e over --env-file.
        result = ctl(sandbox, "run", "--rm", "--entrypoint", "/bin/sh", "-u", "nobody", "-w", "/tmp",
                     "--env-file", env_file, "-e", "SHARED=flag", "busybox",
                     "-c", 'echo "$FROM_FILE $SHARED $(id -u) $(pwd)"')
        assert result.stdout == b"yes flag 65534 /tmp\n"
        # A JSON entrypoint; -p forwards a port (the container's record shows it).
        ctl(sandbox, "create", "--name", name, "-p", "18080:80", "-p", "18053:53/udp",
            "--entrypoint", '["sh", "-c"]', "busybox", "echo hi")
        info = json.loads(ctl(sandbox, "inspect", name).stdout)[0]
        assert info["Command"] == ["sh", "-c", "echo hi"]
        assert info["Publish"] == [[18080, 80, "tcp"], [18053, 53, "udp"]]
        ctl(sandbox, "rm", name)
        # No command with an image that has none: a named error, not a usage error.
        result = ctl(sandbox, "run", "--rm", "busybox", check=False)
        assert result.returncode == 125 and b"no Entrypoint or Cmd" in result.stderr
        bad = ctl(sandbox, "run", "-p", "80", "busybox", "true", check=False)
        assert bad.returncode == 2 and b"HOSTPORT:CONTAINERPORT" in bad.stderr
        bad = ctl(sandbox, "run", "--env-file", "/var/tmp/no-such-env-file", "busybox", "true", check=False)
        assert bad.returncode == 2 and b"--env-file /var/tmp/no-such-env-file" in bad.stderr
        bad = ctl(sandbox, "run", "--entrypoint", "[1]", "busybox", check=False)
        assert bad.returncode == 2 and b"invalid entrypoint" in bad.stderr
    finally:
        sandbox.host_path(env_file).unlink()


def test_background_execs_from_the_command_line(sandbox: Any, busybox_image: str, name: str) -> None:
    _run_detached(sandbox, name, "sleep", "1000")
    try:
        quick = ctl(sandbox, "exec", "-d", "-e", "CODE=4", name, "sh", "-c", "exit $CODE").stdout
        quick = quick.decode().strip()
        slow = ctl(sandbox, "exec", "-d", "-u", "nobody", name, "sleep", "1000").stdout.decode().strip()
        assert ctl(sandbox, "exec-wait", quick).stdout == b"4\n"
        rows = {r["id"]: r for r in json.loads(ctl(sandbox, "execs", "--json", name).stdout)}
        assert rows[slow]["state"] == "running" and rows[slow]["command"] == ["sleep", "1000"]
        assert (rows[quick]["state"], rows[quick]["exit_code"]) == ("exited", 4)
        assert slow in ctl(sandbox, "execs", name).stdout.decode()
        ctl(sandbox, "exec-kill", "-s", "TERM", slow)
        assert ctl(sandbox, "exec-wait", slow).stdout == b"143\n"
        missing = ctl(sandbox, "exec-wait", "0123456789abcdef", check=False)
        assert missing.returncode == 1 and b"(NoSuchExec)" in missing.stderr
        for how in (["-d"], ["-t"], []):
            ghost = ctl(sandbox, "exec", *how, "-u", "ghost", name, "true", check=False)
            assert ghost.returncode == 125 and b"no user 'ghost'" in ghost.stderr, ghost
        bad_env = ctl(sandbox, "exec", "-d", "-e", "1X=y", name, "true", check=False)
        assert bad_env.returncode == 125 and b"(InvalidArgument)" in bad_env.stderr
        nowhere = ctl(sandbox, "exec", "-w", "/nowhere", name, "true", check=False)
        assert nowhere.returncode == 127 and b"workdir /nowhere" in nowhere.stderr
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)


def test_the_documented_podman_habits_run_as_written(sandbox: Any, busybox_image: str) -> None:
    text = (REPO / "docs/quiltctl.md").read_text()
    block = text.split("These are run as written by the test suite:\n\n```sh\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    path = f"{REPO / '.venv/bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
    outputs = []
    try:
        for i, line in enumerate(lines):
            if line.startswith("quiltctl exec agent"):  # the container may still be starting
                deadline = time.monotonic() + 10
                while sandbox.run(["env", f"PATH={path}", "sh", "-c", "quiltctl exec agent true"],
                                  check=False).returncode:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            result = sandbox.run(["env", f"PATH={path}", "sh", "-c", line], check=False)
            assert result.returncode == 0, (line, result.stderr)
            outputs.append(result.stdout.decode())
            if i == 3:
                exec_id = result.stdout.decode().strip()
                assert sandbox.run(["env", f"PATH={path}", "quiltctl", "exec-wait", exec_id]).stdout == b"3\n"
    finally:
        ctl(sandbox, "rm", "-f", "agent", check=False)
    assert outputs[1] == "65534\n"  # the container's user
    assert outputs[2] == "test /tmp 0\n"
    assert "exited" in outputs[4] and "sh -c exit 3" in outputs[4]
    assert outputs[5] == "hello\n"
