"""Lookups that stay inside a root: openat2 and its resolve flags.

A path that comes from a client or an archive is looked up from a
descriptor of the root it must stay in, never joined into a host path:
with RESOLVE_IN_ROOT a symlink on the way resolves as if the root were
"/", with RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS no link is crossed at
all, and RESOLVE_NO_MAGICLINKS refuses /proc's magic links either way.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables were unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# Links resolve in the root (a container's tree, whose absolute links mean its own "/").
IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
# No link is crossed at all (a tree being built, where no link may be written through).
NO_LINKS = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Filesystems whose files are the kernel's, not a container's: never written or archived.
PROC_SUPER_MAGIC = 0x9FA0
SYSFS_MAGIC = 0x62656572
KERNEL_FILESYSTEMS = frozenset({PROC_SUPER_MAGIC, SYSFS_MAGIC})


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)

# With RESOLVE_IN_ROOT or RESOLVE_BENEATH the kernel answers EAGAIN when a
# rename or mount anywhere on the host raced a ".." in the lookup: it cannot
# prove the walk stayed inside. The walk is safe to repeat; on a busy host
# (many containers starting) the race is common enough to need it.
_OPENAT2_TRIES = 100


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    for _ in range(_OPENAT2_TRIES):
        fd: int = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), path.encode(),
                                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise OSError(err, os.strerror(err), path)


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    return openat2(rootfd, path, flags, IN_ROOT)


def fs_type(fd: int) -> int:
    """The f_type of the filesystem fd is on; 0 if fstatfs fails."""
    buf = _StatFs()
    if _libc.fstatfs(ctypes.c_int(fd), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type)
