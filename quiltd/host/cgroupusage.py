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

import os
from pathlib import Path

from quiltd.model import Usage

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupUsage:
    def __init__(self, slice_name: str, root: Path = CGROUP_ROOT) -> None:
        # Unified (v2) when the root itself is a cgroup2 mount. On a hybrid
        # host the v2 tree holds no controllers: the counters are on v1.
        self._unified = (root / "cgroup.controllers").exists()
        # Plain strings: this runs on every GetContainerInfo, and building
        # Path objects cost as much as reading the files.
        base = str(root)
        if self._unified:
            self._memory = self._tasks = self._cpu = f"{base}/{slice_name}/"
        else:
            self._memory = f"{base}/memory/{slice_name}/"
            self._tasks = f"{base}/pids/{slice_name}/"
            self._cpu = f"{base}/cpuacct/{slice_name}/"

    def tasks(self, unit: str) -> int | None:
        """The tasks in the unit's cgroup; 0 once the cgroup is gone; None when that cannot be told.

        Gone means the slice's group is there and the unit's is not: systemd
        removes a unit's groups when it ends it, and makes them before it
        reports the unit started, so a live unit never lacks one.
        """
        try:
            return _number(f"{self._tasks}{unit}/pids.current")
        except FileNotFoundError:
            if os.path.isdir(f"{self._tasks}{unit}") or not os.path.isdir(self._tasks):
                return None  # a group without the pids controller, or a layout this does not know
            return 0
        except (OSError, ValueError):
            return None

    def read(self, unit: str) -> Usage | None:
        try:
            if self._unified:
                return Usage(
                    memory_current=_number(f"{self._memory}{unit}/memory.current"),
                    cpu_usage_nsec=_usage_usec(f"{self._cpu}{unit}/cpu.stat") * 1000,
                    tasks_current=_number(f"{self._tasks}{unit}/pids.current"),
                )
            memory = _number(f"{self._memory}{unit}/memory.usage_in_bytes")
            tasks = _number(f"{self._tasks}{unit}/pids.current")
            try:
                cpu = _number(f"{self._cpu}{unit}/cpuacct.usage")
            except FileNotFoundError:
                # systemd made no cpuacct group for the unit (cpu and cpuacct
                # mounted apart): it has no CPU time to report either.
                cpu = 0
            return Usage(memory_current=memory, cpu_usage_nsec=cpu, tasks_current=tasks)
        except (OSError, ValueError):
            return None


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _number(path: str) -> int:
    return int(_read(path))


def _usage_usec(path: str) -> int:
    for line in _read(path).splitlines():
        key, _, value = line.partition(b" ")
        if key == b"usage_usec":
            return int(value)
    raise ValueError(f"no usage_usec in {path}")
