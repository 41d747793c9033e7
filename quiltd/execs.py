"""Commands run in a running container: Exec (answered with the output) and background execs.

Core code, on the event loop: the daemon never forks. The fork server forks
each exec's supervisor (see execsupervisor); the daemon moves it into the
container's scope, then lets it go. Output of a foreground exec comes back
on pipes read from the event loop; a background exec's goes to journald.
Exits are seen through pidfds, and the status is read from the file the
supervisor leaves in the run dir, so a background exec's end is known even
when it came while the daemon was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from quiltd import fdcheck, images, options
from quiltd.errors import ExecFailed, Internal, InvalidArgument, InvalidState, NoSuchExec, Timeout
from quiltd.execspec import FAILURE_EXEC, FAILURE_GONE, FAILURE_USER, ExecSpec, ExecStatus, OutputMode
from quiltd.manager import JOURNAL_SOCKET, Manager
from quiltd.model import Container, Exec, ExecState, State
from quiltd.paths import Paths
from quiltd.spawner import Forked, ForkServer, open_pidfd, watch_exit
from quiltd.store import Store

log = logging.getLogger("quiltd")

DEFAULT_MAX_OUTPUT = 1 << 20
# Both streams travel in one D-Bus reply; the system bus refuses messages
# over 32 MiB (dbus-daemon's default max_message_size).
MAX_OUTPUT_LIMIT = 8 << 20
MAX_STDIN = 8 << 20
MAX_SPEC = 128 << 10  # command and environment; the fork server's request must fit its socket
MAX_TIMEOUT = 1 << 31
KILLED_EXIT = 128 + signal.SIGKILL
SYNC_KEYS = frozenset({"env", "workdir", "user", "timeout_sec", "stdin", "max_output"})
BACKGROUND_KEYS = frozenset({"env", "workdir", "user", "timeout_sec"})


@dataclass(frozen=True)
class ExecOptions:
    env: tuple[str, ...] = ()  # NAME=value entries over the container's environment
    workdir: str = ""  # "" is the container's workdir
    user: str = ""  # "" is root
    timeout_sec: int = 0
    stdin: bytes = b""
    max_output: int = DEFAULT_MAX_OUTPUT


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


def parse_exec_options(opts: Mapping[str, object], background: bool,
                       hint: str = " (ExecStart output goes to the journal, stdin is empty)") -> ExecOptions:
    known = BACKGROUND_KEYS if background else SYNC_KEYS
    unknown = sorted(set(opts) - known)
    if unknown:
        where = hint if background else ""
        raise InvalidArgument(f"unknown exec option(s){where}: {', '.join(unknown)}")
    env = opts.get("env", [])
    if not isinstance(env, list) or not all(isinstance(v, str) for v in env):
        raise InvalidArgument("option env must be a list of strings (as)")
    for item in env:
        if not options.ENV_RE.match(item) or "\0" in item:
            raise InvalidArgument(f"invalid env entry {item!r}: use NAME=value")
    workdir = opts.get("workdir", "")
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")) or "\0" in workdir:
        raise InvalidArgument(f"option workdir must be an absolute path, got {workdir!r}")
    user = opts.get("user", "")
    if isinstance(user, int) and not isinstance(user, bool):
        if not 0 <= user < 1 << 32:
            raise InvalidArgument(f"option user: uid out of range: {user}")
        user = str(user)
    if not isinstance(user, str) or "\0" in user or "\n" in user or user.count(":") > 1:
        raise InvalidArgument(f"option user must be a name or uid, optionally with ':group', got {user!r}")
    timeout = _int(opts, "timeout_sec", 0, 0, MAX_TIMEOUT)
    max_output = _int(opts, "max_output", DEFAULT_MAX_OUTPUT, 0, MAX_OUTPUT_LIMIT)
    stdin = opts.get("stdin", b"")
    if isinstance(stdin, list):  # an 'ay' inside a variant may arrive as a list of ints
        stdin = bytes(stdin)
    if not isinstance(stdin, bytes):
        raise InvalidArgument("option stdin must be bytes (ay)")
    if len(stdin) > MAX_STDIN:
        raise InvalidArgument(f"option stdin is over {MAX_STDIN} bytes")
    return ExecOptions(tuple(env), workdir, user, timeout, stdin, max_output)


def _int(opts: Mapping[str, object], key: str, default: int, low: int, high: int) -> int:
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"option {key} must be an integer from {low} to {high}, got {value!r}")
    return value


def merged_env(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """The container's environment with extra's entries replacing those of the same name."""
    env = {item.split("=", 1)[0]: item for item in base}
    env.update({item.split("=", 1)[0]: item for item in extra})
    return tuple(env.values())


class Execs:
    def __init__(self, manager: Manager, paths: Paths, store: Store, forkserver: ForkServer) -> None:
        self._manager = manager
        self._paths = paths
        self._store = store
        self._forkserver = forkserver
        self._listeners: list[ExecListener] = []
        self._exit_waiters: dict[str, list[asyncio.Future[None]]] = {}

    def add_listener(self, listener: ExecListener) -> None:
        self._listeners.append(listener)

    # Foreground

    async def run(self, ref: str, command: list[str], opts: Mapping[str, object]) -> ExecResult:
        """Runs command in the container and returns its exit code and output."""
        c = self._manager.get(ref)
        argv = options.check_command(command)
        o = parse_exec_options(opts, background=False)
        exec_id = secrets.token_hex(8)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
        try:
            forked = await self._spawn(c, exec_id, argv, o, OutputMode.CAPTURE, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        try:
            return await self._collect(c, exec_id, forked, o, *ours)
        finally:
            images.remove_tree(self._run_dir(c.id, exec_id))

    async def run_with_fds(self, ref: str, command: list[str], opts: Mapping[str, object],
                           stdio: tuple[int, int, int]) -> int:
        """Runs command on the caller's stdin, stdout and stderr; returns its exit code. Takes fds over."""
        try:
            c = self._manager.get(ref)
            argv = options.check_command(command)
            o = parse_exec_options(opts, background=True, hint=" (ExecWithFds takes stdin as a descriptor, "
                                   "and its output goes to the caller's descriptors)")
            for fd, what, writable in zip(stdio, ("stdin", "stdout", "stderr"), (False, True, True),
                                          strict=True):
                fdcheck.check(fd, writable, what)
            exec_id = secrets.token_hex(8)
            forked = await self._spawn(c, exec_id, argv, o, OutputMode.CAPTURE, list(stdio))
        finally:
            # The supervisor holds its own copies now; the same descriptor may come twice.
            for fd in set(stdio):
                with contextlib.suppress(OSError):
                    os.close(fd)
        exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        watch_exit(forked.pidfd, on_exit)
        try:
            await exited
            return self._read_status(c.id, exec_id).exit_code
        finally:
            images.remove_tree(self._run_dir(c.id, exec_id))

    async def _collect(self, c: Container, exec_id: str, forked: Forked, o: ExecOptions,
                       stdin_w: int, stdout_r: int, stderr_r: int) -> ExecResult:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        watch_exit(forked.pidfd, on_exit)
        out, err = _Capture(stdout_r, o.max_output), _Capture(stderr_r, o.max_output)
        feeder = _Feeder(stdin_w, o.stdin)
        try:
            await exited
        finally:
            feeder.close()
            out.finish()
            err.finish()
        status = self._read_status(c.id, exec_id)
        return ExecResult(status.exit_code, bytes(out.data), bytes(err.data), out.total, err.total,
                          status.timed_out)

    # Background

    async def start(self, ref: str, command: list[str], opts: Mapping[str, object]) -> Exec:
        """Starts command in the container; returns once it runs, its output going to the journal."""
        c = self._manager.get(ref)
        argv = options.check_command(command)
        o = parse_exec_options(opts, background=True)
        exec_id = secrets.token_hex(8)
        forked = await self._spawn(c, exec_id, argv, o, OutputMode.JOURNAL, [])
        e = Exec(id=exec_id, container_id=c.id, command=argv, pid=forked.pid,
                 pid_starttime=forked.starttime, created_usec=now_usec())
        with self._store.transaction():
            self._store.insert_exec(e)
        watch_exit(forked.pidfd, lambda: self._on_exit(exec_id))
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
        pidfd = self._command_pidfd(e)
        if pidfd is None:
            return  # it is ending right now
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _command_pidfd(self, e: Exec) -> int | None:
        try:
            text = (self._run_dir(e.container_id, e.id) / "pid").read_text()
            pid, starttime = (int(v) for v in text.split())
        except (FileNotFoundError, ValueError):
            return None
        return open_pidfd(pid, starttime)

    def _on_exit(self, exec_id: str) -> None:
        e = self._store.find_exec(exec_id)
        if e is None or e.state.is_final:
            return  # its container was removed, and the exec with it
        status = self._read_status(e.container_id, exec_id)
        e = replace(e, state=ExecState.TIMED_OUT if status.timed_out else ExecState.EXITED,
                    exit_code=status.exit_code, pid=0, pid_starttime=0, finished_usec=now_usec())
        with self._store.transaction():
            self._store.update_exec(e)
        for waiter in self._exit_waiters.pop(exec_id, []):
            if not waiter.done():
                waiter.set_result(None)
        for listener in self._listeners:
            listener.exec_exited(e)

    async def recover(self) -> int:
        """Watches again every background exec still running; records those that ended meanwhile."""
        adopted = 0
        for e in self._store.list_execs():
            if e.state.is_final:
                continue
            pidfd = open_pidfd(e.pid, e.pid_starttime) if e.pid else None
            if pidfd is None:
                self._on_exit(e.id)
            else:
                watch_exit(pidfd, lambda exec_id=e.id: self._on_exit(exec_id))  # type: ignore[misc]
                adopted += 1
        return adopted

    # Common

    def _run_dir(self, container_id: str, exec_id: str) -> Path:
        return self._paths.container_run_dir(container_id) / "execs" / exec_id

    def _read_status(self, container_id: str, exec_id: str) -> ExecStatus:
        try:
            return ExecStatus.from_json((self._run_dir(container_id, exec_id) / "status").read_bytes())
        except (FileNotFoundError, ValueError, KeyError):
            # Only a SIGKILL ends a supervisor before it writes: the whole
            # scope was killed (Kill 9, Stop's escalation, Remove with force).
            return ExecStatus(KILLED_EXIT, False)

    async def _spawn(self, c: Container, exec_id: str, argv: tuple[str, ...], o: ExecOptions,
                     mode: OutputMode, stdio: list[int]) -> Forked:
        if c.state != State.RUNNING:
            raise InvalidState(f"container {c.name} is {c.state.value}, not running")
        run_dir = self._run_dir(c.id, exec_id)
        spec = ExecSpec(
            exec_id=exec_id, container_id=c.id, name=c.name, init_pid=c.pid, init_starttime=c.pid_starttime,
            command=argv, env=merged_env(c.spec.env, o.env), workdir=o.workdir or c.spec.workdir,
            user=o.user, timeout_sec=o.timeout_sec, mode=mode, status_path=str(run_dir / "status"),
            pid_path=str(run_dir / "pid"), journal_socket=JOURNAL_SOCKET,
            nested_userns=c.spec.nested_userns,
        )
        if len(spec.to_json()) > MAX_SPEC:
            raise InvalidArgument(f"the command and environment are over {MAX_SPEC} bytes")
        run_dir.mkdir(parents=True, exist_ok=True)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        try:
            forked = await self._forkserver.exec(spec, [go_r, error_w, *stdio])
        except BaseException:
            os.close(go_w)
            os.close(error_r)
            raise
        finally:
            os.close(go_r)
            os.close(error_w)
        try:
            # The supervisor's child is in the scope too: its cgroup and limits are the container's.
            failure = await self._manager.go_in_scope(c, c.unit, forked.pid, go_w, error_r)
            if failure:
                raise _failure_error(c, failure)
        except BaseException:
            os.close(forked.pidfd)
            raise
        return forked


def _failure_error(c: Container, failure: str) -> Exception:
    kind, _, reason = failure.partition(": ")
    if kind == FAILURE_USER:
        return InvalidArgument(reason)
    if kind == FAILURE_EXEC:
        return ExecFailed(f"could not execute in container {c.name}: {reason}")
    if kind == FAILURE_GONE:
        return InvalidState(f"container {c.name} is not running: {reason}")
    return Internal(f"exec in container {c.name} failed: {failure}")


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
