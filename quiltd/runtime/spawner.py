"""The daemon's side of the fork server: launch a container, watch it exit.

Exits are seen through pidfds registered with the event loop; nothing here
blocks or polls on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quiltd.errors import Internal
from quiltd.linux import process_starttime
from quiltd.runtime.copyspec import CopySpec
from quiltd.runtime.launchspec import GO, IN, LaunchSpec


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
        reply, fds = await self._request(b"launch", [], 3)
        if not reply["ok"]:
            raise Internal(f"could not create the container's namespaces: {reply['error']}")
        pidfd, spec_fd, error_fd = fds
        return Launched(reply["pid"], reply["starttime"], pidfd, spec_fd, error_fd)

    async def copy(self, spec: CopySpec, fds: list[int]) -> Forked:
        """Forks a copy into or out of a container, handing it fds (go, the caller's, result)."""
        reply, received = await self._request(spec.to_request(), fds, 1)
        if not reply["ok"]:
            raise Internal(f"could not fork the copy: {reply['error']}")
        return Forked(reply["pid"], reply["starttime"], received[0])

    async def _request(
        self, request: bytes, fds: list[int], reply_fds: int
    ) -> tuple[dict[str, Any], list[int]]:
        # One request at a time: replies carry no id, they come back in order.
        async with self._lock:
            if self._sock is None or (self._process is not None and self._process.poll() is not None):
                self.stop()
                self.start()
            assert self._sock is not None
            socket.send_fds(self._sock, [request], fds)
            await wait_readable(self._sock.fileno())
            data, received, _, _ = socket.recv_fds(self._sock, 65536, reply_fds)
            if not data:
                for fd in received:
                    os.close(fd)
                self._sock.close()
                self._sock = None
                raise Internal("the fork server exited")
        reply: dict[str, Any] = json.loads(data)
        return reply, received


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


def send_spec(launched: Launched, spec: LaunchSpec) -> None:
    """Gives the init its LaunchSpec: it builds the container's root, then waits for go_and_confirm."""
    # One line (JSON escapes newlines), far below a pipe's capacity: this
    # write does not block.
    os.write(launched.spec_fd, spec.to_json() + b"\n")


async def go_and_confirm(launched: Launched) -> str:
    """Lets the init run the command, once it is in its scope.

    Returns "" once the command was executed, else the reason the start
    failed (building the root or executing the command).
    """
    send_go(launched)
    return await confirm(launched)


def send_in(launched: Launched) -> None:
    """Tells a warm pool's init that it is in its scope with its veth (see launchspec.IN)."""
    with contextlib.suppress(BrokenPipeError):  # init is gone: the pool sees its pidfd
        os.write(launched.spec_fd, IN)


def send_go(launched: Launched, claim: bytes = b"") -> None:
    """GO, and a warm pool's init's claim with it; closes the spec pipe."""
    with contextlib.suppress(BrokenPipeError):  # init is gone: its error pipe says why
        # One write: a claim is far below a pipe's capacity, and init reads it at once.
        os.write(launched.spec_fd, GO + claim)
    os.close(launched.spec_fd)


async def confirm(launched: Launched) -> str:
    """"" once the init executed the command after GO, else the reason the start failed."""
    return await read_to_end(launched.error_fd)


async def read_to_end(fd: int) -> str:
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
    return data.decode(errors="replace")


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
