"""Nobody may crash or hang quiltd: floods, unread replies, stray descriptors, a locked or
full database, and a kill during an import. Each test is the fault itself."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd import errors
from quiltd.client import QuiltClient
from tests.system.conftest import BUS, eventually, run
from tests.system.test_access import AS_MEMBER, member  # noqa: F401  (the fixture)

pytestmark = pytest.mark.system

SOCKET = "/run/quilt/quiltd.sock"
DATABASE = "/var/lib/quilt/quilt.db"
IMAGES = "/var/lib/quilt/images"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
SANDBOX_PYTHON = "/usr/bin/python3"  # the host's, seen through the sandbox's overlay root
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"
WATCHDOG_DROPIN = "/run/systemd/system/quiltd.service.d/zz-test-watchdog.conf"

# Opens N connections to the socket and holds them; prints how many it got.
FLOOD = r"""
import resource, socket, sys, time
n, hold, auth = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "auth"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect("/run/quilt/quiltd.sock")
        if auth:
            s.sendall(b"\0AUTH EXTERNAL\r\n")
    except OSError:
        s.close()
        continue
    held.append(s)
print(len(held), flush=True)
time.sleep(hold)
"""

# Authenticates as whoever runs it, then sends one message that claims a
# large body, and the body, as fast as quiltd takes it.
MEMORY_FLOOD = r"""
import socket, struct, sys, time
size = int(sys.argv[1])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("/run/quilt/quiltd.sock")
try:
    s.sendall(b"\0AUTH EXTERNAL\r\n")
    answer = s.recv(256)
    if not answer.startswith(b"DATA") and not answer.startswith(b"OK"):
        print("refused", answer, flush=True)
        sys.exit(0)
    if answer.startswith(b"DATA"):
        s.sendall(b"DATA\r\n")
        s.recv(256)
    s.sendall(b"BEGIN\r\n")
    header = b"l\x01\x00\x01" + struct.pack("<III", size, 1, 0)
    s.sendall(header)
    chunk = b"\0" * (1 << 20)
    for _ in range(size >> 20):
        s.sendall(chunk)
    print("sent", flush=True)
except OSError as e:
    print("refused", e, flush=True)
    sys.exit(0)
time.sleep(5)
"""


def systemctl_show(sandbox: Any, prop: str) -> str:
    out: str = sandbox.run(["systemctl", "show", "-p", prop, "--value", "quiltd"]).stdout.decode().strip()
    return out


def main_pid(sandbox: Any) -> int:
    return int(systemctl_show(sandbox, "MainPID"))


def fd_count(sandbox: Any, pid: int) -> int:
    return len(sandbox.run(["ls", f"/proc/{pid}/fd"]).stdout.split())


def rss_kib(sandbox: Any, pid: int) -> int:
    status = sandbox.run(["cat", f"/proc/{pid}/status"]).stdout.decode()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


@pytest.fixture
def quilt_socket(sandbox: Any, busybox_image: str) -> Iterator[str]:
    """quiltd.socket listening and quiltd holding it, with a short watchdog so a stall shows at once."""
    sandbox.run(["systemctl", "stop", "quiltd"])
    sandbox.run(["sh", "-c", 'mkdir -p "${1%/*}" && printf "[Service]\\nWatchdogSec=3\\n" > "$1"', "sh",
                 WATCHDOG_DROPIN])
    sandbox.run(["systemctl", "daemon-reload"])
    sandbox.run(["systemctl", "start", "quiltd.socket", "quiltd"])
    try:
        yield SOCKET
    finally:
        sandbox.run(["systemctl", "stop", "quiltd.socket", "quiltd"], check=False)
        sandbox.run(["rm", "-f", WATCHDOG_DROPIN], check=False)
        sandbox.run(["systemctl", "daemon-reload"], check=False)
        sandbox.run(["systemctl", "reset-failed", "quiltd"], check=False)


def member_call(sandbox: Any, *args: str) -> Any:
    return sandbox.run([*AS_MEMBER, "busctl", f"--address=unix:path={SOCKET}", "--timeout=5", "call", *BUS,
                        *args], check=False, timeout=30)


def flood(sandbox: Any, who: tuple[str, ...], n: int, hold: float, auth: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        sandbox.argv([*who, SANDBOX_PYTHON, "-c", FLOOD, str(n), str(hold), "auth" if auth else "-"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Waits for a flood to end by itself: killing nsenter on the host would not end it inside."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_connection_flood_neither_crashes_nor_blocks_quiltd(sandbox: Any, member: str,  # noqa: F811
                                                               quilt_socket: str) -> None:
    pid, restarts = main_pid(sandbox), systemctl_show(sandbox, "NRestarts")
    attackers = [flood(sandbox, AS_NOBODY, 1100, 8, auth=False),
                 flood(sandbox, AS_NOBODY, 1100, 8, auth=True)]
    try:
        for attacker in attackers:
            assert attacker.stdout is not None
            assert attacker.stdout.readline().strip(), attacker.stderr.read() if attacker.stderr else b""
        # The floods are held: a member is still served, and quiltd holds no descriptor for them.
        answer = member_call(sandbox, "GetSystemInfo")
        assert answer.returncode == 0, answer.stderr
        assert fd_count(sandbox, pid) < 200
        time.sleep(4)  # past the watchdog's 3 s: a loop that could not ping would be aborted
        answer = member_call(sandbox, "GetSystemInfo")
        assert answer.returncode == 0, answer.stderr
    finally:
        for attacker in attackers:
            finish(attacker)
    # A member's own flood stops at its caps: it neither locks out others nor brings quiltd down.
    own = flood(sandbox, AS_MEMBER, 1100, 6, auth=False)
    try:
        assert own.stdout is not None
        assert own.stdout.readline().strip()
        assert fd_count(sandbox, pid) < 400
        answer = sandbox.run(["busctl", f"--address=unix:path={SOCKET}", "--timeout=5", "call", *BUS,
                              "GetSystemInfo"], check=False)
        assert answer.returncode == 0, answer.stderr  # root, another uid
    finally:
        finish(own)
    answer = member_call(sandbox, "GetSystemInfo")
    assert answer.returncode == 0, answer.stderr
    assert (main_pid(sandbox), systemctl_show(sandbox, "NRestarts")) == (pid, restarts)
    journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
    assert "direct connection refused: uid 65534 is neither root nor in group quilt" in journal


def test_a_non_member_cannot_make_quiltd_hold_memory(sandbox: Any, member: str, quilt_socket: str) -> None:  # noqa: F811
    pid = main_pid(sandbox)
    member_call(sandbox, "GetSystemInfo")  # a warm daemon: what it holds anyway is in the baseline
    before = rss_kib(sandbox, pid)
    attacker = subprocess.Popen(sandbox.argv([*AS_NOBODY, SANDBOX_PYTHON, "-c", MEMORY_FLOOD, str(96 << 20)]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attacker.stdout is not None
        said = attacker.stdout.readline()
        assert said, attacker.stderr.read() if attacker.stderr else b""
        grown = rss_kib(sandbox, pid) - before
        assert grown < 8 << 10, f"quiltd grew by {grown} KiB for a non-member ({said!r})"
        assert said.startswith(b"refused")
    finally:
        finish(attacker)
    assert main_pid(sandbox) == pid


def _authenticated(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    assert s.recv(256).startswith(b"OK ")
    s.sendall(b"BEGIN\r\n")
    return s


def test_a_member_that_never_reads_its_replies_is_dropped(sandbox: Any, quilt_socket: str) -> None:
    pid = main_pid(sandbox)
    calls = 3000
    s = _authenticated(str(sandbox.host_path(SOCKET)))
    try:
        try:
            for serial in range(1, calls + 1):
                # Each answer is the manager's introspection data, some 20 KiB.
                s.sendall(Message(destination=BUS[0], path=BUS[1], interface=INTROSPECTABLE,
                                  member="Introspect", serial=serial)._marshall())  # type: ignore[no-untyped-call]
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped before all were sent
        answer = sandbox.run(["busctl", f"--address=unix:path={SOCKET}", "--timeout=10", "call", *BUS,
                              "GetSystemInfo"], check=False)
        assert answer.returncode == 0, answer.stderr  # by now quiltd has read every call
        received, deadline = 0, time.monotonic() + 20
        s.settimeout(2)
        while time.monotonic() < deadline:
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                break
            except TimeoutError:
                pytest.fail(f"still connected after {received} bytes of answers: never dropped")
            if not data:
                break
            received += len(data)
        assert received < 40 << 20, received  # the queue's cap and the socket's buffers, not every answer
    finally:
        s.close()
    assert main_pid(sandbox) == pid
    journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
    assert "bytes of replies and signals unread" in journal


@pytest.mark.parametrize("transport", ["bus", "socket"])
def test_stray_and_bad_descriptors_are_closed_and_refused(sandbox: Any, quilt_socket: str,
                                                          transport: str) -> None:
    address = sandbox.bus_address if transport == "bus" else f"unix:path={sandbox.host_path(SOCKET)}"

    async def scenario() -> None:
        client = await QuiltClient.connect(address)
        r, w = os.pipe()
        try:
            await client.system_info()
            pid = main_pid(sandbox)
            baseline = fd_count(sandbox, pid)
            for _ in range(25):
                # Descriptors a call has no use for.
                await client.call("GetSystemInfo", unix_fds=[r, w])
                with pytest.raises(errors.NoSuchContainer):
                    await client.call("CopyOutEx", "ssha{sv}", "nope", "/", 0, {}, unix_fds=[w, r, w])
                # An index with nothing behind it.
                bad: list[tuple[Any, ...]] = [
                    ("ExecWithFds", "sasa{sv}hhh", "nope", ["true"], {}, 0, 1, 5, [r, w]),
                    ("CopyIn", "ssh", "nope", "/", 1, [r]),
                    ("CopyInEx", "ssha{sv}", "nope", "/", 7, {}, []),
                    ("CopyOut", "ssh", "nope", "/", 2, [w, w]),
                    ("FollowLogs", "sa{sv}h", "nope", {}, 3, [w]),
                    ("CopyOutEx", "ssha{sv}", "nope", "/", 0, {}, []),
                    # A descriptor inside the options: the copy made for the call was never closed.
                    ("CopyOutEx", "ssha{sv}", "nope", "/", 0, {"max_bytes": Variant("h", 1)}, [w, r]),
                    ("CreateContainer", "ssasa{sv}", "nope", "busybox", ["true"],
                     {"user": Variant("v", Variant("h", 0))}, [r]),
                ]
                for member_name, signature, *args, fds in bad:
                    with pytest.raises(errors.InvalidArgument, match="descriptor"):
                        await client.call(member_name, signature, *args, unix_fds=fds)
            await client.system_info()
            assert fd_count(sandbox, pid) <= baseline + 2, (baseline, fd_count(sandbox, pid))
        finally:
            for fd in (r, w):
                os.close(fd)
            client.close()

    run(scenario())


@pytest.mark.parametrize("transport", ["bus", "socket"])
def test_peer_ping_and_machine_id_are_answered(sandbox: Any, quilt_socket: str, transport: str) -> None:
    address = () if transport == "bus" else (f"--address=unix:path={SOCKET}",)
    machine_id = sandbox.run(["cat", "/etc/machine-id"]).stdout.decode().strip()
    for path in (BUS[1], "/"):
        got = sandbox.run(["busctl", *address, "--timeout=5", "call", BUS[0], path, PEER, "GetMachineId"],
                          check=False)
        assert got.returncode == 0, got.stderr
        assert got.stdout.decode().strip() == f's "{machine_id}"'
        ping = sandbox.run(["busctl", *address, "--timeout=5", "call", BUS[0], path, PEER, "Ping"],
                           check=False)
        assert ping.returncode == 0, ping.stderr


class DatabaseLock:
    """Another process holding the write lock of quiltd's database until released."""

    def __init__(self, sandbox: Any) -> None:
        self._proc = subprocess.Popen(
            sandbox.argv(["sqlite3", DATABASE]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(b"BEGIN EXCLUSIVE;\nSELECT 'locked';\n")
        self._proc.stdin.flush()
        assert self._proc.stdout.readline().strip() == b"locked", self._proc.stderr

    def release(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"ROLLBACK;\n.quit\n")
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def test_a_locked_database_answers_busy(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.system_info()
            lock = DatabaseLock(sandbox)
            try:
                started = time.monotonic()
                with pytest.raises(errors.Busy, match="locked"):
                    await q.create(name, "busybox", ["true"])
                assert time.monotonic() - started < 4
                assert (await q.system_info())["Version"]  # reads still work
            finally:
                lock.release()
            await q.create(name, "busybox", ["true"])
            assert await q.wait(name, 10_000_000) == ("exited", 0)
            await q.remove(name)

    run(scenario())


def test_an_exit_while_the_database_is_locked_is_recorded_after(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "sleep 3; exit 7"])

            async def running() -> bool:
                return bool((await q.info(name))["State"] == "running")

            await eventually(running)
            lock = DatabaseLock(sandbox)
            try:
                waiting = asyncio.ensure_future(q.wait(name, 30_000_000))
                await asyncio.sleep(5)  # the command has exited meanwhile
                assert not waiting.done()
                assert (await q.info(name))["State"] == "running"  # not recorded yet
            finally:
                lock.release()
            assert await asyncio.wait_for(waiting, 15) == ("exited", 7)
            info = await q.info(name)
            assert (info["State"], info["ExitCode"]) == ("exited", 7)
            await q.remove(name)

    run(scenario())


def test_an_import_cut_off_by_kill_leaves_no_directory(sandbox: Any, quilt: Any, name: str) -> None:
    tarball = "/var/tmp/quilt-test-large.tar.gz"
    # Zeros compress to almost nothing, and take a while to write out.
    sandbox.run(["sh", "-c", "mkdir -p /var/tmp/large/d && "
                 f"head -c {600 << 20} /dev/zero > /var/tmp/large/d/zero && "
                 f"tar -C /var/tmp/large -czf {tarball} d && rm -rf /var/tmp/large"], timeout=120)
    image = f"large-{name[-6:]}"
    before = set(sandbox.run(["ls", IMAGES]).stdout.decode().split())
    importer = subprocess.Popen(sandbox.argv(["busctl", "--timeout=120", "call", *BUS, "ImportImage",
                                              "ssa{sv}", image, tarball, "0"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async def partial() -> bool:
            now = set(sandbox.run(["ls", IMAGES]).stdout.decode().split())
            return any(len(n) == 16 for n in now - before)

        run(eventually(partial, timeout=30))
        sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
        importer.wait(timeout=30)
        assert importer.returncode != 0  # cut off, not finished
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
        sandbox.run(["rm", "-f", tarball], check=False)

    async def cleaned() -> bool:
        async with quilt() as q:  # bus activation brings quiltd back
            assert image not in [row[0] for row in await q.images()]
        now = set(sandbox.run(["ls", IMAGES]).stdout.decode().split())
        return not any(len(n) == 16 for n in now - before)

    run(eventually(cleaned, timeout=30))
