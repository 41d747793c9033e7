"""What the fork server needs to know to run one command in a running container.

It crosses a process boundary as JSON, so it holds plain values only.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass


class OutputMode(str, enum.Enum):
    CAPTURE = "capture"  # stdin, stdout and stderr are pipes the daemon passed in
    JOURNAL = "journal"  # stdin is /dev/null; the supervisor relays output lines to journald


@dataclass(frozen=True)
class ExecSpec:
    exec_id: str
    container_id: str
    name: str  # the container's
    init_pid: int  # the container's init, whose namespaces and root the command joins
    init_starttime: int  # with init_pid, names that very process (pids are reused)
    command: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str  # "" for root, else a uid, a name, or either with ":group"
    timeout_sec: int  # 0: no limit
    mode: OutputMode
    status_path: str  # where the supervisor leaves the exit status, outside the container
    pid_path: str  # where it leaves the command's host pid and start time, for signals
    journal_socket: str
    nested_userns: bool = False  # the container's: its command and execs get the same seccomp filter

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExecSpec:
        raw = json.loads(data)
        raw["command"] = tuple(raw["command"])
        raw["env"] = tuple(raw["env"])
        raw["mode"] = OutputMode(raw["mode"])
        return cls(**raw)


@dataclass(frozen=True)
class ExecStatus:
    """How an exec ended, as its supervisor writes it to status_path."""

    exit_code: int  # the command's code, 128+N for signal N, 124 after the timeout
    timed_out: bool

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExecStatus:
        raw = json.loads(data)
        return cls(int(raw["exit_code"]), bool(raw["timed_out"]))


# Failures the supervisor reports on the error pipe start with one of these
# words, so the daemon can tell the caller's mistake from a broken container.
FAILURE_USER = "user"  # the user option names no user of the container
FAILURE_EXEC = "exec"  # the program could not be executed
FAILURE_GONE = "gone"  # the container's init is not there any more
