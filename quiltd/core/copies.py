"""CopyIn and CopyOut: tar streams into and out of containers, running or stopped.

Core code on the event loop. The copy itself runs in a process the fork
server forks (see copyhelper); the daemon hands it the caller's descriptor
and waits for its one-line answer on a pipe, so a long copy never blocks
the loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from quiltd.access import Credentials
from quiltd.core import fdcheck
from quiltd.core.manager import Manager
from quiltd.core.mechanisms import CopyForks
from quiltd.core.turns import FairTurns
from quiltd.errors import (
    CopyFailed,
    Internal,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NoSuchPath,
    QuiltError,
    Timeout,
)
from quiltd.model import Container, State
from quiltd.runtime.copyspec import CopyResult, CopySpec, Direction, Failure

log = logging.getLogger("quiltd")

DEFAULT_MAX_BYTES = 1 << 30
MAX_BYTES_LIMIT = 1 << 40
IDLE_TIMEOUT_SEC = 30
# Each copy is a process of its own: at most this many run at once, the
# rest wait their caller's turn (see turns), and past MAX_WAITING_COPIES a
# copy is Busy rather than one more descriptor held in a queue.
COPY_TURNS = 32
MAX_WAITING_COPIES = 1024
MAX_PATH = 4096
COPY_KEYS = frozenset({"max_bytes"})
STOPPED = (State.CREATED, State.EXITED, State.FAILED)


def parse_copy_options(opts: Mapping[str, object], default_max_bytes: int) -> int:
    """max_bytes, the one option of CopyInEx and CopyOutEx."""
    unknown = sorted(set(opts) - COPY_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown copy option(s): {', '.join(unknown)}")
    if "max_bytes" not in opts:
        return default_max_bytes
    value = opts["max_bytes"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BYTES_LIMIT:
        raise InvalidArgument(f"option max_bytes must be an integer from 1 to {MAX_BYTES_LIMIT}, "
                              f"got {value!r}")
    return value


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"the path must be absolute, inside the container, got {path!r}")
    return path


class Copies:
    def __init__(self, manager: Manager, forkserver: CopyForks) -> None:
        self._manager = manager
        self._forkserver = forkserver
        self._turns = FairTurns(COPY_TURNS, MAX_WAITING_COPIES)

    async def copy_in(self, ref: str, path: str, fd: int, opts: Mapping[str, object], *,
                      caller: Credentials) -> CopyResult:
        """Extracts the tar stream read from fd at path (an existing directory); takes fd over."""
        return await self._checked_copy(ref, Direction.IN, path, fd, opts, DEFAULT_MAX_BYTES, caller)

    async def copy_out(self, ref: str, path: str, fd: int, opts: Mapping[str, object], *,
                       caller: Credentials) -> CopyResult:
        """Writes path as a tar stream to fd; takes fd over. No cap unless max_bytes is given."""
        return await self._checked_copy(ref, Direction.OUT, path, fd, opts, 0, caller)

    async def _checked_copy(self, ref: str, direction: Direction, path: str, fd: int,
                            opts: Mapping[str, object], default_max_bytes: int,
                            caller: Credentials) -> CopyResult:
        try:
            c = self._manager.get(ref)
            max_bytes = parse_copy_options(opts, default_max_bytes)
            check_path(path)
            fdcheck.check(fd, writable=direction == Direction.OUT, what="the tar stream")
            self._turns.check_room("copies")
            async with self._turns.turn(caller.uid):
                c = self._manager.get(c.id)  # it may have gone while the copy waited
                return await self._copy(c, direction, path, fd, max_bytes)
        finally:
            os.close(fd)

    async def _copy(self, c: Container, direction: Direction, path: str, fd: int,
                    max_bytes: int) -> CopyResult:
        if c.state in STOPPED:
            async with self._manager.container_lock(c.id):
                c = self._manager.get(c.id)
                if c.state in STOPPED:
                    return await self._fork(c, self._stopped_spec(c, direction, path, max_bytes), fd, "")
        if c.state != State.RUNNING:
            raise InvalidState(f"container {c.name} is {c.state.value}; "
                               "copy when it is running or stopped")
        spec = self._spec(c, direction, path, max_bytes, c.pid, c.pid_starttime)
        return await self._fork(c, spec, fd, c.unit)

    def _spec(self, c: Container, direction: Direction, path: str, max_bytes: int, pid: int,
              starttime: int) -> CopySpec:
        return CopySpec(direction=direction, name=c.name, path=path, init_pid=pid, init_starttime=starttime,
                        lowerdir="", upperdir="", overlay_workdir="", rootfs="", binds=(), volume_binds=(),
                        tmpfs=(), userns_base=0,
                        max_bytes=max_bytes, idle_timeout_sec=IDLE_TIMEOUT_SEC)

    def _stopped_spec(self, c: Container, direction: Direction, path: str, max_bytes: int) -> CopySpec:
        layers = self._manager.layers(c)
        return CopySpec(direction=direction, name=c.name, path=path, init_pid=0, init_starttime=0,
                        lowerdir=layers.lowerdir, upperdir=layers.upperdir,
                        overlay_workdir=layers.overlay_workdir, rootfs=layers.rootfs, binds=layers.binds,
                        volume_binds=layers.volume_binds, tmpfs=tuple(target for target, _ in layers.tmpfs),
                        userns_base=layers.userns_base, max_bytes=max_bytes,
                        idle_timeout_sec=IDLE_TIMEOUT_SEC, bind_policy=layers.bind_policy)

    async def _fork(self, c: Container, spec: CopySpec, fd: int, unit: str) -> CopyResult:
        """Runs the copy in a child of the fork server (in the container's scope if unit) and waits."""
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        try:
            forked = await self._forkserver.copy(spec, [go_r, fd, result_w])
        except BaseException:
            os.close(go_w)
            os.close(result_r)
            raise
        finally:
            os.close(go_r)
            os.close(result_w)
        os.close(forked.pidfd)
        answer = await self._manager.go_in_scope(c, unit, forked.pid, go_w, result_r)
        if not answer:
            # Only a SIGKILL ends the copy before it answers: the scope was killed.
            raise InvalidState(f"container {c.name} was stopped during the copy")
        result = CopyResult.from_json(answer)
        if not result.ok:
            raise _error(c, spec, result)
        return result


def _error(c: Container, spec: CopySpec, result: CopyResult) -> QuiltError:
    where = f"copy {'into' if spec.direction == Direction.IN else 'out of'} container {c.name}"
    failure = Failure(result.failure) if result.failure in {f.value for f in Failure} else Failure.INTERNAL
    message = f"{where}: {result.error}"
    if failure == Failure.INTERNAL:
        log.error("%s failed: %s", where, result.error)
        return Internal(message)
    return {
        Failure.INVALID: InvalidArgument, Failure.NO_PATH: NoSuchPath, Failure.LIMIT: LimitExceeded,
        Failure.TIMEOUT: Timeout, Failure.GONE: InvalidState, Failure.IO: CopyFailed,
    }[failure](message)
