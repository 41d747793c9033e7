"""Fixtures of the unit tests: the core in a world of fake mechanisms (fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.fakes import World, world


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    """A fresh world per test: a real store in tmp_path, fake systemd, inits, pidfds and networks."""
    with world(tmp_path) as w:
        yield w
