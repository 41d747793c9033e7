"""The daemon's side of the fork server: launch a container, watch it exit.

Exits are seen through pidfds registered with the event loop; nothing here
blocks or polls on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from quiltd.errors import Internal
from quiltd.linux import process_starttime
from quiltd.runtime import execproto, wire
from quiltd.runtime.copyspec import CopySpec
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.wire import Code, Failure, Frame, Kind


@dataclass(frozen=True)
class Launched:
    """A container's init, forked and waiting for its LaunchSpec."""

    pid: int
    starttime: int
    pidfd: int
    spec_fd: int
    error_fd: int

    def close(self) -> None:
        for fd in (self.pidfd, self.spec_fd, self.error_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class Forked:
    """A process the fork server made: pid, start time and a pidfd that is ours to close."""

    pid: int
    starttime: int
    pidfd: int


class ForkServer:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = asyncio.Lock()
        # The next launch's init, asked for as soon as the last one was
        # handed out: a start then does not wait for the round trip.
        self._next: asyncio.Task[Launched] | None = None

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "quiltd.runtime.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self._sock = ours

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the fork server is not started")
        return self._process.pid

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            self._process.wait(timeout=5)
            self._process = None

    async def launch(self) -> Launched:
        ahead, self._next = self._next, None
        launched: Launched | None = None
        if ahead is not None:
            with contextlib.suppress(Exception):  # a fresh request says what is wrong
                launched = await ahead
        if launched is None:
            launched = await self._launch_now()
        # Starts overlap: another launch may have asked for the next one
        # meanwhile, and that init must not be dropped (with its descriptors).
        if self._next is None:
            self._next = asyncio.get_running_loop().create_task(self._launch_now())
            self._next.add_done_callback(_quiet)
        return launched

    async def _launch_now(self) -> Launched:
        body, fds = await self._request(Frame(Kind.LAUNCH), [], Kind.LAUNCHED, 3,
                                        "could not create the container's namespaces")
        pidfd, spec_fd, error_fd = fds
        return Launched(int(body["pid"]), int(body["starttime"]), pidfd, spec_fd, error_fd)

    async def copy(self, spec: CopySpec, fds: list[int]) -> Forked:
        """Forks a copy into or out of a container, handing it fds (go, the caller's, result)."""
        body, received = await self._request(Frame(Kind.COPY, spec.body()), fds, Kind.FORKED, 1,
                                             "could not fork the copy")
        return Forked(int(body["pid"]), int(body["starttime"]), received[0])

    async def _request(self, request: Frame, fds: list[int], answer: Kind, answer_fds: int,
                       failed: str) -> tuple[Mapping[str, Any], list[int]]:
        """The body and descriptors of the answer of kind answer; Internal, saying failed, if another."""
        # One request at a time: replies carry no id, they come back in order.
        async with self._lock:
            if self._sock is None or (self._process is not None and self._process.poll() is not None):
                self.stop()
                self.start()
            assert self._sock is not None
            wire.send(self._sock, request.kind, request.body, fds)
            await wait_readable(self._sock.fileno())
            try:
                reply, received = wire.receive(self._sock, answer_fds, limit=wire.MAX_ANSWER)
            except wire.WireError as e:
                raise Internal(f"{failed}: a bad answer from the fork server: {e}") from None
            if reply is None:
                self._sock.close()
                self._sock = None
                raise Internal("the fork server exited")
        if reply.kind != answer or len(received) != answer_fds:
            for fd in received:
                os.close(fd)
            if reply.kind == Kind.FAILED:
                raise Internal(f"{failed}: {Failure.from_frame(reply)}")
            raise Internal(f"{failed}: the fork server answered {reply.kind.name} "
                           f"with {len(received)} descriptors")
        return reply.body, received


def _quiet(task: asyncio.Task[Launched]) -> None:
    # A failed look-ahead is retried by the launch that needs it.
    if not task.cancelled():
        task.exception()


async def wait_readable(fd: int) -> None:
    """Returns once fd is readable (or at end of file), without holding the event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_ready() -> None:
        loop.remove_reader(fd)
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def adopt(pid: int, starttime: int, control_socket: str) -> Launched | None:
    """A warm pool's init that outlived the daemon, ready for send_go and confirm; None if it is gone.

    Its spec and error pipes went with the daemon; a connection to its
    control socket stands in for both (containerinit._claim_over): GO goes
    out on it, and the answer comes back on it.
    """
    pidfd = open_pidfd(pid, starttime)
    if pidfd is None:
        return None
    sock = execproto.control_socket()
    try:
        # Its backlog is long and it waits in accept: no need to wait here.
        sock.setblocking(False)
        sock.connect(control_socket)
    except OSError:
        sock.close()
        os.close(pidfd)
        return None
    connection = sock.detach()
    return Launched(pid, starttime, pidfd, os.dup(connection), connection)


def send_spec(launched: Launched, spec: LaunchSpec) -> None:
    """Gives the init its LaunchSpec: it waits for IN to build the container's root, then for GO."""
    # One frame far below a pipe's capacity: this write does not block.
    wire.write_frame(launched.spec_fd, Kind.SPEC, spec.body())


def send_in(launched: Launched) -> None:
    """Tells an init that it is in its scope with its veth: it builds the root (see launchspec)."""
    with contextlib.suppress(BrokenPipeError):  # init is gone: the pool sees its pidfd
        wire.write_frame(launched.spec_fd, Kind.IN)


def send_go(launched: Launched, claim: Mapping[str, object] | None = None) -> None:
    """GO, with a warm pool's init's claim as its body; closes the spec pipe."""
    with contextlib.suppress(BrokenPipeError):  # init is gone: its error pipe says why
        # One write: a claim is far below a pipe's capacity, and init reads it at once.
        wire.write_frame(launched.spec_fd, Kind.GO, claim)
    os.close(launched.spec_fd)


async def confirm(launched: Launched) -> Failure | None:
    """None once the init executed the command after GO, else why the start failed."""
    answer = await read_answer(launched.error_fd)
    if answer is None:
        return None
    if answer.kind != Kind.FAILED:
        return Failure(Code.INTERNAL, f"the container's init answered {answer.kind.name}")
    return Failure.from_frame(answer)


def let_go(fd: int) -> None:
    """Lets a fork server's child that waits for GO on fd (a copy) go; closes fd."""
    try:
        wire.write_frame(fd, Kind.GO)
    finally:
        os.close(fd)


async def read_answer(fd: int) -> Frame | None:
    """The one frame a child writes on its answer pipe, or None if it closed it without one; closes fd.

    A frame that is not one is an answer too: a FAILED one that says so.
    """
    data = await read_to_end(fd)
    if not data:
        return None
    try:
        return wire.decode(data)
    except wire.WireError as e:
        return Frame(Kind.FAILED, Failure(Code.INTERNAL, f"a bad answer: {e}").body())


async def read_to_end(fd: int) -> bytes:
    """Everything written to a pipe until its last writer closes it; closes fd."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    data = bytearray()
    done = loop.create_future()

    def ready() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if chunk:
            data.extend(chunk)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(data)


def watch_exit(pidfd: int, on_exit: Callable[[], None]) -> None:
    """Calls on_exit from the event loop once the process behind pidfd has ended."""
    loop = asyncio.get_running_loop()

    def ready() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        on_exit()

    loop.add_reader(pidfd, ready)


def open_pidfd(pid: int, starttime: int) -> int | None:
    """A pidfd for pid if it is still the process that started at starttime."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked after opening: from here on the pidfd pins this very process.
    if process_starttime(pid) != starttime:
        os.close(pidfd)
        return None
    return pidfd
