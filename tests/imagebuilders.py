"""Builds OCI image layouts and docker save archives with tarfile and json, for tests.

No registry and no docker: every byte of an image is made here, so a test
says exactly which layers, whiteouts and config it imports.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MTIME = 1_600_000_000


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    return ti


def file(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = _info(name, tarfile.REGTYPE, mode)
    ti.size = len(data)
    return ti, data


def directory(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, tarfile.DIRTYPE, mode), None


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = _info(name, tarfile.SYMTYPE, 0o777)
    ti.linkname = target
    return ti, None


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = _info(name, tarfile.LNKTYPE, 0o644)
    ti.linkname = target
    return ti, None


def device(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = _info(name, tarfile.CHRTYPE, 0o666)
    ti.devmajor, ti.devminor = 1, 3
    return ti, None


def whiteout(path: str) -> tuple[tarfile.TarInfo, bytes | None]:
    """Deletes `path` of lower layers."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory_path: str) -> tuple[tarfile.TarInfo, bytes | None]:
    """Hides everything lower layers put in the directory."""
    return file(f"{directory_path}/.wh..wh..opq")


Member = tuple[tarfile.TarInfo, "bytes | None"]


def tar_bytes(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sparse_tar(name: str, apparent: int) -> bytes:
    """A tar of one GNU sparse (pax 1.0) file of `apparent` bytes: holes and a last byte "x".

    The archive is a few KiB whatever `apparent` is; tar and Python's tarfile
    read it back as a file of `apparent` bytes.
    """
    content = f"1\n{apparent - 1}\n1\n".encode().ljust(512, b"\0") + b"x"
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(content)
    info.mode = 0o644
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(apparent)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    """A layer as registries and tools store it: "gzip", "xz" or "zstd"."""
    if how == "gzip":
        return gzip.compress(data)
    if how == "xz":
        return lzma.compress(data)
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def uncompressed(layer: bytes) -> bytes:
    if layer[:2] == b"\x1f\x8b":
        return gzip.decompress(layer)
    if layer[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(layer)
    if layer[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-q", "-d", "-c"], input=layer, capture_output=True, check=True).stdout
    return layer


def config_json(config: dict[str, Any], layers: Sequence[bytes]) -> bytes:
    """An image config; diff_ids are the digests of the uncompressed layers."""
    diff_ids = ["sha256:" + hashlib.sha256(uncompressed(layer)).hexdigest() for layer in layers]
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_files(layers: Sequence[bytes], config: dict[str, Any],
              annotations: dict[str, str] | None = None) -> dict[str, bytes]:
    """The files of an OCI image layout: path -> content; `annotations` go on its index entry."""
    cfg = config_json(config, layers)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(cfg),
                   "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar"
                    + ("+gzip" if layer[:2] == b"\x1f\x8b" else ""),
                    "digest": _digest(layer), "size": len(layer)} for layer in layers],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": _digest(manifest), "size": len(manifest),
                       **({"annotations": annotations} if annotations else {})}],
    }).encode()
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
    for blob in (cfg, manifest, *layers):
        files[f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}"] = blob
    return files


def docker_files(layers: Sequence[bytes], config: dict[str, Any], *, blobs: bool = False,
                 tags: Sequence[str] = ("test:latest",)) -> dict[str, bytes]:
    """The files of a `docker save` archive in its classic layout.

    With `blobs`, layers are stored as blobs/sha256/<digest of their bytes>,
    as newer docker names them, still without an OCI layout beside them.
    """
    cfg = config_json(config, layers)
    config_name = hashlib.sha256(cfg).hexdigest() + ".json"
    files = {config_name: cfg}
    paths = []
    for layer in layers:
        digest = hashlib.sha256(layer).hexdigest()
        # Named by content, as docker does (by a v1 id), so images can share an archive.
        path = f"blobs/sha256/{digest}" if blobs else f"{digest}/layer.tar"
        files[path] = layer
        paths.append(path)
    files["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": list(tags) or None, "Layers": paths}]
    ).encode()
    files["repositories"] = b"{}"
    return files


def merged(*archives: dict[str, bytes]) -> dict[str, bytes]:
    """One archive holding the images of several (all docker or all OCI), as `docker save a b` writes."""
    files: dict[str, bytes] = {}
    entries: list[Any] = []
    for archive in archives:
        files.update(archive)
        if "index.json" in archive:
            entries += json.loads(archive["index.json"])["manifests"]
        else:
            entries += json.loads(archive["manifest.json"])
    if "index.json" in files:
        files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()
    else:
        files["manifest.json"] = json.dumps(entries).encode()
    return files


def write_dir(files: dict[str, bytes], dest: Path) -> Path:
    for path, data in files.items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


def write_tar(files: dict[str, bytes], dest: Path) -> Path:
    members = []
    dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
    for d in dirs:
        parts = d.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in [m[0].name for m in members]:
                members.append(directory(sub))
    members += [file(path, data) for path, data in files.items()]
    dest.write_bytes(tar_bytes(members))
    return dest
