"""The first process of a container: set up its root, run the command, stay as init.

This runs in a child of the fork server, already inside fresh mount, UTS,
IPC, network and PID namespaces, where it is PID 1. It builds the root while
the daemon puts it into the container's scope, waits for word that it is
there, then starts the command and stays behind as a tiny init: it reaps zombies, forwards signals,
carries the command's output to journald line by line, and writes the exit
status to a file outside the container before it exits, so the status
survives a daemon that is down at that moment.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from typing import NoReturn

from quiltd import linux, mounts, netconfig, security, userns
from quiltd.journalstream import PRIORITY_ERR, PRIORITY_INFO, JournalStream
from quiltd.launchspec import GO, LaunchSpec

# Init passes on to the command every signal it can catch, except those the
# kernel raises for init's own faults and SIGCHLD, which is init's to handle.
# (From outside its namespace an uncaught signal would take init's default
# action: end or stop the whole container.) SIGKILL and SIGSTOP cannot be
# caught; the daemon sends those to every process of the scope instead.
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                 signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS)
)
# Python ignores these at start-up; a command must get them back at default.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
TTY_GID = 5  # the owner group of terminals, as Debian and most images have it
MAX_LINE = 32 * 1024  # longer lines are split; a datagram must stay well under the socket's limit
STREAMS = {1: ("stdout", PRIORITY_INFO), 2: ("stderr", PRIORITY_ERR)}


def run(spec_fd: int, error_fd: int) -> NoReturn:
    """Entry point in the forked child; never returns."""
    # Two messages come on the spec pipe: the LaunchSpec as one line, sent
    # as soon as the daemon has picked this init, and GO, sent once the
    # daemon has put it into the container's scope. The root is built in
    # between, while systemd makes the scope; only the command has to wait
    # for it. End of file instead of either means: not needed, leave.
    spec_pipe = os.fdopen(spec_fd, "rb")
    try:
        # Not dumpable: nothing in the container may open this process's
        # memory or its executable (a host binary) through /proc/1.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        # This process waits in the fork server's pool until the daemon sends
        # the LaunchSpec.
        request = spec_pipe.readline()
        if not request.endswith(b"\n"):
            os._exit(0)
        spec = LaunchSpec.from_json(request)
        journal = JournalStream(
            {
                "SYSLOG_IDENTIFIER": spec.name,
                "QUILT_CONTAINER_ID": spec.container_id,
                "QUILT_CONTAINER_NAME": spec.name,
            },
            spec.journal_socket,
        )
        # The exit file is made only once the command is to run: a file there
        # tells a restarted daemon that this start got that far. Its
        # directory is held open across the root switch.
        exit_dir, exit_name = os.path.split(spec.exit_path)
        exit_dir_fd = os.open(exit_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        userns_fd = userns.create(spec.userns_base) if spec.userns_base else None
        _enter_root(spec, userns_fd)
    except BaseException as e:  # a failed start, told to the daemon once it is ready to hear it
        with contextlib.suppress(OSError):
            os.write(error_fd, f"{type(e).__name__}: {e}".encode())
        # Held until GO or end of file, so the daemon's scope finds this
        # process and its start fails with the reason above.
        with contextlib.suppress(BaseException):
            spec_pipe.read()
        os._exit(127)
    try:
        if spec_pipe.read(len(GO)) != GO:
            os._exit(0)  # the daemon gave up on this start (its scope failed)
        spec_pipe.close()
        # The veth's inner end exists only from GO on: the daemon makes it
        # while this process builds the root.
        netconfig.configure(spec.net_ifname, spec.net_interface, spec.net_gateway)
        exit_fd = os.open(exit_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                          dir_fd=exit_dir_fd)
        os.close(exit_dir_fd)
        # Only now, inside the scope, so the container's cgroup root is its scope.
        linux.unshare(linux.CLONE_NEWCGROUP)
        if userns_fd is not None:
            # The last step that needs host root: every namespace above is
            # the host's to own, and this init becomes the container's root.
            userns.enter(userns_fd)
            os.close(userns_fd)
        # An image's WorkingDir need not exist in it; made as the container's
        # root, like any directory its root makes. A failure is the command's
        # chdir to report.
        with contextlib.suppress(OSError):
            os.makedirs(spec.workdir, mode=0o755, exist_ok=True)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        command_pid = os.fork()
        if command_pid == 0:
            _exec_command(spec, out_w, err_w, error_fd)
        os.close(out_w)
        os.close(err_w)
        os.close(error_fd)  # the daemon sees end of file once the command's exec succeeded
        code = _supervise(command_pid, {out_r: 1, err_r: 2}, journal)
        os.write(exit_fd, f"{code}\n".encode())
        os._exit(code)
    except BaseException as e:  # a failed start, told to the daemon
        with contextlib.suppress(OSError):
            os.write(error_fd, f"{type(e).__name__}: {e}".encode())
        os._exit(127)


def _enter_root(spec: LaunchSpec, userns_fd: int | None) -> None:
    # Nothing mounted from here on may reach the host's mount table.
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    netconfig.prepare_namespace()
    root = spec.rootfs
    # In a user namespace the filesystems made here belong to its root, and
    # /dev/pts's tty group is the container's own.
    base = spec.userns_base
    owner = f",uid={base},gid={base}" if userns_fd is not None else ""
    if spec.disk_max:
        # Private to this namespace, so the host never sees it and it goes
        # when the container's last process does; writes past the size get
        # ENOSPC inside instead of filling the host's disk.
        linux.mount("tmpfs", spec.disk_dir, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    f"size={spec.disk_max},mode=0700")
        os.mkdir(spec.upperdir, 0o755)
        os.mkdir(spec.overlay_workdir, 0o700)
    mounts.mount_overlay(root, spec.lowerdir, spec.upperdir, spec.overlay_workdir, 0, userns_fd, base)
    for source, target, read_only in spec.binds:
        mounts.bind_into(root, source, target, read_only)
    # Volumes hold plain ids on disk, so any container can share them.
    for source, target, read_only in spec.volume_binds:
        mounts.bind_into(root, source, target, read_only, userns_fd)
    for target, size in spec.tmpfs:
        mounts.mount_in_root(root, target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                             f"size={size},mode=1777{owner}")
    nosuid_nodev_noexec = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    security.mask_proc(_mount_at(root, "proc", "proc", "proc", nosuid_nodev_noexec))
    security.mask_sys(_mount_at(root, "sys", "sysfs", "sysfs", nosuid_nodev_noexec | linux.MS_RDONLY))
    _make_dev(root, owner, base + TTY_GID)
    for source, target in ((spec.hosts_file, "etc/hosts"), (spec.resolv_file, "etc/resolv.conf")):
        if source:
            _bind_file_ro(root, source, os.path.join(root, target))
    socket.sethostname(spec.hostname)
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root under the new one; detaching
    # it leaves no path back to the host's tree.
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _mount_at(root: str, rel: str, source: str, fstype: str, flags: int, data: str | None = None) -> str:
    target = os.path.join(root, rel)
    os.makedirs(target, mode=0o755, exist_ok=True)
    linux.mount(source, target, fstype, flags, data)
    return target


def _make_dev(root: str, owner: str, tty_gid: int) -> None:
    dev = _mount_at(root, "dev", "tmpfs", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC,
                    f"mode=755,size=64k{owner}")
    for name in DEVICES:
        path = os.path.join(dev, name)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(f"/dev/{name}", path, None, linux.MS_BIND)
    _mount_at(dev, "pts", "devpts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
              f"newinstance,ptmxmode=0666,mode=0620,gid={tty_gid}")
    _mount_at(dev, "shm", "tmpfs", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"mode=1777,size=64m{owner}")
    for link, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, link))


def _bind_file_ro(root: str, source: str, target: str) -> None:
    # Before pivot_root a symlinked /etc would lead into the host's tree.
    if not os.path.realpath(os.path.dirname(target)).startswith(os.path.realpath(root) + "/"):
        raise OSError(f"{target} leads out of the container's root")
    # The target is made in the overlay's upper layer if the image lacks it.
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(target):
        os.unlink(target)  # a link could point anywhere once the root is switched
    if not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    linux.mount(source, target, None, linux.MS_BIND)
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
                | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)


def _exec_command(spec: LaunchSpec, out_w: int, err_w: int, error_fd: int) -> NoReturn:
    try:
        for sig in (*FORWARDED_SIGNALS, *RESTORED_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()  # no controlling terminal to push input into (TIOCSTI)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # Only the error pipe survives until exec, and it closes on exec.
        os.closerange(3, error_fd)
        os.closerange(error_fd + 1, 1 << 16)
        env = dict(item.split("=", 1) for item in spec.env)
        if spec.user:
            _switch_user(spec.user, env)
        os.chdir(spec.workdir)
        harden_before_exec(spec.nested_userns)
        os.execvpe(spec.command[0], list(spec.command), env)
    except BaseException as e:  # reported to the daemon as the start failure
        reason = f"{spec.command[0]}: {e.strerror}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(error_fd, reason.encode())
        os._exit(127)


def _switch_user(user: str, env: dict[str, str]) -> None:
    # Imported here: execsupervisor imports this module at its top, and its
    # lookup of users in the container's files is the one to share.
    from quiltd.execsupervisor import resolve_user

    uid, gid, groups, home = resolve_user(user)
    if home and "HOME" not in env:
        env["HOME"] = home
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def harden_before_exec(nested_userns: bool) -> None:
    """The last step before a container's command, or a command exec'd into it, is executed.

    The one place that sets what a process in a container may do, so the
    command and every exec get the same: an exec must not be a way out.
    It runs inside the container (namespaces joined, root switched), after
    the switch to the process's user, as the final step before execve.
    """
    # No setuid binary or file capability can raise privileges from here on.
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    # A process already switched to another user holds no capabilities (the
    # switch cleared them) and, under no_new_privs, cannot gain any: only
    # root has a set to reduce, and only root may reduce the bounding set.
    security.restrict_command(drop_capabilities=os.geteuid() == 0, nested_userns=nested_userns)


def _supervise(command_pid: int, pipes: dict[int, int], journal: JournalStream) -> int:
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _forward(command_pid, signum))
    output = _Output(pipes, journal)
    exit_code: int | None = None
    while True:
        exit_code = _reap(command_pid, exit_code)
        if exit_code is not None:
            # The command is gone: take what is already in the pipes and
            # leave, since a background child may keep them open forever.
            output.drain()
            return exit_code
        readable, _, _ = select.select([*output.open_fds(), wake_r], [], [])
        for fd in readable:
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            else:
                output.read(fd)


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _reap(command_pid: int, exit_code: int | None) -> int | None:
    """Reaps every exited child (init's duty); returns the command's code once known."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exit_code
        if pid == 0:
            return exit_code
        if pid == command_pid:
            code = os.waitstatus_to_exitcode(status)
            exit_code = 128 - code if code < 0 else code


class _Output:
    """Splits the command's stdout and stderr into lines for the journal."""

    def __init__(self, pipes: dict[int, int], journal: JournalStream) -> None:
        self._streams = dict(pipes)
        self._partial = {fd: b"" for fd in pipes}
        self._journal = journal

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
        os.close(fd)

    def _emit(self, fd: int, line: bytes) -> None:
        name, priority = STREAMS[self._streams[fd]]
        self._journal.send(line, {"QUILT_STREAM": name}, priority)
