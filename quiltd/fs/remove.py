"""One safe removal of a directory tree, however deep, whoever controls it.

A tree may belong to a container (its writable layer, a directory a copy
replaces) and be changed while it is removed: any directory may become a
symlink to "/" between two of our calls, entries may come and go, a
directory may have no permissions, and a file may carry the immutable or
append-only flag. shutil.rmtree recurses once per level (RecursionError
past about a thousand) and, walking by descriptors, holds one per level
(EMFILE); a tree from an archive or a container can be 100,000 levels deep.

So the walk here never recurses and holds at most three descriptors:

- the top directory is opened once, without following a link, and every
  lookup is relative to a descriptor, with O_NOFOLLOW or a no-follow call;
- the tree is flattened instead of descended: the grandchildren of the top
  are renamed up into it (a rename moves a link itself, never what it
  points at), and each child, once empty, is removed; so the depth never
  matters, and nothing outside the top is ever named;
- an entry that cannot be removed for want of permission is made
  removable: search and write permission on its directory (for a caller
  that is not root), the immutable and append-only flags cleared (root
  may, with CAP_LINUX_IMMUTABLE) on a regular file or directory only,
  looked at through an O_PATH descriptor first so no device is ever opened.

A directory another process moves out of the tree while we hold it open is
emptied all the same: what is removed is what was in the tree when the walk
reached it. A rename cannot cross a mount, so nothing on another filesystem
(a host volume bound into a container) can be pulled in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from quiltd.fs.resolve import DIR_OPEN

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010
_FS_APPEND_FL = 0x00000020

# A name a flattened directory gets in the top; a clash only takes the next number.
_PARKED = ".quilt-rm-"
_MOUNT_POINT = "a mount point is not removed"
# Times a tree that fills again once emptied is emptied, before its removal fails.
_ATTEMPTS = 100


def remove_path(path: Path) -> None:
    """Removes what path names (a tree, a file or a link, never what a link points at).

    The path's parent is the caller's and trusted; what lies below it is
    not. A missing path is not an error.
    """
    try:
        parent = os.open(path.parent, DIR_OPEN)
    except FileNotFoundError:
        return
    try:
        remove_entry(parent, path.name)
    finally:
        os.close(parent)


def remove_entry(parent: int, name: str, tick: Callable[[], None] | None = None) -> None:
    """Removes name in the directory parent: a tree, or whatever else it is; missing is no error.

    tick, if given, is called as the removal moves on (a copy's idle watch).
    """
    while True:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                remove_tree(parent, name, tick)
                return
            except NotADirectoryError:
                continue  # swapped for something else since the stat: look again
        try:
            _unlink(parent, name)
            return
        except IsADirectoryError:
            continue
        except FileNotFoundError:
            return


def remove_tree(parent: int, name: str, tick: Callable[[], None] | None = None) -> None:
    """Removes the directory name in parent and all below it.

    Raises NotADirectoryError if name is not a directory (a link is never
    followed) and FileNotFoundError if it is missing.
    """
    try:
        top = os.open(name, DIR_OPEN, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name) from None
        raise
    try:
        mount = _mount_id(top)
        if _mount_id(parent) != mount:
            raise OSError(errno.EBUSY, _MOUNT_POINT, name)
        for attempt in range(_ATTEMPTS):
            _empty(top, mount, tick)
            try:
                _with_permission(parent, None, functools.partial(os.rmdir, name, dir_fd=parent))
                return
            except OSError as exc:
                # Something wrote into the tree after it was emptied (a
                # container still running): empty it again, but not forever.
                if exc.errno != errno.ENOTEMPTY or attempt == _ATTEMPTS - 1:
                    raise
    finally:
        os.close(top)


def _empty(top: int, mount: tuple[int, int], tick: Callable[[], None] | None) -> None:
    """Empties the directory top, flattening what lies below it; at most two more descriptors.

    Each pass lists the top and takes every entry one level down. Passes
    that change nothing (an entry that stays in the way whatever is done,
    or a writer that fills what was just emptied) are counted, and past
    _ATTEMPTS in a row the last error is raised rather than looping.
    """
    counter = 0
    idle = 0
    while True:
        entries = _list(top)
        if not entries:
            return
        if tick is not None:
            tick()
        stuck: OSError | None = None
        moved = False
        for entry in entries:
            try:
                child = os.open(entry, DIR_OPEN, dir_fd=top)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    _remove_leaf(top, entry)  # a file, a link, a node: gone by its name
                    moved = True
                elif exc.errno == errno.ENOENT:
                    moved = True
                elif exc.errno == errno.EACCES:
                    _open_up(top, entry)  # listed again on the next pass, now open to us
                    stuck = exc
                else:
                    raise
                continue
            try:
                if _mount_id(child) != mount:
                    raise OSError(errno.EBUSY, _MOUNT_POINT, entry)
                for grand in _list(child):
                    counter = _park(child, grand, top, counter)
                    moved = True
            finally:
                os.close(child)
            try:
                _with_permission(top, None, functools.partial(os.rmdir, entry, dir_fd=top))
                moved = True
            except FileNotFoundError:
                moved = True
            except OSError as exc:
                # Not empty: something came in meanwhile; the next pass takes it.
                if exc.errno != errno.ENOTEMPTY:
                    raise
                stuck = exc
        idle = 0 if moved else idle + 1
        if stuck is not None and idle >= _ATTEMPTS:
            raise stuck


def _mount_id(fd: int) -> tuple[int, int]:
    """(mount id, device) of the file fd is open on; the id is -1 where /proc cannot say.

    A directory that is a mount point (a volume, /proc, a tmpfs) is another
    tree, not ours: below it the walk would empty what the mount shows, and
    the mount itself could not be removed anyway (EBUSY). Mounts are told
    apart by their ids: a bind of the same filesystem has the same device.
    """
    mnt_id = -1
    with contextlib.suppress(OSError, ValueError):
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, 4096)
        finally:
            os.close(info)
        at = text.find(b"\nmnt_id:")
        if at >= 0:
            mnt_id = int(text[at + 8:text.index(b"\n", at + 1)])
    return mnt_id, os.fstat(fd).st_dev


def _park(child: int, grand: str, top: int, counter: int) -> int:
    """Moves grand out of child into top (a non-directory is removed there instead)."""
    while True:
        try:
            # Tried first: most entries are files, and unlink says EISDIR for a
            # directory, so no stat is spent on them.
            _unlink(child, grand)
            return counter
        except FileNotFoundError:
            return counter
        except IsADirectoryError:
            pass
        counter += 1
        try:
            # Over an empty directory the rename succeeds: it was the top's,
            # and going anyway.
            _with_permission(child, grand, functools.partial(
                os.rename, grand, f"{_PARKED}{counter}", src_dir_fd=child, dst_dir_fd=top))
            return counter
        except FileNotFoundError:
            return counter
        except OSError as exc:
            # The name in the top is taken (or grand changed): the next number.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise


def _remove_leaf(parent: int, name: str) -> None:
    try:
        _unlink(parent, name)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        pass  # swapped for a directory since: the next pass takes it


def _unlink(parent: int, name: str) -> None:
    # Called once a file: the plain call first, without _with_permission's
    # wrapping, which costs as much again as the unlink itself.
    try:
        os.unlink(name, dir_fd=parent)
    except PermissionError:  # EPERM or EACCES
        _make_removable(parent, name)
        os.unlink(name, dir_fd=parent)


def _list(fd: int) -> list[str]:
    try:
        with os.scandir(fd) as it:  # reads a duplicate: fd stays open
            return [e.name for e in it]
    except PermissionError:
        _make_searchable(fd)
        with os.scandir(fd) as it:
            return [e.name for e in it]


def _with_permission(parent: int, name: str | None, act: Callable[[], None]) -> None:
    """act(); on EPERM or EACCES, makes parent (and name) removable and acts once more."""
    try:
        act()
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            raise
    _make_removable(parent, name)
    act()


def _make_removable(parent: int, name: str | None) -> None:
    """Gives parent search and write permission, and clears parent's (and name's) immutable flags."""
    _make_searchable(parent)
    _clear_flags(parent)
    if name is not None:
        _clear_flags_of(parent, name)


def _open_up(parent: int, name: str) -> None:
    """A directory we may not open: given search and read permission, if we own it."""
    with contextlib.suppress(OSError):
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
    _clear_flags_of(parent, name)


def _make_searchable(fd: int) -> None:
    # Root ignores modes; a caller that is not root needs read, write and
    # search permission on directories it owns to empty them.
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o700)


def _clear_flags_of(parent: int, name: str) -> None:
    """Clears the immutable and append-only flags of name, if it is a regular file or directory.

    It is looked at through an O_PATH descriptor (which opens nothing), and
    only a regular file or directory is opened for the ioctl, through that
    descriptor, so what is opened is what was looked at.
    """
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode) and not stat.S_ISDIR(os.fstat(path_fd).st_mode):
            return
        try:
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _clear_flags(fd)
        finally:
            os.close(fd)
    finally:
        os.close(path_fd)


def _clear_flags(fd: int) -> None:
    with contextlib.suppress(OSError):
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        (flags,) = struct.unpack_from("=i", buf)
        if flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            struct.pack_into("=i", buf, 0, flags & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL))
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, buf)
