"""Runs one command inside a running container, and watches it to the end.

This is a child of the fork server (single-threaded, so it may fork). The
daemon puts it into the container's scope first, then tells it to go. It
stays in the host's mount namespace, so it can write the exit status to the
run dir and reach journald, and enters only the container's PID namespace,
which applies to its children. Its one child joins every other namespace of
the container's init (mount, UTS, IPC, network, cgroup, and last its user
namespace if it has one), switches to the container's root, takes the
exec's user and the container command's restrictions and executes the
command.

The supervisor then waits for that child: it enforces the timeout, relays
output to journald in journal mode, and writes the exit status to a file, so
the status outlives a daemon that is down when the command ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import time
from typing import NoReturn

from quiltd import linux, userns
from quiltd.containerinit import FORWARDED_SIGNALS, RESTORED_SIGNALS, _Output, harden_before_exec
from quiltd.execspec import FAILURE_EXEC, FAILURE_GONE, FAILURE_USER, ExecSpec, ExecStatus, OutputMode
from quiltd.journalstream import JournalStream

TIMEOUT_EXIT = 124  # what timeout(1) reports for a command it had to end
# The order matters only for mnt: once in the container's mount namespace,
# the host's /proc is out of reach, so every namespace file is opened first.
NAMESPACES = (
    ("cgroup", linux.CLONE_NEWCGROUP), ("ipc", linux.CLONE_NEWIPC), ("uts", linux.CLONE_NEWUTS),
    ("net", linux.CLONE_NEWNET), ("mnt", linux.CLONE_NEWNS),
)
MAX_ACCOUNT_FILE = 4 << 20  # /etc/passwd and /etc/group are the container's: read no more


class _Failure(Exception):
    """A reason for the daemon, starting with one of the FAILURE_ words."""


def run(spec: ExecSpec, go_fd: int, error_fd: int, stdio: tuple[int, int, int] | None) -> NoReturn:
    """Entry point in the forked child; never returns."""
    try:
        # Not dumpable: the host's interpreter behind /proc/PID/exe and this
        # memory stay closed to the container while the command is set up.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        # Passed over a socket, so not close-on-exec: its closing on exec is
        # how the daemon learns the command runs.
        os.set_inheritable(error_fd, False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        # End of file instead of the go byte: the daemon gave up on this exec.
        if os.read(go_fd, 1) != b"1":
            os._exit(0)
        os.close(go_fd)
        journal = None
        if spec.mode == OutputMode.JOURNAL:
            journal = JournalStream(
                {
                    "SYSLOG_IDENTIFIER": spec.name,
                    "QUILT_CONTAINER_ID": spec.container_id,
                    "QUILT_CONTAINER_NAME": spec.name,
                    "QUILT_EXEC_ID": spec.exec_id,
                },
                spec.journal_socket,
            )
        ns_fds, root_fd = _open_container(spec)
        linux.setns(ns_fds.pop("pid"), linux.CLONE_NEWPID)  # for the child to come
        relay: dict[int, int] = {}
        if stdio is None:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            stdio = (null, out_w, err_w)
            relay = {out_r: 1, err_r: 2}
        # Set before the fork: the fork server ignores SIGCHLD, and an ignored
        # SIGCHLD lets the kernel reap the child and drop its status.
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        child = os.fork()
        if child == 0:
            os.close(wake_r)
            os.close(wake_w)
            for fd in relay:
                os.close(fd)
            _enter_and_exec(spec, ns_fds, root_fd, stdio, error_fd)
        for fd in (*ns_fds.values(), root_fd, *stdio):
            os.close(fd)
        _write_atomically(spec.pid_path, f"{child} {linux.process_starttime(child)}\n".encode())
        os.close(error_fd)  # now only the child holds it, until its exec
        status = _supervise(child, wake_r, spec.timeout_sec, relay, journal)
        _write_atomically(spec.status_path, status.to_json())
        os._exit(0)
    except BaseException as e:
        reason = str(e) if isinstance(e, _Failure) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(error_fd, reason.encode())
        os._exit(127)


def _open_container(spec: ExecSpec) -> tuple[dict[str, int], int]:
    """Descriptors of the init's namespaces and root, checked to be that very init's."""
    try:
        pidfd = os.pidfd_open(spec.init_pid)
    except ProcessLookupError:
        raise _Failure(f"{FAILURE_GONE}: the container's init has exited") from None
    # Opened while the pidfd pins the process; checked afterwards, so they
    # cannot belong to a process that took over a reused pid.
    proc = f"/proc/{spec.init_pid}"
    fds = {name: os.open(f"{proc}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
           for name in ("pid", *(n for n, _ in NAMESPACES))}
    user = userns.foreign(spec.init_pid)
    if user is not None:
        fds["user"] = user
    root_fd = os.open(f"{proc}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    exited = select.select([pidfd], [], [], 0)[0]
    os.close(pidfd)
    if exited or linux.process_starttime(spec.init_pid) != spec.init_starttime:
        raise _Failure(f"{FAILURE_GONE}: the container's init has exited")
    return fds, root_fd


def _enter_and_exec(
    spec: ExecSpec, ns_fds: dict[str, int], root_fd: int, stdio: tuple[int, int, int], error_fd: int
) -> NoReturn:
    """In the child, already in the container's PID namespace: the rest, then execve."""
    try:
        for name, nstype in NAMESPACES:
            linux.setns(ns_fds[name], nstype)
        # The mount namespace is the container's now; its root directory is
        # the one init pivoted into.
        os.fchdir(root_fd)
        os.chroot(".")
        os.chdir("/")
        if "user" in ns_fds:  # last: it ends this process's privilege over the others
            userns.enter(ns_fds["user"])
        for sig in (*FORWARDED_SIGNALS, *RESTORED_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()  # no controlling terminal to push input into (TIOCSTI)
        env = dict(item.split("=", 1) for item in spec.env)
        if spec.user:
            uid, gid, groups, home = _resolve_user(spec.user)
            if home and "HOME" not in env:
                env["HOME"] = home
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        try:
            os.chdir(spec.workdir)
        except OSError as e:
            raise _Failure(f"{FAILURE_EXEC}: workdir {spec.workdir}: {e.strerror}") from None
        for std, fd in enumerate(stdio):
            os.dup2(fd, std)
        os.closerange(3, error_fd)
        os.closerange(error_fd + 1, 1 << 16)
        harden_before_exec(spec.nested_userns)
        try:
            os.execvpe(spec.command[0], list(spec.command), env)
        except OSError as e:
            raise _Failure(f"{FAILURE_EXEC}: {spec.command[0]}: {e.strerror}") from None
    except BaseException as e:
        reason = str(e) if isinstance(e, _Failure) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(error_fd, reason.encode())
        os._exit(127)


def _resolve_user(user: str) -> tuple[int, int, list[int], str]:
    """uid, gid, supplementary groups and home of 'user' or 'user:group', from the container's files."""
    name, _, group = user.partition(":")
    passwd = _account_file("/etc/passwd")
    uid = gid = -1
    home = ""
    login = ""
    for fields in passwd:
        if len(fields) >= 6 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            login, uid, gid, home = fields[0], int(fields[2]), int(fields[3]), fields[5]
            break
    else:
        if not name.isdigit():
            raise _Failure(f"{FAILURE_USER}: no user {name!r} in the container's /etc/passwd")
        uid = gid = int(name)  # a bare number needs no entry, as in docker exec
    groups = _account_file("/etc/group")
    if group:
        for fields in groups:
            if len(fields) >= 3 and (fields[0] == group or (group.isdigit() and fields[2] == group)):
                gid = int(fields[2])
                break
        else:
            if not group.isdigit():
                raise _Failure(f"{FAILURE_USER}: no group {group!r} in the container's /etc/group")
            gid = int(group)
    extra = sorted({int(f[2]) for f in groups
                    if len(f) >= 4 and login and login in f[3].split(",") and f[2].isdigit()} | {gid})
    if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
        raise _Failure(f"{FAILURE_USER}: user {user!r} has an invalid id")
    return uid, gid, extra, home


def _account_file(path: str) -> list[list[str]]:
    """The lines of a passwd-like file, split on ':'; none if it is missing or odd."""
    # The file is the container's: a FIFO must not block, a device or a
    # huge file must not be read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = os.read(fd, MAX_ACCOUNT_FILE)
    finally:
        os.close(fd)
    return [line.split(":") for line in data.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]


def _supervise(
    child: int, wake_r: int, timeout_sec: int, relay: dict[int, int], journal: JournalStream | None
) -> ExecStatus:
    output = _Output(relay, journal) if journal is not None else None
    deadline = time.monotonic() + timeout_sec if timeout_sec else None
    timed_out = False
    while True:
        code = _reaped(child)
        if code is not None:
            if output is not None:
                # What is in the pipes now; a background process of the
                # command may hold them open for ever.
                output.drain()
            return ExecStatus(TIMEOUT_EXIT if timed_out else code, timed_out)
        wait = None if deadline is None or timed_out else max(0.0, deadline - time.monotonic())
        fds = [*(output.open_fds() if output else []), wake_r]
        readable, _, _ = select.select(fds, [], [], wait)
        if not readable and wait is not None:
            timed_out = True
            # The whole process group: the command's own children go too.
            for target in (-child, child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
        for fd in readable:
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            elif output is not None:
                output.read(fd)


def _reaped(child: int) -> int | None:
    try:
        pid, status = os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        return 128 + signal.SIGKILL
    if pid == 0:
        return None
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# For the container's command, which takes its user the same way.
resolve_user = _resolve_user
