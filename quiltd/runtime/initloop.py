"""Init's work once the container's command runs: reap, relay, and run execs.

Init is PID 1 of the container and the only process the daemon talks to
inside it. From the command's start to its end it:

- reaps every child (init's duty) and passes on every catchable signal to
  the command;
- splits the command's output into lines for the journal;
- serves the exec channel (see execproto): each exec is forked here, so it
  starts inside the container's namespaces, root, scope and user namespace
  with nothing to join, and no process outside the container is made for it;
- enforces each exec's timeout, relays a background exec's output with its
  QUILT_EXEC_ID, and reports every exec's end on its connection (and, for a
  background exec, in a status file a restarted daemon can read).

All of it is one single-threaded loop on an epoll selector. When the command
exits, init drains what is in its pipes and returns its exit code; the
kernel then ends everything left in the PID namespace, execs included.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from quiltd.runtime import command, execproto, ptys, wire
from quiltd.runtime.execproto import ExecRequest, ExecStatus
from quiltd.runtime.journalstream import PRIORITY_ERR, PRIORITY_INFO, JournalStream
from quiltd.runtime.wire import Code, Failure, Kind

TIMEOUT_EXIT = 124  # what timeout(1) reports for a command it had to end
MAX_LINE = 32 * 1024  # longer lines are split; a datagram must stay well under the socket's limit
STREAMS = {1: ("stdout", PRIORITY_INFO), 2: ("stderr", PRIORITY_ERR)}
EXEC_ID_RE = re.compile(r"[0-9a-f]{1,64}")  # it names a file in the run dir
LISTEN_BACKLOG = 1024


class Output:
    """Splits stdout and stderr pipes into lines for the journal."""

    def __init__(self, pipes: dict[int, int], journal: JournalStream, extra: dict[str, str] | None = None,
                 on_close: Callable[[int], None] = lambda fd: None) -> None:
        self._streams = dict(pipes)  # fd -> 1 (stdout) or 2 (stderr)
        self._partial = {fd: b"" for fd in pipes}
        self._journal = journal
        self._extra = extra or {}
        self._on_close = on_close

    def open_fds(self) -> list[int]:
        return list(self._streams)

    def read(self, fd: int) -> bool:
        """One read from fd; False once it reached end of file or would block."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self._close(fd)
            return False
        lines = (self._partial[fd] + chunk).split(b"\n")
        rest = lines.pop()
        while len(rest) >= MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[fd] = rest
        for line in lines:
            self._emit(fd, line)
        return True

    def drain(self) -> None:
        """Takes what is in the pipes now and closes them: a background child may hold them open for ever."""
        for fd in self.open_fds():
            os.set_blocking(fd, False)
            while self.read(fd):
                pass
            if fd in self._streams:
                self._close(fd)

    def _close(self, fd: int) -> None:
        if self._partial[fd]:
            self._emit(fd, self._partial[fd])
        del self._streams[fd], self._partial[fd]
        self._on_close(fd)
        os.close(fd)

    def _emit(self, fd: int, line: bytes) -> None:
        name, priority = STREAMS[self._streams[fd]]
        self._journal.send(line, {**self._extra, "QUILT_STREAM": name}, priority)


@dataclass
class _Exec:
    """An exec init forked and has not reaped yet."""

    request: ExecRequest
    process: subprocess.Popen[bytes]  # reaped by init's loop, which then sets its returncode
    output: Output | None  # background execs' lines
    deadline: float | None  # monotonic
    # Told of the end: the connection that asked for the exec, and any that waits for it.
    listeners: list[socket.socket] = field(default_factory=list)
    timed_out: bool = False


class InitLoop:
    def __init__(self, command_pid: int, command_pipes: dict[int, int], journal: JournalStream,
                 listener: socket.socket, run_dir_fd: int) -> None:
        self._command_pid = command_pid
        self._journal = journal
        self._listener = listener
        self._run_dir_fd = run_dir_fd
        self._selector = selectors.DefaultSelector()
        self._output = Output(command_pipes, journal, on_close=self._forget)
        self._execs: dict[int, _Exec] = {}  # by pid
        self._by_id: dict[str, _Exec] = {}
        self._exit_code: int | None = None

    def run(self) -> int:
        """Serves until the command exits; returns its exit code (128+N for signal N)."""
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in command.FORWARDED_SIGNALS:
            signal.signal(sig, self._forward)
        self._watch(wake_r, lambda: _drain_wakeups(wake_r))
        for fd in self._output.open_fds():
            self._watch(fd, lambda fd=fd: self._output.read(fd))  # type: ignore[misc]
        self._listener.setblocking(False)
        self._watch(self._listener.fileno(), self._accept)
        while True:
            self._reap()
            if self._exit_code is not None:
                # The command is gone: take what is already in the pipes and
                # leave, since a background child may keep them open for ever.
                self._output.drain()
                self._journal.tell_dropped()
                return self._exit_code
            for key, _ in self._selector.select(self._next_deadline()):
                key.data()
            self._expire()

    # The loop's parts

    def _watch(self, fd: int, handler: Callable[[], object]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, handler)

    def _forget(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def _forward(self, signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._command_pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            if pid == self._command_pid:
                self._exit_code = code
            elif pid in self._execs:
                self._finish(self._execs.pop(pid), code)

    def _next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._execs.values() if e.deadline is not None and not e.timed_out]
        tell = self._journal.tell_due()
        if tell is not None:
            deadlines.append(tell)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self) -> None:
        self._journal.tick()
        now = time.monotonic()
        for e in self._execs.values():
            if e.deadline is not None and not e.timed_out and now >= e.deadline:
                e.timed_out = True
                # The whole process group: the command's own children go too.
                for target in (-e.process.pid, e.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(target, signal.SIGKILL)

    # The exec channel

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        self._watch(conn.fileno(), lambda: self._on_message(conn))

    def _on_message(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            try:
                frame, fds = wire.receive(conn, execproto.MAX_FDS)
            except BlockingIOError:
                return
            except OSError:
                frame = None
            if frame is None:
                self._drop(conn)  # the daemon is done with it, or gone
                return
            if frame.kind == Kind.EXEC:
                self._start(conn, ExecRequest.decode(frame.body), fds)
            elif frame.kind == Kind.WAIT:
                self._wait(conn, str(frame.body["exec_id"]))
            elif frame.kind == Kind.KILL:
                self._kill(conn, str(frame.body["exec_id"]), int(frame.body["signal"]))
            else:
                raise wire.WireError(f"unexpected message {frame.kind.name}")
        except Exception as e:  # a bad request must never end init, and with it the container
            self._fail(conn, Failure.of(e))
        finally:
            for fd in fds:
                os.close(fd)

    def _start(self, conn: socket.socket, request: ExecRequest, fds: list[int]) -> None:
        if not EXEC_ID_RE.fullmatch(request.exec_id) or request.exec_id in self._by_id:
            raise ValueError(f"bad exec id {request.exec_id!r}")
        if len(fds) != (0 if request.background else 3):
            raise ValueError(f"an exec takes 3 descriptors or none, got {len(fds)}")
        if request.pty:
            if not request.background:
                raise ValueError("a pty exec is a background one")
            self._start_on_pty(conn, request)
            return
        relay: dict[int, int] = {}
        if request.background:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            stdio = (null, out_w, err_w)
            relay = {out_r: 1, err_r: 2}
        else:
            stdio = (fds[0], fds[1], fds[2])
        try:
            process = command.spawn(request.command, request.env, request.workdir, request.user, stdio)
        except command.SpawnFailed as e:
            for fd in relay:
                os.close(fd)
            self._fail(conn, e.failure)
            return
        finally:
            if request.background:
                for fd in stdio:
                    os.close(fd)
        self._started(conn, request, process)
        output = None
        if relay:
            output = Output(relay, self._journal, {"QUILT_EXEC_ID": request.exec_id}, on_close=self._forget)
            for fd in relay:
                os.set_blocking(fd, False)
                self._watch(fd, lambda fd=fd, o=output: o.read(fd))  # type: ignore[misc]
            self._by_id[request.exec_id].output = output
        self._reply(conn, Kind.STARTED)

    def _started(self, conn: socket.socket, request: ExecRequest, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + request.timeout_sec if request.timeout_sec else None
        e = _Exec(request, process, None, deadline, [conn])
        self._execs[process.pid] = e
        self._by_id[request.exec_id] = e

    def _start_on_pty(self, conn: socket.socket, request: ExecRequest) -> None:
        """Runs the exec on a new pseudo-terminal of the container's devpts; its master goes to the daemon."""
        try:
            master, peer = ptys.open_pair(request.rows, request.cols)
        except OSError as e:
            self._fail(conn, Failure(Code.EXEC, f"no pseudo-terminal: {e.strerror}"))
            return
        try:
            try:
                process = command.spawn(request.command, request.env, request.workdir, request.user,
                                        (peer, peer, peer), terminal=True)
            except command.SpawnFailed as e:
                self._fail(conn, e.failure)
                return
            finally:
                # The command holds the only peer now: its end (and its
                # children's) is the end of file the client reads.
                os.close(peer)
            self._started(conn, request, process)
            with contextlib.suppress(OSError):
                wire.send(conn, Kind.STARTED, fds=[master])
        finally:
            os.close(master)

    def _finish(self, e: _Exec, code: int) -> None:
        del self._by_id[e.request.exec_id]
        # Reaped here, not by Popen: a Popen collected without a returncode
        # would try to reap its pid again later.
        e.process.returncode = code
        if e.output is not None:
            e.output.drain()
        status = ExecStatus(TIMEOUT_EXIT if e.timed_out else code, e.timed_out)
        if e.request.background:
            with contextlib.suppress(OSError):  # the daemon then counts it as killed
                self._write_status(e.request.exec_id, status)
        for conn in e.listeners:
            self._reply(conn, Kind.EXITED, status.body())
            self._drop(conn)

    def _wait(self, conn: socket.socket, exec_id: str) -> None:
        e = self._by_id.get(exec_id)
        if e is None:  # ended: its status file says how
            self._reply(conn, Kind.UNKNOWN)
            self._drop(conn)
        else:
            e.listeners.append(conn)

    def _kill(self, conn: socket.socket, exec_id: str, signum: int) -> None:
        e = self._by_id.get(exec_id)
        if e is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(e.process.pid, signum)
        self._reply(conn, Kind.OK if e is not None else Kind.UNKNOWN)
        self._drop(conn)

    def _write_status(self, exec_id: str, status: ExecStatus) -> None:
        name = f"{execproto.EXECS_DIR}/{exec_id}"
        fd = os.open(f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=self._run_dir_fd)
        try:
            os.write(fd, status.to_json())
        finally:
            os.close(fd)
        os.rename(f"{name}.tmp", name, src_dir_fd=self._run_dir_fd, dst_dir_fd=self._run_dir_fd)

    def _reply(self, conn: socket.socket, kind: Kind, body: Mapping[str, object] | None = None) -> None:
        # A few hundred bytes into a socket the daemon reads from its loop;
        # a daemon that is gone or stuck must not stall the container.
        with contextlib.suppress(OSError):
            wire.send(conn, kind, body)

    def _fail(self, conn: socket.socket, failure: Failure) -> None:
        self._reply(conn, Kind.FAILED, failure.body())
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if conn.fileno() >= 0:
            self._forget(conn.fileno())
            conn.close()


def _drain_wakeups(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 512)
