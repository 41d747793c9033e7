"""The archives ExportImage writes, from layer directories made here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from quiltd.errors import InvalidArgument
from quiltd.fs.untar import OVERLAY_OPAQUE
from quiltd.images import imageexport
from quiltd.model import Image, ImageConfig


@pytest.mark.parametrize("name,tag", [("busybox", "busybox:latest"), ("bb:1", "bb:1"),
                                      ("my-image.v2", "my-image.v2:latest"), ("Upper", ""), ("a:b:c", "")])
def test_docker_tags(name: str, tag: str) -> None:
    assert imageexport.docker_tag(name) == tag


def test_an_unknown_format_is_named() -> None:
    with pytest.raises(InvalidArgument, match="'tar'"):
        imageexport.parse_format("tar")


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    """A base layer and one over it in overlayfs's format: a whiteout, an opaque directory, a hard link."""
    if os.geteuid() != 0:
        pytest.skip("whiteouts are 0/0 character devices and opaque marks trusted xattrs: root only")
    base, top = tmp_path / "base", tmp_path / "top"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "gone").write_text("base\n")
    (base / "srv").mkdir()
    (base / "srv" / "old").write_text("old\n")
    (top / "srv").mkdir(parents=True)
    os.setxattr(top / "srv", OVERLAY_OPAQUE, b"y")
    (top / "srv" / "new").write_text("new\n")
    os.link(top / "srv" / "new", top / "srv" / "same")
    (top / "etc").mkdir()
    os.mknod(top / "etc" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return base, top


def export(image: Image, fmt: imageexport.ArchiveFormat, dest: Path) -> tuple[imageexport.Exported, bytes]:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        exported = imageexport.write(image, fmt, fd)
    finally:
        os.close(fd)
    return exported, dest.read_bytes()


def read_tar(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data))


def blob(archive: tarfile.TarFile, name: str) -> bytes:
    f = archive.extractfile(name)
    assert f is not None
    return f.read()


def test_an_oci_archive_holds_layers_whiteouts_and_config(layers: tuple[Path, Path], tmp_path: Path) -> None:
    base, top = layers
    image = Image("img", "x", f"{top}:{base}", 0, 1_700_000_000_000_000,
                  ImageConfig(env=("A=1",), workdir="/srv", cmd=("cat", "new")), ("b" * 64, "a" * 64))
    exported, data = export(image, imageexport.ArchiveFormat.OCI, tmp_path / "out.tar")
    assert exported.bytes == len(data)
    archive = read_tar(data)
    index = json.loads(blob(archive, "index.json"))
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "img"
    manifest_bytes = blob(archive, f"blobs/sha256/{entry['digest'][7:]}")
    assert hashlib.sha256(manifest_bytes).hexdigest() == entry["digest"][7:]
    manifest = json.loads(manifest_bytes)
    config = json.loads(blob(archive, f"blobs/sha256/{manifest['config']['digest'][7:]}"))
    assert f"sha256:{exported.config_digest[7:]}" == manifest["config"]["digest"]
    assert config["config"] == {"Env": ["A=1"], "WorkingDir": "/srv", "Cmd": ["cat", "new"]}
    tars = []
    for described, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        layer = blob(archive, f"blobs/sha256/{described['digest'][7:]}")
        assert (hashlib.sha256(layer).hexdigest(), len(layer)) == (diff_id[7:], described["size"])
        tars.append(read_tar(layer))
    assert {m.name for m in tars[0]} == {"etc", "etc/gone", "srv", "srv/old"}
    upper = {m.name: m for m in tars[1]}
    assert set(upper) == {"etc", "etc/.wh.gone", "srv", "srv/.wh..wh..opq", "srv/new", "srv/same"}
    assert upper["etc/.wh.gone"].isreg() and upper["srv/.wh..wh..opq"].isreg()
    assert upper["srv/same"].islnk() and upper["srv/same"].linkname == "srv/new"


def test_the_same_image_exports_to_the_same_bytes(layers: tuple[Path, Path], tmp_path: Path) -> None:
    base, top = layers
    image = Image("img", "x", f"{top}:{base}", 0, 0)
    for fmt in imageexport.ArchiveFormat:
        first = export(image, fmt, tmp_path / "1.tar")
        assert export(image, fmt, tmp_path / "2.tar") == first


def test_a_docker_archive_tags_the_image(layers: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = layers
    image = Image("bb:1", "x", str(base), 0, 0)
    _, data = export(image, imageexport.ArchiveFormat.DOCKER, tmp_path / "d.tar")
    archive = read_tar(data)
    (entry,) = json.loads(blob(archive, "manifest.json"))
    assert entry["RepoTags"] == ["bb:1"]
    (layer,) = entry["Layers"]
    config = json.loads(blob(archive, entry["Config"]))
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(blob(archive, layer)).hexdigest()}"]
