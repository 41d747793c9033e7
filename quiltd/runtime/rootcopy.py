"""Tar streams into and out of a directory tree that belongs to a container, never leaving it.

The tree is given as a descriptor of its root. The container may change it
while we work: any directory may become a symlink to "/" or to /etc/shadow
between two of our calls (the docker cp CVE-2018-15664 class). So no path
is ever joined into a host path string and looked up from the host's root:

- every directory a member lives in is looked up from the root descriptor
  with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS), so a symlink on
  the way resolves as if the container's root were "/", and /proc magic
  links are refused;
- the last component is then made or opened relative to that directory's
  descriptor with O_NOFOLLOW (or the *at call's no-follow flag), so a
  symlink swapped in at the last moment is never followed;
- metadata is set through the open descriptor, or with no-follow *at calls.

Only regular files are ever opened for reading, and a file is read only if
the descriptor is still the regular file that was listed (a device node
swapped in is neither opened twice nor read). Nothing here reads a
directory on a proc or sysfs mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

# How tarfile tells an end-of-archive block from a bad or cut header: these
# classes have been in tarfile since Python 3.2, outside its documented API.
from tarfile import EOFHeaderError, InvalidHeaderError, TruncatedHeaderError  # type: ignore[attr-defined]

from quiltd.fs.remove import remove_tree
from quiltd.fs.resolve import KERNEL_FILESYSTEMS, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, fs_type, openat2
from quiltd.runtime.copyspec import Failure

RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE


class CopyError(Exception):
    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass
class Progress:
    """Bytes of the tar stream and members so far; `tick` is called on every move (the idle watch)."""

    tick: Callable[[], None]
    bytes: int = 0
    entries: int = 0


def _io_error(what: str, e: OSError) -> CopyError:
    return CopyError(Failure.IO, f"{what}: {e.strerror or e}")


def _components(path: str, what: str) -> list[str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CopyError(Failure.INVALID, f"{what} {path!r} has a '..' component")
    return parts


def _open_dir(root_fd: int, parts: list[str], shown: str) -> int:
    """A descriptor of the directory parts name inside the root, resolved in the root."""
    try:
        return openat2(root_fd, "/".join(parts) or ".", os.O_RDONLY | os.O_DIRECTORY, RESOLVE)
    except FileNotFoundError:
        raise CopyError(Failure.NO_PATH, f"no such directory in the container: {shown}") from None
    except NotADirectoryError:
        raise CopyError(Failure.INVALID, f"not a directory in the container: {shown}") from None
    except OSError as e:
        raise _io_error(shown, e) from None


# ---------------------------------------------------------------- in


class _Input:
    """The caller's descriptor as a file for tarfile: counts bytes, enforces the cap, feeds the idle watch."""

    def __init__(self, fd: int, max_bytes: int, progress: Progress) -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self.progress = progress

    def read(self, size: int = CHUNK) -> bytes:
        try:
            data = os.read(self.fd, min(max(size, 1), CHUNK))
        except OSError as e:
            raise _io_error("reading the tar stream", e) from None
        self.progress.bytes += len(data)
        self.progress.tick()
        if self.progress.bytes > self.max_bytes:
            raise self.over()
        return data

    def over(self) -> CopyError:
        return CopyError(Failure.LIMIT, f"the tar stream is over max_bytes ({self.max_bytes} bytes); "
                         "pass a larger max_bytes to CopyInEx")


def _last(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    members: list[tarfile.TarInfo] = tar.members  # type: ignore[attr-defined]  # the stream's, so far
    return members[-1] if members else None


def _after(tar: tarfile.TarFile) -> str:
    """Where a stream went wrong, for messages: after which member."""
    last = _last(tar)
    if last is None:
        return "before any member"
    return f"after member {last.name!r} (its header at offset {last.offset})"


def _bad_stream(tar: tarfile.TarFile, e: tarfile.TarError, length: int) -> CopyError:
    """tarfile's error, said with the member it is about; length: the stream's bytes, if it ended."""
    last = _last(tar)
    if last is not None and last.isreg():
        where = f"member {last.name!r} (its header at offset {last.offset}, {last.size} bytes of data)"
        if length < last.offset_data + last.size:
            return CopyError(Failure.INVALID, f"the tar stream ends inside the data of {where}")
        if length < last.offset_data + last.size + -last.size % BLOCK:
            return CopyError(Failure.INVALID, f"the tar stream ends inside the padding of {where}")
    # An extended header not followed by a good one, say.
    return CopyError(Failure.INVALID, f"bad tar stream {_after(tar)}: {e}")


class _StrictTarInfo(tarfile.TarInfo):
    """Reads headers as TarInfo does, but lets no malformed stream pass for a complete one.

    In stream mode tarfile takes a bad header after the first member, or a
    stream cut inside a header, for the end of the archive, and extraction
    would succeed with the members before it. The rule here instead: the
    archive ends at its first all-zero header block (the end-of-archive
    marker; writers put two, then pad with zeros), or at an end of stream that
    falls exactly where a header would start. After the marker only zero
    bytes may follow; they are read to the end, so the writer never sees a
    broken pipe. Anything else is an error that names the offset and the
    last whole member.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _StrictTarInfo:
        stream = tar.fileobj
        assert stream is not None
        start = stream.tell()
        # A header that follows a pax or GNU extended header is read through
        # here too; tarfile reports those failures itself.
        outer = start == tar.offset
        try:
            return super().fromtarfile(tar)
        except EOFHeaderError:
            if outer:
                _read_zeros_to_end(tar, start)
            raise
        except (TruncatedHeaderError, InvalidHeaderError) as e:
            if not outer or start == 0:
                raise  # the first header: "not a tar stream", as tarfile says
            if isinstance(e, TruncatedHeaderError):
                raise CopyError(Failure.INVALID, f"the tar stream ends inside a header at offset {start}, "
                                f"{_after(tar)}") from None
            raise CopyError(Failure.INVALID, f"bad tar header at offset {start} ({e}), "
                            f"{_after(tar)}") from None


def _read_zeros_to_end(tar: tarfile.TarFile, marker: int) -> None:
    """Reads what follows the end-of-archive marker at offset marker; it must be zeros only."""
    stream = tar.fileobj
    assert stream is not None
    offset = stream.tell()
    while chunk := stream.read(CHUNK):
        if chunk.count(0) != len(chunk):
            at = offset + len(chunk) - len(chunk.lstrip(b"\0"))
            raise CopyError(Failure.INVALID, f"data at offset {at} after the end-of-archive marker at "
                            f"offset {marker}, {_after(tar)}; only zero padding may follow it "
                            "(concatenated archives are not read)")
        offset += len(chunk)


class _Dirs:
    """Directory descriptors by path under the destination, looked up (and made) in the root.

    Only the last one is kept open: tar streams list a directory's members together.
    """

    def __init__(self, root_fd: int, dest: list[str]) -> None:
        self.root_fd = root_fd
        self.dest = dest
        self.key: tuple[str, ...] | None = None
        self.fd = -1

    def get(self, parts: list[str], make: bool) -> int:
        key = tuple(parts)
        if key == self.key:
            return self.fd
        self.close()
        try:
            self.fd = openat2(self.root_fd, "/".join(self.dest + parts) or ".", os.O_RDONLY | os.O_DIRECTORY,
                              RESOLVE)
        except FileNotFoundError:
            if not make:
                raise CopyError(Failure.INVALID,
                                f"hard link into {'/'.join(parts)!r}, which does not exist") from None
            self.fd = self._make(parts)
        except OSError as e:
            raise _io_error(f"directory {'/'.join(parts)}", e) from None
        self.key = key
        if fs_type(self.fd) in KERNEL_FILESYSTEMS:
            # The kernel's files: a privileged writer must not reach them from a tar stream.
            raise CopyError(Failure.INVALID, f"{'/'.join(self.dest + parts)} is on proc or sysfs, "
                            "which are not written")
        return self.fd

    def _make(self, parts: list[str]) -> int:
        """Makes the missing directories one by one, each in its parent's descriptor."""
        fd = openat2(self.root_fd, "/".join(self.dest) or ".", os.O_RDONLY | os.O_DIRECTORY, RESOLVE)
        try:
            for i, part in enumerate(parts):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                # Looked up again from the root: what was made (or found) may
                # have been swapped for a symlink since.
                found = openat2(self.root_fd, "/".join(self.dest + parts[: i + 1]),
                                os.O_RDONLY | os.O_DIRECTORY, RESOLVE)
                os.close(fd)
                fd = found
            return fd
        except OSError as e:
            os.close(fd)
            raise _io_error(f"making directory {'/'.join(parts)}", e) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.key = None


def _check_member(member: tarfile.TarInfo) -> list[str]:
    """The member's path components under the destination, if it is a member we extract at all."""
    parts = _components(member.name, "tar member")
    if not parts:
        return parts  # "." or "/": the destination itself, which we leave as it is
    if member.ischr() or member.isblk():
        raise CopyError(Failure.INVALID, f"tar member {member.name!r} is a device node; "
                        "device nodes are not copied into containers")
    if not (member.isdir() or member.isreg() or member.issym() or member.islnk() or member.isfifo()):
        raise CopyError(Failure.INVALID, f"tar member {member.name!r} has an unknown type")
    if member.islnk() and not _components(member.linkname, "hard link target"):
        raise CopyError(Failure.INVALID, f"hard link {member.name!r} to the destination itself")
    return parts


class _Ahead:
    """A regular file, read with pread from where the copy starts reading it: the file's offset stays."""

    def __init__(self, fd: int, start: int, length: int, progress: Progress) -> None:
        self.fd = fd
        self.start = start
        self.length = length
        self.progress = progress
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        left = max(self.length - self.pos, 0)
        size = left if size < 0 else min(size, left)
        try:
            data = os.pread(self.fd, size, self.start + self.pos)
        except OSError as e:
            raise _io_error("reading the tar stream", e) from None
        self.pos += len(data)
        self.progress.tick()
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


def _check_ahead(in_fd: int, max_bytes: int, progress: Progress, over: Callable[[], CopyError]) -> None:
    """When the stream is a regular file, checks all of it before anything is written.

    Its headers are read (data is skipped) and held to the same rules as
    during the copy: the end of the archive, member names and types, the
    size. So a file that would fail on any of those fails with nothing
    written. A pipe or socket can only be checked as it is read.
    """
    st = os.fstat(in_fd)
    if not stat.S_ISREG(st.st_mode):
        return
    start = os.lseek(in_fd, 0, os.SEEK_CUR)
    length = max(st.st_size - start, 0)
    if length > max_bytes:
        raise over()
    ahead = _Ahead(in_fd, start, length, progress)
    try:
        tar = tarfile.open(fileobj=ahead, mode="r:", tarinfo=_StrictTarInfo)  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.ReadError as e:
        raise CopyError(Failure.INVALID, f"not a tar stream: {e}") from None
    try:
        for member in tar:
            _check_member(member)
    except tarfile.TarError as e:
        raise _bad_stream(tar, e, length) from None


def extract(root_fd: int, dest: str, in_fd: int, max_bytes: int, progress: Progress) -> None:
    """Extracts the tar stream read from in_fd into the existing directory dest of the root."""
    dest_parts = _components(dest, "path")
    os.close(_open_dir(root_fd, dest_parts, dest))  # exists, and is a directory
    source = _Input(in_fd, max_bytes, progress)
    _check_ahead(in_fd, max_bytes, progress, source.over)
    try:
        tar = tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK,  # type: ignore[call-overload]  # noqa: SIM115
                           tarinfo=_StrictTarInfo)
    except tarfile.ReadError as e:
        raise CopyError(Failure.INVALID, f"not a tar stream: {e}") from None
    dirs = _Dirs(root_fd, dest_parts)
    later: list[tuple[list[str], tarfile.TarInfo]] = []  # directory times, set when all is in
    try:
        for member in tar:
            parts = _check_member(member)
            if not parts:
                continue
            parent = dirs.get(parts[:-1], make=True)
            name = parts[-1]
            if member.isdir():
                _make_dir(parent, name, member)
                later.append((parts, member))
            elif member.isreg():
                if progress.bytes + member.size > max_bytes:
                    raise source.over()  # before a byte of it is written
                data = tar.extractfile(member)
                assert data is not None
                _write_file(parent, name, member, data, progress)
            elif member.issym():
                _replace(parent, name, keep_dir=False)
                os.symlink(member.linkname, name, dir_fd=parent)
                _set_meta_nofollow(parent, name, member)
            elif member.islnk():
                target = _components(member.linkname, "hard link target")
                source_dir = os.dup(dirs.get(target[:-1], make=False))
                try:
                    parent = dirs.get(parts[:-1], make=True)
                    _replace(parent, name, keep_dir=False)
                    # linkat without AT_SYMLINK_FOLLOW: a symlink target is linked, never followed.
                    os.link(target[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(source_dir)
            else:  # a FIFO: _check_member let no other type through
                _replace(parent, name, keep_dir=False)
                os.mkfifo(name, member.mode & 0o7777, dir_fd=parent)
                _set_meta_nofollow(parent, name, member)
            progress.entries += 1
        dirs.close()
        for parts, member in reversed(later):
            fd = _open_dir(root_fd, dest_parts + parts, "/".join(parts))
            try:
                os.utime(fd, ns=(_ns(member.mtime), _ns(member.mtime)))
            finally:
                os.close(fd)
    except tarfile.TarError as e:
        # Where tarfile found that the stream ended early, it has read all
        # of it: progress.bytes is then its length.
        raise _bad_stream(tar, e, progress.bytes) from None
    except OSError as e:
        raise _io_error("writing in the container", e) from None
    finally:
        dirs.close()


def _ns(mtime: float) -> int:
    return int(mtime * 1_000_000_000)


def _replace(parent: int, name: str, keep_dir: bool) -> bool:
    """Removes what is at name, unless it is a directory to keep. Returns whether a directory is there."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return True
        remove_tree(parent, name)
    else:
        os.unlink(name, dir_fd=parent)
    return False


def _make_dir(parent: int, name: str, member: tarfile.TarInfo) -> None:
    if not _replace(parent, name, keep_dir=True):
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        _set_meta(fd, member)
    finally:
        os.close(fd)


def _write_file(parent: int, name: str, member: tarfile.TarInfo, data: object, progress: Progress) -> None:
    """Writes the member under a temporary name beside name, then renames it over name.

    So no file is left half written by a copy that fails (a stream cut in
    the member's data, a full disk, a timeout), and a file it replaces stays
    whole until the new one is complete.
    """
    for attempt in range(3):
        temp = f".quilt-copy-{secrets.token_hex(8)}"
        try:
            # O_EXCL: anything put there since is an error, never followed.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            break
        except FileExistsError:
            if attempt == 2:
                raise
    try:
        try:
            read = data.read  # type: ignore[attr-defined]
            while True:
                chunk = read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                progress.tick()
            _set_meta(fd, member)
            os.utime(fd, ns=(_ns(member.mtime), _ns(member.mtime)))
        finally:
            os.close(fd)
        for attempt in range(3):
            try:
                # rename never follows a symlink at name: it replaces the link itself.
                os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
                return
            except OSError as e:
                if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                    raise
                _replace(parent, name, keep_dir=False)  # a directory in the way
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise


def _set_meta(fd: int, member: tarfile.TarInfo) -> None:
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, member.mode & 0o7777)  # after chown, which drops set-id bits


def _set_meta_nofollow(parent: int, name: str, member: tarfile.TarInfo) -> None:
    os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
    os.utime(name, ns=(_ns(member.mtime), _ns(member.mtime)), dir_fd=parent, follow_symlinks=False)


# ---------------------------------------------------------------- out


class _Output:
    def __init__(self, fd: int, progress: Progress, max_bytes: int = 0) -> None:
        self.fd = fd
        self.progress = progress
        self.max_bytes = max_bytes  # 0: no cap
        self.sendfile = True

    def fits(self, arcname: str, header: int, size: int) -> None:
        """Refuses, before a byte of it is written, a member that would take the archive past max_bytes.

        The end-of-archive marker is counted in, so an archive that is
        written whole is never over the cap.
        """
        if not self.max_bytes:
            return
        needed = self.progress.bytes + header + size + -size % BLOCK + 2 * BLOCK
        if needed > self.max_bytes:
            raise CopyError(Failure.LIMIT, f"the archive would pass max_bytes ({self.max_bytes} bytes) at "
                            f"{arcname!r} ({size} bytes of data; {self.progress.bytes} bytes and "
                            f"{self.progress.entries} members written before it); the stream ends there, "
                            "without the end-of-archive marker")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                raise _io_error("writing the tar stream", e) from None
            view = view[n:]
            self.progress.bytes += n
            self.progress.tick()

    def copy_from(self, fd: int, size: int) -> None:
        """size bytes of fd; zeros if the file shrank meanwhile (the header is written already)."""
        left = size
        while left and self.sendfile:
            try:
                n = os.sendfile(self.fd, fd, None, min(left, CHUNK))
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS) and left == size:
                    self.sendfile = False
                    break
                raise _io_error("writing the tar stream", e) from None
            if n == 0:
                break
            left -= n
            self.progress.bytes += n
            self.progress.tick()
        while left:
            chunk = b""
            with contextlib.suppress(OSError):
                chunk = os.read(fd, min(left, CHUNK))
            if not chunk:
                chunk = bytes(min(left, CHUNK))
            self.write(chunk)
            left -= len(chunk)
        if size % BLOCK:
            self.write(bytes(BLOCK - size % BLOCK))


def archive(root_fd: int, path: str, out_fd: int, progress: Progress, max_bytes: int = 0) -> None:
    """Writes path of the root (not following it if it is a symlink) as a tar stream to out_fd.

    With max_bytes, the stream stops before the first member that would take
    it past that many bytes, end-of-archive marker included.
    """
    parts = _components(path, "path")
    out = _Output(out_fd, progress, max_bytes)
    if not parts:
        fd = _open_dir(root_fd, [], path)
        try:
            _emit_dir(fd, ".", out, {})
        finally:
            os.close(fd)
    else:
        parent = _open_dir(root_fd, parts[:-1], path)
        try:
            try:
                os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise CopyError(Failure.NO_PATH,
                                f"no such file or directory in the container: {path}") from None
            if fs_type(parent) in KERNEL_FILESYSTEMS:
                raise CopyError(Failure.INVALID, f"{path} is on proc or sysfs, which are not copied")
            _emit(parent, parts[-1], parts[-1], out, {})
        finally:
            os.close(parent)
    out.write(bytes(2 * BLOCK))


def _header(out: _Output, arcname: str, st: os.stat_result, kind: bytes, size: int = 0,
            linkname: str = "") -> None:
    info = tarfile.TarInfo(arcname)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.size = size
    info.mtime = st.st_mtime_ns // 1_000_000_000 if st.st_mtime_ns % 1_000_000_000 == 0 else st.st_mtime
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    out.fits(arcname, len(header), size)
    out.write(header)
    out.progress.entries += 1


def _emit(parent: int, name: str, arcname: str, out: _Output, links: dict[tuple[int, int], str]) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return  # removed while we walked
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError, OSError) as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return  # swapped meanwhile: not what was listed, so not copied
            raise _io_error(arcname, e) from None
        try:
            if fs_type(fd) in KERNEL_FILESYSTEMS:
                return
            _emit_dir(fd, arcname, out, links)
        finally:
            os.close(fd)
    elif stat.S_ISREG(mode):
        try:
            # O_NONBLOCK and O_NOCTTY: should a FIFO or a terminal have been
            # swapped in, the open neither hangs nor takes it over.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):
                return
            raise _io_error(arcname, e) from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                return  # not the file that was listed
            key = (fst.st_dev, fst.st_ino)
            if fst.st_nlink > 1 and key in links:
                _header(out, arcname, fst, tarfile.LNKTYPE, linkname=links[key])
                return
            if fst.st_nlink > 1:
                links[key] = arcname
            _header(out, arcname, fst, tarfile.REGTYPE, size=fst.st_size)
            out.copy_from(fd, fst.st_size)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=parent)
        except OSError:
            return
        _header(out, arcname, st, tarfile.SYMTYPE, linkname=target)
    elif stat.S_ISFIFO(mode):
        _header(out, arcname, st, tarfile.FIFOTYPE)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        _header(out, arcname, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
    # sockets have no tar form: left out, as tar does


def _emit_dir(fd: int, arcname: str, out: _Output, links: dict[tuple[int, int], str]) -> None:
    _header(out, arcname, os.fstat(fd), tarfile.DIRTYPE)
    try:
        names = sorted(os.listdir(fd))
    except OSError as e:
        raise _io_error(arcname, e) from None
    prefix = "" if arcname == "." else arcname + "/"
    for child in names:
        _emit(fd, child, prefix + child, out, links)
