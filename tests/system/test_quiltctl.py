"""quiltctl as a user runs it, inside the sandbox, against the real quiltd."""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import signal
import subprocess
import tarfile
import tempfile
import time
from typing import Any

import pytest

from quiltd.client import QuiltClient
from tests.system.conftest import BUS, BUSYBOX_TARBALL, REPO

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


def _running(sandbox: Any, name: str) -> None:
    deadline = time.monotonic() + 10
    while json.loads(ctl(sandbox, "inspect", name).stdout)[0]["State"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_stats_shows_cpu_memory_tasks_and_network(sandbox: Any, busybox_image: str, name: str) -> None:
    # Busy on one CPU, after a connection attempt to its gateway (sent, so counted as its TX).
    ctl(sandbox, "run", "-d", "--name", name, "--memory", "64M", "busybox", "sh", "-c",
        "echo x | nc -w 1 10.88.0.1 9; while :; do :; done")
    try:
        _running(sandbox, name)
        time.sleep(2)
        table = ctl(sandbox, "stats", "--no-stream", name).stdout.decode().splitlines()
        assert table[0].split() == ["ID", "NAME", "CPU", "%", "MEM", "USAGE", "/", "LIMIT", "MEM", "%",
                                    "NET", "IO", "(RX", "/", "TX)", "PIDS"]
        assert len(table) == 2 and table[1].split()[1] == name and "/ 64.0 MiB" in table[1]
        (row,) = json.loads(ctl(sandbox, "stats", "--no-stream", "--format", "json", name).stdout)
        assert row["name"] == name and row["memory_limit_bytes"] == 64 << 20
        assert row["cpu_percent"] > 5 and 0 < row["memory_bytes"] < 64 << 20, row
        assert row["tasks"] >= 2 and row["net_tx_bytes"] > 0, row
        # Without names: every running container, this one among them.
        everyone = json.loads(ctl(sandbox, "stats", "--no-stream", "--json").stdout)
        assert name in [r["name"] for r in everyone]
        # Streaming: a frame per interval until interrupted; JSON Lines when piped.
        streamed = sandbox.run(["timeout", "-s", "INT", "3.5", QUILTCTL, "stats", "--interval", "1", "--json",
                                name], check=False)
        frames = [json.loads(line) for line in streamed.stdout.decode().splitlines()]
        assert len(frames) >= 2 and all(f[0]["name"] == name for f in frames), streamed
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)


def test_top_lists_the_containers_processes(sandbox: Any, busybox_image: str, name: str) -> None:
    # "; true": else sh would exec the last sleep and be gone from the list.
    ctl(sandbox, "run", "-d", "--name", name, "busybox", "sh", "-c", "sleep 1001 & sleep 1002; true")
    try:
        _running(sandbox, name)
        deadline = time.monotonic() + 10
        while len(listed := json.loads(ctl(sandbox, "top", "--json", name).stdout)) < 4:
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
        by_command = {p["command"]: p for p in listed}
        shell = by_command["sh -c sleep 1001 & sleep 1002; true"]
        # PIDs as the container sees them; the container's init is PID 1.
        assert 1 in [p["pid"] for p in listed] and shell["ppid"] == 1
        assert by_command["sleep 1001"]["ppid"] == by_command["sleep 1002"]["ppid"] == shell["pid"]
        assert {p["user"] for p in listed} == {"root"}
        table = ctl(sandbox, "top", name).stdout.decode().splitlines()
        assert table[0].split() == ["USER", "PID", "PPID", "%CPU", "ELAPSED", "TIME", "COMMAND"]
        assert any(line.endswith("sleep 1002") for line in table[1:]), table
        ctl(sandbox, "stop", "-t", "1", name)
        stopped = ctl(sandbox, "top", name, check=False)
        assert stopped.returncode == 1 and b"not running (InvalidState)" in stopped.stderr
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)


def _contents(f: Any) -> bytes:
    f.seek(0)
    return bytes(f.read())


def test_events_as_lines_and_json_with_filters(sandbox: Any, busybox_image: str, name: str) -> None:
    ready = f"{name[:40]}-ready"
    with tempfile.TemporaryFile() as as_json, tempfile.TemporaryFile() as as_lines:
        # Each in a process group of its own, which the interrupt goes to, as a Ctrl-C would.
        watchers = [
            subprocess.Popen(sandbox.argv([QUILTCTL, "events", "--format", "json", "--filter",
                                           f"container={name}", "--filter", f"container={ready}"]),
                             stdout=as_json, start_new_session=True),
            subprocess.Popen(sandbox.argv([QUILTCTL, "events", "--filter", "type=container",
                                           "--filter", "event=removed"]),
                             stdout=as_lines, start_new_session=True),
        ]
        try:
            # Until both listen: a container made and removed shows in both.
            deadline = time.monotonic() + 20
            while True:
                ctl(sandbox, "create", "--name", ready, "busybox", "true")
                ctl(sandbox, "rm", ready)
                time.sleep(0.3)
                if all(ready.encode() in _contents(f) for f in (as_json, as_lines)):
                    break
                assert time.monotonic() < deadline
            as_json.seek(0, io.SEEK_END)
            start = as_json.tell()
            cid = ctl(sandbox, "run", "-d", "--name", name, "busybox", "sh", "-c", "exit 3").stdout.decode()
            cid = cid.strip()
            ctl(sandbox, "wait", name)
            ctl(sandbox, "rm", name)
            deadline = time.monotonic() + 10
            while True:
                as_json.seek(start)
                events = [json.loads(line) for line in as_json.read().splitlines()]
                if [e["action"] for e in events][-1:] == ["removed"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for w in watchers:
                os.killpg(w.pid, signal.SIGINT)
                w.wait(10)
        assert {e["id"] for e in events} == {cid} and {e["type"] for e in events} == {"container"}
        actions = [e["action"] for e in events]
        assert actions[0] == "created" and actions[-2:] == ["exited", "removed"], actions
        assert "running" in actions
        assert events[-2]["attributes"] == {"name": name, "exit_code": 3}
        lines = _contents(as_lines).decode().splitlines()
        (line,) = [x for x in lines if x.endswith(f"(name={name})")]
        assert line.split(" ", 1)[1] == f"container removed {cid} (name={name})", lines
        assert all(" container removed " in x for x in lines), lines


def test_listing_and_inspect_verbs_take_format_json(sandbox: Any, busybox_image: str, name: str) -> None:
    ctl(sandbox, "create", "--name", name, "busybox", "true")
    try:
        for args in (["ps", "-a"], ["images"], ["images", "ls"], ["volume", "ls"], ["network", "ls"],
                     ["network"], ["inspect", name]):
            for flag in (["--format", "json"], ["--json"]):
                out = ctl(sandbox, *args, *flag).stdout
                assert isinstance(json.loads(out), list), (args, flag, out)
        assert "Version" in json.loads(ctl(sandbox, "info", "--format", "json").stdout)
        assert json.loads(ctl(sandbox, "images", "--json").stdout)[0].keys() >= {"name", "id"}
    finally:
        ctl(sandbox, "rm", name)


def test_import_shows_progress_on_a_terminal_only(sandbox: Any, busybox_image: str) -> None:
    # script(1) gives quiltctl a terminal, as a user's shell does.
    shown = sandbox.run(["script", "-qec", f"{QUILTCTL} images import bb-bar {BUSYBOX_TARBALL}", "/dev/null"])
    try:
        out = shown.stdout.decode()
        assert "\rbb-bar [" + "#" * 30 + "] 100%  " in out and " KiB / " in out, out
    finally:
        ctl(sandbox, "images", "rm", "bb-bar")
    piped = ctl(sandbox, "images", "import", "bb-bar", BUSYBOX_TARBALL)
    try:
        assert piped.stderr == b"" and len(piped.stdout.decode().strip()) == 64
    finally:
        ctl(sandbox, "images", "rm", "bb-bar")


API_DOC = REPO / "docs/api.md"
BIG_TAR = "/var/tmp/big.tar"  # the path docs/api.md's busctl --timeout example imports


def test_long_import_outlasts_the_clients_timeout_and_busctls(sandbox: Any, busybox_image: str) -> None:
    """An import longer than a call's timeout still succeeds, as docs/api.md says; busctl needs --timeout."""
    big = sandbox.host_path(BIG_TAR)
    with tarfile.open(big, "w") as tar:  # 128 MiB that does not compress, as a real layer
        for i in range(4):
            data = os.urandom(32 << 20)
            member = tarfile.TarInfo(f"blob{i}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    try:
        # Far below the import's time (0.48 s on an idle host, in one CI run),
        # so the import outlasts it by a wide margin however fast the host.
        short = 0.05

        async def import_with_a_short_timeout() -> float:
            q = await QuiltClient.connect(sandbox.bus_address, timeout=short)
            try:
                started = time.monotonic()
                await q.import_image("big", BIG_TAR)
                took = time.monotonic() - started
                q.timeout = 60
                await q.remove_image("big")
                return took
            finally:
                q.close()

        took = asyncio.run(import_with_a_short_timeout())
        assert took > short  # longer than the client's timeout, which an import does not get

        # busctl's own timeout cuts the call off (quiltd finishes it anyway)...
        cut = sandbox.run(["busctl", "--timeout=0.1", "call", *BUS, "ImportImage", "ssa{sv}", "cut", BIG_TAR,
                           "0"], check=False)
        assert cut.returncode != 0 and b"Connection timed out" in cut.stderr, cut
        deadline = time.monotonic() + 60
        while '"cut"' not in sandbox.run(["busctl", "call", *BUS, "ListImages"]).stdout.decode():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        sandbox.run(["busctl", "call", *BUS, "RemoveImage", "s", "cut"])
        # ...and the documented command, as written, waits for it.
        doc = API_DOC.read_text().splitlines()
        (command,) = [line for line in doc if line.startswith("busctl --timeout=")]
        done = sandbox.run(["sh", "-c", command], timeout=300)
        assert done.stdout.decode().startswith('s "'), done
        sandbox.run(["busctl", "call", *BUS, "RemoveImage", "s", "big"])
    finally:
        big.unlink()


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
