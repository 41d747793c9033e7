"""What the fork server needs to know to copy files into or out of one container, and the answer.

Both cross a process boundary as frame bodies (see wire: COPY and COPIED;
a failed copy answers with the wire's FAILED), so they hold plain values only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from quiltd.runtime.mounts import NO_BINDS, SourcePolicy
from quiltd.runtime.wire import Code

# Why a copy failed: the wire's one set of failure codes (INVALID, NO_PATH,
# LIMIT, TIMEOUT, GONE, IO, INTERNAL are a copy's).
Failure = Code


class Direction(str, enum.Enum):
    IN = "in"  # a tar stream from the caller's descriptor, extracted at path
    OUT = "out"  # path as a tar stream, written to the caller's descriptor


@dataclass(frozen=True)
class CopySpec:
    direction: Direction
    name: str  # the container's, for messages
    path: str  # inside the container, absolute
    # A running container: its init, whose root the copy works in.
    init_pid: int
    init_starttime: int
    # A stopped one (init_pid 0): its layers, mounted in the helper's own
    # mount namespace, and its mounts, as a start would make them.
    lowerdir: str
    upperdir: str
    overlay_workdir: str
    rootfs: str
    binds: tuple[tuple[str, str, bool], ...]
    volume_binds: tuple[tuple[str, str, bool], ...]
    tmpfs: tuple[str, ...]
    userns_base: int  # the container's user namespace range; 0 = none
    max_bytes: int  # of the tar stream read, for IN; written, for OUT (0: no cap)
    idle_timeout_sec: int  # no byte moved for this long ends the copy
    bind_policy: SourcePolicy = NO_BINDS  # for binds, as a start would check them

    def body(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CopySpec:
        raw = dict(body)
        raw["direction"] = Direction(raw["direction"])
        for key in ("binds", "volume_binds"):
            raw[key] = tuple((str(s), str(t), bool(ro)) for s, t, ro in raw[key])
        raw["tmpfs"] = tuple(str(t) for t in raw["tmpfs"])
        raw["bind_policy"] = SourcePolicy.from_json(raw.get("bind_policy"))
        return cls(**raw)


@dataclass(frozen=True)
class CopyResult:
    """What a copy that succeeded moved."""

    size: int = 0  # bytes of the tar stream, read or written
    entries: int = 0  # tar members extracted or written

    def body(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CopyResult:
        return cls(int(body["size"]), int(body["entries"]))
