"""Which freezer a host's cgroup layout gives, and the v1 groups quiltd keeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from quiltd.errors import Internal
from quiltd.host.freezer import Freezer, FreezerKind, detect


class NoSystemd:
    async def freeze(self, unit: str) -> None:
        raise AssertionError("systemd asked to freeze on a v1 host")

    async def thaw(self, unit: str) -> None:
        raise AssertionError("systemd asked to thaw on a v1 host")


def test_unified_hosts_freeze_through_systemd(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect(tmp_path) == FreezerKind.SYSTEMD


def test_v1_and_hybrid_hosts_use_the_freezer_controller(tmp_path: Path) -> None:
    (tmp_path / "freezer").mkdir()
    (tmp_path / "freezer" / "cgroup.procs").write_text("")
    (tmp_path / "unified").mkdir()  # hybrid: a v2 tree with no controllers beside
    assert detect(tmp_path) == FreezerKind.CGROUP_V1


def test_no_freezer_at_all(tmp_path: Path) -> None:
    assert detect(tmp_path) == FreezerKind.NONE
    with pytest.raises(Internal, match="no cgroup freezer"):
        asyncio.run(Freezer(NoSystemd(), "quilt.slice", tmp_path).freeze("quilt-0.scope"))


def test_groups_are_listed_and_forgotten(tmp_path: Path) -> None:
    (tmp_path / "freezer").mkdir()
    (tmp_path / "freezer" / "cgroup.procs").write_text("")
    (tmp_path / "freezer" / "quilt" / "quilt-a.scope").mkdir(parents=True)
    freezer = Freezer(NoSystemd(), "quilt.slice", tmp_path)
    assert freezer.groups() == ["quilt-a.scope"]
    freezer.forget("quilt-a.scope")
    freezer.forget("quilt-b.scope")  # never made: nothing to do
    assert freezer.groups() == []


def test_a_group_that_goes_while_it_is_frozen_is_internal_for_the_manager_to_name(tmp_path: Path) -> None:
    """The container's exit removes its group (forget) while a pause fills it: no FileNotFoundError."""
    (tmp_path / "freezer" / "quilt").mkdir(parents=True)
    (tmp_path / "freezer" / "cgroup.procs").write_text("")
    scope = tmp_path / "systemd" / "quilt.slice" / "quilt-a.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("4242\n")
    # A plain directory here, as the group is once removed: it has no cgroup.procs to write to.
    with pytest.raises(Internal, match=r"the freezer group of quilt-a\.scope went while it was frozen"):
        asyncio.run(Freezer(NoSystemd(), "quilt.slice", tmp_path).freeze("quilt-a.scope"))
