"""What clients ask for, typed and checked: one frozen record per a{sv} of the API.

The bus unwraps a call's variants and hands the plain values to
`quiltd.core.parse`, which builds these records or refuses with a named
error; the core's methods take only these records, never a map of options.
A record holds values already checked for type and range; what can only be
checked against the daemon's state (does the network exist, may this
caller bind that source) is the core's to check when it acts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from quiltd.images.extract import ImageLimits
from quiltd.model import ContainerSpec
from quiltd.net.firewall import EgressRule

DEFAULT_MAX_OUTPUT = 1 << 20


@dataclass(frozen=True)
class CreateOptions:
    """CreateContainer's options (and SetWarmPool's, a subset)."""

    # The values given, over the defaults. hostname "" is the container's
    # name; mounts are checked for their shape here and for their sources
    # (the caller may bind them, they exist) by the core.
    spec: ContainerSpec
    start: bool = True
    env: tuple[str, ...] = ()  # as the client gave it, before the image's is merged in
    entrypoint: tuple[str, ...] | None = None  # None: the image's; (): none
    given: frozenset[str] = frozenset()  # the options the client named: the image fills the rest


@dataclass(frozen=True)
class ExecOptions:
    """Exec, ExecEx, ExecWithFds, ExecStart and ExecWithPty options."""

    env: tuple[str, ...] = ()  # NAME=value entries over the container's environment
    workdir: str = ""  # "" is the container's workdir
    user: str = ""  # "" is the container's user (its user option, else the image's User, else root)
    timeout_sec: int = 0
    stdin: bytes = b""
    max_output: int = DEFAULT_MAX_OUTPUT
    rows: int = 0  # ExecWithPty's terminal size; 0 leaves the kernel's
    cols: int = 0


@dataclass(frozen=True)
class CopyOptions:
    """CopyInEx and CopyOutEx options; max_bytes None is the direction's default."""

    max_bytes: int | None = None


class Stream(Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    BOTH = "both"


@dataclass(frozen=True)
class LogOptions:
    """GetLogs, GetLogsRaw and FollowLogs options."""

    since_usec: int = 0
    tail: int = 0
    stream: Stream = Stream.BOTH
    exec_id: str = ""  # "" the container's own output, "*" every exec's too, else one exec's


@dataclass(frozen=True)
class ImportOptions:
    """ImportImage(Ex) and ImportImageFd(Ex) options."""

    max_bytes: int = ImageLimits.max_bytes
    ref: str | None = None  # which image of an archive holding several
    timeout_sec: int | None = None  # a docker:// pull's; refused for any other source


@dataclass(frozen=True)
class RemoveImageOptions:
    force: bool = False


@dataclass(frozen=True)
class ContainerFilter:
    """ListContainers' filter; None matches any."""

    state: str | None = None
    name: str | None = None
    image: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NetworkOptions:
    """CreateNetwork options."""

    subnet: ipaddress.IPv4Network | None = None  # None: the first free /16
    egress: str = "none"  # "none", "all" or "list"
    rules: tuple[EgressRule, ...] = ()  # with "list"


@dataclass(frozen=True)
class CommitOptions:
    """CommitContainer's options: what the new image's config changes (None: the container's own)."""

    env: tuple[str, ...] | None = None
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ForkOptions:
    """ForkContainer's options: the forks' command (None: the source's), whether they start, and how long
    a running source has to stop before it is killed."""

    command: tuple[str, ...] | None = None
    start: bool = True
    stop_timeout_sec: int = 10
