"""Tar streams into and out of a directory tree that belongs to a container, never leaving it.

The tree is given as a descriptor of its root. The container may change it
while we work: any directory may become a symlink to "/" or to /etc/shadow
between two of our calls (the docker cp CVE-2018-15664 class). So no path
is ever joined into a host path string and looked up from the host's root.

In: the stream is read here (its end, its cap, its headers checked ahead
when it is a regular file), and its members are written by the tar engine
(quiltd.fs.untar) with the CopyIn policy: every directory looked up from
the root descriptor with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS),
so a symlink on the way resolves as if the container's root were "/"; the
last component made relative to that directory's descriptor with no-follow
calls, so a symlink swapped in at the last moment is never followed.

Out: metadata is read through the open descriptor, or with no-follow *at
calls. Only regular files are ever opened for reading, and a file is read
only if the descriptor is still the regular file that was listed (a device
node swapped in is neither opened twice nor read). Nothing here reads a
directory on a proc or sysfs mount, or writes one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

# How tarfile tells an end-of-archive block from a bad or cut header: these
# classes have been in tarfile since Python 3.2, outside its documented API.
from tarfile import EOFHeaderError, InvalidHeaderError, TruncatedHeaderError  # type: ignore[attr-defined]

from quiltd.fs.resolve import IN_ROOT, KERNEL_FILESYSTEMS, fs_type, openat2
from quiltd.fs.untar import Devices, Extractor, Lookup, OverLimit, Refused, TarPolicy, check_member
from quiltd.runtime.copyspec import Failure

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
        return openat2(root_fd, "/".join(parts) or ".", os.O_RDONLY | os.O_DIRECTORY, IN_ROOT)
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


def _check_ahead(in_fd: int, max_bytes: int, progress: Progress, over: Callable[[], CopyError],
                 policy: TarPolicy) -> None:
    """When the stream is a regular file, checks all of it before anything is written.

    Its headers are read (data is skipped) and held to the same rules as
    during the copy: the end of the archive, the engine's member rules, the
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
            check_member(member, policy)
    except Refused as e:
        raise CopyError(Failure.INVALID, e.message) from None
    except tarfile.TarError as e:
        raise _bad_stream(tar, e, length) from None


def copy_in_policy(max_bytes: int) -> TarPolicy:
    """The tar engine's rules for CopyIn, where they differ from an image's on purpose.

    The tree is a container's: its links resolve in its root, and a link
    may point anywhere in it. The tar's ids are the container's ids and its
    setuid bits stay. A device node is refused (the container's /dev is the
    runtime's), a leading "/" names the destination as tar -x reads it, the
    destination's own metadata is left as it is, and a file is written
    beside its name and renamed over it, so a failed copy leaves no half
    file in a tree the container uses.
    """
    return TarPolicy(lookup=Lookup.IN_ROOT, devices=Devices.REFUSE, keep_setuid=True,
                     strip_absolute=True, links_inside_tree=False, root_metadata=False,
                     atomic_files=True, max_bytes=max_bytes, content="the copied content")


def extract(root_fd: int, dest: str, in_fd: int, max_bytes: int, progress: Progress) -> None:
    """Extracts the tar stream read from in_fd into the existing directory dest of the root."""
    dest_parts = _components(dest, "path")
    os.close(_open_dir(root_fd, dest_parts, dest))  # exists, and is a directory
    policy = copy_in_policy(max_bytes)
    source = _Input(in_fd, max_bytes, progress)
    _check_ahead(in_fd, max_bytes, progress, source.over, policy)
    try:
        tar = tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK,  # type: ignore[call-overload]  # noqa: SIM115
                           tarinfo=_StrictTarInfo)
    except tarfile.ReadError as e:
        raise CopyError(Failure.INVALID, f"not a tar stream: {e}") from None
    engine = Extractor(root_fd, policy, base=dest_parts, tick=progress.tick)
    done = False
    try:
        for member in tar:
            if member.isreg() and progress.bytes + member.size > max_bytes:
                raise source.over()  # before a byte of it is written
            if engine.add(tar, member):  # the destination itself ("./") is not counted
                progress.entries += 1
        engine.finish()
        done = True
    except OverLimit as e:
        raise CopyError(Failure.LIMIT, e.message) from None
    except Refused as e:
        raise CopyError(Failure.INVALID, e.message) from None
    except tarfile.TarError as e:
        # Where tarfile found that the stream ended early, it has read all
        # of it: progress.bytes is then its length.
        raise _bad_stream(tar, e, progress.bytes) from None
    except OSError as e:
        raise _io_error("writing in the container", e) from None
    finally:
        if not done:
            # What was written stays (a copy from a pipe cannot be undone),
            # with its directories' owners and modes rather than 0700.
            with contextlib.suppress(OSError, Refused):
                engine.finish()
        engine.close()


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
