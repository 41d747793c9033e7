"""User namespaces: a container's root as an unprivileged range of host ids.

A container created with userns=true gets RANGE_SIZE ids of its own: its
ids 0..65535 are host ids base..base+65535, for uids and gids alike. The
ranges come from the block systemd sets aside for containers (0x00080000 to
0x6FFFFFFF), RANGE_SIZE apart, so no range overlaps another or a regular
user's ids. The store keeps each container's base, from its create to its
removal.

Only the container's processes run in the namespace. Its other namespaces
(mount, PID, network, UTS, IPC, cgroup) are made by host root before it joins,
so they stay owned by the host's user namespace: root in the container holds
capabilities over its own files and nothing else. It cannot mount, change
the network or set the hostname, even with a capability in its set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from quiltd import linux

RANGE_SIZE = 65536
FIRST_BASE = 0x00080000
LAST_BASE = 0x6FFF0000  # its range ends at 0x6FFFFFFF, the block's last id


def free_base(used: Iterable[int]) -> int | None:
    """The lowest base not in used, or None when every range is taken."""
    taken = set(used)
    return next((b for b in range(FIRST_BASE, LAST_BASE + 1, RANGE_SIZE) if b not in taken), None)


def create(base: int) -> int:
    """A descriptor of a new user namespace that maps ids 0..65535 to base..base+65535.

    A process cannot write a map of a whole range for its own namespace; its
    parent, root outside, can. So a child makes the namespace and waits while
    this process writes the maps and takes hold of it.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            linux.unshare(linux.CLONE_NEWUSER)
            # Its pid as this /proc names it: the caller may be in another
            # PID namespace than the one /proc belongs to.
            os.write(ready_w, os.readlink("/proc/self").encode())
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        pid = os.read(ready_r, 32).decode()
        if not pid:
            raise OSError(0, "cannot make a user namespace: the kernel refused unshare(CLONE_NEWUSER)")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {base} {RANGE_SIZE}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)


def enter(userns_fd: int) -> None:
    """Joins the user namespace as its root (host id base), with no supplementary groups.

    Call it last: once inside, this process has no privilege over anything
    made outside, its other namespaces included.
    """
    linux.setns(userns_fd, linux.CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def foreign(pid: int) -> int | None:
    """A descriptor of pid's user namespace when it is not this process's own, else None."""
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(fd).st_ino == os.stat("/proc/self/ns/user").st_ino:
        os.close(fd)
        return None
    return fd
