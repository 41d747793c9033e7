"""OCI image layouts (a directory or a tar of one) and `docker save` archives.

The format is told by content: a directory must be an OCI layout; a plain
tar is an OCI layout when it holds `oci-layout` and `index.json`, a docker
archive when it holds `manifest.json`, and otherwise a rootfs tarball (the
caller's business). The manifest is read, each layer is streamed from the
source and applied in order onto one directory by images.LayeredImage (the
rootfs tarball rules plus whiteouts), and every blob is checked against its
digest where the format gives one. The image id is the sha256 of the config,
as docker and podman count it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import re
import stat
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from quiltd.errors import AccessDenied, InvalidArgument, InvalidImage
from quiltd.fs.resolve import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2
from quiltd.grammar import ENV_RE, USER_RE
from quiltd.images.extract import CheckedTarInfo, ImageLimits, LayeredImage, OverlayLayer
from quiltd.images.layerstore import LayerStore
from quiltd.model import ImageConfig

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_JSON_MAX = 4 << 20  # manifests and configs are a few KiB; a bigger one is not read
# An image archive has a few members per layer (docker allows ~127 layers) and
# none deeper than blobs/sha256/<hex>. A tar with more, or with a deeper path,
# is a rootfs, and its scan stops there: a 50,000-file rootfs took 6 s to scan whole.
_INDEX_MAX = 10_000
_DEPTH_MAX = 3  # blobs/sha256/<hex> is the deepest path an image archive needs
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})\Z")  # \Z: $ would let a final newline in
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
# Where an OCI index names its images: the tag (or full name) of the layout
# spec, and the full name containerd and docker (25 and later) add.
_REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"
_DOCKER_HUB = ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}
_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class ImportedImage:
    image_id: str  # sha256 of the config blob
    size_bytes: int
    config: ImageConfig
    layers: int
    skipped_devices: int = 0  # device node members of its layers, not created


@dataclass(frozen=True)
class _Layer:
    path: str
    digest: str  # hex sha256 of the bytes as stored (OCI blobs); "" when the format gives none
    diff_id: str = ""  # hex sha256 of the uncompressed tar (docker archives)


@dataclass(frozen=True)
class _Blob:
    """An open file or a stretch of one: the source of a layer."""

    fd: int
    offset: int
    size: int


class _Source(Protocol):
    docker: bool  # a docker save archive of the old layout, not an OCI layout

    def blob(self, path: str, what: str) -> _Blob: ...
    def close(self) -> None: ...


# (dir_fd, path, flags, resolve) -> fd: how the files of a layout directory
# are opened; an import for a member opens them with the member's credentials.
Opener = Callable[[int, str, int, int], int]


def plain_opener(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    return openat2(dir_fd, path, flags, resolve)


class _DirSource:
    """An OCI layout directory; no path inside it may go through a symlink."""

    def __init__(self, fd: int, opener: Opener) -> None:
        self._fd = fd
        self._opener = opener
        self._open: list[int] = []
        self.docker = False

    def blob(self, path: str, what: str) -> _Blob:
        try:
            fd = self._opener(self._fd, path, _OPEN, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                              | RESOLVE_NO_MAGICLINKS)
        except FileNotFoundError:
            raise InvalidImage(f"{what}: {path} is missing") from None
        except PermissionError:
            # Only an import for a member opens with less than root's rights.
            raise AccessDenied(f"{what}: {path}: the caller may not read it, and quiltd reads a "
                               "layout's files with its caller's permissions") from None
        except OSError as exc:
            raise InvalidImage(f"{what}: {path}: {exc.strerror}") from None
        self._open.append(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidImage(f"{what}: {path} is not a regular file")
        os.set_blocking(fd, True)
        return _Blob(fd, 0, st.st_size)

    def close(self) -> None:
        for fd in self._open:
            os.close(fd)
        os.close(self._fd)


class _TarSource:
    """A plain tar holding an image: blobs are read in place, never extracted to disk."""

    def __init__(self, fd: int, members: dict[str, tuple[int, int]]) -> None:
        self._fd = fd
        self._members = members
        # Newer docker writes an OCI layout with a manifest.json beside it: read it as OCI.
        self.docker = not ("oci-layout" in members and "index.json" in members)

    def blob(self, path: str, what: str) -> _Blob:
        found = self._members.get(path)
        if found is None:
            raise InvalidImage(f"{what}: {path} is missing from the archive")
        return _Blob(self._fd, *found)

    def close(self) -> None:
        os.close(self._fd)


class _BlobReader(io.RawIOBase):
    """A blob's bytes, hashed on the way and counted for progress."""

    def __init__(self, blob: _Blob, on_read: Callable[[int], None] | None) -> None:
        super().__init__()
        self._blob = blob
        self._pos = 0
        self._on_read = on_read
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._blob.size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._blob.fd, want, self._blob.offset + self._pos)
        if not data:
            raise InvalidImage("the archive ends inside a blob")
        n = len(data)
        view[:n] = data
        self._pos += n
        self.digest.update(data)
        if self._on_read is not None:
            self._on_read(n)
        return n


def open_image_source(fd: int, label: str, opener: Opener = plain_opener) -> _Source | None:
    """The image in the open file or directory fd if it is an OCI layout or docker archive.

    None for anything else. Takes fd over: it belongs to the source
    returned, and is closed otherwise. label names it in messages.
    """
    source = label
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            dir_source = _DirSource(fd, opener)
            for marker in ("oci-layout", "index.json"):
                try:
                    os.stat(marker, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    raise InvalidImage(f"{source}: a directory must be an OCI image layout, "
                                       f"and it has no {marker}") from None
            return dir_source
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None  # the rootfs path gives the precise refusal
        os.set_blocking(fd, True)
        try:
            members = _scan_tar(fd)
        except OSError as exc:
            # A file that stat calls regular may still refuse reads (/proc/self/mem: EIO).
            raise InvalidImage(f"{source}: cannot read: {exc.strerror or exc}") from None
        if members is None:
            os.close(fd)
            return None
        return _TarSource(fd, members)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _scan_tar(fd: int) -> dict[str, tuple[int, int]] | None:
    """(offset, size) of the shallow regular files of a plain tar holding an image; None if it does not."""
    if os.pread(fd, 5, 257) != b"ustar" and not _looks_like_v7_tar(fd):
        return None  # compressed or not a tar: a rootfs tarball, or garbage for that path to refuse
    members: dict[str, tuple[int, int]] = {}
    raw = os.fdopen(os.dup(fd), "rb")
    try:
        # Only headers are read; content is seeked over. An image archive has
        # a few files per layer: past the cap this is a rootfs (or garbage).
        with tarfile.open(fileobj=raw, mode="r:", tarinfo=CheckedTarInfo) as tf:
            for _ in range(_INDEX_MAX):
                member = tf.next()
                if member is None:
                    break
                members_seen = getattr(tf, "members", None)  # kept by tarfile for every member
                if isinstance(members_seen, list):
                    members_seen.clear()
                name = "/".join(p for p in member.name.split("/") if p not in ("", "."))
                if name.count("/") >= _DEPTH_MAX:
                    return None
                if member.isreg() and ".." not in name.split("/"):
                    members[name] = (member.offset_data, member.size)
            else:
                return None
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return None
    finally:
        raw.close()
    if "oci-layout" in members and "index.json" in members:
        return members
    if "manifest.json" in members:
        return members
    return None


def _looks_like_v7_tar(fd: int) -> bool:
    header = os.pread(fd, 512, 0)
    if len(header) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


@dataclass(frozen=True)
class StoredLayer:
    diff_id: str  # hex sha256 of the uncompressed layer tar: its name in the layer store
    size_bytes: int  # its file content
    new: bool  # extracted by this import, not found in the store


@dataclass(frozen=True)
class LayeredImport:
    image_id: str  # sha256 of the config blob
    config: ImageConfig
    layers: tuple[StoredLayer, ...]  # base first
    skipped_devices: int  # in the layers this import extracted
    pinned: tuple[str, ...]  # diff_ids pinned in the store: unpin once the image is on record (or not)


def import_layers(source: _Source, store: LayerStore, limits: ImageLimits,
                  on_progress: Callable[[int, int], None] | None = None,
                  ref: str | None = None, known_sizes: Mapping[str, int] | None = None,
                  committed: list[str] | None = None) -> LayeredImport:
    """Stores the layers of `source` in `store`, each once: a layer stored already is not read (its blob
    is only opened).

    Layers are named by their diff_id (the config's rootfs.diff_ids), and a
    new one is checked against it and against its blob digest before it
    gets that name. Closes `source`. `known_sizes` gives the content size of
    layers on record. Each layer this import stores is added to `committed`
    as it is: on an error nothing stays pinned, and the caller removes those
    that no image has recorded meanwhile.
    """
    pinned: list[str] = []
    try:
        read = _read_manifest_and_config(source, ref)
        layers, config = read.layers, read.config
        layers = _with_diff_ids(layers, read.config_json)
        present = []
        for layer in layers:
            pinned.append(layer.diff_id)
            present.append(store.pin(layer.diff_id) and layer.diff_id in (known_sizes or {}))
        # Every blob is opened, a stored layer's too, though only new ones are read: opening is
        # the check that the caller may read the file (a member's opener has the member's
        # credentials), so naming a stored layer's digest gets no one past it.
        blobs = {n: source.blob(layer.path, "layer") for n, layer in enumerate(layers)}
        counted = _progress(on_progress, sum(blobs[n].size for n, here in enumerate(present) if not here))
        counted(0)
        stored: list[StoredLayer] = []
        skipped = 0
        remaining = limits.max_bytes
        for number, (layer, here) in enumerate(zip(layers, present, strict=True), start=1):
            if here:
                size = (known_sizes or {})[layer.diff_id]
                stored.append(StoredLayer(layer.diff_id, size, new=False))
                remaining -= size
                continue
            blob = blobs[number - 1]
            what = f"layer {number} ({layer.path})"
            # The layers below, top first: a hard link to one of their files becomes a copy.
            lowers = [store.path(d.diff_id) for d in reversed(stored)]
            scratch = store.scratch()
            layer_limits = replace(limits, max_bytes=max(remaining, 0))
            with OverlayLayer(scratch, layer_limits, lowers) as extracted:
                reader = _BlobReader(blob, counted)
                magic = os.pread(blob.fd, 6, blob.offset)[: min(6, blob.size)]
                tar_digest = extracted.apply(reader, magic, what)
                if layer.digest and reader.digest.hexdigest() != layer.digest:
                    raise InvalidImage(f"{what}: content does not match its digest sha256:{layer.digest}")
                if tar_digest != layer.diff_id:
                    raise InvalidImage(f"{what}: the uncompressed layer does not match its diff_id "
                                       f"sha256:{layer.diff_id} in the image config")
                size, _ = extracted.finish()
                skipped += extracted.skipped_devices
            store.commit(scratch, layer.diff_id)
            if committed is not None:
                committed.append(layer.diff_id)
            stored.append(StoredLayer(layer.diff_id, size, new=True))
            remaining -= size
        return LayeredImport(read.image_id, config, tuple(stored), skipped,
                             tuple(pinned))
    except BaseException:
        store.unpin(pinned)
        raise
    finally:
        source.close()


def _progress(on_progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """Counts the bytes read of total and reports (done, total) after each piece."""
    done = 0

    def counted(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    return counted


def layer_count(source: _Source, ref: str | None = None) -> int:
    """How many layers the image of `source` has; source stays open."""
    _, layers = _docker_manifest(source, ref) if source.docker else _oci_manifest(source, ref)
    return len(layers)


def import_image(source: _Source, dest: Path, limits: ImageLimits,
                 on_progress: Callable[[int, int], None] | None = None,
                 ref: str | None = None) -> ImportedImage:
    """Builds the image of `source` in the new directory `dest`; closes `source`.

    `ref` picks one image of an archive holding several (see _select); an
    archive of one image is imported without it.
    """
    try:
        read = _read_manifest_and_config(source, ref)
        layers, config = read.layers, read.config
        if source.docker:
            layers = _with_diff_ids(layers, read.config_json)
        blobs = [(layer, source.blob(layer.path, "layer")) for layer in layers]
        counted = _progress(on_progress, sum(b.size for _, b in blobs))

        with LayeredImage(dest, limits) as image:
            for number, (layer, blob) in enumerate(blobs, start=1):
                what = f"layer {number} ({layer.path})"
                reader = _BlobReader(blob, counted)
                magic = os.pread(blob.fd, 6, blob.offset)[: min(6, blob.size)]
                tar_digest = image.apply_layer(reader, magic, what)
                # Checked after: a hostile layer was refused by its content
                # already, and a corrupt one may not even decompress.
                if layer.digest and reader.digest.hexdigest() != layer.digest:
                    raise InvalidImage(f"{what}: content does not match its digest sha256:{layer.digest}")
                if layer.diff_id and tar_digest != layer.diff_id:
                    raise InvalidImage(f"{what}: the uncompressed layer does not match its diff_id "
                                       f"sha256:{layer.diff_id} in the image config")
            size_bytes, _ = image.finish()
            skipped = image.skipped_devices
        return ImportedImage(read.image_id, size_bytes, config, len(blobs),
                             skipped)
    finally:
        source.close()


def _oci_manifest(source: _Source, ref: str | None) -> tuple[tuple[str, str], list[_Layer]]:
    layout = _json(_read_json_bytes(source, "oci-layout", "oci-layout"), "oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise InvalidImage("oci-layout: no imageLayoutVersion: not an OCI image layout")
    index = _select_in_index(_json(_read_json_bytes(source, "index.json", "index.json"), "index.json"), ref)
    for _ in range(3):  # an index may point at an index (one per platform); not deeper
        descriptor = _pick_manifest(index)
        path, digest = _blob_path(descriptor, "manifest")
        data = _read_json_bytes(source, path, "manifest")
        if hashlib.sha256(data).hexdigest() != digest:
            raise InvalidImage(f"manifest {path}: content does not match its digest")
        manifest = _json(data, "manifest")
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            index = manifest
            continue
        config = _blob_path(manifest.get("config"), "image config")
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise InvalidImage(f"manifest {path}: no list of layers")
        return config, [_Layer(*_blob_path(d, "layer")) for d in layers]
    raise InvalidImage("index.json: image indexes nested too deep")


def _pick_manifest(index: Any) -> Any:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise InvalidImage("index.json: no manifests")
    if len(manifests) == 1:
        return manifests[0]
    arch = _ARCH.get(platform.machine(), platform.machine())
    for m in manifests:
        p = m.get("platform") if isinstance(m, dict) else None
        if isinstance(p, dict) and p.get("os") == "linux" and p.get("architecture") == arch:
            return m
    raise InvalidImage(f"index.json: {len(manifests)} manifests and none for linux/{arch}")


def _select_in_index(index: Any, ref: str | None) -> Any:
    """index.json, cut down to the manifests of the one image `ref` names.

    Manifests are told apart by their names (annotations). Several that
    share a name, or have none, are one image's platforms, which
    _pick_manifest chooses from as before.
    """
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        return index  # _pick_manifest names the problem
    names = [_oci_names(m) for m in manifests]
    chosen = _select([n for n in names if n], ref, "index.json")
    if ref is None or chosen is None:
        return index  # one image, or none named: all its manifests, one per platform
    return {**index, "manifests": [m for m, n in zip(manifests, names, strict=True) if n == chosen]}


def _oci_names(descriptor: Any) -> tuple[str, ...]:
    annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
    if not isinstance(annotations, dict):
        return ()
    found = (annotations.get(_CONTAINERD_NAME), annotations.get(_REF_NAME))
    return tuple(n for n in found if isinstance(n, str) and n)


def _select(images: list[tuple[str, ...]], ref: str | None, where: str) -> tuple[str, ...] | None:
    """The names of the image `ref` names, among the names of each image of an archive.

    Without `ref`, the one image (None when there is none to tell apart).
    The first name of each image is the one shown. `ref` matches any name
    as docker would: "busybox" is "busybox:latest" and
    "docker.io/library/busybox:latest" too.
    """
    distinct = list(dict.fromkeys(images))
    shown = ", ".join(names[0] for names in distinct)
    if ref is None:
        if len(distinct) > 1:
            raise InvalidArgument(f"{where}: the archive holds {len(distinct)} images; choose one with "
                                  f"the option ref: {shown}")
        return distinct[0] if distinct else None
    want = _familiar(ref)
    matches = [names for names in distinct if want in {_familiar(n) for n in names}]
    if not matches:
        raise InvalidArgument(f"{where}: no image {ref!r} in the archive; it holds: "
                              f"{shown or 'no named image'}")
    if len(matches) > 1:
        raise InvalidArgument(f"{where}: {ref!r} names {len(matches)} images; use one of: "
                              + ", ".join(names[0] for names in matches))
    return matches[0]


def _familiar(ref: str) -> str:
    """A reference as docker shows it, with its tag: docker.io/library/busybox is busybox:latest."""
    for prefix in _DOCKER_HUB:
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
            break
    if "@" not in ref and ":" not in ref.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref


def _blob_path(descriptor: Any, what: str) -> tuple[str, str]:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise InvalidImage(f"{what}: descriptor without a sha256 digest ({digest!r})")
    media = str(descriptor.get("mediaType", ""))
    if "foreign" in media:
        raise InvalidImage(f"{what} {digest}: foreign layers ({media}) are not supported")
    return f"blobs/sha256/{match.group(1)}", match.group(1)


def _docker_manifest(source: _Source, ref: str | None) -> tuple[tuple[str, str], list[_Layer]]:
    manifest = _json(_read_json_bytes(source, "manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise InvalidImage("manifest.json: not a list of images")
    entries: list[tuple[tuple[str, ...], str, str, list[str]]] = []
    for entry in manifest:
        config = entry.get("Config") if isinstance(entry, dict) else None
        layers = entry.get("Layers") if isinstance(entry, dict) else None
        if not isinstance(config, str) or not isinstance(layers, list) or \
                not all(isinstance(p, str) for p in layers):
            raise InvalidImage("manifest.json: an entry needs Config (a path) and Layers (a list of paths)")
        # The config's file name is its digest in both the old (<hex>.json)
        # and new (blobs/sha256/<hex>) layout.
        config_path = _archive_path(config, "Config")
        name = config_path.rsplit("/", 1)[-1].removesuffix(".json")
        digest = name if re.fullmatch(r"[0-9a-f]{64}", name) else ""
        tags = entry.get("RepoTags")
        names = tuple(t for t in tags if isinstance(t, str) and t) if isinstance(tags, list) else ()
        # An image saved by id has no tag: its id (the config digest) names it.
        names = (*names, f"sha256:{digest}") if digest else names
        entries.append((names or (f"image {len(entries) + 1}",), config_path, digest, layers))
    chosen = _select([names for names, *_ in entries], ref, "manifest.json")
    _, config_path, digest, layers = next(e for e in entries if e[0] == chosen)
    return (config_path, digest), [_docker_layer(_archive_path(p, "layer")) for p in layers]


def _docker_layer(path: str) -> _Layer:
    """A layer named <id>/layer.tar has no digest of its bytes; one named blobs/sha256/<hex> has."""
    match = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", path)
    return _Layer(path, match.group(1) if match else "")


@dataclass(frozen=True)
class _Read:
    """What the manifest and config of an image say."""

    layers: list[_Layer]  # as the manifest lists them, base first
    config_json: Any
    config: ImageConfig
    image_id: str  # the sha256 (hex) of the config blob, as docker and podman name an image


def _read_manifest_and_config(source: _Source, ref: str | None) -> _Read:
    config_blob, layers = _docker_manifest(source, ref) if source.docker else _oci_manifest(source, ref)
    config_bytes = _read_json_bytes(source, config_blob[0], "image config")
    image_id = hashlib.sha256(config_bytes).hexdigest()
    if config_blob[1] and image_id != config_blob[1]:
        raise InvalidImage(f"image config {config_blob[0]}: content does not match its digest")
    config_json = _json(config_bytes, "image config")
    return _Read(layers, config_json, _image_config(config_json), image_id)


def _with_diff_ids(layers: list[_Layer], config_json: Any) -> list[_Layer]:
    """The layers with the config's diff_ids: the digests of the uncompressed tars."""
    rootfs = config_json.get("rootfs") if isinstance(config_json, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise InvalidImage("image config: no rootfs.diff_ids to check the layers against")
    if len(diff_ids) != len(layers):
        raise InvalidImage(f"image config: {len(diff_ids)} rootfs.diff_ids for the {len(layers)} layers "
                           "of the manifest")
    checked = []
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        hex_digest = _digest_hex(diff_id) if isinstance(diff_id, str) else ""
        if not hex_digest:
            raise InvalidImage(f"image config: rootfs.diff_ids entry {diff_id!r} is not a sha256 digest")
        checked.append(_Layer(layer.path, layer.digest, hex_digest))
    return checked


def _archive_path(path: str, what: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts:
        raise InvalidImage(f"manifest.json: {what} path {path!r} leaves the archive")
    return "/".join(parts)


def _digest_hex(digest: str) -> str:
    match = _DIGEST_RE.match(digest)
    return match.group(1) if match else ""


def _read_json_bytes(source: _Source, path: str, what: str) -> bytes:
    blob = source.blob(path, what)
    if blob.size > _JSON_MAX:
        raise InvalidImage(f"{what} {path}: {blob.size} bytes is too large for a JSON document")
    data = os.pread(blob.fd, blob.size, blob.offset)
    if len(data) != blob.size:
        raise InvalidImage(f"{what} {path}: truncated")
    return data


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidImage(f"{what}: not valid JSON: {exc}") from None


def _image_config(config_json: Any) -> ImageConfig:
    """The defaults for containers, checked as strictly as a client's options."""
    if not isinstance(config_json, dict):
        raise InvalidImage("image config: not a JSON object")
    c = config_json.get("config") or {}
    if not isinstance(c, dict):
        raise InvalidImage("image config: 'config' is not an object")

    def strings(key: str) -> tuple[str, ...]:
        value = c.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise InvalidImage(f"image config: {key} is not a list of strings")
        return tuple(value)

    env = strings("Env")
    for item in env:
        if not ENV_RE.match(item):
            raise InvalidImage(f"image config: invalid Env entry {item!r}")
    workdir = c.get("WorkingDir") or ""
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")) or "\0" in workdir:
        raise InvalidImage(f"image config: WorkingDir must be an absolute path, got {workdir!r}")
    user = c.get("User") or ""
    if not isinstance(user, str) or (user and not USER_RE.match(user)):
        raise InvalidImage(f"image config: invalid User {user!r}")
    return ImageConfig(env=env, workdir=workdir, entrypoint=strings("Entrypoint"), cmd=strings("Cmd"),
                       user=user)
