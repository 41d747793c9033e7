"""What GetSystemInfo reports as a host's capacity and what its containers claim."""

from __future__ import annotations

from pathlib import Path

from quiltd.core.capacity import capacity, host_memory
from quiltd.model import Container, ContainerSpec, State


def container(state: State, cpu: float | None, mem: int | None) -> Container:
    return Container(id="0" * 16, name="c", image="busybox", image_id="", command=("true",),
                     spec=ContainerSpec(cpu_quota=cpu, memory_max=mem), state=state)


def test_only_containers_that_run_or_will_claim_their_limits() -> None:
    cap = capacity([
        container(State.RUNNING, 0.5, 1 << 20),
        container(State.CREATED, 1.0, None),
        container(State.STARTING, None, 2 << 20),
        container(State.EXITED, 4.0, 1 << 30),
        container(State.FAILED, 4.0, 1 << 30),
    ])
    assert cap.cpu_reserved == 1.5
    assert cap.memory_reserved == 3 << 20
    assert cap.cpus >= 1 and cap.memory_bytes > 0


def test_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  10 kB\nMemTotal:  2048 kB\n")
    assert host_memory(meminfo) == 2048 * 1024
