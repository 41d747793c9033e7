"""The fork server: a small single-threaded process that forks containers.

The daemon runs threads (image imports, the journal) and forking a threaded
process can deadlock in the child on a lock another thread held. So the
daemon starts this process once, by exec, before it needs it, and asks it
over a socket pair for each container. Here nothing but this loop runs, so
fork is safe, and the children start from a small, clean image.

Each container's init is forked straight into a new PID namespace, where it
is PID 1 (the server unshares only its children's PID namespace around the
fork, then goes back to its own), and enters its other new namespaces
itself (a new network namespace alone costs milliseconds). No intermediate
child: a fork of this Python image is the most expensive step of a start.
Those inits are made ahead of time: a few wait, idle, in a pool, so a start
does not pay for them. The server answers LAUNCH with
LAUNCHED: a waiting init's pid, its start time and three descriptors: a
pidfd of the init, the write end of the pipe that carries the init its
LaunchSpec, and the read end of its error pipe (end of file with no data
there means the command was executed).

The other request, COPY with a CopySpec, forks a copy into or out of a
container (see copyhelper) and answers FORKED: its pid, start time and a
pidfd. Any request that fails is answered FAILED. All of it is framed as
wire says.
Commands run in a running container (execs) do not come here: the
container's own init forks them (see initloop).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass

from quiltd import linux
from quiltd.runtime import containerinit, copyhelper, security, wire
from quiltd.runtime.copyspec import CopySpec
from quiltd.runtime.wire import Failure, Frame, Kind

# The namespaces init enters itself; its PID namespace is made for it by the server.
INIT_NAMESPACES = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET
POOL_SIZE = 4
MAX_REQUEST_FDS = 8


@dataclass(frozen=True)
class WaitingInit:
    pid: int
    starttime: int
    pidfd: int
    spec_w: int
    error_r: int

    def reply(self) -> tuple[Frame, list[int]]:
        return Frame(Kind.LAUNCHED, {"pid": self.pid, "starttime": self.starttime}), [
            self.pidfd, self.spec_w, self.error_r
        ]


def serve(sock: socket.socket, pool_size: int = POOL_SIZE) -> None:
    # Inits whose intermediate parent exits are re-parented here and reaped
    # by the kernel; their exit status is kept by init itself.
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Built once here, where the host's libseccomp is reachable; every
    # container's command loads it just before exec.
    security.prepare()
    # The server's own PID namespace, to go back to after each init's fork.
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # Freezing the heap keeps the collector from touching (and copying)
    # every object page in each forked container init.
    gc.freeze()
    pool: deque[WaitingInit] = deque()
    # No init is made ahead until the first request: by then the daemon has
    # moved this process into a scope of its own (memory an init touches
    # stays charged to the cgroup it was made in: not quiltd.service's).
    asked = False
    while True:
        # Requests first; the pool is refilled only while none is waiting.
        idle = not asked or len(pool) >= pool_size
        readable, _, _ = select.select([sock], [], [], None if idle else 0)
        if not readable:
            try:
                pool.append(_fork_init(own_pid_namespace))
            except OSError:
                select.select([sock], [], [], 1.0)  # out of resources: do not spin
            continue
        received: list[int] = []
        try:
            request, received = wire.receive(sock, MAX_REQUEST_FDS)
            if request is None:
                return  # the daemon is gone
            asked = True
            if request.kind == Kind.LAUNCH:
                reply, fds = (pool.popleft() if pool else _fork_init(own_pid_namespace)).reply()
            elif request.kind == Kind.COPY:
                reply, fds = _fork_copy(CopySpec.from_body(request.body), received)
            else:
                raise wire.WireError(f"unexpected request {request.kind.name}")
        except Exception as e:
            reply, fds = Frame(Kind.FAILED, Failure.of(e).body()), []
        finally:
            for fd in received:
                os.close(fd)
        wire.send(sock, reply.kind, reply.body, fds)
        for fd in fds:
            os.close(fd)


def _fork_init(own_pid_namespace: int) -> WaitingInit:
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        # Only the next child goes into the new PID namespace; this process
        # stays where it is, and its later children (copies) go back to its own.
        linux.unshare(linux.CLONE_NEWPID)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    _init_child(spec_r, error_w, report_w)
                finally:
                    os._exit(127)  # never back into this function: its own children stay in its namespace
        finally:
            linux.setns(own_pid_namespace, linux.CLONE_NEWPID)
    except BaseException:
        for fd in (spec_w, error_r, report_r):
            os.close(fd)
        raise
    finally:
        for fd in (spec_r, error_w, report_w):
            os.close(fd)
    try:
        answer = wire.read_frame(report_r)
    except wire.WireError:
        answer = None  # the child died mid-write
    finally:
        os.close(report_r)
    if answer is None or answer.kind != Kind.READY:
        os.close(spec_w)
        os.close(error_r)
        # OSError: the pool's refill treats it as the host running short, and retries.
        failed = answer is not None and answer.kind == Kind.FAILED
        raise OSError(Failure.from_frame(answer).message if failed and answer else "namespace setup failed")
    return WaitingInit(pid, linux.process_starttime(pid), os.pidfd_open(pid), spec_w, error_r)


def _fork_copy(spec: CopySpec, fds: list[int]) -> tuple[Frame, list[int]]:
    """Forks a copy; fds are its go pipe, the caller's descriptor and the result pipe."""
    if len(fds) != 3:
        raise ValueError(f"a copy needs 3 descriptors, got {len(fds)}")
    pid = os.fork()
    if pid == 0:
        _child_keeping(fds)
        copyhelper.run(spec, fds[0], fds[1], fds[2])
    return Frame(Kind.FORKED, {"pid": pid, "starttime": linux.process_starttime(pid)}), [os.pidfd_open(pid)]


def _child_keeping(fds: list[int]) -> None:
    """In a fresh child: nothing of the server's but fds, and /dev/null for stdio."""
    try:
        gc.disable()
        linux.close_fds_except(set(fds))
        null = os.open("/dev/null", os.O_RDWR)
        for std in (0, 1, 2):
            if std not in fds:
                os.dup2(null, std)
        if null > 2:
            os.close(null)
    except BaseException:
        os._exit(127)


def _init_child(spec_r: int, error_w: int, report_w: int) -> None:
    """The forked init, PID 1 of its namespace: the rest of its namespaces, then containerinit."""
    try:
        gc.disable()
        linux.unshare(INIT_NAMESPACES)
        # Init keeps only its two pipes (and the report pipe until it is
        # done with it): nothing of the daemon's follows it into the container.
        linux.close_fds_except({spec_r, error_w, report_w})
        null = os.open("/dev/null", os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        wire.write_frame(report_w, Kind.READY)
        os.close(report_w)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(report_w, Failure.of(e).encode())
        os._exit(1)
    containerinit.run(spec_r, error_w)


def main() -> None:
    fd = int(sys.argv[1])
    serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    main()
