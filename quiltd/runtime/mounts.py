"""Mounting host paths into a container's root without leaving it.

Runs in the container init, before the root switch, when both trees are
visible. A target path comes from the client and is resolved in a root the
container may have written to before (its upper layer survives a restart):
any component may be a symlink, absolute or full of "..". Every lookup here
goes through openat2 with RESOLVE_IN_ROOT, so a link resolves as if the
container's root were "/" and can never point the mount out of it. The mount
is then made on the descriptor that lookup returned (through /proc/self/fd),
not on a path that could be looked up again differently.

A host source is handled the same way: opened once (O_PATH) under the
container's SourcePolicy, checked on that descriptor, and bound from it. A
path swapped for a symlink after the create therefore binds what the checks
saw, or nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from quiltd import linux
from quiltd.fs.resolve import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, open_in_root, openat2


class SourceRefused(PermissionError):
    """A host source the container's policy does not allow; the message says why."""


class StateSource(SourceRefused):
    """A source that is, holds or lies in quiltd's state or run directory: refused to everyone."""


@dataclass(frozen=True)
class SourcePolicy:
    """Where a container's host binds may come from.

    forbidden: quiltd's state and run directories. No source may be one,
    lie in one, or hold one, whoever made the container.
    roots: None lets a source be anywhere else (a container root made).
    Otherwise a source must be one of these directories or lie beneath it,
    and the lookup below the root may not leave it: no "..", no absolute
    symlink, no symlink out (the kernel checks, RESOLVE_BENEATH). The
    default, no roots, binds nothing.
    """

    forbidden: tuple[str, ...] = ()
    roots: tuple[str, ...] | None = ()

    def to_json(self) -> dict[str, object]:
        return {"forbidden": list(self.forbidden), "roots": None if self.roots is None else list(self.roots)}

    @classmethod
    def from_json(cls, raw: object) -> SourcePolicy:
        if not isinstance(raw, dict):
            return cls()  # nothing may be bound: a spec without a policy fails closed
        roots = raw.get("roots")
        return cls(tuple(str(f) for f in raw.get("forbidden", ())),
                   None if roots is None else tuple(str(r) for r in roots))


NO_BINDS = SourcePolicy()


def open_source(source: str, policy: SourcePolicy) -> int:
    """An O_PATH descriptor of the host path source, if policy allows what it names.

    Raises SourceRefused naming the reason, or the OSError of the lookup.
    """
    if policy.roots is None:
        fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
    else:
        fd = _open_beneath_root(source, policy.roots)
    try:
        _check_not_forbidden(fd, source, policy.forbidden)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_beneath_root(source: str, roots: tuple[str, ...]) -> int:
    normal = os.path.normpath(source)
    for root in roots:
        if normal != root and not normal.startswith(root.rstrip("/") + "/"):
            continue
        rest = os.path.relpath(normal, root)
        # The root itself is the administrator's path: it may be a symlink.
        rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return openat2(rootfd, rest, os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise SourceRefused(errno.EACCES, f"{source} leads out of {root} (through a symlink "
                                    "or '..'), the allowed mount root it lies in") from None
            raise
        finally:
            os.close(rootfd)
    listed = ", ".join(roots) if roots else "none"
    raise SourceRefused(errno.EACCES, f"{source} is not under a mount root the administrator allows "
                        f"members (mount_roots in /etc/quilt/quiltd.conf: {listed})")


def _check_not_forbidden(fd: int, source: str, forbidden: tuple[str, ...]) -> None:
    """Refuses fd if it is, lies in or holds one of the forbidden directories.

    Checked on what was opened: the kernel's own path of the descriptor, and
    (for a directory) its identity against each forbidden directory and the
    directories above it, so a second name of one (a bind) is caught too.
    """
    if not forbidden:
        return
    real = os.readlink(f"/proc/self/fd/{fd}")
    st = os.fstat(fd)
    for place in forbidden:
        place_real = os.path.realpath(place)
        if real == place_real or real.startswith(place_real.rstrip("/") + "/") or \
                place_real.startswith(real.rstrip("/") + "/"):
            raise StateSource(errno.EACCES, f"{source} holds or lies in quiltd's own state ({place})")
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in _self_and_parents(place_real):
            raise StateSource(errno.EACCES, f"{source} holds quiltd's own state ({place})")


def _self_and_parents(path: str) -> set[tuple[int, int]]:
    found = set()
    while True:
        try:
            st = os.stat(path)
        except OSError:
            break
        found.add((st.st_dev, st.st_ino))
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return found


def bind_into(root: str, source: str, target: str, read_only: bool, userns_fd: int | None = None,
              policy: SourcePolicy | None = None) -> None:
    """Binds the host path source onto target, resolved inside root as if root were /.

    A missing target is made (a directory, or an empty file for a file
    source). The mount is nosuid and nodev whatever the source's mount is.
    With userns_fd, the mount is idmapped through that user namespace (see
    idmapped_bind), and only source's own mount is bound, not those below it.
    With policy, the source is opened and checked under it (see
    open_source); without, it is quiltd's own (a volume) and opened as is.
    """
    src_fd = os.open(source, os.O_PATH | os.O_CLOEXEC) if policy is None else open_source(source, policy)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
        fd = _make_target(rootfd, target, is_dir)
        try:
            if userns_fd is not None:
                idmapped_bind(f"/proc/self/fd/{src_fd}", fd, userns_fd, read_only)
                return
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


def idmapped_bind(source: str, target_fd: int, userns_fd: int, read_only: bool) -> None:
    """Binds source onto target_fd (O_PATH) with its ids seen through a user namespace, nosuid and nodev.

    A file stored as owned by id N shows as owned by whatever host id the
    namespace maps N to, and a write through the mount stores the reverse.
    So a tree stored with plain ids (0 is root) is owned by the container's
    root when seen from inside its namespace, and is the same tree for any
    container, whatever its range.
    """
    tree = linux.open_tree_clone(source)
    try:
        flags = linux.MOUNT_ATTR_IDMAP | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
        try:
            linux.mount_setattr(tree, flags | (linux.MOUNT_ATTR_RDONLY if read_only else 0), userns_fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot map ids on {source}: user namespaces need a filesystem "
                          f"with idmapped mounts (ext4, xfs, btrfs, tmpfs): {e.strerror}") from None
        linux.move_mount_to_fd(tree, target_fd)
    finally:
        os.close(tree)


def mount_overlay(rootfs: str, lowerdir: str, upperdir: str, workdir: str, flags: int,
                  userns_fd: int | None = None, userns_base: int = 0) -> None:
    """The container's root: its writable upperdir over the image's lowerdir, on rootfs.

    With userns_fd (mapping container id 0 to host id userns_base), the
    image is seen through an idmapped mount, so its root-owned files belong
    to the container's root; files made in the upper layer get the host ids
    of their container ids. The idmapped view is bound next to rootfs only
    long enough for overlayfs to take its own private copy.
    """
    # No workdir: a read-only view with the upper dir as the topmost lower
    # (ExportContainer of a live container, whose upper its own overlay holds:
    # overlayfs allows one writable mount per upper dir, any number of readers).
    top = upperdir if not workdir else ""
    layers = f"lowerdir={upperdir}:{lowerdir}" if top else \
        f"lowerdir={lowerdir},upperdir={upperdir},workdir={workdir}"
    if top:
        flags |= linux.MS_RDONLY
    if userns_fd is None:
        linux.mount("overlay", rootfs, "overlay", flags, layers)
        return
    # An image of stored layers has several lower dirs, top first, each
    # idmapped on its own: a layer is shared, so it cannot be chowned.
    lowers = lowerdir.split(":")
    # The root directory's owner comes from the upper layer: make it the
    # image root's (its top layer's), as the container sees it.
    image_root = os.stat(lowers[0])
    if not top:
        os.chown(upperdir, userns_base + image_root.st_uid, userns_base + image_root.st_gid)
    parent = os.path.dirname(rootfs)
    stagings = [os.path.join(parent, "lower" if i == 0 else f"lower.{i}") for i in range(len(lowers))]
    mounted: list[str] = []
    try:
        for lower, staging in zip(lowers, stagings, strict=True):
            os.makedirs(staging, mode=0o700, exist_ok=True)
            fd = os.open(staging, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                idmapped_bind(lower, fd, userns_fd, read_only=True)
            finally:
                os.close(fd)
            mounted.append(staging)
        # The upper dir holds host ids already (the container's shifted): it is not idmapped.
        linux.mount("overlay", rootfs, "overlay", flags,
                    f"lowerdir={top}:{':'.join(stagings)}" if top else
                    f"lowerdir={':'.join(stagings)},upperdir={upperdir},workdir={workdir}")
    finally:
        for staging in mounted:
            linux.umount2(staging, linux.MNT_DETACH)


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
