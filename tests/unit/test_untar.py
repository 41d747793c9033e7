"""The tar engine: each refusal rule, and each policy that image import, layers and CopyIn choose."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from quiltd.fs.untar import (
    OVERLAY_OPAQUE,
    Devices,
    Extractor,
    Lookup,
    OverLimit,
    Refused,
    TarPolicy,
    Whiteouts,
)

IMAGE = TarPolicy(lookup=Lookup.NO_LINKS, devices=Devices.SKIP)
COPY_IN = TarPolicy(lookup=Lookup.IN_ROOT, devices=Devices.REFUSE, keep_setuid=True, strip_absolute=True,
                    links_inside_tree=False, root_metadata=False, atomic_files=True)
IS_ROOT = os.geteuid() == 0


def member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644,
           uid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.uid, info.gid = kind, link, mode, uid, uid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_600_000_000
    return info, data


def directory(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, kind=tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, kind=tarfile.SYMTYPE, link=target)


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, kind=tarfile.LNKTYPE, link=target)


def device(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info, data = member(name, kind=tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 3
    return info, data


def extract(root: Path, members: Sequence[tuple[tarfile.TarInfo, bytes]], policy: TarPolicy = IMAGE,
            base: Sequence[str] = (), lowers: Sequence[int] = ()) -> Extractor:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    engine = Extractor(fd, policy, base=base, lowers=lowers)
    try:
        with tarfile.open(fileobj=buf, mode="r|") as tf:
            for info in tf:
                engine.add(tf, info)
        engine.finish()
    finally:
        engine.close()
        os.close(fd)
    return engine


def refused(root: Path, members: Sequence[tuple[tarfile.TarInfo, bytes]], policy: TarPolicy = IMAGE,
            kind: type[Refused] = Refused) -> str:
    with pytest.raises(kind) as e:
        extract(root, members, policy)
    return e.value.message


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "precious").write_text("keep")
    return path


# -- the rules every policy shares ---------------------------------------------------------------

@pytest.mark.parametrize("policy", [IMAGE, COPY_IN], ids=["image", "copy-in"])
@pytest.mark.parametrize("members, message", [
    ([member("a/../../x", b"x")], r"'a/\.\./\.\./x': path 'a/\.\./\.\./x' contains '\.\.'"),
    ([member("p" * 4096, b"x")], "path too long"),
    ([member("./", b"x")], "only a directory may stand for the destination itself"),
    ([member("v", kind=b"V")], "unsupported tar member type"),
    ([member("f", b"x", uid=0xFFFFFFFF)], "invalid uid 4294967295"),
    ([symlink("l", "")], "symlink with an empty target"),
    ([symlink("l", "t" * 4096)], "symlink target too long"),
    ([hardlink("h", "")], "hard link to the destination itself"),
    ([hardlink("h", "ghost")], "'h': hard link target 'ghost' is not a regular file extracted earlier"),
    ([symlink("s", "f"), hardlink("h", "s")], "'h': hard link target 's' is not a regular file"),
    ([hardlink("h", "../../etc/passwd")], r"'h': hard link target '\.\./\.\./etc/passwd' contains '\.\.'"),
])
def test_every_policy_refuses(root: Path, policy: TarPolicy, members: list[tuple[tarfile.TarInfo, bytes]],
                              message: str) -> None:
    with pytest.raises(Refused, match=message):
        extract(root, members, policy)


@pytest.mark.parametrize("policy", [IMAGE, COPY_IN], ids=["image", "copy-in"])
def test_caps_on_entries_depth_and_content(root: Path, policy: TarPolicy) -> None:
    capped = replace(policy, max_entries=2, max_depth=3, max_bytes=100)
    assert "too many entries (limit 2)" in refused(root, [member(f"f{i}", b"x") for i in range(3)], capped)
    assert "is 4 levels deep; the limit is 3" in refused(root, [member("a/b/c/d", b"x")], capped)
    message = refused(root, [member("big", bytes(101))], capped, OverLimit)
    assert message == ("'big': content exceeds the limit of 100 bytes (option max_bytes); "
                       "this member alone is 101 bytes")
    assert not (root / "big").exists()  # refused on its header, before a byte is written
    extract(root, [member("a/b/c", bytes(100))], capped)  # at the caps: fine


# -- where the policies differ on purpose ---------------------------------------------------------

def test_absolute_names_refused_for_images_and_stripped_for_copy_in(root: Path) -> None:
    assert refused(root, [member("/etc/x", b"x")]) == "'/etc/x': absolute path '/etc/x'"
    extract(root, [member("/etc/x", b"x")], COPY_IN)
    assert (root / "etc" / "x").read_bytes() == b"x"


def test_device_nodes_skipped_and_counted_for_images_refused_for_copy_in(root: Path) -> None:
    (root / "null").write_text("in the way")
    engine = extract(root, [device("null")])
    assert engine.skipped_devices == 1 and not os.path.lexists(root / "null")  # replaced by nothing
    assert refused(root, [device("null")], COPY_IN) == (
        "'null' is a device node; device nodes are not copied into containers")


def test_links_climbing_out_refused_for_images_kept_for_copy_in(root: Path) -> None:
    assert "escapes the image root" in refused(root, [directory("a"), symlink("a/up", "../../etc")])
    extract(root, [directory("a"), symlink("a/up", "../../etc")], COPY_IN)
    assert os.readlink(root / "a" / "up") == "../../etc"


def test_writing_through_a_link(root: Path, outside: Path) -> None:
    """An image refuses any link on the way; CopyIn resolves it inside the root."""
    message = refused(root, [symlink("a", str(outside)), member("a/x", b"pwned")])
    assert message == "'a/x': 'a' is not a directory (a symlink or file); refusing to write through it"
    (root / str(outside).lstrip("/")).mkdir(parents=True)  # what the link names, read in the root
    extract(root, [symlink("a", str(outside)), member("a/x", b"in")], COPY_IN)
    assert sorted(os.listdir(outside)) == ["precious"]
    assert (root / str(outside).lstrip("/") / "x").read_bytes() == b"in"


def test_setuid_bits_dropped_for_images_kept_for_copy_in(root: Path) -> None:
    extract(root, [member("i", b"x", mode=0o4755)])
    extract(root, [member("c", b"x", mode=0o4755)], COPY_IN)
    assert stat.S_IMODE(os.stat(root / "i").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "c").st_mode) == 0o4755


def test_the_root_member_sets_the_root_for_images_and_is_left_alone_by_copy_in(tmp_path: Path) -> None:
    for policy, mode in ((IMAGE, 0o750), (COPY_IN, 0o711)):
        dest = tmp_path / policy.lookup.value
        dest.mkdir()
        dest.chmod(0o711)
        extract(dest, [directory(".", 0o750), member("f", b"x")], policy)
        assert stat.S_IMODE(os.stat(dest).st_mode) == mode


def test_copy_in_writes_below_its_destination_only(root: Path) -> None:
    (root / "dest").mkdir()
    extract(root, [member("f", b"x"), symlink("up", "/")], COPY_IN, base=("dest",))
    assert (root / "dest" / "f").read_bytes() == b"x" and not (root / "f").exists()
    # A link out of the destination still resolves in the root, never above it.
    extract(root, [member("up/g", b"y")], COPY_IN, base=("dest",))
    assert (root / "g").read_bytes() == b"y"


def test_copy_in_refuses_proc() -> None:
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        engine = Extractor(fd, COPY_IN, base=("sys", "kernel"))
        tf_buf = io.BytesIO()
        with tarfile.open(fileobj=tf_buf, mode="w") as tf:
            info, data = member("core_pattern", b"|/bin/sh")
            tf.addfile(info, io.BytesIO(data))
        tf_buf.seek(0)
        with tarfile.open(fileobj=tf_buf, mode="r|") as tf, pytest.raises(Refused, match="proc or sysfs"):
            for info in tf:
                engine.add(tf, info)
        engine.close()
    finally:
        os.close(fd)


def test_atomic_files_keep_the_old_file_whole_until_the_new_one_is(root: Path) -> None:
    (root / "f").write_bytes(b"old")
    info, _ = member("f", bytes(1000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(info, io.BytesIO(bytes(1000)))
    cut = io.BytesIO(buf.getvalue()[:512 + 300])  # the header and part of the data
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        engine = Extractor(fd, COPY_IN)
        with tarfile.open(fileobj=cut, mode="r|") as tf, pytest.raises((tarfile.ReadError, Refused)):
            for got in tf:
                engine.add(tf, got)
        engine.close()
    finally:
        os.close(fd)
    assert os.listdir(root) == ["f"] and (root / "f").read_bytes() == b"old"


def test_later_members_replace_earlier_ones_without_following_them(root: Path, outside: Path) -> None:
    for policy in (IMAGE, COPY_IN):
        extract(root, [symlink("l", str(outside / "precious")), member("l", b"new"),
                       directory("d"), member("d/inner", b"x"), member("d", b"file now")], policy)
        assert (root / "l").read_bytes() == b"new" and (root / "d").read_bytes() == b"file now"
        assert (outside / "precious").read_text() == "keep"


def test_whiteouts_are_files_without_a_layer_policy(root: Path) -> None:
    extract(root, [member("a", b"x"), member(".wh.a", b"")])
    assert sorted(os.listdir(root)) == [".wh.a", "a"]


def test_whiteouts_applied_between_layers(root: Path) -> None:
    layers = replace(IMAGE, whiteouts=Whiteouts.APPLY)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        engine = Extractor(fd, layers)
        for layer in ([directory("d"), member("d/a", b"1"), member("d/b", b"2"), member("gone", b"3")],
                      [member("d/c", b"4"), member("d/.wh..wh..opq"), member(".wh.gone")]):
            engine.begin_layer()
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                for info, data in layer:
                    tf.addfile(info, io.BytesIO(data))
            buf.seek(0)
            with tarfile.open(fileobj=buf, mode="r|") as tf:
                for info in tf:
                    engine.add(tf, info)
        engine.finish()
        engine.close()
    finally:
        os.close(fd)
    assert sorted(os.listdir(root)) == ["d"] and sorted(os.listdir(root / "d")) == ["c"]
    assert "whiteout of no name" in refused(root, [member(".wh.")], layers)


@pytest.mark.skipif(not IS_ROOT, reason="overlayfs whiteouts are device nodes and trusted xattrs")
def test_whiteouts_in_overlayfs_format_for_a_layer_of_its_own(root: Path, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "base").write_bytes(b"from below")
    lower_fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    try:
        layer = [member(".wh.gone"), directory("d"), member("d/.wh..wh..opq"), hardlink("copy", "base")]
        extract(root, layer, replace(IMAGE, whiteouts=Whiteouts.OVERLAY), lowers=[lower_fd])
    finally:
        os.close(lower_fd)
    st = os.stat(root / "gone", follow_symlinks=False)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(root / "d", OVERLAY_OPAQUE) == b"y"
    # A hard link to a lower layer's file is a copy: the shared layer's inode is never touched.
    assert (root / "copy").read_bytes() == b"from below"
    assert os.stat(root / "copy").st_ino != os.stat(lower / "base").st_ino
