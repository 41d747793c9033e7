"""Host paths a caller names: bind sources under a policy, and files opened as the caller."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiltd.access import Credentials
from quiltd.core import fdcheck
from quiltd.errors import InvalidArgument
from quiltd.fs import resolve
from quiltd.host import callerfiles
from quiltd.runtime import mounts
from quiltd.runtime.mounts import SourcePolicy, SourceRefused, StateSource

NOBODY = Credentials(65534, frozenset({65534}))
ROOT = Credentials(0, frozenset({0}))
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="opens files as another user")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="quilt-sources-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def opened(source: str | Path, policy: SourcePolicy) -> str:
    fd = mounts.open_source(str(source), policy)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_a_member_source_stays_beneath_its_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "work").mkdir(parents=True)
    outside.mkdir()
    (root / "inside").symlink_to("work")
    (root / "abs").symlink_to(root / "work")  # absolute, even pointing inside: refused
    (root / "out").symlink_to(outside)
    policy = SourcePolicy((), (str(root),))
    assert opened(root / "work", policy) == str(root / "work")
    assert opened(root / "inside", policy) == str(root / "work")
    assert opened(root, policy) == str(root)
    for source in (root / "abs", root / "out", root / "out/x"):
        with pytest.raises(SourceRefused, match="leads out of"):
            opened(source, policy)
    for source in (outside, f"{root}/../outside", f"{root}x"):
        with pytest.raises(SourceRefused, match="not under a mount root"):
            opened(source, policy)
    with pytest.raises(SourceRefused, match="not under a mount root"):
        opened(root / "work", SourcePolicy())  # no roots: nothing


def test_the_state_directory_is_refused_to_everyone(tmp_path: Path) -> None:
    state = tmp_path / "var/lib/quilt"
    (state / "images").mkdir(parents=True)
    (tmp_path / "link").symlink_to(state)
    (tmp_path / "other").mkdir()
    policy = SourcePolicy((str(state),), None)
    for source in (state, state / "images", tmp_path / "link", tmp_path / "var", tmp_path):
        with pytest.raises(StateSource, match="quiltd's own state"):
            opened(source, policy)
    assert opened(tmp_path / "other", policy) == str(tmp_path / "other")


def test_a_file_is_opened_with_the_callers_permissions(open_dir: Path) -> None:
    tmp_path = open_dir
    secret, shared = tmp_path / "secret", tmp_path / "shared"
    secret.write_text("s")
    shared.write_text("x")
    secret.chmod(0o600)
    shared.chmod(0o644)
    with pytest.raises(PermissionError) as caught:
        callerfiles.open_as(NOBODY, callerfiles.AT_FDCWD, str(secret), os.O_RDONLY)
    assert caught.value.errno == errno.EACCES
    for who, path in ((NOBODY, shared), (ROOT, secret)):
        fd = callerfiles.open_as(who, callerfiles.AT_FDCWD, str(path), os.O_RDONLY)
        os.close(fd)
    # The daemon's own thread keeps root's rights.
    os.close(os.open(secret, os.O_RDONLY))


def test_relative_opens_as_the_caller_stay_beneath(open_dir: Path) -> None:
    tmp_path = open_dir
    (tmp_path / "blob").write_text("b")
    (tmp_path / "blob").chmod(0o600)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PermissionError):
            callerfiles.opener(NOBODY)(dir_fd, "blob", os.O_RDONLY, 0)
        with pytest.raises(OSError) as caught:
            callerfiles.opener(ROOT)(dir_fd, "../x", os.O_RDONLY, resolve.RESOLVE_BENEATH)
        assert caught.value.errno == errno.EXDEV
    finally:
        os.close(dir_fd)


def test_an_import_descriptor_must_be_readable_content(tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(b"x")
    good = [os.open(tmp_path / "image.tar", os.O_RDONLY), os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    read_end, write_end = os.pipe()
    bad = {
        os.open(tmp_path / "image.tar", os.O_PATH): "not open for reading",
        os.open(tmp_path / "image.tar", os.O_WRONLY): "not open for reading",
        read_end: "must be a regular file or a directory",
    }
    try:
        for fd in good:
            fdcheck.check_source(fd, "the image")
        for fd, message in bad.items():
            with pytest.raises(InvalidArgument, match=message):
                fdcheck.check_source(fd, "the image")
    finally:
        for fd in [*good, *bad, write_end]:
            os.close(fd)
