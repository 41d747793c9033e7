"""What GetSystemInfo reports as a host's capacity and what its containers claim."""

from __future__ import annotations

from pathlib import Path

from quiltd.core.capacity import CLAIMING, capacity, host_memory
from quiltd.model import Container, ContainerSpec, State
from quiltd.store.database import Store


def test_only_containers_that_run_or_will_claim_their_limits(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    rows = [
        (State.RUNNING, 0.5, 1 << 20, ""),
        (State.CREATED, 1.0, None, ""),
        (State.STARTING, None, 2 << 20, ""),
        (State.PAUSED, 0.25, 4 << 20, ""),  # holds its memory, and may resume at any time
        (State.STOPPING, None, None, ""),
        (State.EXITED, 4.0, 1 << 30, ""),
        (State.FAILED, 4.0, 1 << 30, ""),
        (State.RUNNING, 2.0, 8 << 20, "pool-busybox"),  # a warm pool's member holds its limits too
    ]
    for i, (state, cpu, mem, pool) in enumerate(rows):
        with store.transaction():
            store.insert_container(Container(
                id=f"{i:016x}", name=f"c{i}", image="busybox", image_id="", command=("true",),
                spec=ContainerSpec(cpu_quota=cpu, memory_max=mem), state=state, pool=pool))
    cap = capacity(*store.claimed_limits(CLAIMING))
    assert cap.cpu_reserved == 3.75
    assert cap.memory_reserved == 15 << 20
    assert cap.cpus >= 1 and cap.memory_bytes > 0
    assert store.claimed_limits({State.EXITED}) == (4.0, 1 << 30)


def test_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  10 kB\nMemTotal:  2048 kB\n")
    assert host_memory(meminfo) == 2048 * 1024
