"""Opening files with a caller's credentials, so the daemon reads only what its caller could.

quiltd runs as root. A path a member names (an image to import) must be
opened as that member, not checked first and opened as root after (the path
could change between the two). So the open runs in a thread of its own
whose filesystem ids and groups are the caller's: Linux keeps credentials
per thread, and the thread ends right after, so no other work ever runs
with them. The raw system calls are used on purpose: glibc's setgroups
changes every thread of the process, and setfsuid/setfsgid change only the
calling one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable

from quiltd.access import Credentials
from quiltd.fs.resolve import openat2

# (dir_fd, path, flags, resolve) -> fd: how an import opens a file, see ociimage.
Opener = Callable[[int, str, int, int], int]

AT_FDCWD = -100
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159}
_libc = ctypes.CDLL(None, use_errno=True)


def _open(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    if resolve:
        return openat2(dir_fd, path, flags, resolve)
    return os.open(path, flags | os.O_CLOEXEC, dir_fd=None if dir_fd == AT_FDCWD else dir_fd)


def _become(creds: Credentials) -> None:
    """This thread's filesystem credentials become the caller's: ids, groups, no root privilege."""
    number = _SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise OSError(0, f"opening files as a caller is not supported on {platform.machine()}")
    gids = sorted(creds.gids)
    array = (ctypes.c_uint32 * max(1, len(gids)))(*gids)
    if _libc.syscall(ctypes.c_long(number), ctypes.c_size_t(len(gids)), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setgroups: {os.strerror(err)}")
    # Any of the caller's groups will do: the kernel checks a file's group
    # against the fsgid and the supplementary groups alike.
    fsgid = gids[0] if gids else 65534
    _libc.setfsgid(ctypes.c_uint32(fsgid))
    # Leaving fsuid 0 drops this thread's file capabilities (DAC override and
    # the like): from here on the kernel checks permissions as for the caller.
    _libc.setfsuid(ctypes.c_uint32(creds.uid))
    # The two calls report no error; asking back (-1 changes nothing) does.
    if _libc.setfsuid(ctypes.c_uint32(0xFFFFFFFF)) != creds.uid or \
            _libc.setfsgid(ctypes.c_uint32(0xFFFFFFFF)) != fsgid:
        raise OSError(0, "could not take the caller's filesystem ids")


def open_as(creds: Credentials, dir_fd: int, path: str, flags: int, resolve: int = 0) -> int:
    """path (relative to dir_fd, or to the working directory with AT_FDCWD) opened as creds.

    Root's calls open directly. Errors are the OSError the open raised.
    """
    if creds.is_root:
        return _open(dir_fd, path, flags, resolve)
    outcome: list[int | BaseException] = []

    def work() -> None:
        try:
            _become(creds)
            outcome.append(_open(dir_fd, path, flags, resolve))
        except BaseException as e:
            outcome.append(e)

    # A new thread each time: its credentials end with it.
    thread = threading.Thread(target=work, name="quiltd-open-as-caller", daemon=True)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def opener(creds: Credentials) -> Opener:
    return lambda dir_fd, path, flags, resolve: open_as(creds, dir_fd, path, flags, resolve)
