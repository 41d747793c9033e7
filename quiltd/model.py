"""The records Quilt keeps: containers, their settings and state, images."""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_EXIT_CODE = -1  # ExitCode before the container has exited


def scope_unit(container_id: str) -> str:
    """The transient systemd scope a container's processes live in."""
    return f"quilt-{container_id}.scope"


class State(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    PAUSED = "paused"  # every process frozen (PauseContainer) until ResumeContainer
    EXITED = "exited"
    FAILED = "failed"

    @property
    def is_active(self) -> bool:
        """A process may exist for a container in this state."""
        return self in (State.STARTING, State.RUNNING, State.STOPPING, State.PAUSED)

    @property
    def is_final(self) -> bool:
        return self in (State.EXITED, State.FAILED)


# journald's own defaults (RateLimitBurst, RateLimitIntervalSec), which it
# only ever raises with free disk space: at these a container's lines are
# dropped by Quilt, where they are counted, before journald drops any.
DEFAULT_LOG_RATE_BURST = 10000
DEFAULT_LOG_RATE_INTERVAL_SEC = 30


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
    mounts: tuple[tuple[str, str, bool], ...] = ()  # (host source, target, read_only)
    tmpfs: tuple[tuple[str, int], ...] = ()  # (target, size_bytes)
    publish: tuple[tuple[int, int, str], ...] = ()  # (host port, container port, "tcp" or "udp")
    volumes: tuple[tuple[str, str, bool], ...] = ()  # (volume name, target, read_only)
    disk_max: int | None = None  # bytes: the writable layer lives on a tmpfs of this size
    user: str = ""  # "user" or "user:group" as in the container's /etc/passwd; "" = root
    userns: bool = False  # root in the container is an unprivileged range of host ids
    nested_userns: bool = False  # with userns: its processes may make user namespaces of their own
    # Lines of output per interval; more are dropped, counted and told in the
    # logs. 0 leaves only journald's own per-unit limit, which drops silently.
    log_rate_burst: int = DEFAULT_LOG_RATE_BURST
    log_rate_interval_sec: int = DEFAULT_LOG_RATE_INTERVAL_SEC
    # Who created it: 0 (root) may bind any host path and use the host image;
    # anyone else only what /etc/quilt/quiltd.conf allows members. Rows from
    # before this was recorded have UNKNOWN_CREATOR, which counts as a member.
    creator_uid: int = -1


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
    # With spec.userns: the host id its ids start at, held from create to removal.
    userns_base: int = 0
    # CLOCK_BOOTTIME when the command started: how long it ran is measured on
    # this clock, which no one sets back (see manager.finished_usec).
    started_boot_usec: int = 0
    # The warm pool (WarmPool.id) of a container made ready ahead and not yet
    # claimed; "" for every container a caller created (see pool.py).
    pool: str = ""

    @property
    def unit(self) -> str:
        return scope_unit(self.id)


@dataclass(frozen=True)
class WarmPool:
    """How many containers to keep ready for an image and a set of setup options."""

    id: str
    image: str
    options: str  # canonical JSON of the options, the pool's identity with the image
    size: int


@dataclass(frozen=True)
class ContainerListing:
    """What ListContainers shows of a container: read without decoding its spec."""

    id: str
    name: str
    image: str
    state: State


@dataclass(frozen=True)
class Usage:
    """A running container's live usage, as systemd accounts it for its scope."""

    memory_current: int  # bytes
    cpu_usage_nsec: int
    tasks_current: int


@dataclass(frozen=True)
class ImageConfig:
    """The defaults an OCI or docker image's config gives its containers."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # set by CommitContainer; OCI imports keep none


@dataclass(frozen=True)
class Image:
    name: str
    id: str  # sha256 of the imported archive, or of the image's config for OCI and docker images
    path: str  # the overlay's lower dirs: the extracted root, or its stored layers top first, ':'-joined
    size_bytes: int
    created_usec: int
    config: ImageConfig = ImageConfig()
    layers: tuple[str, ...] = ()  # diff_ids of its stored layers, base first; () for one directory


@dataclass(frozen=True)
class Volume:
    """A named volume: a directory under the state dir that outlives containers."""

    name: str
    path: str
    created_usec: int


class CleanupKind(str, enum.Enum):
    SCOPE = "scope"  # a systemd unit to stop
    TREE = "tree"  # a directory to remove


@dataclass(frozen=True)
class CleanupTask:
    """A leftover to undo, retried until it is gone."""

    id: int
    kind: CleanupKind
    target: str
    attempts: int
    next_usec: int  # not before this time (µs since the epoch)
    last_error: str


class ExecState(str, enum.Enum):
    RUNNING = "running"
    EXITED = "exited"
    TIMED_OUT = "timed_out"  # killed by its timeout; exit code 124

    @property
    def is_final(self) -> bool:
        return self != ExecState.RUNNING


@dataclass(frozen=True)
class Exec:
    """A background command run in a container with ExecStart."""

    id: str
    container_id: str
    command: tuple[str, ...]
    state: ExecState = ExecState.RUNNING
    exit_code: int = NO_EXIT_CODE
    created_usec: int = 0
    finished_usec: int = 0


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
