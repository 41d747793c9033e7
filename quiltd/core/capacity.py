"""What the host can give containers, and what its containers have claimed.

A placer spread over many hosts (quiltd.cluster) reads these from
GetSystemInfo: the room left on a host is its capacity less the limits
(cpu_quota, memory_max) of the containers that run or are about to. Limits
are what a container may take, not what it uses now: a host is never placed
past what it could give if every container used its limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quiltd.model import State

# A container still holding (or about to hold) what its limits claim. A
# paused one keeps its memory and may be resumed at any time.
CLAIMING = frozenset({State.CREATED, State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING})


@dataclass(frozen=True)
class Capacity:
    cpus: float  # cores this process may run on
    memory_bytes: int  # the host's memory (MemTotal)
    cpu_reserved: float  # cpu_quota of the claiming containers, summed
    memory_reserved: int  # memory_max of the claiming containers, summed


def host_cpus() -> float:
    # The affinity mask, not os.cpu_count(): a host pinned to fewer cores
    # (cpuset, taskset) has only those to give.
    return float(len(os.sched_getaffinity(0)))


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no MemTotal in {meminfo}")


def capacity(cpu_reserved: float, memory_reserved: int) -> Capacity:
    """The host's capacity, with what the CLAIMING containers' limits add up to (Store.claimed_limits)."""
    return Capacity(host_cpus(), host_memory(), cpu_reserved, memory_reserved)
