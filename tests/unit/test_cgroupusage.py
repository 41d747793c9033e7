"""Live usage from a scope's cgroup files, on both layouts systemd uses."""

from __future__ import annotations

from pathlib import Path

from quiltd.host.cgroupusage import CgroupUsage
from quiltd.model import Usage

UNIT = "quilt-0123456789abcdef.scope"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_reads_one_file_per_controller(tmp_path: Path) -> None:
    for ctrl in ("memory", "cpuacct", "pids", "systemd"):
        (tmp_path / ctrl).mkdir()
    scope = f"quilt.slice/{UNIT}"
    _write(tmp_path / "memory" / scope / "memory.usage_in_bytes", "4096000\n")
    _write(tmp_path / "cpuacct" / scope / "cpuacct.usage", "123456789\n")
    _write(tmp_path / "pids" / scope / "pids.current", "2\n")
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) == Usage(4096000, 123456789, 2)


def test_v2_reads_the_unified_tree(tmp_path: Path) -> None:
    _write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    scope = tmp_path / "quilt.slice" / UNIT
    _write(scope / "memory.current", "8192\n")
    _write(scope / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    _write(scope / "pids.current", "3\n")
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) == Usage(8192, 1_500_000, 3)


def test_a_missing_or_odd_file_means_ask_systemd(tmp_path: Path) -> None:
    _write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    scope = tmp_path / "quilt.slice" / UNIT
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) is None  # a scope that is gone
    _write(scope / "memory.current", "8192\n")
    _write(scope / "cpu.stat", "user_usec 1000\n")
    _write(scope / "pids.current", "3\n")
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) is None  # no usage_usec


def test_v1_without_a_cpuacct_group_counts_no_cpu_time(tmp_path: Path) -> None:
    # What systemd reports as "[not set]" for CPUUsageNSec there.
    scope = f"quilt.slice/{UNIT}"
    (tmp_path / "cpuacct").mkdir()
    _write(tmp_path / "memory" / scope / "memory.usage_in_bytes", "4096000\n")
    _write(tmp_path / "pids" / scope / "pids.current", "2\n")
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) == Usage(4096000, 0, 2)
    (tmp_path / "pids" / scope / "pids.current").unlink()
    assert CgroupUsage("quilt.slice", tmp_path).read(UNIT) is None


def test_tasks_tell_an_empty_or_ended_scope_from_one_that_cannot_be_told(tmp_path: Path) -> None:
    # What the cleaner relies on to skip systemd for a scope whose processes are all gone.
    _write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    cgroups = CgroupUsage("quilt.slice", tmp_path)
    assert cgroups.tasks(UNIT) is None  # no quilt.slice: a layout this does not know
    scope = tmp_path / "quilt.slice" / UNIT
    scope.mkdir(parents=True)
    assert cgroups.tasks(UNIT) is None  # a group without the pids controller
    _write(scope / "pids.current", "2\n")
    assert cgroups.tasks(UNIT) == 2
    _write(scope / "pids.current", "0\n")
    assert cgroups.tasks(UNIT) == 0
    (scope / "pids.current").unlink()
    scope.rmdir()
    assert cgroups.tasks(UNIT) == 0  # systemd ended the scope and removed its group


def test_v1_counts_tasks_in_the_pids_hierarchy(tmp_path: Path) -> None:
    _write(tmp_path / "pids" / "quilt.slice" / UNIT / "pids.current", "1\n")
    assert CgroupUsage("quilt.slice", tmp_path).tasks(UNIT) == 1
