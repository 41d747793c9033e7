"""OCI layouts and docker save archives: layers in order, whiteouts, config, and refusals."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from quiltd.errors import InvalidArgument, InvalidImage, LimitExceeded
from quiltd.images import imageimport, ociimage
from quiltd.images.extract import ImageLimits
from quiltd.images.layerstore import LayerStore
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


def import_path(source: Path, dest: Path, limits: ImageLimits, progress: imageimport.ProgressCallback,
                ref: str | None = None) -> imageimport.Imported:
    """imageimport.run on source, opened as the daemon opens a path for root."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return imageimport.run(fd, str(source), dest, limits, progress, ref)


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
    got = import_path(source, dest, ImageLimits(), lambda done, total: seen.append((done, total)))
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
    got = import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert (got.kind, tree(tmp_path / "image")) == ("rootfs", ["etc", "etc/manifest"])


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([b.file("../escape", b"x")], "contains '..'"),
        ([b.symlink("link", "../../../etc")], "escapes the image root"),
        ([b.hardlink("shadow", "/etc/shadow")], "absolute hard link target"),
        ([b.symlink("d", "/etc"), b.file("d/passwd", b"x")], "refusing to write through it"),
    ],
)
def test_hostile_layer_is_refused_by_path_and_leaves_nothing(
    tmp_path: Path, members: list[b.Member], message: str
) -> None:
    layers = [b.tar_bytes([b.file("ok", b"ok")]), b.tar_bytes(members)]
    source = b.write_tar(b.oci_files(layers, {}), tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match=message) as caught:
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert "layer 2" in caught.value.message
    assert not os.path.lexists(tmp_path / "image")


@pytest.mark.parametrize("layout", ["oci-dir", "oci-tar", "docker"])
def test_device_nodes_of_a_base_layer_are_skipped_and_counted(tmp_path: Path, layout: str) -> None:
    # Base layers made from a debootstrap or mmdebstrap root carry /dev.
    base = b.tar_bytes([b.directory("dev"), b.device("dev/null"), b.device("dev/zero"),
                        b.directory("etc"), b.file("etc/hostname", b"h")])
    layers = [base, b.tar_bytes([b.device("dev/tty"), b.file("etc/motd", b"m")])]
    if layout == "docker":
        source = b.write_tar(b.docker_files(layers, {}), tmp_path / "image.tar")
    elif layout == "oci-tar":
        source = b.write_tar(b.oci_files(layers, {}), tmp_path / "image.tar")
    else:
        source = b.write_dir(b.oci_files(layers, {}), tmp_path / "layout")
    got = import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert got.skipped_devices == 3
    assert tree(tmp_path / "image") == ["dev", "etc", "etc/hostname", "etc/motd"]


def test_layer_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    files = b.oci_files([b.tar_bytes([b.file("f", b"one")])], {})
    blob = next(p for p, data in files.items() if data.startswith(b"f"))
    files[blob] = b.tar_bytes([b.file("f", b"two")])  # same size, other bytes
    source = b.write_dir(files, tmp_path / "layout")
    with pytest.raises(InvalidImage, match="does not match its digest"):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


def test_bomb_layer_stops_at_max_bytes(tmp_path: Path) -> None:
    bomb = gzip.compress(b.tar_bytes([b.file("zeros", bytes(10 << 20))]))
    assert len(bomb) < 100 << 10  # a 10 MiB file in under 100 KiB
    source = b.write_tar(b.docker_files([bomb], {}), tmp_path / "image.tar")
    with pytest.raises(LimitExceeded, match="exceeds the limit of 1048576 bytes"):
        import_path(source, tmp_path / "image", ImageLimits(max_bytes=1 << 20), lambda *_: None)
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
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


def test_directory_that_is_no_oci_layout(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidImage, match="OCI image layout"):
        import_path(tmp_path / "d", tmp_path / "image", ImageLimits(), lambda *_: None)


def test_docker_path_out_of_the_archive_is_refused(tmp_path: Path) -> None:
    files = b.docker_files([b.tar_bytes([b.file("f")])], {})
    files["manifest.json"] = files["manifest.json"].replace(b'"Layers": ["', b'"Layers": ["../')
    source = b.write_tar(files, tmp_path / "image.tar")
    with pytest.raises(InvalidImage, match="leaves the archive"):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)


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
    got = import_path(good, tmp_path / "good", ImageLimits(), lambda *_: None)
    assert (got.kind, (tmp_path / "good/f").read_bytes()) == ("docker", b"one")

    # The second layer swapped for another, stored under the same name: only
    # the config's diff_id (of the uncompressed tar) can tell.
    path = next(p for p, data in files.items() if data == one)
    files[path] = layer(b"two")
    bad = b.write_tar(files, tmp_path / "bad.tar")
    with pytest.raises(InvalidImage, match=rf"layer 2 \({path}\): .*does not match") as caught:
        import_path(bad, tmp_path / "image", ImageLimits(), lambda *_: None)
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
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    assert not os.path.lexists(tmp_path / "image")


def ends(message: str) -> str:
    """A pattern for an error message ending in exactly `message`."""
    return re.escape(message) + "$"


def marked(which: str) -> list[bytes]:
    """One layer whose file /which says which image this is."""
    return [b.tar_bytes([b.file("which", which.encode())])]


def docker_pair(tmp_path: Path) -> Path:
    files = b.merged(b.docker_files(marked("busybox"), {"Cmd": ["busybox"]}, tags=["busybox:latest"]),
                     b.docker_files(marked("alpine"), {"Cmd": ["alpine"]},
                                    tags=["alpine:3.19", "registry.example:5000/team/alpine:3.19"]))
    return b.write_tar(files, tmp_path / "two.tar")


@pytest.mark.parametrize(
    ("ref", "which"),
    [
        ("busybox:latest", "busybox"),
        ("busybox", "busybox"),  # no tag is :latest, as with docker
        ("docker.io/library/busybox:latest", "busybox"),
        ("alpine:3.19", "alpine"),
        ("registry.example:5000/team/alpine:3.19", "alpine"),
    ],
)
def test_docker_archive_of_several_images_imports_the_one_asked_for(tmp_path: Path, ref: str,
                                                                    which: str) -> None:
    got = import_path(docker_pair(tmp_path), tmp_path / "image", ImageLimits(), lambda *_: None, ref)
    assert (tmp_path / "image/which").read_bytes() == which.encode()
    assert got.config.cmd == (which,)


def test_docker_archive_of_several_images_needs_a_ref_and_lists_them(tmp_path: Path) -> None:
    source = docker_pair(tmp_path)
    with pytest.raises(InvalidArgument, match=ends("holds 2 images; choose one with the option ref: "
                                                   "busybox:latest, alpine:3.19")):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    with pytest.raises(InvalidArgument, match=ends("no image 'alpine:3.20' in the archive; it holds: "
                                                   "busybox:latest, alpine:3.19")):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, "alpine:3.20")
    assert not os.path.lexists(tmp_path / "image")


def test_docker_archive_of_one_image_needs_no_ref_but_checks_one_given(tmp_path: Path) -> None:
    source = b.write_tar(b.docker_files(marked("only"), {}, tags=["only:1"]), tmp_path / "one.tar")
    import_path(source, tmp_path / "a", ImageLimits(), lambda *_: None)
    import_path(source, tmp_path / "b", ImageLimits(), lambda *_: None, "only:1")
    with pytest.raises(InvalidArgument, match=ends("it holds: only:1")):
        import_path(source, tmp_path / "c", ImageLimits(), lambda *_: None, "only:2")
    assert not os.path.lexists(tmp_path / "c")


def test_untagged_docker_images_are_named_by_their_id(tmp_path: Path) -> None:
    first = b.docker_files(marked("first"), {}, tags=[])
    files = b.merged(first, b.docker_files(marked("second"), {}, tags=[]))
    source = b.write_tar(files, tmp_path / "two.tar")
    with pytest.raises(InvalidArgument, match=r"the option ref: sha256:[0-9a-f]{64}, sha256:[0-9a-f]{64}$"):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    image_id = "sha256:" + next(p for p in first if p.endswith(".json")).removesuffix(".json")
    got = import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, image_id)
    assert ("sha256:" + got.image_id, (tmp_path / "image/which").read_bytes()) == (image_id, b"first")


def oci_pair(tmp_path: Path, annotations: tuple[dict[str, str], dict[str, str]]) -> Path:
    files = b.merged(b.oci_files(marked("busybox"), {}, annotations[0]),
                     b.oci_files(marked("alpine"), {}, annotations[1]))
    return b.write_tar(files, tmp_path / "two.tar")


# Tags only, as the layout spec and skopeo write them; full names beside
# them, as containerd and docker (25 and later) do.
SPEC = ({"org.opencontainers.image.ref.name": "1.36"}, {"org.opencontainers.image.ref.name": "3.19"})
DOCKER = ({"io.containerd.image.name": "docker.io/library/busybox:1.36",
           "org.opencontainers.image.ref.name": "1.36"},
          {"io.containerd.image.name": "docker.io/library/alpine:3.19",
           "org.opencontainers.image.ref.name": "3.19"})


@pytest.mark.parametrize(
    ("annotations", "ref", "which"),
    [(SPEC, "1.36", "busybox"), (SPEC, "3.19", "alpine"),
     (DOCKER, "busybox:1.36", "busybox"), (DOCKER, "docker.io/library/alpine:3.19", "alpine"),
     (DOCKER, "3.19", "alpine")],
)
def test_oci_layout_of_several_images_imports_the_one_named(
    tmp_path: Path, annotations: tuple[dict[str, str], dict[str, str]], ref: str, which: str
) -> None:
    source = oci_pair(tmp_path, annotations)
    got = import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, ref)
    assert (got.kind, (tmp_path / "image/which").read_bytes()) == ("oci", which.encode())


def test_oci_layout_of_several_images_needs_a_ref_and_lists_them(tmp_path: Path) -> None:
    source = oci_pair(tmp_path, DOCKER)
    with pytest.raises(InvalidArgument, match=ends("index.json: the archive holds 2 images; choose one with "
                       "the option ref: docker.io/library/busybox:1.36, docker.io/library/alpine:3.19")):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None)
    with pytest.raises(InvalidArgument, match="no image 'busybox' in the archive"):  # busybox:latest
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, "busybox")
    assert not os.path.lexists(tmp_path / "image")


def test_a_ref_naming_two_images_is_refused(tmp_path: Path) -> None:
    both_latest = ({"io.containerd.image.name": "docker.io/library/busybox:latest",
                    "org.opencontainers.image.ref.name": "latest"},
                   {"io.containerd.image.name": "docker.io/library/alpine:latest",
                    "org.opencontainers.image.ref.name": "latest"})
    source = oci_pair(tmp_path, both_latest)
    with pytest.raises(InvalidArgument, match=ends("'latest' names 2 images; use one of: "
                                                   "docker.io/library/busybox:latest, "
                                                   "docker.io/library/alpine:latest")):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, "latest")
    got = import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, "alpine")
    assert (got.kind, (tmp_path / "image/which").read_bytes()) == ("oci", b"alpine")


def test_ref_is_refused_for_a_rootfs_tarball(tmp_path: Path) -> None:
    source = tmp_path / "rootfs.tar"
    source.write_bytes(b.tar_bytes([b.file("f")]))
    with pytest.raises(InvalidArgument, match="rootfs tarball"):
        import_path(source, tmp_path / "image", ImageLimits(), lambda *_: None, "busybox")
    assert not os.path.lexists(tmp_path / "image")


def import_layered(source: Path, store: LayerStore, known: dict[str, int] | None = None,
                   committed: list[str] | None = None) -> ociimage.LayeredImport:
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    image_source = ociimage.open_image_source(fd, str(source), ociimage.plain_opener)
    assert image_source is not None
    return ociimage.import_layers(image_source, store, ImageLimits(), None, None, known, committed)


def test_layers_are_stored_apart_with_overlayfs_whiteouts(tmp_path: Path) -> None:
    layers = two_layers()
    source = b.write_tar(b.oci_files(layers, CONFIG), tmp_path / "image.tar")
    store = LayerStore(tmp_path / "layers")
    got = import_layered(source, store)
    assert [layer.new for layer in got.layers] == [True, True]
    lower, upper = (store.path(layer.diff_id) for layer in got.layers)
    assert got.layers[0].diff_id == hashlib.sha256(layers[0]).hexdigest()
    assert tree(lower) == ["bin", "etc", "etc/a", "etc/b", "gone", "gone/f", "opt", "opt/keep", "opt/x",
                           "opt/x/old"]
    for hidden in ("etc/a", "gone"):
        st = os.lstat(upper / hidden)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, hidden
    if os.geteuid() == 0:
        assert os.getxattr(upper / "opt", "trusted.overlay.opaque") == b"y"
    assert (upper / "opt/x/new").read_bytes() == b"n"
    # A hard link to a file of the layer below is a copy: that inode is shared.
    assert (upper / "etc/b2").read_bytes() == b"b"
    assert os.stat(upper / "etc/b2").st_ino != os.stat(lower / "etc/b").st_ino
    assert got.pinned == tuple(layer.diff_id for layer in got.layers)
    assert sorted(p.name for p in store.root.iterdir()) == sorted(got.pinned)


def test_a_stored_layer_is_not_read_again(tmp_path: Path) -> None:
    base = b.tar_bytes([b.directory("etc"), b.file("etc/os-release", b"debian")])
    store = LayerStore(tmp_path / "layers")
    first = import_layered(b.write_tar(b.docker_files([base, b.tar_bytes([b.file("a", b"a")])], {}),
                                       tmp_path / "a.tar"), store)
    known = {layer.diff_id: layer.size_bytes for layer in first.layers}
    files = b.docker_files([base, b.tar_bytes([b.file("b", b"b")])], {})
    # The shared layer's bytes in the second archive are garbage: never read.
    files[next(p for p in files if files[p] == base)] = b"x" * len(base)
    second = import_layered(b.write_tar(files, tmp_path / "b.tar"), store, known)
    assert [layer.new for layer in second.layers] == [False, True]
    assert second.layers[0] == replace(first.layers[0], new=False)
    assert len(list(store.root.iterdir())) == 3


def test_a_failed_layered_import_names_what_it_stored_and_leaves_no_scratch(tmp_path: Path) -> None:
    files = b.oci_files([b.tar_bytes([b.file("f", b"one")]), b.tar_bytes([b.file("g", b"two")])], {})
    blob = next(p for p, data in files.items() if data.startswith(b"g"))
    files[blob] = b.tar_bytes([b.file("g", b"TWO")])
    store = LayerStore(tmp_path / "layers")
    committed: list[str] = []
    with pytest.raises(InvalidImage, match="layer 2"):
        import_layered(b.write_tar(files, tmp_path / "image.tar"), store, None, committed)
    assert [p.name for p in store.root.iterdir()] == committed
    assert store.retire(committed[0]) is not None  # nothing stays pinned


@pytest.mark.parametrize("compression", ["tar", "gzip"])
def test_a_truncated_layer_leaves_no_layer(tmp_path: Path, compression: str) -> None:
    layer = b.tar_bytes([b.file("f", bytes(64 << 10))])
    if compression == "gzip":
        layer = gzip.compress(layer)
    files = b.docker_files([layer], {})
    path = next(p for p in files if p.endswith("/layer.tar"))
    files[path] = files[path][: len(files[path]) // 2]
    store = LayerStore(tmp_path / "layers")
    committed: list[str] = []
    with pytest.raises(InvalidImage, match=r"layer 1 .*(truncated|corrupt|unexpected end of data)"):
        import_layered(b.write_tar(files, tmp_path / "image.tar"), store, None, committed)
    assert committed == [] and list(store.root.iterdir()) == []
