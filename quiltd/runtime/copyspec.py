"""What the fork server needs to know to copy files into or out of one container, and the answer.

Both cross a process boundary as JSON, so they hold plain values only.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

from quiltd.runtime.mounts import NO_BINDS, SourcePolicy

REQUEST_PREFIX = b"copy "  # how the fork server tells a copy from an exec request


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

    def to_request(self) -> bytes:
        return REQUEST_PREFIX + json.dumps(asdict(self)).encode()

    @classmethod
    def from_request(cls, data: bytes) -> CopySpec:
        raw = json.loads(data[len(REQUEST_PREFIX):])
        raw["direction"] = Direction(raw["direction"])
        for key in ("binds", "volume_binds"):
            raw[key] = tuple((str(s), str(t), bool(ro)) for s, t, ro in raw[key])
        raw["tmpfs"] = tuple(str(t) for t in raw["tmpfs"])
        raw["bind_policy"] = SourcePolicy.from_json(raw.get("bind_policy"))
        return cls(**raw)


class Failure(str, enum.Enum):
    """Why a copy failed, so the daemon can name the error."""

    INVALID = "invalid"  # not a tar, a bad member name, a device node, a path that is no directory
    NO_PATH = "no-path"  # the path does not exist in the container
    LIMIT = "limit"  # over max_bytes, read or written
    TIMEOUT = "timeout"  # nothing moved for idle_timeout_sec
    GONE = "gone"  # the container's init ended
    IO = "io"  # reading or writing in the container failed (read-only, full, permissions)
    INTERNAL = "internal"


@dataclass(frozen=True)
class CopyResult:
    ok: bool
    failure: str = ""  # a Failure value when not ok
    error: str = ""
    size: int = 0  # bytes of the tar stream, read or written
    entries: int = 0  # tar members extracted or written

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> CopyResult:
        raw = json.loads(data)
        return cls(bool(raw["ok"]), str(raw["failure"]), str(raw["error"]), int(raw["size"]),
                   int(raw["entries"]))
