"""CopyIn and CopyOut: tar streams into and out of containers, running or stopped.

Core code on the event loop. The copy itself runs in a process the fork
server forks (see copyhelper); the daemon hands it the caller's descriptor
and waits for its answer (one frame of the wire protocol) on a pipe, so a long copy never blocks
the loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from quiltd.access import Credentials
from quiltd.core import fdcheck
from quiltd.core.manager import Manager
from quiltd.core.mechanisms import CopyForks
from quiltd.core.requests import CopyOptions
from quiltd.core.turns import FairTurns
from quiltd.errors import Internal, InvalidArgument, InvalidState
from quiltd.model import Container, State
from quiltd.runtime import wire
from quiltd.runtime.copyspec import CopyResult, CopySpec, Direction
from quiltd.runtime.wire import Code, Failure, Kind

log = logging.getLogger("quiltd")

DEFAULT_MAX_BYTES = 1 << 30
IDLE_TIMEOUT_SEC = 30
# Each copy is a process of its own: at most this many run at once, the
# rest wait their caller's turn (see turns), and past MAX_WAITING_COPIES a
# copy is Busy rather than one more descriptor held in a queue.
COPY_TURNS = 32
MAX_WAITING_COPIES = 1024
MAX_PATH = 4096
STOPPED = (State.CREATED, State.EXITED, State.FAILED)


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"the path must be absolute, inside the container, got {path!r}")
    return path


class Copies:
    def __init__(self, manager: Manager, forkserver: CopyForks) -> None:
        self._manager = manager
        self._forkserver = forkserver
        self._turns = FairTurns(COPY_TURNS, MAX_WAITING_COPIES)

    async def copy_in(self, ref: str, path: str, fd: int, request: CopyOptions, *,
                      caller: Credentials) -> CopyResult:
        """Extracts the tar stream read from fd at path (an existing directory); takes fd over."""
        max_bytes = DEFAULT_MAX_BYTES if request.max_bytes is None else request.max_bytes
        return await self._checked_copy(ref, Direction.IN, path, fd, max_bytes, caller)

    async def copy_out(self, ref: str, path: str, fd: int, request: CopyOptions, *,
                       caller: Credentials) -> CopyResult:
        """Writes path as a tar stream to fd; takes fd over. No cap unless max_bytes is given."""
        return await self._checked_copy(ref, Direction.OUT, path, fd, request.max_bytes or 0, caller)

    async def export(self, ref: str, fd: int, *, caller: Credentials) -> CopyResult:
        """Writes the container's root filesystem, as docker export, as a tar stream to fd; takes fd over.

        The root is its layers only, read through an overlay of its own in
        the copy's mount namespace: no /proc, /sys or /dev contents, no host
        binds, volumes or tmpfs (as docker export leaves out volumes).
        """
        try:
            c = self._manager.get(ref)
            fdcheck.check(fd, writable=True, what="the tar stream")
            self._turns.check_room("copies")
            if c.spec.disk_max:
                # Its writable layer is a tmpfs only its own mount namespace sees, gone when it stops.
                raise InvalidState(f"container {c.name} has disk_max: its writable layer is seen only "
                                   "inside it while it runs and is gone once it stops; export its image "
                                   "with ExportImage")
            async with self._turns.turn(caller.uid):
                c = self._manager.get(c.id)
                if c.state in STOPPED:
                    async with self._manager.container_lock(c.id):
                        c = self._manager.get(c.id)
                        if c.state in STOPPED:
                            return await self._fork(c, self._export_spec(c, read_only=False), fd, "")
                if c.state not in (State.RUNNING, State.PAUSED):
                    raise InvalidState(f"container {c.name} is {c.state.value}; export it when it is "
                                       "running, paused or stopped")
                return await self._fork(c, self._export_spec(c, read_only=True), fd, "")
        finally:
            os.close(fd)

    def _export_spec(self, c: Container, read_only: bool) -> CopySpec:
        """The container's layers alone; read_only: its writable layer stacked as the top lower
        (a second writable overlay on a live upper dir is not allowed)."""
        spec = replace(self._stopped_spec(c, Direction.OUT, "/", 0), binds=(), volume_binds=(), tmpfs=())
        return replace(spec, overlay_workdir="") if read_only else spec

    async def _checked_copy(self, ref: str, direction: Direction, path: str, fd: int,
                            max_bytes: int, caller: Credentials) -> CopyResult:
        try:
            c = self._manager.get(ref)
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
        where = f"copy {'into' if spec.direction == Direction.IN else 'out of'} container {c.name}"
        if answer.kind == Kind.FAILED:
            failure = Failure.from_frame(answer)
            if failure.code == Code.INTERNAL:
                log.error("%s failed: %s", where, failure.message)
            raise wire.error(failure, where)
        if answer.kind != Kind.COPIED:
            raise Internal(f"{where}: the copy answered {answer.kind.name}")
        return CopyResult.from_body(answer.body)
