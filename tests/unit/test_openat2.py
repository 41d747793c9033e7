"""openat2 repeats a lookup the kernel could not prove safe, and only that."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from quiltd.fs import resolve


def test_a_raced_lookup_is_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_text("x")
    real = resolve._libc.syscall
    refusals = [errno.EAGAIN, errno.EAGAIN]

    def racing(*args: Any) -> int:
        if refusals:
            ctypes.set_errno(refusals.pop())
            return -1
        return int(real(*args))

    monkeypatch.setattr(resolve._libc, "syscall", racing)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = resolve.open_in_root(root, "f", os.O_RDONLY)
        assert os.read(fd, 1) == b"x"
        os.close(fd)
        assert refusals == []
    finally:
        os.close(root)


def test_other_errors_are_not_repeated(tmp_path: Path) -> None:
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):
            resolve.open_in_root(root, "missing")
    finally:
        os.close(root)
