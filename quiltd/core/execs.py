"""Commands run in a running container: Exec (answered with the output) and background execs.

Core code, on the event loop: the daemon never forks. It asks the
container's init over the exec channel (see execproto and initloop), and
init forks the command: it starts inside the container, in its scope, with
nothing to join and no helper process on the host. A foreground exec's
output comes back on pipes read from the event loop and its end on the
channel; a background exec's output goes to journald, and its end is
recorded from the channel, or from the status file init leaves in the run
dir when the daemon was down at the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from quiltd.access import Credentials
from quiltd.core import fdcheck, options
from quiltd.core.manager import Manager
from quiltd.core.requests import ExecOptions
from quiltd.errors import (
    Internal,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NoSuchExec,
    Timeout,
)
from quiltd.model import Container, Exec, ExecState, State
from quiltd.paths import Paths
from quiltd.runtime import execproto, wire
from quiltd.runtime.execproto import ExecRequest, ExecStatus
from quiltd.runtime.spawner import wait_readable
from quiltd.runtime.wire import Failure, Frame, Kind
from quiltd.store.database import Store

log = logging.getLogger("quiltd")

# The output quiltd may hold for foreground Execs running at once: each
# reserves 2 x max_output (both streams) while it runs, per caller's uid and
# in all. With the default max_output that is 64 execs at once per caller;
# at the largest, 8. The output is copied a few times on its way into the
# reply, and quiltd.service's MemoryHigh and MemoryMax are sized for
# CAPTURE_BUDGET. ExecWithFds and ExecStart hold no output: not counted.
CAPTURE_BUDGET_PER_UID = 128 << 20
CAPTURE_BUDGET = 192 << 20
MAX_SPEC = 128 << 10  # command and environment; one message on the exec channel
CONNECT_TRIES = 200
CONNECT_RETRY_SEC = 0.005
# Init answers a request at once unless something holds it: it was sent
# SIGSTOP, or its cgroup is frozen. An Exec must not wait on that for ever.
START_ANSWER_SEC = 30
KILLED_EXIT = 128 + signal.SIGKILL


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_bytes: int  # how much the command wrote, kept or not
    stderr_bytes: int
    timed_out: bool

    @property
    def stdout_truncated(self) -> bool:
        return self.stdout_bytes > len(self.stdout)

    @property
    def stderr_truncated(self) -> bool:
        return self.stderr_bytes > len(self.stderr)


class ExecListener(Protocol):
    def exec_exited(self, e: Exec) -> None: ...


def now_usec() -> int:
    return time.time_ns() // 1000


def merged_env(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """The container's environment with extra's entries replacing those of the same name."""
    env = {item.split("=", 1)[0]: item for item in base}
    env.update({item.split("=", 1)[0]: item for item in extra})
    return tuple(env.values())


def exec_env(c: Container, o: ExecOptions) -> tuple[str, ...]:
    """An exec's environment: the container's, with the exec's env option over it.

    HOME follows the user, as with docker exec: the container's HOME is
    kept for an exec that runs as the container's user, and dropped for one
    that runs as another, which init then gives the home its entry in the
    container's /etc/passwd names. HOME in the env option always wins.
    """
    env = merged_env(c.spec.env, o.env)
    if o.user and o.user != c.spec.user and not any(item.startswith("HOME=") for item in o.env):
        env = tuple(item for item in env if not item.startswith("HOME="))
    return env


class Execs:
    def __init__(self, manager: Manager, paths: Paths, store: Store) -> None:
        self._manager = manager
        self._paths = paths
        self._store = store
        self._listeners: list[ExecListener] = []
        self._exit_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._captured: dict[int, int] = {}  # uid -> bytes its running foreground execs may hold

    def add_listener(self, listener: ExecListener) -> None:
        self._listeners.append(listener)

    # Foreground

    async def run(self, ref: str, command: list[str], o: ExecOptions, *,
                  caller: Credentials) -> ExecResult:
        """Runs command in the container and returns its exit code and output."""
        # Reserved before the first await, so execs asked for together cannot pass the caps together.
        need = 2 * o.max_output
        mine, total = self._captured.get(caller.uid, 0), sum(self._captured.values())
        if mine + need > CAPTURE_BUDGET_PER_UID or total + need > CAPTURE_BUDGET:
            raise LimitExceeded(
                f"the output of running Execs is capped at {CAPTURE_BUDGET_PER_UID} bytes per user and "
                f"{CAPTURE_BUDGET} in all, each counting 2 x max_output ({need} here); {caller}'s hold "
                f"{mine} and all {total}. Wait for one to end, lower max_output, or use ExecWithFds or "
                "ExecStart, which hold no output")
        self._captured[caller.uid] = mine + need
        try:
            return await self._run_captured(ref, command, o)
        finally:
            self._captured[caller.uid] -= need
            if not self._captured[caller.uid]:
                del self._captured[caller.uid]

    async def _run_captured(self, ref: str, command: list[str], o: ExecOptions) -> ExecResult:
        c = self._manager.get(ref)
        argv = options.check_command(command)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
        try:
            channel, _ = await self._start(c, argv, o, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        out, err = _Capture(out_r, o.max_output), _Capture(err_r, o.max_output)
        feeder = _Feeder(in_w, o.stdin)
        try:
            status = await _exit_status(channel)
        finally:
            feeder.close()
            # The command has ended, so what it wrote is in the pipes now.
            out.finish()
            err.finish()
        return ExecResult(status.exit_code, bytes(out.data), bytes(err.data), out.total, err.total,
                          status.timed_out)

    async def run_with_fds(self, ref: str, command: list[str], o: ExecOptions,
                           stdio: tuple[int, int, int]) -> int:
        """Runs command on the caller's stdin, stdout and stderr; returns its exit code. Takes fds over."""
        try:
            c = self._manager.get(ref)
            argv = options.check_command(command)
            for fd, what, writable in zip(stdio, ("stdin", "stdout", "stderr"), (False, True, True),
                                          strict=True):
                fdcheck.check(fd, writable, what)
            channel, _ = await self._start(c, argv, o, list(stdio))
        finally:
            # Init's child holds its own copies now; the same descriptor may come twice.
            for fd in set(stdio):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return (await _exit_status(channel)).exit_code

    # Background

    async def start(self, ref: str, command: list[str], o: ExecOptions) -> Exec:
        """Starts command in the container; returns once it runs, its output going to the journal."""
        c = self._manager.get(ref)
        argv = options.check_command(command)
        channel, _ = await self._start(c, argv, o, [])
        return self._record(c, argv, channel)

    async def start_on_pty(self, ref: str, command: list[str], o: ExecOptions) -> tuple[Exec, int]:
        """Starts command on a new pseudo-terminal of the container; the exec and the pty's master (yours).

        It is a background exec (ExecWait, ExecKill, ListExecs) whose
        output goes to the terminal: whoever holds the master reads it,
        writes its input, and sets its size.
        """
        c = self._manager.get(ref)
        argv = options.check_command(command)
        channel, master = await self._start(c, argv, o, [], pty=(o.rows, o.cols))
        assert master is not None
        try:
            return self._record(c, argv, channel), master
        except BaseException:
            os.close(master)
            raise

    def _record(self, c: Container, argv: tuple[str, ...], channel: _Channel) -> Exec:
        e = Exec(id=channel.exec_id, container_id=c.id, command=argv, created_usec=now_usec())
        with self._store.transaction():
            self._store.insert_exec(e)
        self._follow(e, channel)
        return e

    def get(self, exec_id: str) -> Exec:
        e = self._store.find_exec(exec_id) if isinstance(exec_id, str) else None
        if e is None:
            raise NoSuchExec(f"no exec {exec_id!r}")
        return e

    def list_execs(self, ref: str) -> list[Exec]:
        return self._store.list_execs(self._manager.get(ref).id)

    async def wait(self, exec_id: str, timeout_usec: int) -> Exec:
        """Waits until the exec has ended; timeout 0 waits as long as it takes."""
        e = self.get(exec_id)
        if e.state.is_final:
            return e
        waiter = asyncio.get_running_loop().create_future()
        self._exit_waiters.setdefault(exec_id, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_usec / 1e6 if timeout_usec else None)
        except asyncio.TimeoutError:
            raise Timeout(f"exec {exec_id} still running after {timeout_usec} µs") from None
        return self.get(exec_id)

    async def kill(self, exec_id: str, signum: int) -> None:
        if not 1 <= signum <= signal.SIGRTMAX:
            raise InvalidArgument(f"invalid signal number {signum}")
        e = self.get(exec_id)
        if e.state.is_final:
            raise InvalidState(f"exec {exec_id} has ended ({e.state.value})")
        channel = await self._connect(e.container_id, exec_id)
        if channel is None:
            return  # the container's init is gone, and the exec with it: its end is on the way
        with channel:
            channel.send(wire.encode(Kind.KILL, {"exec_id": exec_id, "signal": signum}))
            await channel.receive()  # ok, or unknown: it is ending right now

    def _follow(self, e: Exec, channel: _Channel) -> None:
        """Records the exec's end once init reports it on channel."""
        async def follow() -> None:
            with channel:
                status = await channel.exit_status()
            self._on_exit(e.id, status)

        task = asyncio.get_running_loop().create_task(follow())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _on_exit(self, exec_id: str, status: ExecStatus | None) -> None:
        e = self._store.find_exec(exec_id)
        if e is None or e.state.is_final:
            return  # its container was removed, and the exec with it
        if status is None:
            status = self._read_status(e.container_id, exec_id)
        ended = replace(e, state=ExecState.TIMED_OUT if status.timed_out else ExecState.EXITED,
                        exit_code=status.exit_code, finished_usec=now_usec())

        def commit() -> None:
            with self._store.transaction():
                self._store.update_exec(ended)
            with contextlib.suppress(FileNotFoundError):
                self._status_file(ended.container_id, exec_id).unlink()
            for waiter in self._exit_waiters.pop(exec_id, []):
                if not waiter.done():
                    waiter.set_result(None)
            for listener in self._listeners:
                listener.exec_exited(ended)

        # Nobody waits to be told this failed: a busy or full store is retried
        # until it commits, in order with the containers' own changes.
        self._manager.commits.run(f"the end of exec {exec_id}", commit)

    async def recover(self) -> int:
        """Follows again every background exec still running; records those that ended meanwhile."""
        adopted = 0
        for e in self._store.list_execs():
            if e.state.is_final:
                continue
            channel = await self._connect(e.container_id, e.id)
            if channel is not None:
                channel.send(wire.encode(Kind.WAIT, {"exec_id": e.id}))
                self._follow(e, channel)
                adopted += 1
            else:
                self._on_exit(e.id, None)
        return adopted

    # Common

    def _status_file(self, container_id: str, exec_id: str) -> Path:
        return self._paths.container_run_dir(container_id) / execproto.EXECS_DIR / exec_id

    def _read_status(self, container_id: str, exec_id: str) -> ExecStatus:
        try:
            return ExecStatus.from_json(self._status_file(container_id, exec_id).read_bytes())
        except (FileNotFoundError, ValueError, KeyError):
            # Init writes it whenever an exec ends; only its own end (the
            # command exited, or the scope was killed) takes unended execs
            # down without a word, and the kernel kills them with SIGKILL.
            return ExecStatus(KILLED_EXIT, False)

    async def _connect(self, container_id: str, exec_id: str) -> _Channel | None:
        """A connection to the container's init; None if it is not there (any more)."""
        path = str(self._paths.container_run_dir(container_id) / execproto.CONTROL_SOCKET)
        sock = execproto.control_socket()
        sock.setblocking(False)
        for _ in range(CONNECT_TRIES):
            try:
                sock.connect(path)
                return _Channel(exec_id, sock)
            except BlockingIOError:
                # Its backlog is full: init is busy forking other execs.
                await asyncio.sleep(CONNECT_RETRY_SEC)
            except (FileNotFoundError, ConnectionRefusedError):
                break
        sock.close()
        return None

    async def _start(self, c: Container, argv: tuple[str, ...], o: ExecOptions, stdio: list[int],
                     pty: tuple[int, int] | None = None) -> tuple[_Channel, int | None]:
        """The channel of a started exec, and with pty (rows, cols) the master of its terminal."""
        if c.state != State.RUNNING:
            raise InvalidState(f"container {c.name} is {c.state.value}, not running")
        exec_id = secrets.token_hex(8)
        request = ExecRequest(
            exec_id=exec_id, command=argv, env=exec_env(c, o), workdir=o.workdir or c.spec.workdir,
            user=o.user or c.spec.user, timeout_sec=o.timeout_sec, background=not stdio,
            pty=pty is not None, rows=pty[0] if pty else 0, cols=pty[1] if pty else 0,
        ).frame().encode()
        if len(request) > MAX_SPEC:
            raise InvalidArgument(f"the command and environment are over {MAX_SPEC} bytes")
        if _is_stopped(c.pid):
            raise InvalidState(f"container {c.name} is stopped (its init got SIGSTOP): "
                               "send it SIGCONT with KillContainer to exec again")
        channel = await self._connect(c.id, exec_id)
        if channel is None:
            raise InvalidState(f"container {c.name} is not running")
        fds: list[int] = []
        try:
            channel.send(request, stdio)
            try:
                answer = await asyncio.wait_for(channel.receive(fds), START_ANSWER_SEC)
            except asyncio.TimeoutError:
                raise Timeout(f"container {c.name}'s init did not take the exec in {START_ANSWER_SEC} s: "
                              "is the container stopped or frozen?") from None
            if answer is None:
                raise InvalidState(f"container {c.name} is not running")
            if answer.kind == Kind.FAILED:
                raise wire.error(Failure.from_frame(answer), f"exec in container {c.name}")
            if answer.kind != Kind.STARTED:
                raise Internal(f"exec in container {c.name}: unexpected answer {answer.kind.name}")
            if len(fds) != (1 if pty else 0):
                raise Internal(f"exec in container {c.name}: {len(fds)} descriptors with its start")
        except BaseException:
            channel.close()
            for fd in fds:
                os.close(fd)
            raise
        return channel, fds[0] if fds else None


def _is_stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T) or traced (t)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # gone: the connection says so
    return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")


async def _exit_status(channel: _Channel) -> ExecStatus:
    with channel:
        status = await channel.exit_status()
    # No word before init's end: the container ended, and the kernel killed the command with it.
    return status or ExecStatus(KILLED_EXIT, False)


class _Channel:
    """One connection of the exec channel (see execproto), for one exec; the daemon's end."""

    def __init__(self, exec_id: str, sock: socket.socket) -> None:
        self.exec_id = exec_id
        self._sock = sock

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, frame: bytes, fds: list[int] | None = None) -> None:
        """One encoded frame (see wire), encoded once by the caller, which also checked its size."""
        # A fresh connection's buffer takes one small message without blocking.
        socket.send_fds(self._sock, [frame], fds or [])

    async def receive(self, fds: list[int] | None = None) -> Frame | None:
        """The next frame, or None once init closed the connection or is gone.

        A descriptor that comes with it is added to fds, which the caller then
        owns; without fds, any is closed.
        """
        while True:
            await wait_readable(self._sock.fileno())
            try:
                frame, got = wire.receive(self._sock, 1, socket.MSG_CMSG_CLOEXEC, wire.MAX_ANSWER)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return None
            except wire.WireError as e:
                raise Internal(f"exec {self.exec_id}: bad answer from the container's init: {e}") from None
            if fds is None:
                for fd in got:
                    os.close(fd)
            else:
                fds.extend(got)
            return frame

    async def exit_status(self) -> ExecStatus | None:
        """How the exec ended, once init says; None if init closed the connection without saying."""
        answer = await self.receive()
        if answer is None or answer.kind != Kind.EXITED:
            return None
        return ExecStatus.from_message(answer.body)

    def close(self) -> None:
        self._sock.close()


class _Capture:
    """Reads a pipe from the event loop, keeping the first `limit` bytes and counting the rest."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.data = bytearray()
        self.total = 0
        self._open = True
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> bool:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self._close()
            return False
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data.extend(chunk[:room])
        return True

    def finish(self) -> None:
        """Takes what is in the pipe now and stops: a background child may hold it open for ever."""
        while self._open and self._read():
            pass
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)


class _Feeder:
    """Writes stdin to the command from the event loop, then closes it."""

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.view = memoryview(data)
        self._open = True
        if not data:
            self.close()
            return
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_writer(fd, self._write)

    def _write(self) -> None:
        try:
            n = os.write(self.fd, self.view[:65536])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin, or is gone
            self.close()
            return
        self.view = self.view[n:]
        if not self.view:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_writer(self.fd)
            os.close(self.fd)
