"""The records quiltd.cluster passes between the driver, the registry and the host agents.

All are frozen and picklable: Ray carries them between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The label quiltd.cluster puts on every container it creates: its value is
# the cluster-wide name, so a host that comes back can tell its sandboxes.
CLUSTER_LABEL = "quilt.cluster"
LOST = "lost"


@dataclass(frozen=True)
class HostInfo:
    """A host as its quiltd describes it (GetSystemInfo), at one moment."""

    name: str  # the host's hostname, stable across its restarts
    node_id: str  # the Ray node it runs on now
    cpus: float
    memory_bytes: int
    cpu_reserved: float
    memory_reserved: int
    containers: int  # created, starting or running ones
    images: frozenset[str] = frozenset()

    @property
    def cpu_free(self) -> float:
        return self.cpus - self.cpu_reserved

    @property
    def memory_free(self) -> int:
        return self.memory_bytes - self.memory_reserved


@dataclass(frozen=True)
class Need:
    """What a create asks of a host."""

    image: str
    cpus: float = 0.0  # the create's cpu_quota
    memory_bytes: int = 0  # the create's memory_max
    host: str | None = None  # must go on this host
    avoid: frozenset[str] = frozenset()  # must not go on these
    pull: bool = False  # the image may be pulled where absent


@dataclass(frozen=True)
class SandboxRecord:
    """The registry's entry for one sandbox name: where it lives and how to make it again."""

    name: str
    host: str
    container_id: str
    image: str
    command: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()  # CreateContainer options, as given
    generation: int = 0  # times it was recreated on another host

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class SandboxSummary:
    """One row of QuiltCluster.list()."""

    name: str
    host: str
    id: str
    image: str
    state: str  # quiltd's state, or "lost" when its host is gone
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MapResult:
    """What map() streams back for one item: its value, or the error it raised."""

    index: int
    item: Any
    value: Any = None
    error: BaseException | None = None
    host: str = ""
