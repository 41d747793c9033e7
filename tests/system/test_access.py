"""Who may use quiltd, on the bus and on its own socket; and the socket itself."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiltd.client import QuiltClient, StateChange
from tests.system.conftest import BUS, eventually, run

pytestmark = pytest.mark.system

SOCKET = "/run/quilt/quiltd.sock"
MEMBER = "quilt-member-t"
OPEN_POLICY = "/etc/dbus-1/system.d/zz-quilt-test-open.conf"
DENIED = "may not call"  # only quiltd's own AccessDenied says this
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
AS_MEMBER = ("runuser", "-u", MEMBER, "--")
AS_ROOT: tuple[str, ...] = ()
TRANSPORTS = {"bus": (), "socket": (f"--address=unix:path={SOCKET}",)}


def reload_dbus(sandbox: Any) -> None:
    sandbox.run(["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                 "ReloadConfig"])


@pytest.fixture(scope="module")
def member(sandbox: Any) -> Iterator[str]:
    """A user in group quilt (the group made here unless it exists), known to the bus's policy."""
    made_group = sandbox.run(["getent", "group", "quilt"], check=False).returncode != 0
    if made_group:
        sandbox.run(["groupadd", "--system", "quilt"])
    sandbox.run(["useradd", "--no-create-home", "--groups", "quilt", MEMBER])
    reload_dbus(sandbox)  # the bus resolves group names when it loads its policy
    try:
        yield MEMBER
    finally:
        sandbox.run(["userdel", MEMBER], check=False)
        if made_group:
            sandbox.run(["groupdel", "quilt"], check=False)
        reload_dbus(sandbox)


@pytest.fixture(scope="module")
def quilt_socket(sandbox: Any, busybox_image: str) -> Iterator[str]:
    """quiltd.socket listening, and quiltd holding it."""
    # systemd refuses to start a socket whose service already runs.
    sandbox.run(["systemctl", "stop", "quiltd"])
    sandbox.run(["systemctl", "start", "quiltd.socket", "quiltd"])
    try:
        yield SOCKET
    finally:
        sandbox.run(["systemctl", "stop", "quiltd.socket", "quiltd"], check=False)


def call(sandbox: Any, who: tuple[str, ...], transport: str, *args: str) -> Any:
    return sandbox.run([*who, "busctl", *TRANSPORTS[transport], *args], check=False)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("who", ["root", "member"])
def test_root_and_members_may_call(sandbox: Any, member: str, quilt_socket: str, transport: str,
                                   who: str) -> None:
    as_user = AS_ROOT if who == "root" else AS_MEMBER
    result = call(sandbox, as_user, transport, "call", *BUS, "GetSystemInfo")
    assert result.returncode == 0, result.stderr
    assert b'"Version"' in result.stdout


def test_others_are_refused_on_the_socket(sandbox: Any, member: str, quilt_socket: str) -> None:
    # Refused at accept, from SO_PEERCRED: quiltd reads nothing a non-member sends.
    for args in (("introspect", BUS[0], BUS[1]), ("call", *BUS, "GetSystemInfo")):
        result = call(sandbox, AS_NOBODY, "socket", *args)
        assert result.returncode != 0
    journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
    assert "direct connection refused: uid 65534 is neither root nor in group quilt" in journal


def test_others_may_introspect_only(sandbox: Any, member: str, quilt_socket: str) -> None:
    transport = "bus"
    introspect = call(sandbox, AS_NOBODY, transport, "introspect", BUS[0], BUS[1])
    assert introspect.returncode == 0, introspect.stderr
    assert b"CreateContainer" in introspect.stdout
    for args in (("GetSystemInfo",), ("CreateContainer", "ssasa{sv}", "nope", "busybox", "1", "true", "0")):
        result = call(sandbox, AS_NOBODY, transport, "call", *BUS, *args)
        assert result.returncode != 0
        assert b"denied" in result.stderr.lower() or DENIED.encode() in result.stderr
    props = call(sandbox, AS_NOBODY, transport, "get-property", BUS[0], BUS[1], BUS[2], "Version")
    assert props.returncode != 0
    listed = call(sandbox, AS_ROOT, transport, "call", *BUS, "ListContainers", "a{sv}", "1", "name", "s",
                  "nope")
    assert listed.stdout.decode().strip() == "a(sssso) 0"  # the denied create made nothing


def test_the_daemon_checks_calls_the_bus_lets_through(sandbox: Any, member: str) -> None:
    # Loosen the bus policy: quiltd's own check must still turn nobody away.
    sandbox.run(["sh", "-c", 'cat > "$1"', "sh", OPEN_POLICY], input=(
        b'<busconfig><policy context="default"><allow send_destination="org.quilt.Quilt1"/>'
        b"</policy></busconfig>\n"))
    try:
        reload_dbus(sandbox)
        for member_call in ("org.quilt.Quilt1.Manager.GetSystemInfo", "org.quilt.Quilt1.Manager.ListImages"):
            result = sandbox.run([*AS_NOBODY, "dbus-send", "--system", "--print-reply", f"--dest={BUS[0]}",
                                  BUS[1], member_call], check=False)
            assert result.returncode != 0
            assert result.stderr.decode().startswith(
                "Error org.quilt.Quilt1.Error.AccessDenied: uid 65534 may not call"), result.stderr
        journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
        assert "denied org.quilt.Quilt1.Manager.ListImages to uid 65534" in journal
        ok = sandbox.run([*AS_MEMBER, "dbus-send", "--system", "--print-reply", f"--dest={BUS[0]}", BUS[1],
                          "org.quilt.Quilt1.Manager.ListImages"])
        assert b"busybox" in ok.stdout
    finally:
        sandbox.run(["rm", "-f", OPEN_POLICY])
        reload_dbus(sandbox)


def test_connecting_to_the_socket_starts_quiltd(sandbox: Any, quilt_socket: str) -> None:
    sandbox.run(["systemctl", "stop", "quiltd"])
    assert sandbox.run(["systemctl", "is-active", "quiltd"], check=False).stdout.strip() == b"inactive"
    out = call(sandbox, AS_ROOT, "socket", "call", *BUS, "GetSystemInfo")
    assert out.returncode == 0, out.stderr
    assert sandbox.run(["systemctl", "is-active", "quiltd"]).stdout.strip() == b"active"
    assert b"TriggeredBy: \xe2\x97\x8f quiltd.socket" in sandbox.run(
        ["systemctl", "status", "quiltd", "--no-pager"], check=False).stdout


def test_a_python_client_runs_a_container_over_the_socket(sandbox: Any, quilt_socket: str, name: str) -> None:
    address = f"unix:path={sandbox.host_path(SOCKET)}"

    async def scenario() -> None:
        client = await QuiltClient.connect(address)
        try:
            seen: list[StateChange] = []
            await client.watch_states(lambda s: seen.append(s) if s.name == name else None)
            await client.create(name, "busybox", ["sh", "-c", "exit 7"])
            assert await client.wait(name, 10_000_000) == ("exited", 7)

            async def all_seen() -> bool:
                return [s.state for s in seen][-1:] == ["exited"]

            await eventually(all_seen)
            assert [s.state for s in seen] == ["created", "starting", "running", "exited"]
            info = await client.info(name)
            assert info["ExitCode"] == 7
            await client.remove(name)
        finally:
            client.close()

    run(scenario())


def test_quiltd_started_by_hand_serves_the_bus(sandbox: Any, busybox_image: str) -> None:
    # Neither socket nor activation: a plain process that owns the name itself.
    sandbox.run(["systemctl", "stop", "quiltd.socket", "quiltd"])
    pidfile = "/run/quiltd-by-hand.pid"
    hand = subprocess.Popen(sandbox.argv(["sh", "-c", f"echo $$ > {pidfile}; exec /usr/bin/quiltd"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def ready() -> bool:
            # NameHasOwner, because a call would bus-activate quiltd.service.
            owned = sandbox.run(["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                 "org.freedesktop.DBus", "NameHasOwner", "s", BUS[0]]).stdout.decode()
            assert hand.poll() is None, hand.stderr.read() if hand.stderr else b""
            return owned.strip() == "b true"

        run(eventually(ready))
        out = sandbox.run(["busctl", "call", *BUS, "ListImages"]).stdout.decode()
        assert '"busybox"' in out
        assert sandbox.run(["systemctl", "is-active", "quiltd"], check=False).stdout.strip() == b"inactive"
        assert sandbox.run(["test", "-e", SOCKET], check=False).returncode != 0
    finally:
        sandbox.run(["sh", "-c", f'kill -TERM "$(cat {pidfile})" && rm {pidfile}'], check=False)
        try:
            hand.wait(timeout=20)
        except subprocess.TimeoutExpired:
            hand.kill()
            hand.wait()
    assert hand.returncode == 0, hand.stderr.read() if hand.stderr else b""


def test_a_member_sees_output_without_journal_access(sandbox: Any, member: str, busybox_image: str) -> None:
    """quiltctl reads output through quiltd, so group quilt is enough (no systemd-journal, no adm)."""
    quiltctl = str(Path(__file__).resolve().parents[2] / ".venv/bin/quiltctl")
    groups = sandbox.run(["id", "-nG", member]).stdout.decode().split()
    assert "systemd-journal" not in groups and "adm" not in groups
    name = f"member-logs-{secrets.token_hex(3)}"
    # The checkout's interpreter may live under a private home: open the way
    # to it inside the sandbox only (its root is an overlay on a tmpfs).
    blocked = [d for d in Path(sys.executable).resolve().parents
               if d != Path("/") and sandbox.run([*AS_MEMBER, "test", "-x", str(d)], check=False).returncode]
    modes = {d: sandbox.run(["stat", "-c", "%a", str(d)]).stdout.decode().strip() for d in blocked}
    for d in blocked:
        sandbox.run(["chmod", "o+x", str(d)])
    try:
        run = sandbox.run([*AS_MEMBER, quiltctl, "run", "--name", name, "busybox", "sh", "-c",
                           "echo hello; echo oops >&2; exit 4"], check=False)
        assert (run.returncode, run.stdout, run.stderr) == (4, b"hello\n", b"oops\n")
        logs = sandbox.run([*AS_MEMBER, quiltctl, "logs", name])
        assert (logs.stdout, logs.stderr) == (b"hello\n", b"oops\n")
    finally:
        sandbox.run([quiltctl, "rm", "-f", name], check=False)
        for d, mode in modes.items():
            sandbox.run(["chmod", mode, str(d)], check=False)


MONITOR = ("stdbuf", "-oL", "gdbus", "monitor", "--system", "--dest", BUS[0])


class _Monitor:
    """`gdbus monitor` of quiltd's signals as one user, inside the sandbox: a match rule, no eavesdropping."""

    def __init__(self, sandbox: Any, who: tuple[str, ...], tag: str) -> None:
        self._sandbox = sandbox
        self._pidfile = f"/run/quilt-test-monitor-{tag}-{secrets.token_hex(3)}.pid"
        self.lines: list[str] = []
        self._subscribed = threading.Event()
        self._proc = subprocess.Popen(
            sandbox.argv(["sh", "-c", 'echo $$ > "$0"; exec "$@"', self._pidfile, *who, *MONITOR]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # gdbus adds its match before it asks who owns the name, on the same
        # connection: once it prints the owner, every later signal is matched.
        assert self._subscribed.wait(10), self.lines

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "is owned by" in line:
                self._subscribed.set()

    def stop(self) -> None:
        self._sandbox.run(["sh", "-c", 'kill -TERM "$(cat "$0")"; rm -f "$0"', self._pidfile], check=False)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)


def test_only_root_and_members_receive_quiltds_signals(sandbox: Any, member: str, busybox_image: str) -> None:
    # A non-member's match rule for quiltd's signals: the bus must deliver it
    # none, while a member (and root) get every one.
    sandbox.run(["busctl", "call", *BUS, "GetSystemInfo"])  # quiltd owns its name
    name = f"signals-{secrets.token_hex(3)}"
    monitors = {who: _Monitor(sandbox, argv, who) for who, argv in
                (("root", AS_ROOT), ("member", AS_MEMBER), ("nobody", AS_NOBODY))}
    try:
        sandbox.run(["busctl", "call", "--", *BUS, "CreateContainer", "ssasa{sv}", name, "busybox", "1",
                     "true", "0"])
        sandbox.run(["busctl", "call", *BUS, "WaitContainer", "st", name, "10000000"])
        sandbox.run(["busctl", "call", *BUS, "RemoveContainer", "sb", name, "false"])

        async def members_saw_the_removal() -> bool:
            return all(any("ContainerRemoved" in line and name in line for line in monitors[who].lines)
                       for who in ("root", "member"))

        run(eventually(members_saw_the_removal))
    finally:
        for monitor in monitors.values():
            monitor.stop()
    for who in ("root", "member"):
        changes = [line for line in monitors[who].lines if "ContainerStateChanged" in line and name in line]
        assert len(changes) >= 3, (who, monitors[who].lines)
    leaked = [line for line in monitors["nobody"].lines if "org.quilt.Quilt1." in line]
    assert leaked == [], leaked


def test_a_non_member_gets_no_signal_on_the_socket(sandbox: Any, member: str, quilt_socket: str) -> None:
    # On quiltd.sock there is no bus policy: quiltd refuses the connection at
    # accept, before the client can send a match rule.
    result = sandbox.run([*AS_NOBODY, "timeout", "10", "gdbus", "monitor", "--address",
                          f"unix:path={SOCKET}", "--dest", BUS[0]], check=False)
    assert result.returncode not in (0, 124), result
    assert b"ContainerStateChanged" not in result.stdout
