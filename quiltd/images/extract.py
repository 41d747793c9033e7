"""Safe extraction of rootfs tarballs into an image directory.

The archive comes from a client and is treated as hostile: every member is
checked before anything is written, nothing is ever resolved through a
symlink, and the whole archive is streamed so neither its size nor its
compression ratio decides how much memory the daemon uses. A failed
extraction removes the destination completely, so the caller only ever sees
a complete image or none.

tarfile's own extraction filters are not used: they only exist from 3.12
(and as late backports), and the checks here are stricter anyway.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol, TypeVar

from quiltd.errors import InvalidImage, LimitExceeded
from quiltd.fs.remove import remove_path, remove_tree

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_CHUNK = 1 << 20

# Long-name and pax records are read into memory whole by tarfile, so they
# get a cap of their own; real ones are a few hundred bytes.
_META_MAX = 1 << 20

# Paths longer than PATH_MAX could not be used inside the container anyway,
# and the cap bounds how deep a single member can make us walk and create.
_PATH_MAX = 4095

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_META_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
# What marks a directory of an overlay lower layer opaque; trusted.* needs
# CAP_SYS_ADMIN to write, so a container cannot forge one in its upper layer.
OVERLAY_OPAQUE = "trusted.overlay.opaque"

# Left free on the image directory's filesystem after an import: it usually
# holds the state database and the containers' writable layers too, and an
# import that fills it would make every later commit fail with NoSpace.
DISK_RESERVE = 64 << 20

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Errors that mean "this archive (or reading it) is broken" and so become
# InvalidImage; anything else is a bug here and must surface as one.
_ARCHIVE_ERRORS = (
    OSError,
    EOFError,
    tarfile.TarError,
    lzma.LZMAError,
    zlib.error,
    ValueError,
    OverflowError,
    RecursionError,
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 16 << 30  # total size of regular-file content
    max_entries: int = 2_000_000
    keep_setuid: bool = False  # setuid/setgid bits are dropped unless asked


@dataclass(frozen=True)
class ExtractedImage:
    image_id: str  # sha256 (64 lowercase hex digits) of the archive bytes as stored
    size_bytes: int  # sum of regular file sizes written
    entries: int  # archive members processed, including directories and links
    skipped_devices: int = 0  # character and block device members, not created (see _Extractor)


@dataclass(frozen=True)
class _Meta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int


def extract_rootfs_tarball(
    source: Path, dest: Path, limits: ImageLimits = ImageLimits(),
    on_read: Callable[[int], None] | None = None,
) -> ExtractedImage:
    """Extract the rootfs tarball `source` into the new directory `dest`.

    Raises InvalidImage for anything wrong with the archive, after removing
    `dest`. `dest` already existing (or its parent missing) is the caller's
    bug, not the image's, so that raises the plain OSError and leaves the
    existing path alone.
    """
    src_fd = _open_source(source)
    try:
        return extract_rootfs_fd(src_fd, str(source), dest, limits, on_read)
    finally:
        os.close(src_fd)


def extract_rootfs_fd(
    src_fd: int, label: str, dest: Path, limits: ImageLimits = ImageLimits(),
    on_read: Callable[[int], None] | None = None,
) -> ExtractedImage:
    """extract_rootfs_tarball from an open regular file, read from its start; src_fd stays open.

    label names the source in messages.
    """
    try:
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            raise InvalidImage(f"{label}: not a regular file")
        os.set_blocking(src_fd, True)
        os.lseek(src_fd, 0, os.SEEK_SET)
    except OSError as exc:
        raise InvalidImage(f"{label}: cannot read: {_describe(exc)}") from None
    os.mkdir(dest, 0o700)
    try:
        with open(src_fd, "rb", buffering=0, closefd=False) as raw:
            return _extract(raw, dest, limits, on_read)
    except InvalidImage:
        remove_path(dest)
        raise
    except _ARCHIVE_ERRORS as exc:
        remove_path(dest)
        raise InvalidImage(f"{label}: corrupt or unreadable archive: {_describe(exc)}") from exc
    except BaseException:
        remove_path(dest)
        raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _open_source(source: Path) -> int:
    # O_NONBLOCK so a FIFO planted at the path cannot hang the open; only
    # regular files are accepted because the whole file is read to hash it.
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidImage(f"{source}: no such file") from None
    except OSError as exc:
        raise InvalidImage(f"{source}: cannot open: {_describe(exc)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidImage(f"{source}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stream_cap(limits: ImageLimits) -> int:
    # Everything decompressed beyond file content is headers and padding;
    # this generous bound stops a stream of padding or metadata records that
    # would otherwise keep us decompressing long after max_bytes.
    return limits.max_bytes + limits.max_entries * 2048 + (16 << 20)


def _apply(hashed: io.RawIOBase, magic: bytes, extractor: _Extractor, stream_cap: int,
           tar_digest: hashlib._Hash | None = None) -> None:
    """Decompresses (by magic) and extracts one tar stream, reading `hashed` to its very end.

    With `tar_digest`, the decompressed tar stream is hashed into it as it
    goes, to its very end (what an image config's diff_ids name).
    """
    if magic.startswith(_ZSTD_MAGIC):
        with _ZstdPipe(hashed) as pipe:
            _untar(_Capped(pipe.stdout, stream_cap, tar_digest), extractor)
            pipe.finish()
    else:
        inner = _decompressor(magic, io.BufferedReader(hashed, _CHUNK))
        try:
            _untar(_Capped(inner, stream_cap, tar_digest), extractor)
        finally:
            inner.close()
        # Compressed formats may end with bytes the decompressor
        # never asked for; they are part of the file and its id.
        while hashed.read(_CHUNK):
            pass


def _extract(raw: io.FileIO, dest: Path, limits: ImageLimits,
             on_read: Callable[[int], None] | None) -> ExtractedImage:
    digest = hashlib.sha256()
    hashed = _HashingReader(raw, digest, on_read)
    # Peek without consuming so the hash still sees every byte exactly once.
    magic = os.pread(raw.fileno(), 6, 0)
    root_fd = os.open(dest, _DIR_OPEN)
    try:
        extractor = _Extractor(root_fd, limits)
        try:
            _apply(hashed, magic, extractor, _stream_cap(limits))
            extractor.finish()
        finally:
            extractor.close()
    finally:
        os.close(root_fd)
    return ExtractedImage(
        image_id=digest.hexdigest(),
        size_bytes=extractor.size_bytes,
        entries=extractor.entries,
        skipped_devices=extractor.skipped_devices,
    )


class _Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


def _decompressor(magic: bytes, raw: io.BufferedReader) -> _Stream:
    # By content, not by name: clients rename files, and a wrong guess
    # would only produce a confusing error.
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(_XZ_MAGIC):
        return lzma.LZMAFile(raw)
    return raw


def _untar(capped: _Capped, extractor: _Extractor) -> None:
    stream = io.BufferedReader(capped, _CHUNK)
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo) as tf:
        while (member := tf.next()) is not None:
            extractor.add(tf, member)
            # tarfile keeps every TarInfo it has read, even in stream mode;
            # with millions of entries that is the one unbounded allocation.
            members = getattr(tf, "members", None)
            if isinstance(members, list):
                members.clear()
    # Read the decompressed stream to its real end so a truncated or corrupt
    # compressed archive fails its integrity check (gzip CRC, xz check, zstd
    # exit status) instead of passing because tar's end marker came first.
    while stream.read(_CHUNK):
        pass


class _HashingReader(io.RawIOBase):
    """The raw archive bytes, hashed exactly as they are read."""

    def __init__(self, raw: io.RawIOBase, digest: hashlib._Hash,
                 on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        n = self._raw.readinto(buffer) or 0
        self._digest.update(memoryview(buffer)[:n])
        if self._on_read is not None and n:
            self._on_read(n)
        return n


class _Capped(io.RawIOBase):
    """The decompressed tar stream, cut off once it grows past a bound, and hashed if asked."""

    def __init__(self, inner: _Stream, cap: int, digest: hashlib._Hash | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._cap = cap
        self._seen = 0
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(len(view))
        n = len(data)
        self._seen += n
        if self._seen > self._cap:
            raise InvalidImage(
                f"archive expands past {self._cap} bytes of tar stream; refusing it"
            )
        view[:n] = data
        if self._digest is not None:
            self._digest.update(data)
        return n


_T = TypeVar("_T", bound="_CheckedTarInfo")


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo that turns tarfile's silent leniencies into errors.

    tarfile ends an archive quietly at a missing end marker, a short header
    or a bad checksum after the first member, which would make a truncated
    download look like a smaller, valid image. It also reads long-name and
    pax records whole into memory, whatever size they claim.
    """

    @classmethod
    def frombuf(cls: type[_T], buf: bytes | bytearray, encoding: str, errors: str) -> _T:
        if not buf:
            raise InvalidImage("archive is truncated: it ends without a tar end-of-archive marker")
        if len(buf) != tarfile.BLOCKSIZE:
            raise InvalidImage("archive is truncated: it ends inside a tar header")
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            if not any(buf):
                raise  # an all-zero block is tar's end marker
            raise InvalidImage(f"not a tar archive, or corrupt: {exc}") from None
        if info.type in _META_TYPES and info.size > _META_MAX:
            raise InvalidImage(
                f"tar metadata record of {info.size} bytes before {info.name!r} is too large"
            )
        return info


# For readers of tar headers elsewhere (the image archive scan).
CheckedTarInfo = _CheckedTarInfo


class _ZstdPipe:
    """`zstd -dc` fed from the hashing reader by a thread, read by tarfile.

    The thread exists so the raw bytes pass through our hash on their way to
    zstd instead of being read twice.
    """

    def __init__(self, hashed: io.RawIOBase) -> None:
        # A file, not a pipe: nobody reads stderr while zstd runs.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        try:
            self._proc = subprocess.Popen(
                ["zstd", "-d", "-c", "-q"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except FileNotFoundError:
            self._stderr.close()
            raise InvalidImage("cannot read a zstd archive: the zstd tool is not installed") from None
        except BaseException:
            self._stderr.close()
            raise
        assert self._proc.stdout is not None
        self.stdout: IO[bytes] = self._proc.stdout
        self._stop = threading.Event()
        self._read_error: OSError | None = None
        self._finished = False
        self._thread = threading.Thread(
            target=self._pump, args=(hashed,), name="quilt-zstd-feed", daemon=True
        )
        self._thread.start()

    def _pump(self, hashed: io.RawIOBase) -> None:
        sink = self._proc.stdin
        try:
            while not self._stop.is_set():
                chunk = hashed.read(_CHUNK)
                if not chunk:
                    break
                if sink is not None:
                    try:
                        sink.write(chunk)
                    except (BrokenPipeError, ValueError):
                        # zstd quit early; its exit status says why. Keep
                        # reading so the hash still covers the whole file.
                        sink = None
        except OSError as exc:
            self._read_error = exc
        finally:
            if sink is not None:
                with contextlib.suppress(BrokenPipeError):
                    sink.close()

    def finish(self) -> None:
        """Call once the output was read to its end: checks zstd's verdict."""
        rc = self._proc.wait()
        self._thread.join()
        self._finished = True
        if self._read_error is not None:
            raise InvalidImage(f"reading the archive failed: {_describe(self._read_error)}")
        if rc != 0:
            self._stderr.seek(0)
            detail = self._stderr.read(4096).decode("utf-8", "replace").strip()
            raise InvalidImage(f"corrupt zstd archive: {detail or f'zstd exited with {rc}'}")

    def __enter__(self) -> _ZstdPipe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            # Killing zstd also unblocks the feeder if it is stuck writing
            # into a full pipe nobody reads any more.
            self._stop.set()
            self._proc.kill()
            self._thread.join()
            self._proc.wait()
        self.stdout.close()
        self._stderr.close()


class _Extractor:
    """Writes members below root_fd, one at a time, as tarfile yields them.

    With `layers`, the members are image layers applied in order: whiteouts
    (`.wh.<name>`, `.wh..wh..opq`) remove what lower layers wrote.

    Absolute symlinks are stored as they are: they resolve in the container's
    root at run time, and nothing here resolves through any link. Device
    nodes are skipped and counted, never created: a container gets its /dev
    from the runtime, and a node in an image would let its holder open a
    host device through the image directory (see docs/images.md).
    """

    def __init__(self, root_fd: int, limits: ImageLimits, layers: bool = False,
                 lowers: Sequence[int] | None = None) -> None:
        self._root = root_fd
        self._limits = limits
        self._layers = layers
        # With lowers (root fds of the layers below, top first), this is one
        # layer extracted on its own in overlayfs's format: whiteouts become
        # overlayfs whiteouts instead of removing anything, and the layers
        # are stacked at mount time (see OverlayLayer).
        self._lowers = lowers
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
        # parent fd saves walking the path again for most of them.
        self._cached: tuple[tuple[str, ...], int] | None = None
        self.size_bytes = 0
        self.entries = 0
        self.skipped_devices = 0

    def close(self) -> None:
        self._drop_cache()

    def begin_layer(self) -> None:
        self._written = set()

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        self.entries += 1
        if self.entries > self._limits.max_entries:
            raise InvalidImage(
                f"{name!r}: too many entries (limit {self._limits.max_entries})"
            )
        parts = _member_parts(name, name, "path")
        try:
            if self._lowers is not None and parts and parts[-1].startswith(_WHITEOUT):
                self._overlay_whiteout(parts, name)
                return
            if self._layers and parts and parts[-1].startswith(_WHITEOUT):
                self._whiteout(parts, name)
                return
            meta = self._meta(member)
            if self._layers:
                self._written.update(parts[:i] for i in range(1, len(parts) + 1))
            self._add(tf, member, parts, meta)
        except _ARCHIVE_ERRORS as exc:
            # Say which member broke: "File name too long" alone is useless.
            raise InvalidImage(f"{name!r}: {_describe(exc)}") from exc

    # -- whiteouts (layers only) -------------------------------------------

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        base, dir_parts = parts[-1], parts[:-1]
        if base.startswith(_WHITEOUT + _WHITEOUT) and base != _OPAQUE:
            return  # aufs bookkeeping (.wh..wh.plnk and the like), nothing to apply
        hidden = base[len(_WHITEOUT):]
        if base != _OPAQUE and hidden in ("", ".", ".."):
            raise InvalidImage(f"{name!r}: whiteout of no name")
        # Whatever we remove below may be the cached parent or lie under it.
        self._drop_cache()
        try:
            parent = self._walk(dir_parts, name, create=False)
        except (FileNotFoundError, InvalidImage):
            return  # no such directory (or not a directory): nothing below to hide
        try:
            if base == _OPAQUE:
                self._hide_lower(parent, dir_parts)
            elif (*dir_parts, hidden) not in self._written:
                self._remove_entry(parent, hidden)
        finally:
            if parent != self._root:
                os.close(parent)

    def _overlay_whiteout(self, parts: tuple[str, ...], name: str) -> None:
        """A whiteout as overlayfs reads it: a 0/0 character device, or an opaque directory's xattr."""
        base, dir_parts = parts[-1], parts[:-1]
        if base.startswith(_WHITEOUT + _WHITEOUT) and base != _OPAQUE:
            return  # aufs bookkeeping, nothing to apply
        if base == _OPAQUE:
            self._drop_cache()
            fd = self._walk(dir_parts, name, create=True)
            try:
                os.setxattr(fd, OVERLAY_OPAQUE, b"y")
            finally:
                if fd != self._root:
                    os.close(fd)
            return
        hidden = base[len(_WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise InvalidImage(f"{name!r}: whiteout of no name")
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
        """Removes from a directory what lower layers put there; keeps what this layer wrote."""
        with os.scandir(dir_fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for entry, is_dir in entries:
            child = (*dir_parts, entry)
            if child not in self._written:
                self._remove_entry(dir_fd, entry)
            elif is_dir:
                fd = os.open(entry, _DIR_OPEN, dir_fd=dir_fd)
                try:
                    self._hide_lower(fd, child)
                finally:
                    os.close(fd)

    def _remove_entry(self, parent: int, base: str) -> None:
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(parent, base)
        else:
            os.unlink(base, dir_fd=parent)

    def _add(
        self,
        tf: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: tuple[str, ...],
        meta: _Meta,
    ) -> None:
        name = member.name
        if member.isdir():
            self._add_dir(parts, name, meta)
            return
        if not parts:
            raise InvalidImage(f"{name!r}: only a directory may stand for the image root")
        if member.ischr() or member.isblk():
            # Whatever an earlier member or lower layer put at this path is
            # replaced by the node, as tar and overlayfs would; the node
            # itself is just not made.
            self._clear(self._parent_fd(parts, name), parts, keep_dir=False)
            self.skipped_devices += 1
            return
        if member.isreg():
            self._add_file(tf, member, parts, meta)
        elif member.issym():
            self._add_symlink(member, parts, meta)
        elif member.islnk():
            self._add_hardlink(member, parts)
        elif member.isfifo():
            self._add_fifo(parts, name, meta)
        else:
            raise InvalidImage(f"{name!r}: unsupported tar member type {member.type!r}")

    def _meta(self, member: tarfile.TarInfo) -> _Meta:
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            # 2**32-1 is chown's "leave unchanged", not an owner.
            if not 0 <= value < 0xFFFFFFFF:
                raise InvalidImage(f"{member.name!r}: invalid {what} {value}")
        mode = member.mode & 0o7777
        if not self._limits.keep_setuid:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        mtime = member.mtime
        mtime_ns = mtime * 1_000_000_000 if isinstance(mtime, int) else int(mtime * 1e9)
        return _Meta(mode=mode, uid=member.uid, gid=member.gid, mtime_ns=mtime_ns)

    # -- members ------------------------------------------------------------

    def _add_dir(self, parts: tuple[str, ...], name: str, meta: _Meta) -> None:
        if parts:
            parent = self._parent_fd(parts, name)
            if not self._clear(parent, parts, keep_dir=True):
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self._dirs[parts] = meta

    def _add_file(
        self,
        tf: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: tuple[str, ...],
        meta: _Meta,
    ) -> None:
        name = member.name
        # Checked against the header before any content is decompressed, so
        # a bomb stops at its first oversized member.
        # member.size is the apparent size, holes of a sparse member included:
        # holes are written out as zeros, so that is what the member costs on
        # disk, however small the archive.
        if self.size_bytes + member.size > self._limits.max_bytes:
            raise LimitExceeded(
                f"{name!r}: image content exceeds the limit of {self._limits.max_bytes} bytes "
                f"(option max_bytes); this member alone is {member.size} bytes"
            )
        self._check_free_space(name, member.size)
        content = tf.extractfile(member)
        if content is None:
            raise InvalidImage(f"{name!r}: no content for a regular file")
        parent = self._parent_fd(parts, name)
        self._clear(parent, parts, keep_dir=False)
        fd = os.open(parts[-1], _FILE_CREATE, 0o600, dir_fd=parent)
        try:
            written = 0
            while chunk := content.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
            if written != member.size:
                raise InvalidImage(f"{name!r}: truncated content ({written} of {member.size})")
            self.size_bytes += written
            if self._chown:
                os.fchown(fd, meta.uid, meta.gid)
            # After chown, which clears setuid/setgid.
            os.fchmod(fd, meta.mode)
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
        finally:
            os.close(fd)

    def _check_free_space(self, name: str, size: int) -> None:
        # Asked before each file rather than once: earlier members, and other
        # imports running at the same time, have used some of it since.
        vfs = os.fstatvfs(self._root)
        free = vfs.f_bavail * vfs.f_frsize - DISK_RESERVE
        if size > free:
            raise LimitExceeded(
                f"{name!r}: {size} bytes do not fit in the free space of the image directory's "
                f"filesystem ({max(free, 0)} bytes, keeping {DISK_RESERVE} bytes free)"
            )

    def _add_symlink(self, member: tarfile.TarInfo, parts: tuple[str, ...], meta: _Meta) -> None:
        name, target = member.name, member.linkname
        if not target:
            raise InvalidImage(f"{name!r}: symlink with an empty target")
        if len(target.encode("utf-8", "surrogateescape")) > _PATH_MAX:
            raise InvalidImage(f"{name!r}: symlink target too long")
        # Lexical resolution is what a host-side reader would do, and the
        # only one possible: the link may point at things not extracted yet.
        # An absolute target starts at the image root.
        depth = 0 if target.startswith("/") else len(parts) - 1
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise InvalidImage(
                        f"{name!r}: symlink target {target!r} escapes the image root"
                    )
            else:
                depth += 1
        # Linux has no mode on a symlink to set.
        self._add_node(parts, name, meta, lambda base, parent: os.symlink(target, base, dir_fd=parent),
                       set_mode=False)

    def _add_hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        target_parts = _member_parts(target, name, "hard link target")
        if not target_parts:
            raise InvalidImage(f"{name!r}: hard link to the image root")
        if target_parts == parts:
            return
        # The target must be a regular file this extraction already wrote;
        # the walk below refuses symlinked parents, so a link can only ever
        # reach an inode inside the image.
        missing = InvalidImage(
            f"{name!r}: hard link target {target!r} is not a regular file extracted earlier"
        )
        try:
            target_parent = self._walk(target_parts[:-1], name, create=False)
        except FileNotFoundError:
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
            # never applies the link entry's own mode or owner.
            os.link(
                target_parts[-1],
                parts[-1],
                src_dir_fd=target_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            if target_parent != self._root:
                os.close(target_parent)

    def _copy_from_lower(self, target_parts: tuple[str, ...], parts: tuple[str, ...], name: str) -> bool:
        """A hard link to a file of a lower layer, in a layer of its own: a copy of that file.

        A link cannot cross layer directories, and the lower layer may be
        shared with other images, so its inode is never touched. The
        lower layers are searched top first, each without following a link.
        """
        for lower in self._lowers or ():
            try:
                parent = _walk_beneath(lower, target_parts[:-1])
            except (FileNotFoundError, NotADirectoryError, InvalidImage):
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
                self._check_free_space(name, st.st_size)
                if self.size_bytes + st.st_size > self._limits.max_bytes:
                    raise LimitExceeded(f"{name!r}: image content exceeds the limit of "
                                        f"{self._limits.max_bytes} bytes (option max_bytes)")
                dest_parent = self._parent_fd(parts, name)
                self._clear(dest_parent, parts, keep_dir=False)
                fd = os.open(parts[-1], _FILE_CREATE, 0o600, dir_fd=dest_parent)
                try:
                    while chunk := os.read(src, _CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                    self.size_bytes += st.st_size
                    if self._chown:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    os.utime(fd, ns=(st.st_mtime_ns, st.st_mtime_ns))
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            return True
        return False

    def _add_fifo(self, parts: tuple[str, ...], name: str, meta: _Meta) -> None:
        self._add_node(parts, name, meta, lambda base, parent: os.mkfifo(base, 0o600, dir_fd=parent),
                       set_mode=True)

    def _add_node(self, parts: tuple[str, ...], name: str, meta: _Meta,
                  make: Callable[[str, int], None], *, set_mode: bool) -> None:
        """Makes parts[-1] with make(base, parent_fd), then sets its owner, mode and mtime."""
        parent = self._parent_fd(parts, name)
        self._clear(parent, parts, keep_dir=False)
        base = parts[-1]
        make(base, parent)
        if self._chown:
            os.chown(base, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
        if set_mode:
            # After chown, which clears setuid/setgid. It follows a link, so
            # only for a node just made that is none (a FIFO).
            os.chmod(base, meta.mode, dir_fd=parent)
        os.utime(base, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)

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
            if self._cached is not None and self._cached[0][: len(parts)] == parts:
                self._drop_cache()
            remove_tree(parent, base)
            self._dirs.pop(parts, None)
        else:
            os.unlink(base, dir_fd=parent)
        return False

    def _parent_fd(self, parts: tuple[str, ...], name: str) -> int:
        """A borrowed fd of the directory that will hold parts[-1]."""
        dir_parts = parts[:-1]
        if not dir_parts:
            return self._root
        if self._cached is not None and self._cached[0] == dir_parts:
            return self._cached[1]
        fd = self._walk(dir_parts, name, create=True)
        self._drop_cache()
        self._cached = (dir_parts, fd)
        return fd

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _walk(self, dir_parts: tuple[str, ...], name: str, *, create: bool) -> int:
        """Open root/dir_parts one component at a time, never following a link.

        Returns an fd the caller owns (the root fd itself for no parts).
        Missing directories are created when `create`, as tar does for
        archives that omit parent entries.
        """
        fd = self._root
        try:
            for i, part in enumerate(dir_parts):
                try:
                    next_fd = os.open(part, _DIR_OPEN, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, _DIR_OPEN, dir_fd=fd)
                    # Not the umask's choice: an implied directory is 0755.
                    os.fchmod(next_fd, 0o755)
                    self._dirs.pop(dir_parts[: i + 1], None)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(dir_parts[: i + 1])
                    raise InvalidImage(
                        f"{name!r}: {where!r} is not a directory (a symlink or file); "
                        "refusing to write through it"
                    ) from None
                if fd != self._root:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self._root:
                os.close(fd)
            raise
        return fd

    def finish(self) -> None:
        """Apply the deferred directory owners, modes and mtimes."""
        self._drop_cache()
        for parts, meta in self._dirs.items():
            try:
                fd = self._walk(parts, "/".join(parts), create=False)
            except (FileNotFoundError, InvalidImage):
                # Replaced or removed by a later member.
                continue
            try:
                if self._chown:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            finally:
                if fd != self._root:
                    os.close(fd)
        if () not in self._dirs:
            os.fchmod(self._root, 0o755)


class LayeredImage:
    """An image directory built from layers applied in order (OCI and docker save).

    Each layer is extracted with the rootfs tarball rules, plus whiteouts,
    into the one new directory `dest`. On any error the directory is removed
    before the error leaves: use it as a context manager.
    """

    def __init__(self, dest: Path, limits: ImageLimits = ImageLimits()) -> None:
        self._dest = dest
        self._limits = limits
        os.mkdir(dest, 0o700)
        try:
            self._root = os.open(dest, _DIR_OPEN)
        except BaseException:
            os.rmdir(dest)
            raise
        self._extractor = _Extractor(self._root, limits, layers=True)

    def apply_layer(self, raw: io.RawIOBase, magic: bytes, what: str) -> str:
        """Extracts one layer (tar, gzip, xz or zstd by magic), reading raw to its end.

        Returns the sha256 (hex) of the layer's uncompressed tar stream.
        """
        self._extractor.begin_layer()
        return _apply_layer(raw, magic, self._extractor, self._limits, what)

    def finish(self) -> tuple[int, int]:
        """Applies the directories' metadata; returns (content bytes, entries)."""
        self._extractor.finish()
        return self._extractor.size_bytes, self._extractor.entries

    @property
    def skipped_devices(self) -> int:
        """Device node members of all layers so far, skipped (not created)."""
        return self._extractor.skipped_devices

    def __enter__(self) -> LayeredImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._extractor.close()
        os.close(self._root)
        if exc is not None:
            remove_path(self._dest)


def _apply_layer(raw: io.RawIOBase, magic: bytes, extractor: _Extractor, limits: ImageLimits,
                 what: str) -> str:
    """Extracts one layer with extractor; the sha256 (hex) of its uncompressed tar stream.

    Errors name the layer (what).
    """
    tar_digest = hashlib.sha256()
    try:
        _apply(raw, magic, extractor, _stream_cap(limits), tar_digest)
    except InvalidImage as exc:
        raise InvalidImage(f"{what}: {exc.message}") from exc
    except LimitExceeded as exc:
        raise LimitExceeded(f"{what}: {exc.message}") from exc
    except _ARCHIVE_ERRORS as exc:
        raise InvalidImage(f"{what}: corrupt or unreadable layer: {_describe(exc)}") from exc
    return tar_digest.hexdigest()


class OverlayLayer:
    """One image layer extracted into its own new directory, in overlayfs's format.

    Layers kept this way are shared by every image built on them and
    stacked as the overlay's lower directories when a container starts.
    `lowers` are the directories of the layers below, top first: only read,
    for hard links to their files. On any error `dest` is removed before the
    error leaves: use it as a context manager.
    """

    def __init__(self, dest: Path, limits: ImageLimits, lowers: Sequence[Path] = ()) -> None:
        self._dest = dest
        self._limits = limits
        self._lower_fds: list[int] = []
        os.mkdir(dest, 0o700)
        try:
            self._root = os.open(dest, _DIR_OPEN)
            try:
                for lower in lowers:
                    self._lower_fds.append(os.open(lower, _DIR_OPEN))
            except BaseException:
                self._close_fds()
                raise
        except BaseException:
            os.rmdir(dest)
            raise
        self._extractor = _Extractor(self._root, limits, lowers=self._lower_fds)

    def apply(self, raw: io.RawIOBase, magic: bytes, what: str) -> str:
        """Extracts the layer (tar, gzip, xz or zstd by magic), reading raw to its end.

        Returns the sha256 (hex) of the layer's uncompressed tar stream.
        """
        return _apply_layer(raw, magic, self._extractor, self._limits, what)

    def finish(self) -> tuple[int, int]:
        """Applies the directories' metadata; returns (content bytes, entries)."""
        self._extractor.finish()
        return self._extractor.size_bytes, self._extractor.entries

    @property
    def skipped_devices(self) -> int:
        return self._extractor.skipped_devices

    def _close_fds(self) -> None:
        for fd in self._lower_fds:
            os.close(fd)
        self._lower_fds.clear()
        if hasattr(self, "_root"):
            os.close(self._root)

    def __enter__(self) -> OverlayLayer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._extractor.close()
        self._close_fds()
        if exc is not None:
            remove_path(self._dest)


def _walk_beneath(root: int, dir_parts: tuple[str, ...]) -> int:
    """Opens root/dir_parts one component at a time, never following a link; root itself for ()."""
    fd = root
    try:
        for part in dir_parts:
            try:
                next_fd = os.open(part, _DIR_OPEN, dir_fd=fd)
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


def _member_parts(path: str, member: str, what: str) -> tuple[str, ...]:
    """Split an archive path into components, refusing anything that leaves the root."""
    if path.startswith("/"):
        raise InvalidImage(f"{member!r}: absolute {what} {path!r}")
    if len(path.encode("utf-8", "surrogateescape")) > _PATH_MAX:
        raise InvalidImage(f"{member!r}: {what} too long")
    parts = path.split("/")
    if ".." in parts:
        raise InvalidImage(f"{member!r}: {what} {path!r} contains '..'")
    return tuple(p for p in parts if p not in ("", "."))
