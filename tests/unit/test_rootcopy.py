"""Tar streams into and out of a root directory: kept metadata, and no way out of the root."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiltd.runtime import rootcopy
from quiltd.runtime.copyspec import Failure
from quiltd.runtime.rootcopy import CopyError, Progress

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership is kept only as root")


@pytest.fixture
def roots() -> Iterator[tuple[Path, Path]]:
    """A container-like root, and a canary beside it, outside it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "root")
        root.mkdir()
        outside = Path(tmp, "outside")
        outside.mkdir()
        (outside / "canary").write_bytes(b"host secret\n")
        yield root, outside


def _archive(root: Path, path: str, max_bytes: int = 0, written: list[bytes] | None = None) -> bytes:
    """The archive of path; what was written before an error goes to written."""
    with tempfile.TemporaryFile() as out:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        try:
            rootcopy.archive(fd, path, out.fileno(), Progress(lambda: None), max_bytes)
        finally:
            os.close(fd)
            out.seek(0)
            if written is not None:
                written.append(out.read())
        out.seek(0)
        return out.read()


def _extract(root: Path, dest: str, data: bytes, max_bytes: int = 1 << 30, via: str = "file") -> Progress:
    """Extracts data read from a regular file, which is checked ahead, or from a pipe, which cannot be."""
    progress = Progress(lambda: None)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        if via == "file":
            with tempfile.TemporaryFile() as src:
                src.write(data)
                src.seek(0)
                rootcopy.extract(fd, dest, src.fileno(), max_bytes, progress)
        else:
            r, w = os.pipe()
            writer = threading.Thread(target=_write_all, args=(w, data))
            writer.start()
            try:
                rootcopy.extract(fd, dest, r, max_bytes, progress)
            finally:
                os.close(r)
                writer.join()
    finally:
        os.close(fd)
    return progress


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb") as f:
        f.write(data)


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@needs_root
def test_round_trip_keeps_modes_owners_times_links(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    tree = root / "src" / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"data" * 10000)
    os.chown(tree / "sub" / "f", 1234, 5678)
    os.chmod(tree / "sub" / "f", 0o4751)
    os.utime(tree / "sub" / "f", ns=(1_600_000_000_500_000_000, 1_600_000_000_500_000_000))
    os.link(tree / "sub" / "f", tree / "hard")
    os.symlink("/etc/shadow", tree / "link")
    os.mkfifo(tree / "fifo", 0o640)
    os.chmod(tree / "sub", 0o710)
    os.utime(tree / "sub", (1_500_000_000, 1_500_000_000))
    data = _archive(root, "/src/tree")
    (root / "dest").mkdir()
    progress = _extract(root, "/dest", data)
    assert progress.entries == 6 and progress.bytes == len(data)
    got = root / "dest" / "tree"
    f = os.stat(got / "sub" / "f")
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime_ns) == \
        (0o4751, 1234, 5678, 1_600_000_000_500_000_000)
    assert (got / "sub" / "f").read_bytes() == b"data" * 10000
    assert os.stat(got / "hard").st_ino == f.st_ino
    assert os.readlink(got / "link") == "/etc/shadow"
    assert stat.S_ISFIFO(os.stat(got / "fifo").st_mode)
    sub = os.stat(got / "sub")
    assert (stat.S_IMODE(sub.st_mode), sub.st_mtime) == (0o710, 1_500_000_000)


def test_symlinks_resolve_inside_the_root(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    os.symlink("/", root / "up")
    os.symlink("../../../" + str(outside).lstrip("/"), root / "dots")
    os.symlink(str(outside / "canary"), root / "direct")
    # Out: the host's canary is never reached, whichever way the link points.
    for path in (f"/up{outside}/canary", "/dots/canary"):
        with pytest.raises(CopyError) as e:
            _archive(root, path)
        assert e.value.failure == Failure.NO_PATH
    with tarfile.open(fileobj=io.BytesIO(_archive(root, "/direct"))) as tar:
        (member,) = tar.getmembers()
    assert member.issym()  # the link itself, not what it names
    # In: written below the root, the host's canary untouched.
    info = tarfile.TarInfo(f"{str(outside).lstrip('/')}/canary")
    _extract(root, "/up", _tar((info, b"overwritten")))
    assert (outside / "canary").read_bytes() == b"host secret\n"
    assert (root / str(outside).lstrip("/") / "canary").read_bytes() == b"overwritten"
    # A member named through a symlink of the stream itself stays inside too.
    link = tarfile.TarInfo("esc")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    _extract(root, "/", _tar((link, b""), (tarfile.TarInfo("esc/canary"), b"again")))
    assert (outside / "canary").read_bytes() == b"host secret\n"


def _two_files() -> bytes:
    """Members a (1000 bytes, header at 0) and b (1000 bytes, header at 1536), then the end marker."""
    return _tar((tarfile.TarInfo("a"), b"A" * 1000), (tarfile.TarInfo("b"), b"B" * 1000))


END = 2 * 1536  # where the end-of-archive marker of _two_files starts


@pytest.mark.parametrize("data, failure, message", [
    (b"", Failure.INVALID, "not a tar"),
    (b"hello, this is not a tar stream at all" * 100, Failure.INVALID, "not a tar"),
    # Garbage where a third header would be: tarfile alone would stop there quietly.
    (_two_files()[:END] + b"garbage!" * 100, Failure.INVALID,
     r"bad tar header at offset 3072 .*after member 'b' \(its header at offset 1536\)"),
    # Cut inside a header, inside a member's data, inside its padding.
    (_two_files()[:1536 + 100], Failure.INVALID,
     "the tar stream ends inside a header at offset 1536, after member 'a'"),
    (_two_files()[:1536 + 512 + 300], Failure.INVALID,
     r"ends inside the data of member 'b' \(its header at offset 1536, 1000 bytes of data\)"),
    (_two_files()[:1536 + 512 + 1000], Failure.INVALID,
     r"ends inside the padding of member 'b' \(its header at offset 1536, 1000 bytes of data\)"),
    # Data after the end marker: a second archive, say, that tar would skip.
    (_two_files()[:END + 1024] + _two_files(), Failure.INVALID,
     "data at offset 4096 after the end-of-archive marker at offset 3072"),
])
@pytest.mark.parametrize("via", ["file", "pipe"])
def test_bad_streams(roots: tuple[Path, Path], data: bytes, failure: Failure, message: str, via: str) -> None:
    root, _ = roots
    with pytest.raises(CopyError, match=message) as e:
        _extract(root, "/", data, via=via)
    assert e.value.failure == failure


def _gnu_tar(root: Path) -> bytes:
    if not shutil.which("tar"):
        pytest.skip("no tar program")
    src = root / "gnu"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 1000)
    (src / "b").write_bytes(b"B" * 1000)
    return subprocess.run(["tar", "-c", "-f", "-", "-C", str(src), "a", "b"], check=True,
                          stdout=subprocess.PIPE).stdout


@pytest.mark.parametrize("via", ["file", "pipe"])
@pytest.mark.parametrize("ending", ["python", "gnu", "no marker", "one zero block", "marker, no padding"])
def test_well_ended_streams(roots: tuple[Path, Path], ending: str, via: str) -> None:
    """Writers end with two zero blocks, padded with zeros; some stop right after the last member."""
    root, _ = roots
    data = {
        "python": _two_files(),  # two zero blocks, padded with zeros to 10240 bytes
        "gnu": _gnu_tar(root) if ending == "gnu" else b"",
        "no marker": _two_files()[:END],
        "one zero block": _two_files()[:END + 512],
        "marker, no padding": _two_files()[:END + 1024],
    }[ending]
    (root / "dest").mkdir()
    progress = _extract(root, "/dest", data, via=via)
    assert (progress.entries, progress.bytes) == (2, len(data))
    assert (root / "dest" / "a").read_bytes() == b"A" * 1000
    assert (root / "dest" / "b").read_bytes() == b"B" * 1000


def test_refusals(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    cases: list[tuple[bytes, str, Failure, str, int]] = []
    dots = tarfile.TarInfo("a/../../x")
    cases.append((_tar((dots, b"x")), "/", Failure.INVALID, "'..'", 1 << 30))
    dev = tarfile.TarInfo("sda")
    dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
    cases.append((_tar((dev, b"")), "/", Failure.INVALID, "device node", 1 << 30))
    cases.append((_tar((tarfile.TarInfo("big"), bytes(100_000))), "/", Failure.LIMIT, "max_bytes", 50_000))
    empty = _tar((tarfile.TarInfo("f"), b""))
    cases.append((empty, "/missing", Failure.NO_PATH, "no such directory", 1 << 30))
    (root / "file").write_bytes(b"")
    cases.append((empty, "/file", Failure.INVALID, "not a directory", 1 << 30))
    for data, dest, failure, message, cap in cases:
        with pytest.raises(CopyError, match=message) as e:
            _extract(root, dest, data, cap)
        assert e.value.failure == failure
    assert not (root / "sda").exists()


def test_a_failed_copy_leaves_no_half_written_file(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "b").write_bytes(b"old b\n")
    cut = _two_files()[:1536 + 512 + 300]
    with pytest.raises(CopyError, match="ends inside the data of member 'b'"):
        _extract(root, "/", cut, via="pipe")
    # a was whole and stays; b keeps its old content; no temporary file is left.
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert (root / "a").read_bytes() == b"A" * 1000 and (root / "b").read_bytes() == b"old b\n"


@pytest.mark.parametrize("problem", ["cut", "device node", "'..'", "max_bytes"])
def test_a_regular_file_is_checked_before_anything_is_written(roots: tuple[Path, Path], problem: str) -> None:
    root, _ = roots
    dev = tarfile.TarInfo("sda")
    dev.type = tarfile.BLKTYPE
    third = {"device node": dev, "'..'": tarfile.TarInfo("x/../../y")}.get(problem, tarfile.TarInfo("c"))
    data = _tar((tarfile.TarInfo("a"), b"A" * 1000), (tarfile.TarInfo("b"), b"B" * 1000), (third, b""))
    message = problem
    if problem == "cut":
        data, message = data[:1536 + 512 + 300], "ends inside the data of member 'b'"
    with pytest.raises(CopyError, match=message):
        _extract(root, "/", data, max_bytes=len(data) - 1 if problem == "max_bytes" else 1 << 30)
    assert os.listdir(root) == []


def test_files_replace_what_is_in_their_way(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    (root / "a").mkdir()
    (root / "a" / "inner").write_bytes(b"")
    os.symlink(outside / "canary", root / "b")
    _extract(root, "/", _two_files())
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert (root / "a").read_bytes() == b"A" * 1000
    assert not (root / "b").is_symlink() and (root / "b").read_bytes() == b"B" * 1000
    assert (outside / "canary").read_bytes() == b"host secret\n"


def test_copy_out_stops_before_the_member_that_would_pass_max_bytes(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "d").mkdir()
    for name in ("a", "b", "c"):
        (root / "d" / name).write_bytes(name.encode() * 1000)
        os.utime(root / "d" / name, (1_600_000_000, 1_600_000_000))
    os.utime(root / "d", (1_600_000_000, 1_600_000_000))  # whole seconds: no pax header
    whole = _archive(root, "/d")
    assert len(whole) == 4 * 512 + 3 * 1024 + 1024  # 4 headers, 3 padded files, the end marker
    assert _archive(root, "/d", max_bytes=len(whole)) == whole  # the cap counts the end marker in
    for cap, kept in ((len(whole) - 1, ["d", "d/a", "d/b"]), (512 + 1536 + 1024, ["d", "d/a"]), (1, [])):
        written: list[bytes] = []
        with pytest.raises(CopyError, match=rf"would pass max_bytes \({cap} bytes\)") as e:
            _archive(root, "/d", max_bytes=cap, written=written)
        assert e.value.failure == Failure.LIMIT
        # Whole members only, no end marker: what a reader gets is never over the cap.
        (stream,) = written
        assert len(stream) == (512 + 1536 * (len(kept) - 1) if kept else 0)
        assert len(stream) <= cap and whole.startswith(stream)
        if kept:
            with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
                assert [m.name for m in tar] == kept
