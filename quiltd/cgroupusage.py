"""A scope's live usage, read from its cgroup's own files.

These are the very files systemd reads to answer MemoryCurrent,
CPUUsageNSec and TasksCurrent, so the numbers are the same; asking systemd
for them is a D-Bus round trip to PID 1 and cost several times the rest of
GetContainerInfo. The one difference: systemd subtracts the CPU time the
cgroup had when the unit started, which for a scope made for this container
(a fresh cgroup) is nothing or next to nothing.

Anything unexpected here (a layout this does not know, a file that is
missing because the scope is going away or accounting is off) gives None,
and the caller asks systemd instead.
"""

from __future__ import annotations

from pathlib import Path

from quiltd.model import Usage

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupUsage:
    def __init__(self, slice_name: str, root: Path = CGROUP_ROOT) -> None:
        self._slice = slice_name
        # Unified (v2) when the root itself is a cgroup2 mount. On a hybrid
        # host the v2 tree holds no controllers: the counters are on v1.
        self._unified = (root / "cgroup.controllers").exists()
        self._root = root

    def read(self, unit: str) -> Usage | None:
        rel = f"{self._slice}/{unit}"
        try:
            if self._unified:
                scope = self._root / rel
                return Usage(
                    memory_current=_number(scope / "memory.current"),
                    cpu_usage_nsec=_usage_usec(scope / "cpu.stat") * 1000,
                    tasks_current=_number(scope / "pids.current"),
                )
            memory = _number(self._root / "memory" / rel / "memory.usage_in_bytes")
            tasks = _number(self._root / "pids" / rel / "pids.current")
            try:
                cpu = _number(self._root / "cpuacct" / rel / "cpuacct.usage")
            except FileNotFoundError:
                # systemd made no cpuacct group for the unit (cpu and cpuacct
                # mounted apart): it has no CPU time to report either.
                cpu = 0
            return Usage(memory_current=memory, cpu_usage_nsec=cpu, tasks_current=tasks)
        except (OSError, ValueError):
            return None


def _number(path: Path) -> int:
    with open(path, "rb") as f:
        return int(f.read())


def _usage_usec(path: Path) -> int:
    with open(path, "rb") as f:
        for line in f:
            key, _, value = line.partition(b" ")
            if key == b"usage_usec":
                return int(value)
    raise ValueError(f"no usage_usec in {path}")
