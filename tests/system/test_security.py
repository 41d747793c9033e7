"""The defaults a hostile process meets inside a container, checked from inside and outside."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from quiltd.runtime.security import DEFAULT_CAPABILITY_MASK
from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system

PROBE = (Path(__file__).parent / "probe.sh").read_text()


def journal_lines(sandbox: Any, cid: str) -> list[str]:
    """The container's output, once its last line ("done N") has reached the journal."""
    deadline = time.monotonic() + 10
    while True:
        out = sandbox.run(["journalctl", f"QUILT_CONTAINER_ID={cid}", "-o", "cat", "--no-pager"])
        lines = out.stdout.decode().splitlines()
        if any(line.startswith("done ") for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def run_to_end(quilt: Any, name: str, image: str, command: list[str], **options: Any) -> tuple[str, int]:
    async def scenario() -> tuple[str, int]:
        async with quilt() as q:
            cid, _ = await q.create(name, image, command, **options)
            try:
                state, code = await q.wait(name, 60_000_000)
                assert state == "exited"
                return str(cid), int(code)
            finally:
                await q.remove(name, force=True)

    return run(scenario())


async def _running(q: Any, name: str) -> bool:
    return bool((await q.info(name))["State"] == "running")


@pytest.mark.parametrize("userns", [False, True])
def test_probe_inside_a_container(sandbox: Any, quilt: Any, name: str, userns: bool) -> None:
    cid, code = run_to_end(quilt, name, "busybox", ["sh", "-c", PROBE], userns=userns,
                           env=[f"WANT_CAPS={DEFAULT_CAPABILITY_MASK:016x}", f"USERNS={int(userns)}"])
    lines = journal_lines(sandbox, cid)
    failed = [line for line in lines if line.startswith("not ok")]
    assert not failed, "\n".join(lines)
    assert code == 0, "\n".join(lines)
    assert lines[-1] == "done 0"
    # Every check ran: a probe cut short (by a reboot that worked, say) has fewer.
    assert sum(line.startswith("ok ") for line in lines) >= 45, "\n".join(lines)


@pytest.mark.parametrize("userns", [False, True])
def test_probe_through_exec(quilt: Any, name: str, userns: bool) -> None:
    # An exec is forked by the container's init, not by the container's
    # command: it must come out exactly as restricted.
    async def scenario() -> tuple[int, str]:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"], userns=userns)
            await eventually(lambda: _running(q, name))
            env = [f"WANT_CAPS={DEFAULT_CAPABILITY_MASK:016x}", f"USERNS={int(userns)}"]
            code, out, err = await q.exec(name, ["sh", "-c", PROBE], env=env, max_output=1 << 20)
            await q.remove(name, force=True)
            return code, (out + err).decode()

    code, output = run(scenario())
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("not ok")], output
    assert code == 0 and lines[-1] == "done 0", output
    assert sum(line.startswith("ok ") for line in lines) >= 45, output


def test_scope_device_policy_is_closed(sandbox: Any, quilt: Any, name: str) -> None:
    async def start() -> str:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"])
            await eventually(lambda: _running(q, name))
            return str(cid)

    async def remove() -> None:
        async with quilt() as q:
            await q.remove(name, force=True)

    cid = run(start())
    try:
        unit = f"quilt-{cid}.scope"
        shown = sandbox.run(["systemctl", "show", unit, "-p", "DevicePolicy", "-p", "DeviceAllow"])
        props = shown.stdout.decode()
        assert "DevicePolicy=closed" in props
        for node in ("/dev/null", "/dev/urandom", "/dev/ptmx", "char-pts"):
            assert node in props
        # What the kernel enforces on cgroup v1: the devices controller's list.
        listed = sandbox.run(["cat", f"/sys/fs/cgroup/devices/quilt.slice/{unit}/devices.list"], check=False)
        if listed.returncode == 0:
            # systemd always adds its "inaccessible" nodes, 0:0, which no driver backs.
            entries = {line for line in listed.stdout.decode().splitlines() if " 0:0 " not in line}
            assert entries == {"c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                               "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm"}, listed.stdout
    finally:
        run(remove())


def test_init_memory_per_container(sandbox: Any, quilt: Any, name: str) -> None:
    """Init is a forked copy of the fork server: most of its pages stay shared."""
    async def start() -> int:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await eventually(lambda: _running(q, name))
            return int((await q.info(name))["Pid"])

    async def remove() -> None:
        async with quilt() as q:
            await q.remove(name, force=True)

    pid = run(start())
    try:
        rollup = sandbox.run(["cat", f"/proc/{pid}/smaps_rollup"]).stdout.decode()
        kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
        print(f"container init {pid}: Rss {kib['Rss']} kB, Pss {kib['Pss']} kB, "
              f"Private_Dirty {kib['Private_Dirty']} kB")
        assert kib["Pss"] < 8 * 1024, rollup
        assert kib["Private_Dirty"] < 4 * 1024, rollup
    finally:
        run(remove())


SOCKPROBE = (Path(__file__).parent / "sockprobe.py").read_text()


def test_vsock_is_refused_through_every_abi(sandbox: Any, quilt: Any, name: str) -> None:
    """vsock is not namespaced: a container that opens one talks to the host and the hypervisor."""
    cid, code = run_to_end(quilt, name, "host", ["python3", "-c", SOCKPROBE])
    lines = journal_lines(sandbox, cid)
    assert code == 0 and lines[-1] == "done 0", lines
    got = dict(line.split(" ", 1) for line in lines[:-1])
    refused = {"EAFNOSUPPORT", "EPERM"}
    for door in ("vsock", "vsock-high-bits", "vsock-socketpair", "vsock-i386", "vsock-i386-socketcall",
                 "packet", "tipc", "alg"):
        assert got[door] in refused, (door, lines)
    # This kernel may have no x32 ABI at all (ENOSYS); either way no socket.
    assert got["vsock-x32"] in refused | {"ENOSYS"}, lines
    # What a container needs still works, through the i386 ABI too.
    assert (got["inet"], got["unix"], got["inet-i386"]) == ("socket", "socket", "socket"), lines


IO_URING_PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
for name, nr, args in (("io_uring_setup", 425, (8, params)), ("io_uring_enter", 426, (0, 1, 0, 0, None, 0)),
                       ("io_uring_register", 427, (0, 0, None, 0))):
    rc = libc.syscall(nr, *args)
    print(name, rc if rc >= 0 else errno.errorcode[ctypes.get_errno()])
print("done 0")
"""


def test_io_uring_is_refused(sandbox: Any, quilt: Any, name: str) -> None:
    """io_uring runs system calls in kernel workers, out of seccomp's sight."""
    cid, code = run_to_end(quilt, name, "host", ["python3", "-c", IO_URING_PROBE])
    lines = journal_lines(sandbox, cid)
    assert code == 0 and lines[-1] == "done 0", lines
    assert lines[:-1] == ["io_uring_setup EPERM", "io_uring_enter EPERM", "io_uring_register EPERM"], lines


RAW_PROBE = """
import socket
def attempt(*args):
    try:
        socket.socket(*args).close()
        return "socket"
    except OSError as e:
        return e.strerror
print("raw-icmp", attempt(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
print("raw-ip", attempt(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
print("packet", attempt(socket.AF_PACKET, socket.SOCK_RAW, 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(5)
s.sendto(bytes([8, 0, 0xf7, 0xff, 0, 0, 0, 0]), ("10.88.0.1", 0))
print("echo-socket", "reply" if s.recvfrom(64)[0][0] == 0 else "no reply")
"""


def test_no_raw_sockets_by_default_but_ping_works(sandbox: Any, quilt: Any, name: str) -> None:
    """Without CAP_NET_RAW no packet can be forged; ICMP echo sockets still ping."""
    script = f"python3 -c '{RAW_PROBE}'; busybox ping -c1 -W2 10.88.0.1 >/dev/null 2>&1; echo busybox-ping $?"
    cid, code = run_to_end(quilt, name, "host", ["sh", "-c", script + "; echo done 0"])
    lines = journal_lines(sandbox, cid)
    assert code == 0 and lines[-1] == "done 0", lines
    assert lines[:-1] == ["raw-icmp Operation not permitted", "raw-ip Operation not permitted",
                          "packet Address family not supported by protocol", "echo-socket reply",
                          "busybox-ping 1"], lines  # busybox's ping wants a raw socket


def test_quiltd_service_is_hardened(sandbox: Any) -> None:
    """systemd-analyze rates the unit as docs/security.md says, and its settings are in force."""
    sandbox.run(["systemctl", "start", "quiltd"])
    report = sandbox.run(["systemd-analyze", "security", "quiltd.service", "--no-pager"], check=False)
    text = report.stdout.decode()
    (overall,) = [line for line in text.splitlines() if "Overall exposure level" in line]
    assert float(overall.split(":")[1].split()[0]) <= 7.1, overall
    properties = ("NoNewPrivileges", "RestrictRealtime", "ProtectClock", "CapabilityBoundingSet", "MainPID")
    shown = sandbox.run(["systemctl", "show", "quiltd", *(f"-p{p}" for p in properties)]).stdout.decode()
    assert "NoNewPrivileges=yes" in shown and "ProtectClock=yes" in shown, shown
    # No setting may give quiltd a mount namespace of its own: it must see
    # the host's mounts as they are, also those made after it started.
    pid = next(x for x in shown.splitlines() if x.startswith("MainPID=")).split("=")[1]
    namespaces = sandbox.run(["readlink", f"/proc/{pid}/ns/mnt", "/proc/1/ns/mnt"]).stdout.decode().split()
    assert namespaces[0] == namespaces[1], namespaces
    capabilities = next(x for x in shown.splitlines() if x.startswith("CapabilityBoundingSet="))
    assert "cap_sys_admin" in capabilities and "cap_sys_module" not in capabilities, capabilities
