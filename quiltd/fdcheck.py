"""Checks of descriptors that callers pass in (UNIX_FD arguments) before the daemon hands them on."""

from __future__ import annotations

import fcntl
import os
import stat

from quiltd.errors import InvalidArgument


def check(fd: int, writable: bool, what: str) -> None:
    """fd must be a pipe, a socket or a regular file, open for reading (or writing)."""
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise InvalidArgument(f"bad file descriptor for {what}: {e.strerror}") from None
    # Not a terminal or any other device: a process in a container must not
    # be handed the caller's terminal (whose ioctls reach the caller's session).
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
        raise InvalidArgument(f"the descriptor for {what} must be a pipe, a socket or a regular file")
    access = flags & os.O_ACCMODE
    if writable and access == os.O_RDONLY:
        raise InvalidArgument(f"the descriptor for {what} is not open for writing")
    if not writable and access == os.O_WRONLY:
        raise InvalidArgument(f"the descriptor for {what} is not open for reading")
