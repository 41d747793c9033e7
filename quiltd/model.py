"""The records Quilt keeps: containers, their settings and state, images."""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_EXIT_CODE = -1  # ExitCode before the container has exited


class State(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def is_active(self) -> bool:
        """A process may exist for a container in this state."""
        return self in (State.STARTING, State.RUNNING, State.STOPPING)

    @property
    def is_final(self) -> bool:
        return self in (State.EXITED, State.FAILED)


@dataclass(frozen=True)
class ContainerSpec:
    """How a container runs, fixed at create time."""

    env: tuple[str, ...] = ()
    workdir: str = "/"
    hostname: str = ""
    memory_max: int | None = None
    cpu_quota: float | None = None
    tasks_max: int = 1024
    network: str = "none"
    labels: tuple[tuple[str, str], ...] = ()
    ttl_sec: int = 0
    auto_remove: bool = False
    publish: tuple[tuple[int, int, str], ...] = ()  # (host port, container port, "tcp" or "udp")


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: str
    image_id: str
    command: tuple[str, ...]
    spec: ContainerSpec
    state: State = State.CREATED
    reason: str = ""  # why it failed, or how it ended when that is not plain
    pid: int = 0  # the init's pid on the host, while active
    pid_starttime: int = 0
    exit_code: int = NO_EXIT_CODE
    created_usec: int = 0
    started_usec: int = 0
    finished_usec: int = 0

    @property
    def unit(self) -> str:
        return f"quilt-{self.id}.scope"


@dataclass(frozen=True)
class Image:
    name: str
    id: str  # sha256 of the imported archive
    path: str  # the extracted root, used as the overlay's lower layer
    size_bytes: int
    created_usec: int


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str  # the bridge device in the daemon's network namespace
    subnet: str  # CIDR, e.g. 10.88.0.0/16
    gateway: str  # the bridge's own address in the subnet
    egress: str = "none"  # "none", "all", or comma-separated "CIDR" / "CIDR:PORT" entries
    created_usec: int = 0


@dataclass(frozen=True)
class Lease:
    """A container's address on its network, held from its first start until it is removed."""

    container_id: str
    network: str
    address: str
