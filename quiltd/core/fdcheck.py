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


def check_source(fd: int, what: str) -> None:
    """fd must be a regular file or a directory the caller opened for reading.

    Not an O_PATH descriptor: that only names a file, and reading through it
    would need the daemon to open the file again, with its own rights.
    """
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise InvalidArgument(f"bad file descriptor for {what}: {e.strerror}") from None
    if flags & os.O_PATH or (flags & os.O_ACCMODE) == os.O_WRONLY:
        raise InvalidArgument(f"the descriptor for {what} is not open for reading")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidArgument(f"the descriptor for {what} must be a regular file or a directory "
                              "(an OCI layout); read a pipe into a file first")
