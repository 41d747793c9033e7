"""The exec channel: how the daemon asks a container's init to run a command.

Init listens on a SOCK_SEQPACKET unix socket in the container's run dir,
bound before it switched roots, so no process inside the container can reach
it (the directory is root's alone, and init is not dumpable). One
connection carries one request, each message one frame of the wire
protocol (see wire):

    daemon -> init          init -> daemon
    EXEC (+3 fds or none)   STARTED (+ the pty's master with pty) | FAILED, then EXITED
    WAIT                    EXITED | UNKNOWN
    KILL                    OK | UNKNOWN

A foreground exec passes the command's stdin, stdout and stderr with the
request; a background one passes none, and init relays its output to the
journal. A pty exec passes none either: init opens a pseudo-terminal in the
container's own devpts, runs the command on it, and hands its master back
with "started". An exec is a child of init: it is in the container's namespaces,
root, cgroup and user namespace from its fork, with nothing to join. When a
background exec ends, init also writes its status file in the run dir, so
the end is known to a daemon that was down at the time.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from quiltd.runtime.wire import Frame, Kind

CONTROL_SOCKET = "control"  # in the container's run dir
EXECS_DIR = "execs"  # in the container's run dir: <exec id>/status of background execs
MAX_FDS = 3


@dataclass(frozen=True)
class ExecRequest:
    exec_id: str
    command: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str  # "" for root, else a uid, a name, or either with ":group"
    timeout_sec: int  # 0: no limit
    background: bool  # the status goes to a file; the output to the journal, or to the pty
    pty: bool = False  # on a pseudo-terminal whose master init answers with (background too)
    rows: int = 0  # the pty's first size; 0: the kernel's default
    cols: int = 0

    def frame(self) -> Frame:
        return Frame(Kind.EXEC, asdict(self))

    @classmethod
    def decode(cls, message: Mapping[str, Any]) -> ExecRequest:
        return cls(str(message["exec_id"]), tuple(map(str, message["command"])),
                   tuple(map(str, message["env"])), str(message["workdir"]), str(message["user"]),
                   int(message["timeout_sec"]), bool(message["background"]), bool(message.get("pty", False)),
                   int(message.get("rows", 0)), int(message.get("cols", 0)))


@dataclass(frozen=True)
class ExecStatus:
    """How an exec ended."""

    exit_code: int  # the command's code, 128+N for signal N, 124 after the timeout
    timed_out: bool

    def body(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> bytes:
        """For the status file of a background exec (recovery), not the channel."""
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> ExecStatus:
        return cls(int(message["exit_code"]), bool(message["timed_out"]))

    @classmethod
    def from_json(cls, data: bytes) -> ExecStatus:
        return cls.from_message(json.loads(data))


def control_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
