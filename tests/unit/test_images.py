"""Rootfs tarball import: what a user (or an attacker) sees.

Every archive is built here with tarfile, so each test says exactly which
members it contains; the attacks are the classic tar path-traversal and
resource tricks, each of which must be refused by name and leave nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from quiltd.errors import InvalidImage, LimitExceeded
from quiltd.fs.remove import remove_path
from quiltd.images.extract import (
    DISK_RESERVE,
    ExtractedImage,
    ImageLimits,
    extract_rootfs_tarball,
)
from tests.imagebuilders import sparse_tar

REPO = Path(__file__).resolve().parents[2]
MTIME = 1_600_000_000
IS_ROOT = os.geteuid() == 0
KINDS = ["tar", "gz", "xz", "zst"]
DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Member:
    info: tarfile.TarInfo
    data: bytes | None = None


def _info(name: str, kind: bytes, mode: int, mtime: int, uid: int, gid: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = mtime
    ti.uid, ti.gid = uid, gid
    return ti


def reg(
    name: str, data: bytes = b"", mode: int = 0o644, mtime: int = MTIME, uid: int = 0, gid: int = 0
) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode, mtime, uid, gid)
    ti.size = len(data)
    return Member(ti, data)


def dir_(name: str, mode: int = 0o755, mtime: int = MTIME) -> Member:
    return Member(_info(name, tarfile.DIRTYPE, mode, mtime, 0, 0))


def sym(name: str, target: str, mtime: int = MTIME) -> Member:
    ti = _info(name, tarfile.SYMTYPE, 0o777, mtime, 0, 0)
    ti.linkname = target
    return Member(ti)


def hard(name: str, target: str) -> Member:
    ti = _info(name, tarfile.LNKTYPE, 0o644, MTIME, 0, 0)
    ti.linkname = target
    return Member(ti)


def node(name: str, kind: bytes) -> Member:
    ti = _info(name, kind, 0o666, MTIME, 0, 0)
    ti.devmajor, ti.devminor = 1, 3
    return Member(ti)


def tar_bytes(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            tar.addfile(m.info, io.BytesIO(m.data) if m.data is not None else None)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "tar":
        return data
    if kind == "gz":
        return gzip.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    if kind == "zst":
        if shutil.which("zstd") is None:
            pytest.skip("zstd tool not installed")
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    raise AssertionError(kind)


def archive(tmp_path: Path, members: Sequence[Member], kind: str = "gz") -> Path:
    # A name that matches no format: detection must go by content.
    path = tmp_path / f"image-{kind}.bin"
    path.write_bytes(compress(tar_bytes(members), kind))
    return path


def refuse(source: Path, dest: Path, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    """Extract, expect InvalidImage, check nothing is left; return the message."""
    with pytest.raises(InvalidImage) as caught:
        extract_rootfs_tarball(source, dest, limits)
    assert not os.path.lexists(dest), "a failed extraction must leave nothing behind"
    return caught.value.message


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory attacks aim at; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


# -- good archives -------------------------------------------------------------


def good_members() -> list[Member]:
    return [
        dir_("./", 0o755, mtime=MTIME - 1),
        dir_("etc", 0o750, mtime=MTIME + 1),
        reg("etc/conf", b"key=value\n", 0o640, mtime=MTIME + 2, uid=1000, gid=1001),
        # No "bin" directory entry: parents are created as tar does.
        reg("bin/tool", b"#!/bin/sh\necho hi\n", 0o755, mtime=MTIME + 3),
        sym("bin/link", "tool", mtime=MTIME + 4),
        sym("usr/bin/env", "../../bin/tool"),
        hard("bin/tool2", "bin/tool"),
        reg("empty", b""),
        Member(_info("run/fifo", tarfile.FIFOTYPE, 0o600, MTIME, 0, 0)),
        dir_("tmp", 0o1777),
        # Written after its children would have bumped it: must still be MTIME+5.
        dir_("usr", 0o755, mtime=MTIME + 5),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_good_archive_extracts_with_content_modes_links_and_mtimes(
    tmp_path: Path, kind: str
) -> None:
    source = archive(tmp_path, good_members(), kind)
    dest = tmp_path / "rootfs"

    result = extract_rootfs_tarball(source, dest)

    assert result == ExtractedImage(
        image_id=hashlib.sha256(source.read_bytes()).hexdigest(),
        size_bytes=len(b"key=value\n") + len(b"#!/bin/sh\necho hi\n"),
        entries=len(good_members()),
    )
    assert len(result.image_id) == 64
    assert (dest / "etc/conf").read_bytes() == b"key=value\n"
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "empty").read_bytes() == b""

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(dest / rel).st_mode)

    assert mode(".") == 0o755
    assert mode("etc") == 0o750
    assert mode("etc/conf") == 0o640
    assert mode("bin/tool") == 0o755
    assert mode("bin") == 0o755  # implied directory
    assert mode("tmp") == 0o1777
    assert mode("run/fifo") == 0o600
    assert stat.S_ISFIFO(os.lstat(dest / "run/fifo").st_mode)

    assert os.readlink(dest / "bin/link") == "tool"
    assert os.readlink(dest / "usr/bin/env") == "../../bin/tool"
    assert (dest / "usr/bin/env").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.lstat(dest / "bin/tool2").st_ino == os.lstat(dest / "bin/tool").st_ino

    def mtime(rel: str) -> int:
        return os.lstat(dest / rel).st_mtime_ns // 1_000_000_000

    assert mtime(".") == MTIME - 1
    assert mtime("etc") == MTIME + 1
    assert mtime("etc/conf") == MTIME + 2
    assert mtime("bin/tool") == MTIME + 3
    assert mtime("bin/link") == MTIME + 4
    assert mtime("usr") == MTIME + 5

    if IS_ROOT:
        st = os.lstat(dest / "etc/conf")
        assert (st.st_uid, st.st_gid) == (1000, 1001)


def test_format_is_detected_by_content_not_name(tmp_path: Path) -> None:
    source = tmp_path / "really-gzip.tar.xz"
    source.write_bytes(compress(tar_bytes([reg("f", b"x")]), "gz"))
    extract_rootfs_tarball(source, tmp_path / "rootfs")
    assert (tmp_path / "rootfs/f").read_bytes() == b"x"


def test_image_id_covers_trailing_padding(tmp_path: Path) -> None:
    # gzip allows zero padding after the stream; it is part of the file.
    source = tmp_path / "padded"
    source.write_bytes(compress(tar_bytes([reg("f", b"x")]), "gz") + bytes(256 << 10))
    result = extract_rootfs_tarball(source, tmp_path / "rootfs")
    assert result.image_id == hashlib.sha256(source.read_bytes()).hexdigest()


def test_image_id_never_skips_bytes_the_decompressor_ignored(tmp_path: Path) -> None:
    # Python's xz reader stops quietly at trailing garbage. Refusing would be
    # fine; accepting with an id that does not cover the garbage would not.
    # More garbage than any read-ahead buffer, so some is never read for data.
    source = tmp_path / "trailing"
    source.write_bytes(compress(tar_bytes([reg("f", b"x")]), "xz") + b"junk" * (1 << 20))
    try:
        result = extract_rootfs_tarball(source, tmp_path / "rootfs")
    except InvalidImage:
        assert not os.path.lexists(tmp_path / "rootfs")
        return
    assert result.image_id == hashlib.sha256(source.read_bytes()).hexdigest()


def test_setuid_and_setgid_dropped_by_default(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("bin/su", b"x", 0o6755), dir_("shared", 0o2775)])
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest)
    assert stat.S_IMODE(os.stat(dest / "bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "shared").st_mode) == 0o775


def test_setuid_and_setgid_kept_when_asked(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("bin/su", b"x", 0o6755), dir_("shared", 0o2775)])
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest, ImageLimits(keep_setuid=True))
    assert stat.S_IMODE(os.stat(dest / "bin/su").st_mode) == 0o6755
    assert stat.S_IMODE(os.stat(dest / "shared").st_mode) == 0o2775


def test_later_entries_replace_earlier_ones_without_writing_through(tmp_path: Path) -> None:
    source = archive(
        tmp_path,
        [
            reg("f", b"one"),
            reg("f", b"two"),
            # A symlink replaced by a file: the file must not land in "f".
            sym("s", "f"),
            reg("s", b"own"),
            # A hard link replaced by a file: the other name keeps its data.
            hard("h", "f"),
            reg("h", b"new"),
            # A directory tree replaced by a file, and a file by a directory.
            reg("d/sub/x", b"x"),
            reg("d", b"file now"),
            reg("e", b"file first"),
            dir_("e", 0o700),
        ],
    )
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest)
    assert (dest / "f").read_bytes() == b"two"
    assert not (dest / "s").is_symlink()
    assert (dest / "s").read_bytes() == b"own"
    assert (dest / "h").read_bytes() == b"new"
    assert (dest / "d").read_bytes() == b"file now"
    assert (dest / "e").is_dir()
    assert stat.S_IMODE(os.stat(dest / "e").st_mode) == 0o700


def test_deep_tree_extracts_and_removes(tmp_path: Path) -> None:
    # Deeper than Python's recursion limit: cleanup must not recurse.
    deep = "d/" * 1500 + "f"
    source = archive(tmp_path, [reg(deep, b"x")])
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest)
    remove_path(dest)
    assert not os.path.lexists(dest)


def test_deep_tree_is_cleaned_up_after_a_refusal(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("d/" * 1500 + "f", b"x"), reg("../evil", b"x")])
    assert "../evil" in refuse(source, tmp_path / "rootfs")


def test_replacing_a_tree_then_writing_below_it_again(tmp_path: Path) -> None:
    # "d/sub" is the last directory written to when "d" is replaced; the
    # new "d/sub/y" must land in the new tree, not in the deleted one.
    source = archive(
        tmp_path,
        [reg("d/sub/x", b"x"), reg("d", b"file"), dir_("d"), reg("d/sub/y", b"y")],
    )
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest)
    assert (dest / "d/sub/y").read_bytes() == b"y"
    assert not (dest / "d/sub/x").exists()


def test_directory_recreated_implicitly_gets_default_metadata(tmp_path: Path) -> None:
    # "x/y" had its own entry, but that directory is gone with the old "x";
    # the "x/y" that "x/y/z" needs is a new one with the default mode.
    source = archive(
        tmp_path,
        [dir_("x/y", 0o700), reg("x", b"file"), dir_("x"), reg("x/y/z", b"z")],
    )
    dest = tmp_path / "rootfs"
    extract_rootfs_tarball(source, dest)
    assert stat.S_IMODE(os.stat(dest / "x/y").st_mode) == 0o755


def test_writing_below_a_replaced_directory_is_refused(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("d/sub/x", b"x"), reg("d", b"file"), reg("d/sub/y", b"y")])
    assert "d/sub/y" in refuse(source, tmp_path / "rootfs")


def test_existing_destination_is_left_alone(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("f", b"x")])
    dest = tmp_path / "rootfs"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        extract_rootfs_tarball(source, dest)
    assert (dest / "keep").read_text() == "mine"


# -- attacks -------------------------------------------------------------------

ATTACKS: dict[str, tuple[list[Member], str]] = {
    "dotdot": ([reg("../evil", b"x")], "../evil"),
    "dotdot-inside": ([dir_("a"), reg("a/../../evil", b"x")], "a/../../evil"),
    # Long enough that tarfile stores it in a pax header, not the ustar name.
    "dotdot-pax": ([reg("../" + "p" * 150, b"x")], "../" + "p" * 150),
    "absolute": ([reg("/etc/evil", b"x")], "/etc/evil"),
    "escaping-symlink": ([dir_("a"), sym("a/up", "../../etc")], "a/up"),
    "escaping-symlink-dotdot": ([sym("up", "..")], "up"),
    "hardlink-absolute": ([hard("shadow", "/etc/shadow")], "shadow"),
    "hardlink-dotdot": ([hard("passwd-link", "../../etc/passwd")], "passwd-link"),
    "hardlink-not-extracted": ([hard("ghost-link", "bin/ghost")], "ghost-link"),
    "hardlink-to-symlink": ([sym("s", "f"), hard("s-link", "s")], "s-link"),
    # An absolute link is stored, but nothing is ever written through it.
    "write-through-absolute-symlink": ([sym("lib", "/etc"), reg("lib/passwd", b"x")], "lib/passwd"),
    # Each link alone stays inside, but writing through them would not.
    "write-through-symlink-chain": (
        [dir_("c"), sym("c/b", ".."), sym("d", "c/b/.."), reg("d/x", b"x")],
        "d/x",
    ),
    "write-through-inner-symlink": ([dir_("b"), sym("a", "b"), reg("a/x", b"x")], "a/x"),
    "root-as-file": ([reg("./", b"x")], "./"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_is_refused_by_name_and_leaves_nothing(
    tmp_path: Path, outside: Path, name: str
) -> None:
    members, offender = ATTACKS[name]
    source = archive(tmp_path, members)
    message = refuse(source, tmp_path / "rootfs")
    assert offender in message
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("target", ["outside", ".."])
def test_symlink_then_write_through_it_is_refused(
    tmp_path: Path, outside: Path, target: str
) -> None:
    link = str(outside) if target == "outside" else ".."
    source = archive(tmp_path, [sym("a", link), reg("a/x", b"pwned")])
    message = refuse(source, tmp_path / "rootfs")
    assert "'a'" in message
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_refusal_mid_stream_stops_promptly_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    # The decompressor still has 24 MiB to go when the escape is refused;
    # zstd in particular must be stopped, not waited for.
    members = [reg("first", b"x"), reg("../evil", b"x"), reg("big", bytes(24 << 20))]
    source = archive(tmp_path, members, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "../evil" in refuse(source, tmp_path / "rootfs")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_zstd_archive_without_the_zstd_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = archive(tmp_path, [reg("f", b"x")], "zst")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert "zstd" in refuse(source, tmp_path / "rootfs")


def test_too_many_entries(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg(f"f{i}", b"x") for i in range(5)])
    message = refuse(source, tmp_path / "rootfs", ImageLimits(max_entries=3))
    assert "f3" in message


def over_limit(source: Path, dest: Path, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    """Extract, expect LimitExceeded, check nothing is left; return the message."""
    with pytest.raises(LimitExceeded) as caught:
        extract_rootfs_tarball(source, dest, limits)
    assert not os.path.lexists(dest), "a failed extraction must leave nothing behind"
    return caught.value.message


def test_gzip_bomb_is_stopped_at_max_bytes(tmp_path: Path) -> None:
    source = archive(tmp_path, [reg("zeros", bytes(20 << 20))], "gz")
    assert source.stat().st_size < 100 << 10, "the bomb should be small on disk"
    message = over_limit(source, tmp_path / "rootfs", ImageLimits(max_bytes=1 << 20))
    assert "zeros" in message


def test_sparse_member_counts_its_holes(tmp_path: Path) -> None:
    # A few hundred bytes of archive standing for 256 MiB of zeros on disk.
    source = tmp_path / "sparse.tar"
    source.write_bytes(sparse_tar("big", 256 << 20))
    assert source.stat().st_size < 16 << 10
    message = over_limit(source, tmp_path / "rootfs", ImageLimits(max_bytes=64 << 20))
    assert "'big'" in message and "268435456" in message


def test_content_past_the_free_space_is_refused_before_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fstatvfs

    def nearly_full(fd: int) -> os.statvfs_result:
        got = real(fd)
        fields = list(got)
        fields[4] = (DISK_RESERVE + (1 << 20)) // got.f_frsize  # f_bavail: 1 MiB over the reserve
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "fstatvfs", nearly_full)
    source = tmp_path / "sparse.tar"
    source.write_bytes(sparse_tar("big", 2 << 20))
    message = over_limit(source, tmp_path / "rootfs")
    assert "free space" in message


def test_many_small_files_past_max_bytes(tmp_path: Path) -> None:
    chunk = bytes(64 << 10)
    source = archive(tmp_path, [reg(f"part{i:02}", chunk) for i in range(40)], "gz")
    message = over_limit(source, tmp_path / "rootfs", ImageLimits(max_bytes=1 << 20))
    # 16 parts make exactly 1 MiB; the 17th is the one over.
    assert "part16" in message


def test_oversized_metadata_record_is_refused(tmp_path: Path) -> None:
    info = reg("f", b"x").info
    info.pax_headers = {"comment": "c" * (2 << 20)}
    source = archive(tmp_path, [Member(info, b"x")])
    assert "metadata" in refuse(source, tmp_path / "rootfs")


def test_stream_of_metadata_past_the_stream_cap_is_refused(tmp_path: Path) -> None:
    # No file content at all, but 20 MB of pax records to decompress: the
    # per-record cap does not stop this, the cap on the whole stream does.
    members = []
    for i in range(20):
        m = reg(f"f{i}")
        m.info.pax_headers = {"comment": "c" * 1_000_000}
        members.append(m)
    source = archive(tmp_path, members)
    message = refuse(source, tmp_path / "rootfs", ImageLimits(max_bytes=0, max_entries=100))
    assert "expands past" in message


def test_path_too_long_is_refused(tmp_path: Path) -> None:
    long = "d/" * 2100 + "f"
    source = archive(tmp_path, [reg(long, b"x")])
    assert "too long" in refuse(source, tmp_path / "rootfs")


def test_not_a_tar_file(tmp_path: Path) -> None:
    source = tmp_path / "notes.tar"
    source.write_text("this is not an archive\n" * 200)
    assert "not a tar archive" in refuse(source, tmp_path / "rootfs")


def test_empty_file(tmp_path: Path) -> None:
    source = tmp_path / "empty.tar"
    source.write_bytes(b"")
    refuse(source, tmp_path / "rootfs")


def test_missing_file(tmp_path: Path) -> None:
    message = refuse(tmp_path / "nope.tar.gz", tmp_path / "rootfs")
    assert "no such file" in message


def test_source_that_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # must not hang waiting for a writer
    assert "not a regular file" in refuse(fifo, tmp_path / "rootfs")


def _random_members() -> list[Member]:
    # Incompressible content, so cutting the compressed file in half cuts
    # into the middle of a member rather than into trailing padding.
    return [reg(f"blob{i}", os.urandom(64 << 10)) for i in range(4)]


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_archive(tmp_path: Path, kind: str) -> None:
    whole = compress(tar_bytes(_random_members()), kind)
    source = tmp_path / "cut"
    source.write_bytes(whole[: len(whole) // 2])
    refuse(source, tmp_path / "rootfs")


@pytest.mark.parametrize("kind", ["gz", "xz", "zst"])
def test_compressed_stream_cut_after_the_tar_end_marker(tmp_path: Path, kind: str) -> None:
    # Every member and the end marker are intact; only the compressor's
    # trailer (checksum, length) is missing. A download cut this short is
    # still a corrupt download.
    whole = compress(tar_bytes([reg("f", b"x")]), kind)
    source = tmp_path / "cut"
    source.write_bytes(whole[:-4])
    refuse(source, tmp_path / "rootfs")


def test_plain_tar_cut_at_a_member_boundary(tmp_path: Path) -> None:
    # tarfile alone would take this for a complete, one-file archive.
    whole = tar_bytes([reg("first", b"a" * 512), reg("second", b"b" * 512)])
    source = tmp_path / "cut.tar"
    source.write_bytes(whole[: 512 * 4])  # pax header, header, data... then nothing
    assert "truncated" in refuse(source, tmp_path / "rootfs")


@pytest.mark.parametrize("kind", ["gz", "xz", "zst"])
def test_corrupt_compressed_stream(tmp_path: Path, kind: str) -> None:
    whole = bytearray(compress(tar_bytes(_random_members()), kind))
    middle = len(whole) // 2
    # Inverted, not zeroed: the middle may well be zeros already.
    whole[middle : middle + 64] = bytes(b ^ 0xFF for b in whole[middle : middle + 64])
    source = tmp_path / "corrupt"
    source.write_bytes(bytes(whole))
    refuse(source, tmp_path / "rootfs")


# -- the busybox image ---------------------------------------------------------


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_busybox_image_builds_and_extracts(tmp_path: Path) -> None:
    tool = REPO / "tools" / "make-busybox-image"

    def build(out: Path) -> Path:
        run = subprocess.run(
            [sys.executable, str(tool), str(out)], capture_output=True, text=True, check=True
        )
        assert run.stdout.strip() == str(out)
        return out

    first = build(tmp_path / "busybox.tar.gz")
    second = build(tmp_path / "again.tar.gz")
    assert first.read_bytes() == second.read_bytes(), "the image must be reproducible"

    dest = tmp_path / "rootfs"
    result = extract_rootfs_tarball(first, dest)
    assert result.image_id == hashlib.sha256(first.read_bytes()).hexdigest()
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert os.readlink(dest / "usr/bin/env") == "../../bin/busybox"
    assert os.access(dest / "bin/busybox", os.X_OK)
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o1777
    for d in ("dev", "proc", "sys", "run", "root", "etc", "var", "home"):
        assert (dest / d).is_dir(), d
    passwd = (dest / "etc/passwd").read_text()
    assert passwd.startswith("root:x:0:0:")
    assert "nobody:" in passwd
    for f in ("etc/group", "etc/hostname", "etc/hosts"):
        assert (dest / f).is_file(), f

    # The extracted busybox runs and knows its applets through the links.
    out = subprocess.run(
        [str(dest / "bin/busybox"), "echo", "ok"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "ok\n"


# -- distribution roots: absolute links and device nodes -------------------------


def test_absolute_symlinks_are_stored_as_they_are(tmp_path: Path, outside: Path) -> None:
    # As in every Debian root: /etc/alternatives and usrmerge's /bin.
    source = archive(tmp_path, [
        dir_("usr/bin"), reg("usr/bin/mawk", b"mawk"), sym("bin", "usr/bin"),
        dir_("etc/alternatives"), sym("etc/alternatives/awk", "/usr/bin/mawk"),
        sym("escape", str(outside)),
    ])
    dest = tmp_path / "rootfs"
    result = extract_rootfs_tarball(source, dest)
    assert os.readlink(dest / "etc/alternatives/awk") == "/usr/bin/mawk"
    # Stored, not resolved: on the host it points wherever it points, and
    # nothing here ever followed it.
    assert os.readlink(dest / "escape") == str(outside)
    assert list(outside.iterdir()) == []
    assert result.skipped_devices == 0


@pytest.mark.parametrize("kind", KINDS)
def test_device_nodes_are_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    # What mmdebstrap writes by default at the top of its tarball.
    source = archive(tmp_path, [
        dir_("dev"), node("dev/console", tarfile.CHRTYPE), node("dev/null", tarfile.CHRTYPE),
        sym("dev/fd", "/proc/self/fd"), node("dev/sda", tarfile.BLKTYPE), reg("etc/hostname", b"h\n"),
    ], kind)
    dest = tmp_path / "rootfs"
    result = extract_rootfs_tarball(source, dest)
    assert result.skipped_devices == 3
    assert sorted(os.listdir(dest / "dev")) == ["fd"]
    assert (dest / "etc/hostname").read_bytes() == b"h\n"
    assert result.entries == 6


def test_a_skipped_device_node_still_replaces_what_was_at_its_path(tmp_path: Path) -> None:
    # tar replaces an earlier member by a later one of the same name; a node
    # left out must not leave the older file showing through.
    source = archive(tmp_path, [reg("dev/null", b"a file first"), node("dev/null", tarfile.CHRTYPE)])
    dest = tmp_path / "rootfs"
    assert extract_rootfs_tarball(source, dest).skipped_devices == 1
    assert not os.path.lexists(dest / "dev/null")


def test_a_device_node_below_a_symlink_is_refused_not_skipped(tmp_path: Path, outside: Path) -> None:
    # Skipping still removes what is at the path, so the path is checked
    # like any other member's: never through a link.
    (outside / "keep").write_text("x")
    source = archive(tmp_path, [sym("d", str(outside)), node("d/keep", tarfile.CHRTYPE)])
    assert "d/keep" in refuse(source, tmp_path / "rootfs")
    assert (outside / "keep").read_text() == "x"
