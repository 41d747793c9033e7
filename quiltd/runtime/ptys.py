"""Pseudo-terminals for execs, made inside the container.

Init opens the master on the container's own devpts instance (its
/dev/pts, mounted newinstance at start), never the host's: the command gets
a terminal of the container, whose ioctls (TIOCSTI included) reach nothing
outside it, and the client gets its master through the daemon. The peer is
taken with TIOCGPTPEER from the master itself, not opened by a path the
container could change.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios

from quiltd import linux

PTMX = "/dev/pts/ptmx"  # in the container's root: its own devpts instance
PTMX_RDEV = os.makedev(5, 2)
# Not in Python's termios module: unlockpt(3) and the peer of a master (Linux 4.13).
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


def open_pair(rows: int, cols: int) -> tuple[int, int]:
    """(master, peer) of a new pseudo-terminal of the container; sized when rows and cols are given."""
    master = os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(master)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != PTMX_RDEV:
            raise OSError(0, f"{PTMX} is not the pty multiplexer")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        if rows and cols:
            linux.set_size(master, rows, cols)
        peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, peer


def take_as_controlling_terminal() -> None:
    """In an exec's child, after setsid and before execve: stdin, the pty's peer, becomes its terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
