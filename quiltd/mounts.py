"""Mounting host paths into a container's root without leaving it.

Runs in the container init, before the root switch, when both trees are
visible. A target path comes from the client and is resolved in a root the
container may have written to before (its upper layer survives a restart):
any component may be a symlink, absolute or full of "..". Every lookup here
goes through openat2 with RESOLVE_IN_ROOT, so a link resolves as if the
container's root were "/" and can never point the mount out of it. The mount
is then made on the descriptor that lookup returned (through /proc/self/fd),
not on a path that could be looked up again differently.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from quiltd import linux

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables were unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd: int = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), path.encode(),
                            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    return openat2(rootfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)


def bind_into(root: str, source: str, target: str, read_only: bool) -> None:
    """Binds the host path source onto target, resolved inside root as if root were /.

    A missing target is made (a directory, or an empty file for a file
    source). The mount is nosuid and nodev whatever the source's mount is.
    """
    src_fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
        fd = _make_target(rootfd, target, is_dir)
        try:
            linux.mount(f"/proc/self/fd/{src_fd}", f"/proc/self/fd/{fd}", None, linux.MS_BIND | linux.MS_REC)
        finally:
            os.close(fd)
        # The descriptor above names what lies under the new mount; the mount
        # itself is found by the same lookup made again.
        fd = open_in_root(rootfd, target)
        try:
            flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV
            linux.mount("none", f"/proc/self/fd/{fd}", None, flags | (linux.MS_RDONLY if read_only else 0))
        finally:
            os.close(fd)
    finally:
        os.close(src_fd)
        os.close(rootfd)


def mount_in_root(root: str, target: str, fstype: str, flags: int, data: str) -> None:
    """Mounts a new filesystem (a tmpfs) on target, resolved and made inside root."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _make_target(rootfd, target, True)
        try:
            linux.mount(fstype, f"/proc/self/fd/{fd}", fstype, flags, data)
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)


def _make_target(rootfd: int, target: str, is_dir: bool) -> int:
    """An O_PATH descriptor of target inside root, making what is missing on the way."""
    parts = [p for p in target.split("/") if p]
    fd = os.dup(rootfd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            path = "/".join(parts[: i + 1])
            try:
                found = open_in_root(rootfd, path)
            except FileNotFoundError:
                # Made in the descriptor of its parent, which was itself resolved in the root.
                if last and not is_dir:
                    os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=fd))
                else:
                    os.mkdir(part, 0o755, dir_fd=fd)
                found = open_in_root(rootfd, path)
            os.close(fd)
            fd = found
            kind = os.fstat(fd).st_mode
            if not last and not stat.S_ISDIR(kind):
                raise OSError(errno.ENOTDIR, f"mount target {target}: {path} is not a directory")
        kind = os.fstat(fd).st_mode
        if is_dir != stat.S_ISDIR(kind):
            want = "a directory" if is_dir else "not a directory"
            raise OSError(errno.ENOTDIR if is_dir else errno.EISDIR, f"mount target {target} must be {want}")
        return fd
    except BaseException:
        os.close(fd)
        raise
