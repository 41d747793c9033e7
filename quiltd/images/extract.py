"""Image archives read safely: rootfs tarballs and layers, into image directories.

The archive comes from a client and is treated as hostile. This module
reads it: by content it picks the decompressor, hashes the bytes as they
are read, caps the decompressed stream and refuses tar's silent
leniencies. The members go to the tar engine (quiltd.fs.untar) with the
image policy: checked before anything is written, nothing ever resolved
through a symlink. The whole archive is streamed so neither its size nor
its compression ratio decides how much memory the daemon uses. A failed
extraction removes the destination completely, so the caller only ever sees
a complete image or none.

tarfile's own extraction filters are not used: they only exist from 3.12
(and as late backports), and the checks here are stricter anyway.
"""

from __future__ import annotations

import contextlib
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
from quiltd.fs.remove import remove_path
from quiltd.fs.resolve import DIR_OPEN
from quiltd.fs.untar import Devices, Extractor, Lookup, OverLimit, Refused, TarPolicy, Whiteouts

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_CHUNK = 1 << 20

# Long-name and pax records are read into memory whole by tarfile, so they
# get a cap of their own; real ones are a few hundred bytes.
_META_MAX = 1 << 20

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

# Left free on the image directory's filesystem after an import: it usually
# holds the state database and the containers' writable layers too, and an
# import that fills it would make every later commit fail with NoSpace.
DISK_RESERVE = 64 << 20

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
    skipped_devices: int = 0  # character and block device members, not created (see _ImageTree)


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


def _apply(hashed: io.RawIOBase, magic: bytes, extractor: _ImageTree, stream_cap: int,
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
    root_fd = os.open(dest, DIR_OPEN)
    try:
        extractor = _ImageTree(root_fd, image_policy(limits))
        try:
            _apply(hashed, magic, extractor, _stream_cap(limits))
            extractor.finish()
        finally:
            extractor.close()
    finally:
        os.close(root_fd)
    return ExtractedImage(
        image_id=digest.hexdigest(),
        size_bytes=extractor.engine.size_bytes,
        entries=extractor.engine.entries,
        skipped_devices=extractor.engine.skipped_devices,
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


def _untar(capped: _Capped, extractor: _ImageTree) -> None:
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


def image_policy(limits: ImageLimits, whiteouts: Whiteouts = Whiteouts.NONE) -> TarPolicy:
    """The engine's rules for an image: a new tree no link is written through, devices skipped."""
    return TarPolicy(lookup=Lookup.NO_LINKS, devices=Devices.SKIP, whiteouts=whiteouts,
                     keep_setuid=limits.keep_setuid, max_bytes=limits.max_bytes,
                     max_entries=limits.max_entries, disk_reserve=DISK_RESERVE, content="image content")


class _ImageTree:
    """The tar engine writing one image directory; its refusals become InvalidImage and LimitExceeded.

    Absolute symlinks are stored as they are: they resolve in the
    container's root at run time, and nothing here resolves through any
    link. Device nodes are skipped and counted, never created: a container
    gets its /dev from the runtime, and a node in an image would let its
    holder open a host device through the image directory (see docs/images.md).
    """

    def __init__(self, root_fd: int, policy: TarPolicy, lowers: Sequence[int] = ()) -> None:
        self.engine = Extractor(root_fd, policy, lowers=lowers)

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        try:
            self.engine.add(tf, member)
        except OverLimit as exc:
            raise LimitExceeded(exc.message) from None
        except Refused as exc:
            raise InvalidImage(exc.message) from None
        except _ARCHIVE_ERRORS as exc:
            # Say which member broke: "File name too long" alone is useless.
            raise InvalidImage(f"{member.name!r}: {_describe(exc)}") from exc

    def finish(self) -> None:
        self.engine.finish()

    def close(self) -> None:
        self.engine.close()


class _LayerTree:
    """One new directory that layers are extracted into; removed whole if an error leaves.

    Use it as a context manager. lowers: directories of the layers below,
    top first, for OverlayLayer (only read, for hard links to their files).
    """

    def __init__(self, dest: Path, limits: ImageLimits, whiteouts: Whiteouts,
                 lowers: Sequence[Path] = ()) -> None:
        self._dest = dest
        self._limits = limits
        self._fds: list[int] = []
        os.mkdir(dest, 0o700)
        try:
            self._root = os.open(dest, DIR_OPEN)
            self._fds.append(self._root)
            for lower in lowers:
                self._fds.append(os.open(lower, DIR_OPEN))
        except BaseException:
            self._close_fds()
            os.rmdir(dest)
            raise
        self._tree = _ImageTree(self._root, image_policy(limits, whiteouts), lowers=self._fds[1:])

    def _apply(self, raw: io.RawIOBase, magic: bytes, what: str) -> str:
        """Extracts one layer (tar, gzip, xz or zstd by magic), reading raw to its end.

        Returns the sha256 (hex) of the layer's uncompressed tar stream;
        errors name the layer (what).
        """
        tar_digest = hashlib.sha256()
        try:
            _apply(raw, magic, self._tree, _stream_cap(self._limits), tar_digest)
        except InvalidImage as exc:
            raise InvalidImage(f"{what}: {exc.message}") from exc
        except LimitExceeded as exc:
            raise LimitExceeded(f"{what}: {exc.message}") from exc
        except _ARCHIVE_ERRORS as exc:
            raise InvalidImage(f"{what}: corrupt or unreadable layer: {_describe(exc)}") from exc
        return tar_digest.hexdigest()

    def finish(self) -> tuple[int, int]:
        """Applies the directories' metadata; returns (content bytes, entries)."""
        self._tree.finish()
        return self._tree.engine.size_bytes, self._tree.engine.entries

    @property
    def skipped_devices(self) -> int:
        """Device node members of all layers so far, skipped (not created)."""
        return self._tree.engine.skipped_devices

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._tree.close()
        self._close_fds()
        if exc is not None:
            remove_path(self._dest)


class LayeredImage(_LayerTree):
    """An image directory built from layers applied in order (OCI and docker save).

    Each layer is extracted with the rootfs tarball rules, plus whiteouts,
    into the one new directory `dest`.
    """

    def __init__(self, dest: Path, limits: ImageLimits = ImageLimits()) -> None:
        super().__init__(dest, limits, Whiteouts.APPLY)

    def apply_layer(self, raw: io.RawIOBase, magic: bytes, what: str) -> str:
        self._tree.engine.begin_layer()
        return self._apply(raw, magic, what)

    def __enter__(self) -> LayeredImage:
        return self


class OverlayLayer(_LayerTree):
    """One image layer extracted into its own new directory, in overlayfs's format.

    Layers kept this way are shared by every image built on them and
    stacked as the overlay's lower directories when a container starts.
    `lowers` are the directories of the layers below, top first.
    """

    def __init__(self, dest: Path, limits: ImageLimits, lowers: Sequence[Path] = ()) -> None:
        super().__init__(dest, limits, Whiteouts.OVERLAY, lowers)

    def apply(self, raw: io.RawIOBase, magic: bytes, what: str) -> str:
        return self._apply(raw, magic, what)

    def __enter__(self) -> OverlayLayer:
        return self
