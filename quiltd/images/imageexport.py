"""ExportImage: an image written as an OCI archive or a docker-archive, for skopeo, podman and docker.

Each stored layer is a directory in overlayfs's format (whiteouts as 0/0
character devices, opaque directories marked by an xattr): it goes out as
an image layer tar, whiteouts as `.wh.<name>` and `.wh..wh..opq` files. An
image imported as one directory (a rootfs tarball) goes out as one layer.

The archive names every blob by its sha256 and gives its size in the tar
header before its data, and a layer tar is not kept anywhere: each layer is
made twice, once to learn its digest and size, and once into the stream.
Both runs read the same immutable directory in the same order and write
the same headers, so the bytes are the same; the second run checks that.
Nothing is written to disk, so nothing is left behind by a failure or a kill.

The config is made from what quiltd keeps of the image (its Env,
WorkingDir, Entrypoint, Cmd and User) with the new layers' diff_ids: the
exported image's id is therefore not the id it was imported with.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import platform
import re
import select
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quiltd.errors import CopyFailed, Internal, InvalidArgument, Timeout
from quiltd.fs.untar import OVERLAY_OPAQUE
from quiltd.model import Image

IDLE_TIMEOUT_SEC = 30.0  # a reader that takes nothing for this long ends the export
_BLOCK = tarfile.BLOCKSIZE
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# A docker reference's repository and tag (the distribution grammar, lower case).
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


class ArchiveFormat(str, enum.Enum):
    OCI = "oci-archive"
    DOCKER = "docker-archive"


def parse_format(value: object) -> ArchiveFormat:
    try:
        return ArchiveFormat(value)
    except ValueError:
        raise InvalidArgument(f"unknown archive format {value!r}: use 'oci-archive' or "
                              "'docker-archive'") from None


@dataclass(frozen=True)
class Exported:
    bytes: int  # of the archive
    config_digest: str  # sha256:<hex>, the exported image's id


def docker_tag(name: str) -> str:
    """The RepoTags entry of a docker-archive: the name with ':latest' unless it has a tag; "" if
    the name is no docker reference (upper case, for one), which leaves the image untagged."""
    repository, _, tag = name.partition(":")
    tag = tag or "latest"
    if not _REPOSITORY.fullmatch(repository) or not _TAG.fullmatch(tag):
        return ""
    return f"{repository}:{tag}"


def write(image: Image, fmt: ArchiveFormat, fd: int) -> Exported:
    """Writes the archive to fd (a pipe, socket or file the caller opened); run in a worker thread."""
    out = _FdWriter(fd)
    layers = [_Layer(Path(p)) for p in reversed(image.path.split(":"))]  # base first
    for layer in layers:
        layer.measure()
    config = _json(_config(image, [layer.diff_id for layer in layers]))
    config_hex = hashlib.sha256(config).hexdigest()
    if fmt == ArchiveFormat.OCI:
        manifest = _json({
            "schemaVersion": 2, "mediaType": _OCI_MANIFEST,
            "config": {"mediaType": _OCI_CONFIG, "digest": f"sha256:{config_hex}", "size": len(config)},
            "layers": [{"mediaType": _OCI_LAYER, "digest": layer.diff_id, "size": layer.size}
                       for layer in layers],
        })
        manifest_hex = hashlib.sha256(manifest).hexdigest()
        index = _json({"schemaVersion": 2, "manifests": [{
            "mediaType": _OCI_MANIFEST, "digest": f"sha256:{manifest_hex}", "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": image.name}}]})
        _member_dir(out, "blobs/")
        _member_dir(out, "blobs/sha256/")
        _member_bytes(out, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _member_bytes(out, "index.json", index)
        _member_bytes(out, f"blobs/sha256/{manifest_hex}", manifest)
        _member_bytes(out, f"blobs/sha256/{config_hex}", config)
        for layer in layers:
            layer.emit(out, f"blobs/sha256/{layer.hex}")
    else:
        tag = docker_tag(image.name)
        manifest = _json([{"Config": f"{config_hex}.json", "RepoTags": [tag] if tag else [],
                           "Layers": [f"{layer.hex}/layer.tar" for layer in layers]}])
        _member_bytes(out, "manifest.json", manifest)
        _member_bytes(out, f"{config_hex}.json", config)
        for layer in layers:
            _member_dir(out, f"{layer.hex}/")
            layer.emit(out, f"{layer.hex}/layer.tar")
    out.write(b"\0" * (2 * _BLOCK))  # end of archive
    return Exported(out.count, f"sha256:{config_hex}")


def _config(image: Image, diff_ids: list[str]) -> dict[str, object]:
    c = image.config
    runtime: dict[str, object] = {}
    if c.env:
        runtime["Env"] = list(c.env)
    if c.workdir:
        runtime["WorkingDir"] = c.workdir
    if c.entrypoint:
        runtime["Entrypoint"] = list(c.entrypoint)
    if c.cmd:
        runtime["Cmd"] = list(c.cmd)
    if c.user:
        runtime["User"] = c.user
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(image.created_usec / 1e6))
    return {"created": created, "architecture": _ARCH.get(platform.machine(), platform.machine()),
            "os": "linux", "config": runtime, "rootfs": {"type": "layers", "diff_ids": diff_ids}}


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _header(name: str, kind: bytes, size: int, mode: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _member_dir(out: _FdWriter, name: str) -> None:
    out.write(_header(name, tarfile.DIRTYPE, 0, 0o755))


def _member_bytes(out: _FdWriter, name: str, data: bytes) -> None:
    out.write(_header(name, tarfile.REGTYPE, len(data), 0o644))
    out.write(data)
    out.write(b"\0" * (-len(data) % _BLOCK))


class _Layer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.hex = ""
        self.size = 0

    @property
    def diff_id(self) -> str:
        return f"sha256:{self.hex}"

    def measure(self) -> None:
        sink = _Sink(lambda _: None)
        _layer_tar(self.path, sink)
        self.hex, self.size = sink.hash.hexdigest(), sink.count

    def emit(self, out: _FdWriter, name: str) -> None:
        out.write(_header(name, tarfile.REGTYPE, self.size, 0o644))
        sink = _Sink(out.write)
        _layer_tar(self.path, sink)
        if (sink.hash.hexdigest(), sink.count) != (self.hex, self.size):
            # The stream is broken now: the caller is told, not handed a wrong archive.
            raise Internal(f"layer {self.path.name} changed while it was exported")
        out.write(b"\0" * (-self.size % _BLOCK))


class _Sink:
    """A file object for tarfile: hashes and counts what goes through, then passes it on."""

    def __init__(self, then: Callable[[bytes], object]) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self._then = then

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        self._then(bytes(data))
        return len(data)

    def tell(self) -> int:
        return self.count


def _layer_tar(root: Path, sink: _Sink) -> None:
    """One layer directory as an image layer tar, in a fixed order with fixed headers."""
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        _add_tree(tar, str(root), "")


def _add_tree(tar: tarfile.TarFile, directory: str, prefix: str) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        arcname = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            tar.addfile(_info(f"{prefix}.wh.{entry.name}", st, tarfile.REGTYPE))
            continue
        if stat.S_ISSOCK(st.st_mode):
            continue  # a socket cannot be archived, as tar leaves it out too
        info = tar.gettarinfo(entry.path, arcname)
        info.uname = info.gname = ""  # numeric owners only: the host's names mean nothing to the image
        info.mtime = int(st.st_mtime)
        if info.isreg():
            with open(entry.path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)
        if entry.is_dir(follow_symlinks=False):
            if _opaque(entry.path):
                tar.addfile(_info(f"{arcname}/.wh..wh..opq", st, tarfile.REGTYPE))
            _add_tree(tar, entry.path, arcname + "/")


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o600
    info.mtime = int(st.st_mtime)
    return info


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OVERLAY_OPAQUE, follow_symlinks=False) == b"y"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


class _FdWriter:
    """Writes to the caller's descriptor, waiting at most IDLE_TIMEOUT_SEC for it to take data."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.count = 0
        # A blocking pipe or socket that polls writable takes a page without
        # blocking, not necessarily more: larger writes could wait forever
        # on a reader that stopped. A file never waits.
        self._chunk = 1 << 20 if stat.S_ISREG(os.fstat(fd).st_mode) else 4096
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._poll.poll(IDLE_TIMEOUT_SEC * 1000):
                raise Timeout(f"the reader took nothing for {IDLE_TIMEOUT_SEC:g} s: export ended")
            try:
                n = os.write(self._fd, view[:self._chunk])
            except BlockingIOError:
                continue
            except OSError as e:
                raise CopyFailed(f"writing the archive failed: {e.strerror}") from None
            view = view[n:]
            self.count += n
