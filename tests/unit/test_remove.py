"""The one tree removal: deep, hostile and locked trees go, and nothing outside them does."""

from __future__ import annotations

import ast
import fcntl
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import quiltd
from quiltd.fs.remove import remove_entry, remove_path, remove_tree

IS_ROOT = os.geteuid() == 0
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
IMMUTABLE, APPEND = 0x10, 0x20


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "precious").write_text("keep")
    return path


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs: a deep tree is made and removed there in seconds, not minutes."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="quilt-remove-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _chain(top: Path, depth: int, every: int = 0, link_to: Path | None = None) -> None:
    """top/d/d/.../d, depth levels; every `every` levels a file and a symlink to link_to."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if every and level % every == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
                if link_to is not None:
                    os.symlink(link_to, "out", dir_fd=fd)
    finally:
        os.close(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_tree_far_deeper_than_any_limit_goes_with_few_descriptors(shm: Path) -> None:
    # 30,000 levels: past the recursion limit and 64 descriptors many times
    # over, in a few seconds; test_tree_removal.py removes 100,000 in the sandbox.
    outside = shm / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    tree = shm / "tree"
    _chain(tree, 30_000, every=5_000, link_to=outside)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Far fewer descriptors than levels: a walk that held one per level fails.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        before = _open_fds()
        remove_path(tree)
        assert _open_fds() == before
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not os.path.lexists(tree)
    assert sorted(os.listdir(outside)) == ["precious"]


def test_no_link_is_followed(tmp_path: Path, outside: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a/b").mkdir(parents=True)
    (tree / "a/b/link").symlink_to(outside)
    (tree / "top-link").symlink_to(outside)
    (tree / "file-link").symlink_to(outside / "precious")
    remove_path(tree)
    assert not os.path.lexists(tree)
    assert (outside / "precious").read_text() == "keep"


def test_a_link_given_as_the_tree_is_removed_itself(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_path(link)
    assert not os.path.lexists(link)
    assert (outside / "precious").read_text() == "keep"
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "link").symlink_to(outside)
        with pytest.raises(NotADirectoryError):
            remove_tree(parent, "link")  # a tree was asked for: a link is not one
        assert (outside / "precious").exists()
        remove_entry(parent, "missing")  # nothing there: nothing to do
    finally:
        os.close(parent)


def test_missing_path_is_no_error(tmp_path: Path) -> None:
    remove_path(tmp_path / "nothing")
    remove_path(tmp_path / "no" / "parent")


def test_directories_without_permissions(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a/b/c").mkdir(parents=True)
    (tree / "a/b/c/f").write_text("x")
    for d in (tree / "a/b/c", tree / "a/b", tree / "a"):
        d.chmod(0)
    remove_path(tree)
    assert not os.path.lexists(tree)


def _set_flags(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        struct.pack_into("=i", buf, 0, struct.unpack_from("=i", buf)[0] | flags)
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, buf)
    finally:
        os.close(fd)


@pytest.mark.skipif(not IS_ROOT, reason="setting the immutable flag needs CAP_LINUX_IMMUTABLE")
def test_immutable_and_append_only_entries_are_cleared_and_removed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "locked/inner").mkdir(parents=True)
    (tree / "locked/inner/file").write_text("x")
    (tree / "appendonly").mkdir()
    (tree / "appendonly/file").write_text("x")
    (tree / "immutable-file").write_text("x")
    try:
        _set_flags(tree / "locked/inner/file", IMMUTABLE)
        _set_flags(tree / "locked/inner", IMMUTABLE)
        _set_flags(tree / "appendonly", APPEND)
        _set_flags(tree / "immutable-file", IMMUTABLE)
    except OSError as exc:
        pytest.skip(f"this filesystem keeps no such flags: {exc}")
    with pytest.raises(PermissionError):
        os.unlink(tree / "immutable-file")  # the flags do hold
    remove_path(tree)
    assert not os.path.lexists(tree)


def test_a_tree_changed_while_it_is_removed(tmp_path: Path, outside: Path) -> None:
    """Another process keeps adding to the tree and swaps its directories for links out of it."""
    tree = tmp_path / "tree"
    _chain(tree, 300, every=10)
    stop = threading.Event()
    swaps = 0

    def attack() -> None:
        # Confined as a container is: it works from a descriptor of the
        # tree and never follows a link itself, so all it can do is change
        # the tree under the removal.
        nonlocal swaps
        nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        top = os.open(tree, nofollow)
        n = 0
        try:
            while not stop.is_set():
                try:
                    for entry in os.listdir(top):
                        fd = os.open(entry, nofollow, dir_fd=top)
                        try:
                            for child in os.listdir(fd):
                                n += 1
                                os.rename(child, f"moved{n}", src_dir_fd=fd, dst_dir_fd=top)
                                os.symlink(outside, child, dir_fd=fd)
                                swaps += 1
                                moved = os.open(f"moved{n}", nofollow, dir_fd=top)
                                try:
                                    os.mkdir("new", dir_fd=moved)
                                    os.symlink(outside, "link", dir_fd=moved)
                                finally:
                                    os.close(moved)
                        finally:
                            os.close(fd)
                except OSError:
                    pass
        finally:
            os.close(top)

    thread = threading.Thread(target=attack)
    thread.start()
    try:
        remove_path(tree)
    finally:
        stop.set()
        thread.join()
    assert swaps > 0  # the attack ran while the removal did
    assert sorted(os.listdir(outside)) == ["precious"]
    assert (outside / "precious").read_text() == "keep"
    remove_path(tree)  # whatever the attack made after the first removal ended
    assert not os.path.lexists(tree)


def test_a_long_removal_reports_that_it_moves_on(tmp_path: Path) -> None:
    """A copy's idle watch ends a copy that moves nothing for 30 s: a deep removal must not look idle."""
    tree = tmp_path / "tree"
    _chain(tree, 200)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_entry(parent, "tree", tick)
    finally:
        os.close(parent)
    assert not os.path.lexists(tree)
    assert ticks >= 200  # once a level at least


def test_the_daemon_removes_trees_only_this_way() -> None:
    """shutil.rmtree recurses and follows the tree's own shape: no module of quiltd may use it."""
    found = []
    for path in Path(quiltd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            attribute = isinstance(node, ast.Attribute) and node.attr == "rmtree"
            imported = isinstance(node, ast.ImportFrom) and any(a.name == "rmtree" for a in node.names)
            if attribute or imported:
                found.append(f"{path.name}:{getattr(node, 'lineno', 0)}")
    assert found == []


_MOUNT_POINT_PROBE = """
import os, subprocess, sys
from quiltd.fs.remove import remove_tree
top = sys.argv[1]
os.makedirs(os.path.join(top, "tree", "mnt"))
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.path.join(top, "tree", "mnt")], check=True)
with open(os.path.join(top, "tree", "mnt", "kept"), "w") as f:
    f.write("another filesystem")
parent = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
try:
    remove_tree(parent, "tree")
except OSError as e:
    print("refused:", e)
print("kept" if os.path.exists(os.path.join(top, "tree", "mnt", "kept")) else "emptied")
"""


def test_a_mount_point_in_the_tree_is_not_emptied(tmp_path: Path) -> None:
    """A filesystem mounted below a container's root (a volume, /proc) is another tree: not touched.

    Run in a mount namespace of its own, so the tmpfs never shows on the host.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs needs root and unshare")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                          _MOUNT_POINT_PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "refused: " in out.stdout and "a mount point is not removed" in out.stdout, out
    assert out.stdout.strip().endswith("kept"), out
