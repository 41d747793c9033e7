"""The test harness itself: what a user checks before trusting tools/sandbox.

The session `sandbox` covers what happens inside. The `cycle` fixture boots a
second sandbox next to it, installs a stand-in checkout from under /tmp, stops
it, and records the host before, during and after, for the host-side checks.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
SANDBOX_CLI = REPO / "tools" / "sandbox"

FORKER = """
import os, time
pids = []
try:
    for _ in range(50):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        pids.append(pid)
    print("forked", len(pids))
except BlockingIOError:
    print("refused after", len(pids))
finally:
    for p in pids:
        os.kill(p, 9)
        os.waitpid(p, 0)
"""


def scope(*props: str, argv: list[str]) -> list[str]:
    """A transient scope in quilt.slice, as quiltd makes them for containers."""
    cmd = ["systemd-run", "--scope", "--quiet", "--slice=quilt.slice"]
    for p in props:
        cmd += ["-p", p]
    return cmd + argv


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout or b"").decode(errors="replace").strip()


# --------------------------------------------------------------------------
# inside the session sandbox


def test_systemd_reports_running(sandbox: Any) -> None:
    state = out(sandbox.run(["systemctl", "is-system-running"], check=False))
    failed = out(sandbox.run(["systemctl", "--failed", "--no-legend"], check=False))
    assert state in ("running", "degraded"), f"state {state!r}, failed units:\n{failed}"


def test_pid1_is_systemd_in_a_container(sandbox: Any) -> None:
    assert out(sandbox.run(["cat", "/proc/1/comm"])) == "systemd"
    assert out(sandbox.run(["systemd-detect-virt", "--container"], check=False)) != "none"
    assert out(sandbox.run(["hostname"])) == sandbox.name


def test_memory_max_gets_allocation_oom_killed(sandbox: Any) -> None:
    hog = ["python3", "-c", "b = bytearray(200 << 20); print('survived')"]
    killed = sandbox.run(scope("MemoryMax=32M", argv=hog), check=False)
    assert b"survived" not in killed.stdout
    # nsenter re-raises the signal that killed its child: SIGKILL from the OOM killer.
    assert killed.returncode in (-9, 137), (killed.returncode, killed.stderr)

    roomy = sandbox.run(scope("MemoryMax=512M", argv=hog), check=False)
    assert (roomy.returncode, out(roomy)) == (0, "survived"), roomy.stderr


def test_tasks_max_refuses_forks_past_the_limit(sandbox: Any) -> None:
    limited = out(sandbox.run(scope("TasksMax=8", argv=["python3", "-c", FORKER])))
    # 8 tasks: the python itself plus 7 children, then fork() fails with EAGAIN.
    assert limited == "refused after 7"
    unlimited = out(sandbox.run(scope(argv=["python3", "-c", FORKER])))
    assert unlimited == "forked 50"


def test_limits_land_in_the_sandboxes_own_cgroup(sandbox: Any) -> None:
    sandbox.run(["systemd-run", "--unit=limit-probe", "--slice=quilt.slice",
                 "-p", "MemoryMax=48M", "-p", "TasksMax=12", "sleep", "60"])
    try:
        # Seen from the host: under /quilt-sandbox/NAME, never at the host's root.
        for hierarchy, knob, want in (
            ("memory", "memory.limit_in_bytes", str(48 << 20)),
            ("pids", "pids.max", "12"),
        ):
            root = Path("/sys/fs/cgroup", hierarchy)
            if not root.is_dir():
                continue  # cgroup v2 host: covered by the kernel enforcing it above
            mine = root / "quilt-sandbox" / sandbox.name / "quilt.slice/limit-probe.service"
            assert (mine / knob).read_text().strip() == want
            assert not (root / "quilt.slice/limit-probe.service").exists()
    finally:
        sandbox.run(["systemctl", "stop", "limit-probe.service"], check=False)


def test_host_reaches_the_sandbox_bus(sandbox: Any, bus_address: str) -> None:
    assert bus_address == f"unix:path=/proc/{sandbox.pid}/root/run/dbus/system_bus_socket"
    # busctl on the host, through /proc/PID/root:
    r = subprocess.run(
        ["busctl", f"--address={bus_address}", "get-property", "org.freedesktop.systemd1",
         "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "Virtualization"],
        capture_output=True, check=True,
    )
    assert out(r).startswith('s "') and out(r) != 's ""'

    # dbus-next on the host, the library quiltd and its clients use:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType, MessageType
    from dbus_next.message import Message

    async def names() -> tuple[list[str], int]:
        bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
        try:
            reply = await bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="ListNames"))
            assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
            uid = await bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
                signature="s", body=[bus.unique_name]))
            assert uid is not None
            return reply.body[0], uid.body[0]
        finally:
            bus.disconnect()  # type: ignore[no-untyped-call]

    listed, uid = asyncio.run(names())
    assert "org.freedesktop.systemd1" in listed
    assert uid == 0


def test_busctl_fixture(busctl: Callable[..., str], sandbox_module: ModuleType) -> None:
    reply = busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.login1")
    assert reply.strip() == "b true"
    with pytest.raises(sandbox_module.CommandFailed) as failure:
        busctl("call", "org.quilt.NoSuchName", "/", "org.quilt.Nope", "Nope")
    assert "org.quilt.NoSuchName" in str(failure.value)  # busctl's stderr is in the message


def test_host_path_sees_inside_files(sandbox: Any) -> None:
    sandbox.run(["sh", "-c", "echo inside > /run/host-path-probe"])
    assert sandbox.host_path("/run/host-path-probe").read_text() == "inside\n"
    assert not Path("/run/host-path-probe").exists()


def test_run_passes_input_and_exit_code(sandbox: Any, sandbox_module: ModuleType) -> None:
    assert sandbox.run(["cat"], input=b"data").stdout == b"data"
    assert sandbox.run(["sh", "-c", "exit 7"], check=False).returncode == 7
    with pytest.raises(subprocess.CalledProcessError):
        sandbox.run(["false"])
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run(["sleep", "30"], timeout=0.5)


def test_cli_run_and_list(sandbox: Any) -> None:
    r = subprocess.run([SANDBOX_CLI, "run", sandbox.name, "--", "sh", "-c", "echo hi; exit 7"],
                       capture_output=True, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (7, b"hi\n"), r.stderr
    listing = subprocess.run([SANDBOX_CLI, "list"], capture_output=True, check=True).stdout
    line = next(ln for ln in listing.decode().splitlines() if ln.startswith(sandbox.name))
    assert line.split()[1:] in (
        [str(sandbox.pid), "running"], [str(sandbox.pid), "degraded"]
    ), line


def test_session_install_of_this_checkout(sandbox: Any) -> None:
    link = out(sandbox.run(["readlink", "/usr/bin/quiltd"]))
    assert link == str(REPO / ".venv/bin/quiltd")
    for src, dst in (
        ("dbus/org.quilt.Quilt1.conf", "/etc/dbus-1/system.d/org.quilt.Quilt1.conf"),
        ("dbus/org.quilt.Quilt1.service",
         "/usr/share/dbus-1/system-services/org.quilt.Quilt1.service"),
        *((f"systemd/{p.name}", f"/etc/systemd/system/{p.name}")
          for p in sorted((REPO / "systemd").glob("*.s*"))
          if p.suffix in (".service", ".socket", ".slice")),
    ):
        if (REPO / src).is_file():  # the daemon's files land as they are written
            assert sandbox.host_path(dst).read_bytes() == (REPO / src).read_bytes(), dst


# --------------------------------------------------------------------------
# a whole boot-install-stop cycle, observed from the host

FAKE_SERVICE = """[D-BUS Service]
Name=org.quilt.Quilt1
Exec=/bin/false
User=root
SystemdService=quiltd.service
"""
FAKE_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy user="root"><allow own="org.quilt.Quilt1"/></policy></busconfig>
"""
FAKE_UNIT = "[Service]\nType=simple\nExecStart=/usr/bin/quiltd\n"
HOST_INSTALL_PATHS = (
    "/etc/dbus-1/system.d/org.quilt.Quilt1.conf",
    "/usr/share/dbus-1/system-services/org.quilt.Quilt1.service",
    "/etc/systemd/system/quiltd.service",
    "/usr/bin/quiltd",
)


def host_links() -> list[str]:
    r = subprocess.run(["ip", "-br", "link"], capture_output=True, check=True, text=True)
    return sorted(line.split()[0] for line in r.stdout.splitlines() if line.strip())


def path_fingerprint(path: str) -> tuple[bool, float, str]:
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return (False, 0.0, "")
    return (True, p.lstat().st_mtime, os.readlink(p) if p.is_symlink() else "")


def pidns_members(pidns: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pidns:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@dataclass
class Cycle:
    name: str = ""
    pid: int = 0
    pidns: str = ""
    links_before: list[str] = field(default_factory=list)
    links_after: list[str] = field(default_factory=list)
    links_inside: str = ""
    markers: dict[Path, bytes] = field(default_factory=dict)
    marker_seen_inside: bool = True
    tmpfiles_clean_rc: int = -1
    install_before: dict[str, tuple[bool, float, str]] = field(default_factory=dict)
    install_after: dict[str, tuple[bool, float, str]] = field(default_factory=dict)
    activatable: str = ""
    fake_quiltd_output: str = ""
    unit_path: str = ""
    states: tuple[str, str] = ("", "")
    cgroup_dirs: list[Path] = field(default_factory=list)
    state_dir: Path = Path("/nonexistent")
    stop_seconds: float = 0.0


@pytest.fixture(scope="module")
def cycle(
    sandbox: Any,
    sandbox_module: ModuleType,
    sandbox_name: Callable[[str], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cycle]:
    c = Cycle(links_before=host_links())
    # Markers in the host's /tmp, one of them 30 days old: exactly what
    # systemd-tmpfiles would delete if it ever ran on the host's root.
    for age_days in (0, 30):
        fd, path = tempfile.mkstemp(prefix="quilt-sandbox-marker-", dir="/tmp")
        os.write(fd, f"marker {age_days}\n".encode())
        os.close(fd)
        old = time.time() - age_days * 86400
        os.utime(path, (old, old))
        c.markers[Path(path)] = f"marker {age_days}\n".encode()

    # A stand-in checkout under /tmp (like a CI clone): the daemon's real
    # files may not exist yet, and this one proves the share works there.
    fake = tmp_path_factory.mktemp("fake-checkout")
    (fake / "dbus").mkdir()
    (fake / "dbus/org.quilt.Quilt1.service").write_text(FAKE_SERVICE)
    (fake / "dbus/org.quilt.Quilt1.conf").write_text(FAKE_POLICY)
    (fake / "systemd").mkdir()
    (fake / "systemd/quiltd.service").write_text(FAKE_UNIT)
    (fake / ".venv/bin").mkdir(parents=True)
    (fake / ".venv/bin/quiltd").write_text("#!/bin/sh\necho fake quiltd\n")
    (fake / ".venv/bin/quiltd").chmod(0o755)
    c.install_before = {p: path_fingerprint(p) for p in HOST_INSTALL_PATHS}

    sb = sandbox_module.Sandbox.start(sandbox_name("cycle"), share=[fake],
                                      die_with_parent=True)
    try:
        c.name, c.pid, c.pidns = sb.name, sb.pid, os.readlink(f"/proc/{sb.pid}/ns/pid")
        c.state_dir = sb.state_dir
        c.cgroup_dirs = [d for d in sandbox_module._cgroup_dirs(sb.name) if d.exists()]
        c.states = (sandbox.system_state(), sb.system_state())
        c.links_inside = out(sb.run(["ip", "-br", "link"]))
        seen = sb.run(["sh", "-c", " || ".join(f"test -e {m}" for m in c.markers)], check=False)
        c.marker_seen_inside = seen.returncode == 0
        c.tmpfiles_clean_rc = sb.run(["systemd-tmpfiles", "--clean"], check=False).returncode

        sb.install(fake)
        c.activatable = out(sb.run(["busctl", "call", "org.freedesktop.DBus",
                                    "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                    "ListActivatableNames"]))
        c.fake_quiltd_output = out(sb.run(["/usr/bin/quiltd"]))
        c.unit_path = out(sb.run(["systemctl", "show", "-P", "FragmentPath", "quiltd.service"]))
        c.install_after = {p: path_fingerprint(p) for p in HOST_INSTALL_PATHS}
    finally:
        t0 = time.monotonic()
        sb.stop()
        c.stop_seconds = time.monotonic() - t0
    c.links_after = host_links()
    try:
        yield c
    finally:
        for marker in c.markers:
            marker.unlink(missing_ok=True)


def test_boot_leaves_host_tmp_alone(cycle: Cycle) -> None:
    for marker, content in cycle.markers.items():
        assert marker.read_bytes() == content, marker
    assert not cycle.marker_seen_inside, "the sandbox's /tmp must be its own tmpfs"
    assert cycle.tmpfiles_clean_rc == 0


def test_boot_and_stop_add_no_host_links(cycle: Cycle) -> None:
    assert cycle.links_after == cycle.links_before
    assert [ln.split()[0] for ln in cycle.links_inside.splitlines()] == ["lo"]


def test_stop_leaves_no_process_cgroup_or_state(cycle: Cycle) -> None:
    assert cycle.stop_seconds < 10
    assert not sandbox_alive(cycle.pid)
    # Its systemd, journald, dbus-daemon...: nothing is left in its pid namespace.
    assert pidns_members(cycle.pidns) == []
    ps = subprocess.run(["pgrep", "-f", "systemd --system"], capture_output=True, text=True)
    assert str(cycle.pid) not in ps.stdout.split()
    assert cycle.cgroup_dirs, "the sandbox should have had its own cgroups"
    assert [d for d in cycle.cgroup_dirs if d.exists()] == []
    assert not cycle.state_dir.exists()


def test_two_sandboxes_run_side_by_side(cycle: Cycle, sandbox: Any) -> None:
    for state in cycle.states:
        assert state in ("running", "degraded")
    assert cycle.pid != sandbox.pid
    assert sandbox.system_state() in ("running", "degraded"), "stopping one must spare the other"


def test_install_writes_inside_only(cycle: Cycle) -> None:
    assert "org.quilt.Quilt1" in cycle.activatable  # dbus reloaded its config
    assert cycle.unit_path == "/etc/systemd/system/quiltd.service"  # daemon-reload ran
    assert cycle.fake_quiltd_output == "fake quiltd"  # the symlink into the checkout works
    assert cycle.install_after == cycle.install_before, "install touched the host"


def test_failed_boot_leaves_nothing(
    sandbox_module: ModuleType, sandbox_name: Callable[[str], str]
) -> None:
    name = sandbox_name("fail")
    with pytest.raises(sandbox_module.SandboxError, match="not ready"):
        sandbox_module.Sandbox.start(name, timeout=0.2, die_with_parent=True)
    assert not (sandbox_module.STATE_ROOT / name).exists()
    assert [d for d in sandbox_module._cgroup_dirs(name) if d.exists()] == []


def sandbox_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
