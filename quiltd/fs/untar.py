"""The one hardened tar engine: members written into a root through descriptors.

Image import, image layers and CopyIn all extract with this engine. The
archive is hostile, and so may be the tree it is written into (a running
container's). Every member is checked before anything is written, and
nothing is ever written through a link:

- each directory a member lives in is looked up from a descriptor of the
  root, either one component at a time with O_NOFOLLOW (a tree being built:
  any link on the way is refused) or with openat2(RESOLVE_IN_ROOT) (a
  container's tree: its links resolve as if its root were "/", so none
  leads out);
- the last component is then made or replaced relative to that directory's
  descriptor with no-follow calls, so a link swapped in at the last moment
  is replaced, never followed;
- caps bound the content bytes, the entries and the depth, and a member's
  path may not hold "..", be longer than PATH_MAX or, unless the policy
  strips it as tar does, start with "/".

What differs between the callers on purpose is a TarPolicy: how lookups
resolve, whether device nodes are skipped (and counted) or refused, how
whiteouts are read, whether setuid bits stay, whether links must stay
inside the tree, whether files are replaced atomically. The engine reads
no stream itself: its caller opens the archive (compressed, hashed, or a
caller's pipe) and hands over each member as tarfile yields it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quiltd.fs.remove import remove_entry
from quiltd.fs.resolve import DIR_OPEN, IN_ROOT, KERNEL_FILESYSTEMS, fs_type, openat2

CHUNK = 1 << 20

# Paths longer than PATH_MAX could not be used inside a container anyway,
# and the cap bounds how deep a single member can make us walk and create.
PATH_MAX = 4095

_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# What marks a directory of an overlay lower layer opaque; trusted.* needs
# CAP_SYS_ADMIN to write, so a container cannot forge one in its upper layer.
OVERLAY_OPAQUE = "trusted.overlay.opaque"


class Refused(Exception):
    """The archive breaks a rule; the message names the member and the rule."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OverLimit(Refused):
    """The archive would pass a size cap (content bytes or free disk space)."""


class Lookup(enum.Enum):
    NO_LINKS = "no-links"  # a tree being built: a link on the way to a member is refused
    IN_ROOT = "in-root"  # a container's tree: links resolve inside the root, on proc/sysfs nothing is written


class Devices(enum.Enum):
    SKIP = "skip"  # not made, counted; what was at the path is still replaced (images: /dev is the runtime's)
    REFUSE = "refuse"  # the archive is refused (CopyIn: no device node is copied into a container)


class Whiteouts(enum.Enum):
    NONE = "none"  # a .wh. name is an ordinary file
    APPLY = "apply"  # layers in one tree: a whiteout removes what a lower layer wrote
    OVERLAY = "overlay"  # a layer of its own: whiteouts written in overlayfs's format


@dataclass(frozen=True)
class TarPolicy:
    lookup: Lookup
    devices: Devices
    whiteouts: Whiteouts = Whiteouts.NONE
    keep_setuid: bool = False  # setuid/setgid bits are dropped unless kept
    strip_absolute: bool = False  # "/a" means "a", as tar -x reads it; otherwise refused
    links_inside_tree: bool = True  # a symlink whose target climbs out of the tree (by its text) is refused
    root_metadata: bool = True  # a "." directory member sets the root's owner, mode and time
    atomic_files: bool = False  # a file is written beside its name and renamed over it
    max_bytes: int = 16 << 30  # of regular-file content
    max_entries: int = 2_000_000
    max_depth: int = 2048  # path components of a member (PATH_MAX allows no more)
    disk_reserve: int = 0  # bytes left free on the root's filesystem; 0: not checked
    content: str = "content"  # what max_bytes counts, in messages


@dataclass(frozen=True)
class _Meta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int


def member_parts(path: str, member: str, what: str, policy: TarPolicy) -> tuple[str, ...]:
    """An archive path split into components, refusing anything that leaves the root."""
    if path.startswith("/") and not policy.strip_absolute:
        raise Refused(f"{member!r}: absolute {what} {path!r}")
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise Refused(f"{member!r}: {what} too long")
    parts = path.split("/")
    if ".." in parts:
        raise Refused(f"{member!r}: {what} {path!r} contains '..'")
    kept = tuple(p for p in parts if p not in ("", "."))
    if len(kept) > policy.max_depth:
        raise Refused(f"{member!r}: {what} is {len(kept)} levels deep; the limit is {policy.max_depth}")
    return kept


def check_member(member: tarfile.TarInfo, policy: TarPolicy) -> tuple[str, ...]:
    """The rules a member's header alone must pass; its path components under the destination.

    add() applies them too; a caller that can read the archive ahead (a
    regular file) checks every header first, so a refused archive writes
    nothing.
    """
    parts = member_parts(member.name, member.name, "path", policy)
    _check_rest(member, parts, policy)
    return parts


def _check_rest(member: tarfile.TarInfo, parts: tuple[str, ...], policy: TarPolicy) -> None:
    """check_member's rules past the path, which the caller has split already."""
    name = member.name
    if not member.isdir() and not parts:
        raise Refused(f"{name!r}: only a directory may stand for the destination itself")
    if member.ischr() or member.isblk():
        if policy.devices is Devices.REFUSE:
            raise Refused(f"{name!r} is a device node; device nodes are not copied into containers")
    elif not (member.isdir() or member.isreg() or member.issym() or member.islnk() or member.isfifo()):
        raise Refused(f"{name!r}: unsupported tar member type {member.type!r}")
    for what, value in (("uid", member.uid), ("gid", member.gid)):
        # 2**32-1 is chown's "leave unchanged", not an owner.
        if not 0 <= value < 0xFFFFFFFF:
            raise Refused(f"{name!r}: invalid {what} {value}")
    if member.issym():
        _check_symlink(name, member.linkname, parts, policy)
    elif member.islnk() and not member_parts(member.linkname, name, "hard link target", policy):
        raise Refused(f"{name!r}: hard link to the destination itself")


def _check_symlink(name: str, target: str, parts: tuple[str, ...], policy: TarPolicy) -> None:
    if not target:
        raise Refused(f"{name!r}: symlink with an empty target")
    if len(target.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise Refused(f"{name!r}: symlink target too long")
    if not policy.links_inside_tree:
        return
    # Lexical resolution is what a host-side reader would do, and the only
    # one possible: the link may point at things not extracted yet. An
    # absolute target starts at the root.
    depth = 0 if target.startswith("/") else len(parts) - 1
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                raise Refused(f"{name!r}: symlink target {target!r} escapes the image root")
        else:
            depth += 1


class Extractor:
    """Writes members below a root, one at a time, as tarfile yields them.

    root_fd: the root's descriptor (borrowed). base: the destination's
    components below the root (IN_ROOT only; a tree being built is its own
    root). lowers: with Whiteouts.OVERLAY, root descriptors of the layers
    below, top first, only read (a hard link to one of their files becomes
    a copy). tick: called while a tree in a member's way is removed, which
    reads nothing from the stream. Call finish() once every member is in,
    close() always.
    """

    def __init__(self, root_fd: int, policy: TarPolicy, base: Sequence[str] = (),
                 lowers: Sequence[int] = (), tick: Callable[[], None] | None = None) -> None:
        if base and policy.lookup is not Lookup.IN_ROOT:
            raise ValueError("a destination below the root needs in-root lookups")
        self._root = root_fd
        self._policy = policy
        self._base = tuple(base)
        self._lowers = tuple(lowers)
        self._tick = tick  # called as a long removal moves on (a copy's idle watch)
        # Paths (and their parents) the current layer wrote: an opaque
        # whiteout hides only what lower layers left in its directory.
        self._written: set[tuple[str, ...]] = set()
        # chown needs root; unprivileged callers (tests, tools) still get a
        # usable tree, owned by themselves.
        self._chown = os.geteuid() == 0
        # Directory metadata is applied at the end: creating entries would
        # bump the mtimes, and a read-only mode could lock us out.
        self._dirs: dict[tuple[str, ...], _Meta] = {}
        # Members usually arrive directory by directory, so one cached
        # parent fd saves looking the path up again for most of them.
        self._cached: tuple[tuple[str, ...], int] | None = None
        self.size_bytes = 0
        self.entries = 0
        self.skipped_devices = 0

    def close(self) -> None:
        self._drop_cache()

    def begin_layer(self) -> None:
        self._written = set()

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, ...]:
        """Writes one member; its path components under the destination.

        Refused or OverLimit name the member. OSError and tarfile's errors pass through.
        """
        name = member.name
        self.entries += 1
        if self.entries > self._policy.max_entries:
            raise Refused(f"{name!r}: too many entries (limit {self._policy.max_entries})")
        parts = member_parts(name, name, "path", self._policy)
        if self._policy.whiteouts is not Whiteouts.NONE and parts and parts[-1].startswith(WHITEOUT):
            if self._policy.whiteouts is Whiteouts.OVERLAY:
                self._overlay_whiteout(parts, name)
            else:
                self._whiteout(parts, name)
            return parts
        _check_rest(member, parts, self._policy)
        meta = self._meta(member)
        if self._policy.whiteouts is Whiteouts.APPLY:
            self._written.update(parts[:i] for i in range(1, len(parts) + 1))
        if member.isdir():
            self._add_dir(parts, name, meta)
        elif member.ischr() or member.isblk():
            # Whatever an earlier member or lower layer put at this path is
            # replaced by the node, as tar and overlayfs would; the node
            # itself is just not made.
            self._clear(self._parent_fd(parts, name), parts, keep_dir=False)
            self.skipped_devices += 1
        elif member.isreg():
            self._add_file(tf, member, parts, meta)
        elif member.issym():
            target = member.linkname
            # Linux has no mode on a symlink to set.
            self._add_node(parts, name, meta, lambda base, parent: os.symlink(target, base, dir_fd=parent))
        elif member.islnk():
            self._add_hardlink(member, parts)
        else:  # a FIFO: check_member let no other type through
            self._add_node(parts, name, meta, lambda base, parent: os.mkfifo(base, 0o600, dir_fd=parent),
                           mode=True)
        return parts

    def _meta(self, member: tarfile.TarInfo) -> _Meta:
        mode = member.mode & 0o7777
        if not self._policy.keep_setuid:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        mtime = member.mtime
        mtime_ns = mtime * 1_000_000_000 if isinstance(mtime, int) else int(mtime * 1e9)
        return _Meta(mode=mode, uid=member.uid, gid=member.gid, mtime_ns=mtime_ns)

    # -- whiteouts (layers only) -------------------------------------------

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        base, dir_parts = parts[-1], parts[:-1]
        if base.startswith(WHITEOUT + WHITEOUT) and base != OPAQUE:
            return  # aufs bookkeeping (.wh..wh.plnk and the like), nothing to apply
        hidden = base[len(WHITEOUT):]
        if base != OPAQUE and hidden in ("", ".", ".."):
            raise Refused(f"{name!r}: whiteout of no name")
        # Whatever we remove below may be the cached parent or lie under it.
        self._drop_cache()
        try:
            parent = self._lookup(dir_parts, name, create=False)
        except (FileNotFoundError, Refused):
            return  # no such directory (or not a directory): nothing below to hide
        try:
            if base == OPAQUE:
                self._hide_lower(parent, dir_parts)
            elif (*dir_parts, hidden) not in self._written:
                remove_entry(parent, hidden, self._tick)
        finally:
            self._release(parent)

    def _overlay_whiteout(self, parts: tuple[str, ...], name: str) -> None:
        """A whiteout as overlayfs reads it: a 0/0 character device, or an opaque directory's xattr."""
        base, dir_parts = parts[-1], parts[:-1]
        if base.startswith(WHITEOUT + WHITEOUT) and base != OPAQUE:
            return  # aufs bookkeeping, nothing to apply
        if base == OPAQUE:
            self._drop_cache()
            fd = self._lookup(dir_parts, name, create=True)
            try:
                os.setxattr(fd, OVERLAY_OPAQUE, b"y")
            finally:
                self._release(fd)
            return
        hidden = base[len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise Refused(f"{name!r}: whiteout of no name")
        target = (*dir_parts, hidden)
        parent = self._parent_fd(target, name)
        try:
            os.stat(hidden, dir_fd=parent, follow_symlinks=False)
            return  # this layer wrote the name itself: its own entry is what it means
        except FileNotFoundError:
            pass
        # Not a device anyone can open: overlayfs shows it as "no such file".
        os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)

    def _hide_lower(self, dir_fd: int, dir_parts: tuple[str, ...]) -> None:
        """Removes from a directory what lower layers put there; keeps what this layer wrote.

        The walk goes only as deep as this layer's own directories, which
        the depth cap bounds.
        """
        with os.scandir(dir_fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for entry, is_dir in entries:
            child = (*dir_parts, entry)
            if child not in self._written:
                remove_entry(dir_fd, entry, self._tick)
            elif is_dir:
                fd = os.open(entry, DIR_OPEN, dir_fd=dir_fd)
                try:
                    self._hide_lower(fd, child)
                finally:
                    os.close(fd)

    # -- members ------------------------------------------------------------

    def _add_dir(self, parts: tuple[str, ...], name: str, meta: _Meta) -> None:
        if not parts:
            if self._policy.root_metadata:
                self._dirs[parts] = meta
            return
        parent = self._parent_fd(parts, name)
        if not self._clear(parent, parts, keep_dir=True):
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self._dirs[parts] = meta

    def _add_file(self, tf: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...],
                  meta: _Meta) -> None:
        name = member.name
        # Checked against the header before any content is read, so a bomb
        # stops at its first oversized member. member.size is the apparent
        # size, holes of a sparse member included: holes are written out as
        # zeros, so that is what the member costs on disk.
        self._check_size(name, member.size, alone=True)
        content = tf.extractfile(member)
        if content is None:
            raise Refused(f"{name!r}: no content for a regular file")
        parent = self._parent_fd(parts, name)
        if self._policy.atomic_files:
            temp, fd = _create_temp(parent)
        else:
            self._clear(parent, parts, keep_dir=False)
            temp, fd = parts[-1], os.open(parts[-1], _FILE_CREATE, 0o600, dir_fd=parent)
        try:
            try:
                written = 0
                while chunk := content.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    written += len(chunk)
                if written != member.size:
                    raise Refused(f"{name!r}: truncated content ({written} of {member.size})")
                self._set_meta(fd, meta)
            finally:
                os.close(fd)
            if self._policy.atomic_files:
                self._rename_over(parent, temp, parts)
        except BaseException:
            if self._policy.atomic_files:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)
            raise
        self.size_bytes += written

    def _rename_over(self, parent: int, temp: str, parts: tuple[str, ...]) -> None:
        for attempt in range(3):
            try:
                # rename never follows a link at the name: it replaces the link itself.
                os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                return
            except OSError as e:
                if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                    raise
                self._clear(parent, parts, keep_dir=False)  # a directory in the way

    def _set_meta(self, fd: int, meta: _Meta) -> None:
        if self._chown:
            os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)  # after chown, which clears setuid/setgid
        os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def _check_size(self, name: str, size: int, *, alone: bool) -> None:
        limit = self._policy.max_bytes
        if self.size_bytes + size > limit:
            raise OverLimit(f"{name!r}: {self._policy.content} exceeds the limit of {limit} bytes "
                            "(option max_bytes)" + (f"; this member alone is {size} bytes" if alone else ""))
        if self._policy.disk_reserve:
            # Asked before each file rather than once: earlier members, and
            # other imports running at the same time, have used some of it since.
            vfs = os.fstatvfs(self._root)
            free = vfs.f_bavail * vfs.f_frsize - self._policy.disk_reserve
            if size > free:
                raise OverLimit(f"{name!r}: {size} bytes do not fit in the free space of the image "
                                f"directory's filesystem ({max(free, 0)} bytes, keeping "
                                f"{self._policy.disk_reserve} bytes free)")

    def _add_node(self, parts: tuple[str, ...], name: str, meta: _Meta, make: Callable[[str, int], None],
                  *, mode: bool = False) -> None:
        """Makes parts[-1] with make(base, parent_fd), then its owner, mode and mtime, following no link."""
        parent = self._parent_fd(parts, name)
        self._clear(parent, parts, keep_dir=False)
        base = parts[-1]
        make(base, parent)
        if self._chown:
            os.chown(base, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
        if mode:
            # After chown, which clears setuid/setgid. Python has no lchmod
            # on Linux but fchmodat's no-follow: a link swapped in since the
            # node was made is refused there, never followed.
            with contextlib.suppress(NotImplementedError):
                os.chmod(base, meta.mode, dir_fd=parent, follow_symlinks=False)
        os.utime(base, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _add_hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        target_parts = member_parts(target, name, "hard link target", self._policy)
        if target_parts == parts:
            return
        # The target must be a regular file already in the tree; the lookup
        # never leaves the root, so a link can only reach an inode inside it.
        missing = Refused(f"{name!r}: hard link target {target!r} is not a regular file extracted earlier")
        try:
            target_parent = self._lookup(target_parts[:-1], name, create=False)
        except (FileNotFoundError, Refused):
            if self._copy_from_lower(target_parts, parts, name):
                return
            raise missing from None
        try:
            try:
                st = os.stat(target_parts[-1], dir_fd=target_parent, follow_symlinks=False)
            except FileNotFoundError:
                if self._copy_from_lower(target_parts, parts, name):
                    return
                raise missing from None
            if not stat.S_ISREG(st.st_mode):
                raise missing
            parent = self._parent_fd(parts, name)
            self._clear(parent, parts, keep_dir=False)
            # The link shares the target's inode and so its metadata; tar
            # never applies the link entry's own mode or owner. linkat
            # without AT_SYMLINK_FOLLOW: a link swapped in is linked, never followed.
            os.link(target_parts[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            self._release(target_parent)

    def _copy_from_lower(self, target_parts: tuple[str, ...], parts: tuple[str, ...], name: str) -> bool:
        """A hard link to a file of a lower layer, in a layer of its own: a copy of that file.

        A link cannot cross layer directories, and the lower layer may be
        shared with other images, so its inode is never touched. The lower
        layers are searched top first, each without following a link.
        """
        for lower in self._lowers:
            try:
                parent = _walk_nofollow(lower, target_parts[:-1])
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                try:
                    st = os.stat(target_parts[-1], dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    return False  # a whiteout, a link or a directory: no file to link to
                src = os.open(target_parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            finally:
                if parent != lower:
                    os.close(parent)
            try:
                st = os.fstat(src)
                if not stat.S_ISREG(st.st_mode):
                    return False  # replaced since the stat
                self._check_size(name, st.st_size, alone=False)
                dest_parent = self._parent_fd(parts, name)
                self._clear(dest_parent, parts, keep_dir=False)
                fd = os.open(parts[-1], _FILE_CREATE, 0o600, dir_fd=dest_parent)
                try:
                    while chunk := os.read(src, CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                    self.size_bytes += st.st_size
                    self._set_meta(fd, _Meta(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            return True
        return False

    # -- the tree -----------------------------------------------------------

    def _clear(self, parent: int, parts: tuple[str, ...], *, keep_dir: bool) -> bool:
        """Make room for parts[-1]; True if an existing directory was kept.

        A later member replaces an earlier one, as with tar; the old entry is
        removed rather than written through, which for a symlink would
        follow it and for a hard link would change the other name too.
        """
        base = parts[-1]
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            # The cached fd would point into the removed tree; the parent
            # itself (often the cached fd) stays valid.
            if self._cached is not None and self._cached[0][:len(parts)] == parts:
                self._drop_cache()
            self._dirs.pop(parts, None)
        remove_entry(parent, base, self._tick)
        return False

    def _parent_fd(self, parts: tuple[str, ...], name: str) -> int:
        """A borrowed fd of the directory that will hold parts[-1]."""
        dir_parts = parts[:-1]
        if self._cached is not None and self._cached[0] == dir_parts:
            return self._cached[1]
        fd = self._lookup(dir_parts, name, create=True)
        self._drop_cache()
        self._cached = (dir_parts, fd)
        return fd

    def _drop_cache(self) -> None:
        if self._cached is not None:
            self._release(self._cached[1])
            self._cached = None

    def _release(self, fd: int) -> None:
        if fd != self._root:
            os.close(fd)

    def _lookup(self, dir_parts: tuple[str, ...], name: str, *, create: bool) -> int:
        """A descriptor of the directory dir_parts (the caller's; the root fd itself for () in NO_LINKS).

        Missing directories are made when `create`, as tar does for
        archives that omit parent entries; an implied directory is 0755.
        """
        if self._policy.lookup is Lookup.NO_LINKS:
            return self._walk(dir_parts, name, create=create)
        return self._in_root(dir_parts, name, create=create)

    def _walk(self, dir_parts: tuple[str, ...], name: str, *, create: bool) -> int:
        fd = self._root
        try:
            for i, part in enumerate(dir_parts):
                try:
                    next_fd = os.open(part, DIR_OPEN, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, DIR_OPEN, dir_fd=fd)
                    # Not the umask's choice: an implied directory is 0755.
                    os.fchmod(next_fd, 0o755)
                    self._dirs.pop(dir_parts[:i + 1], None)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    raise _not_a_directory(name, dir_parts[:i + 1]) from None
                self._release(fd)
                fd = next_fd
        except BaseException:
            self._release(fd)
            raise
        return fd

    def _in_root(self, dir_parts: tuple[str, ...], name: str, *, create: bool) -> int:
        path = "/".join(self._base + dir_parts) or "."
        try:
            fd = openat2(self._root, path, os.O_RDONLY | os.O_DIRECTORY, IN_ROOT)
        except FileNotFoundError:
            if not create:
                raise
            fd = self._make_in_root(dir_parts, name)
        except NotADirectoryError:
            raise _not_a_directory(name, dir_parts) from None
        try:
            if fs_type(fd) in KERNEL_FILESYSTEMS:
                # The kernel's files: a privileged writer must not reach them from a tar stream.
                raise Refused(f"{name!r}: {'/'.join(self._base + dir_parts)} is on proc or sysfs, "
                              "which are not written")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_in_root(self, dir_parts: tuple[str, ...], name: str) -> int:
        """Makes the missing directories one by one, each in its parent's descriptor."""
        fd = openat2(self._root, "/".join(self._base) or ".", os.O_RDONLY | os.O_DIRECTORY, IN_ROOT)
        try:
            for i, part in enumerate(dir_parts):
                made = False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
                # Looked up again from the root: what was made (or found) may
                # have been swapped for a symlink since.
                try:
                    found = openat2(self._root, "/".join(self._base + dir_parts[:i + 1]),
                                    os.O_RDONLY | os.O_DIRECTORY, IN_ROOT)
                except NotADirectoryError:
                    raise _not_a_directory(name, dir_parts[:i + 1]) from None
                os.close(fd)
                fd = found
                if made:
                    os.fchmod(fd, 0o755)
                    self._dirs.pop(dir_parts[:i + 1], None)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def finish(self) -> None:
        """Applies the deferred directory owners, modes and mtimes."""
        self._drop_cache()
        for parts, meta in self._dirs.items():
            try:
                fd = self._lookup(parts, "/".join(parts), create=False)
            except (FileNotFoundError, Refused):
                # Replaced or removed by a later member.
                continue
            try:
                self._set_meta(fd, meta)
            finally:
                self._release(fd)
        if () not in self._dirs and self._policy.lookup is Lookup.NO_LINKS:
            os.fchmod(self._root, 0o755)


def _not_a_directory(name: str, where: tuple[str, ...]) -> Refused:
    return Refused(f"{name!r}: {'/'.join(where)!r} is not a directory (a symlink or file); "
                   "refusing to write through it")


def _create_temp(parent: int) -> tuple[str, int]:
    """A new file beside the member's name, to be renamed over it once whole."""
    for attempt in range(3):
        temp = f".quilt-copy-{secrets.token_hex(8)}"
        try:
            # O_EXCL: anything put there since is an error, never followed.
            return temp, os.open(temp, _FILE_CREATE, 0o600, dir_fd=parent)
        except FileExistsError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _walk_nofollow(root: int, dir_parts: tuple[str, ...]) -> int:
    """Opens root/dir_parts one component at a time, never following a link; root itself for ()."""
    fd = root
    try:
        for part in dir_parts:
            try:
                next_fd = os.open(part, DIR_OPEN, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotADirectoryError(exc.errno, part) from None
                raise
            if fd != root:
                os.close(fd)
            fd = next_fd
    except BaseException:
        if fd != root:
            os.close(fd)
        raise
    return fd
