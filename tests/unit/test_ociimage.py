"""OCI layouts and docker save archives: layers in order, whiteouts, config, and refusals."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from quiltd import imageimport
from quiltd.errors import InvalidImage
from quiltd.images import ImageLimits
from quiltd.model import ImageConfig
from tests import imagebuilders as b

CONFIG = {"Env": ["PATH=/usr/bin:/bin", "GREETING=hello"], "WorkingDir": "/srv",
          "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING"], "User": "nobody"}


def two_layers() -> list[bytes]:
    lower = b.tar_bytes([
        b.directory("etc"), b.file("etc/a", b"a"), b.file("etc/b", b"b"),
        b.directory("opt"), b.file("opt/keep", b"k"), b.directory("opt/x"), b.file("opt/x/old", b"o"),
        b.directory("gone"), b.file("gone/f", b"f"),
        b.symlink("bin", "/usr/bin"),  # absolute, as in real base layers
    ])
    upper = b.tar_bytes([
        b.whiteout("etc/a"),
        b.whiteout("gone"),
        b.file("opt/x/new", b"n"),  # written before the opaque marker of its parent: stays
        b.opaque("opt"),
        b.file("opt/new", b"n"),
        b.hardlink("etc/b2", "etc/b"),  # a link to a file of a lower layer
    ])
    return [lower, gzip.compress(upper)]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("layout", ["oci-dir", "oci-tar", "docker"])
def test_layers_apply_in_order_with_whiteouts_and_config(tmp_path: Path, layout: str) -> None:
    layers = two_layers()
    if layout == "docker":
        source = b.write_tar(b.docker_files(layers, CONFIG), tmp_path / "image.tar")
    elif layout == "oci-tar":
        source = b.write_tar(b.oci_files(layers, CONFIG), tmp_path / "image.tar")
    else:
        source = b.write_dir(b.oci_files(layers, CONFIG), tmp_path / "layout")
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "image"
    got = imageimport.run(source, dest, ImageLimits(), lambda done, total: seen.append((done, total)))
    assert got.kind == ("docker" if layout == "docker" else "oci")
    assert tree(dest) == ["bin", "etc", "etc/b", "etc/b2", "opt", "opt/new", "opt/x", "opt/x/new"]
    assert os.readlink(dest / "bin") == "/usr/bin"
    assert os.stat(dest / "etc/b").st_ino == os.stat(dest / "etc/b2").st_ino
    assert got.config == ImageConfig(env=("PATH=/usr/bin:/bin", "GREETING=hello"), workdir="/srv",
                                     entrypoint=("/bin/sh", "-c"), cmd=("echo $GREETING",), user="nobody")
    assert len(got.image_id) == 64
    assert seen and seen[0][1] == sum(len(layer) for layer in layers)


def test_a_plain_rootfs_tarball_is_not_taken_for_an_image_archive(tmp_path: Path) -> None:
    source = tmp_path / "rootfs.tar"
    source.write_bytes(b.tar_bytes([b.directory("etc"), b.file("etc/manifest", b"x")]))
    got = imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert (got.kind, tree(tmp_path / "image")) == ("rootfs", ["etc", "etc/manifest"])


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([b.file("../escape", b"x")], "contains '..'"),
        ([b.symlink("link", "../../../etc")], "escapes the image root"),
        ([b.hardlink("shadow", "/etc/shadow")], "absolute hard link target"),
        ([b.device("dev/null")], "device nodes"),
        ([b.symlink("d", "/etc"), b.file("d/passwd", b"x")], "refusing to write through it"),
    ],
)
def test_hostile_layer_is_refused_by_path_and_leaves_nothing(
    tmp_path: Path, members: list[b.Member], message: str
) -> None:
    layers = [b.tar_bytes([b.file("ok", b"ok")]), b.tar_bytes(members)]
    source = b.write_tar(b.oci_files(layers, {}), tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match=message) as caught:
        imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert "layer 2" in caught.value.message
    assert not os.path.lexists(tmp_path / "image")


def test_layer_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    files = b.oci_files([b.tar_bytes([b.file("f", b"one")])], {})
    blob = next(p for p, data in files.items() if data.startswith(b"f"))
    files[blob] = b.tar_bytes([b.file("f", b"two")])  # same size, other bytes
    source = b.write_dir(files, tmp_path / "layout")
    with pytest.raises(InvalidImage, match="does not match its digest"):
        imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


def test_bomb_layer_stops_at_max_bytes(tmp_path: Path) -> None:
    bomb = gzip.compress(b.tar_bytes([b.file("zeros", bytes(10 << 20))]))
    assert len(bomb) < 100 << 10  # a 10 MiB file in under 100 KiB
    source = b.write_tar(b.docker_files([bomb], {}), tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match="exceeds the limit of 1048576 bytes"):
        imageimport.run(source, tmp_path / "image", ImageLimits(max_bytes=1 << 20), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"Env": ["1BAD=x"]}, "Env"),
        ({"WorkingDir": "relative"}, "WorkingDir"),
        ({"User": "a b"}, "User"),
        ({"Cmd": "not a list"}, "Cmd"),
    ],
)
def test_bad_config_is_refused(tmp_path: Path, config: dict[str, object], message: str) -> None:
    source = b.write_dir(b.oci_files([b.tar_bytes([b.file("f")])], config), tmp_path / "layout")
    with pytest.raises(InvalidImage, match=message):
        imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


def test_directory_that_is_no_oci_layout(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidImage, match="OCI image layout"):
        imageimport.run(tmp_path / "d", tmp_path / "image", ImageLimits(), lambda *_: None)


def test_docker_path_out_of_the_archive_is_refused(tmp_path: Path) -> None:
    files = b.docker_files([b.tar_bytes([b.file("f")])], {})
    files["manifest.json"] = files["manifest.json"].replace(b'"Layers": ["', b'"Layers": ["../')
    source = b.write_tar(files, tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match="leaves the archive"):
        imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)


@pytest.mark.parametrize("compression", ["none", "gzip", "xz", "zstd"])
@pytest.mark.parametrize("blobs", [False, True], ids=["id-dirs", "blobs"])
def test_docker_layers_are_checked_against_their_diff_ids(tmp_path: Path, compression: str,
                                                          blobs: bool) -> None:
    def layer(data: bytes) -> bytes:
        tar = b.tar_bytes([b.file("f", data)])
        return tar if compression == "none" else b.compress(tar, compression)

    one = layer(b"one")
    files = b.docker_files([layer(b"base"), one], {}, blobs=blobs)
    good = b.write_tar(files, tmp_path / "good.tar")
    got = imageimport.run(good, tmp_path / "good", ImageLimits(), lambda *_: None)
    assert (got.kind, (tmp_path / "good/f").read_bytes()) == ("docker", b"one")

    # The second layer swapped for another, stored under the same name: only
    # the config's diff_id (of the uncompressed tar) can tell.
    path = next(p for p, data in files.items() if data == one)
    files[path] = layer(b"two")
    bad = b.write_tar(files, tmp_path / "bad.tar")
    with pytest.raises(InvalidImage, match=rf"layer 2 \({path}\): .*does not match") as caught:
        imageimport.run(bad, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert ("diff_id" in caught.value.message) != blobs  # a blob's name is checked first
    assert not os.path.lexists(tmp_path / "image")


@pytest.mark.parametrize(
    ("rootfs", "message"),
    [
        (None, "no rootfs.diff_ids"),
        ({"type": "layers", "diff_ids": []}, "0 rootfs.diff_ids for the 1 layers"),
        ({"type": "layers", "diff_ids": ["md5:0"]}, "not a sha256 digest"),
    ],
)
def test_docker_config_without_usable_diff_ids_is_refused(tmp_path: Path, rootfs: object,
                                                           message: str) -> None:
    files = b.docker_files([b.tar_bytes([b.file("f")])], {})
    config_name = next(p for p in files if p.endswith(".json") and p != "manifest.json")
    config = json.loads(files.pop(config_name))
    config["rootfs"] = rootfs
    data = json.dumps(config).encode()
    new_name = hashlib.sha256(data).hexdigest() + ".json"
    files[new_name] = data
    files["manifest.json"] = files["manifest.json"].replace(config_name.encode(), new_name.encode())
    source = b.write_tar(files, tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match=message):
        imageimport.run(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")
