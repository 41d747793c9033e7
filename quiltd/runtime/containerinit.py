"""The first process of a container: set up its root, run the command, stay as init.

This runs in a child of the fork server, already inside fresh mount, UTS,
IPC, network and PID namespaces, where it is PID 1. It builds the root while
the daemon puts it into the container's scope, waits for word that it is
there, then starts the command and stays behind as the container's init
(see initloop): it reaps zombies, forwards signals, carries the command's
output to journald line by line and runs the daemon's execs. It writes the
exit status to a file outside the container before it exits, so the status
survives a daemon that is down at that moment.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import NoReturn

from quiltd import linux
from quiltd.net import netconfig
from quiltd.runtime import command, execproto, mounts, security, userns, wire
from quiltd.runtime.initloop import InitLoop
from quiltd.runtime.journalstream import LOG_DROPPED_FILE, JournalStream, LogLimit
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.wire import Failure, Frame, Kind, WireError, read_frame

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
TTY_GID = 5  # the owner group of terminals, as Debian and most images have it


def run(spec_fd: int, error_fd: int) -> NoReturn:
    """Entry point in the forked child; never returns."""
    # Frames come on the spec pipe (see wire): SPEC, sent as soon as the
    # daemon has picked this init; IN, once the daemon has put it into the
    # container's scope and made its veth; GO, to run the command (a warm
    # pool's member waits for its claim here). The root is built after IN:
    # memory a process touches is charged to the cgroup it is in at that
    # moment and stays there when the process moves, so a root built before
    # charged each container's init (megabytes of copied pages, the mounts)
    # to quiltd.service for the container's whole life, and a thousand
    # containers went past the service's MemoryMax. End of file instead of
    # any frame means: not needed, leave.
    try:
        # Not dumpable: nothing in the container may open this process's
        # memory or its executable (a host binary) through /proc/1.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        # This process waits in the fork server's pool until the daemon sends
        # the LaunchSpec.
        frame = read_frame(spec_fd)
        if frame is None:
            os._exit(0)
        if frame.kind != Kind.SPEC:
            raise WireError(f"{frame.kind.name} where a SPEC was expected")
        spec = LaunchSpec.from_body(frame.body)
        # The exit file is made only once the command is to run: a file there
        # tells a restarted daemon that this start got that far. Its
        # directory is held open across the root switch.
        run_dir, exit_name = os.path.split(spec.exit_path)
        run_dir_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        dropped_fd = os.open(LOG_DROPPED_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                             dir_fd=run_dir_fd)
        journal = JournalStream(_journal_fields(spec), spec.journal_socket,
                                LogLimit(spec.log_rate_burst, spec.log_rate_interval_sec), dropped_fd)
        frame = read_frame(spec_fd)
        if frame is None:
            os._exit(0)  # the daemon gave up on this start before the scope was made
        if frame.kind != Kind.IN:
            raise WireError(f"{frame.kind.name} where IN was expected")
        userns_fd = userns.create(spec.userns_base) if spec.userns_base else None
        listener = _listen_for_execs(run_dir, spec.userns_base)
        _enter_root(spec, userns_fd)
        netconfig.configure(spec.net_ifname, spec.net_interface, spec.net_gateway)
        # Inside the scope, so the container's cgroup root is its scope.
        linux.unshare(linux.CLONE_NEWCGROUP)
    except BaseException as e:  # a failed start, told to the daemon once it is ready to hear it
        with contextlib.suppress(OSError):
            os.write(error_fd, Failure.of(e).encode())
        # Held until GO or end of file, so the daemon's scope finds this
        # process and its start fails with the reason above.
        with contextlib.suppress(BaseException):
            while os.read(spec_fd, 4096):
                pass
        os._exit(127)
    try:
        frame = read_frame(spec_fd)
        os.close(spec_fd)
        if frame is None and spec.pool_member:
            # The daemon went before the claim (restarted, or killed): a warm
            # pool's member stays ready for the daemon that comes back.
            frame, error_fd = _claim_over(listener, error_fd)
        if frame is None or frame.kind != Kind.GO:
            os._exit(0)  # the daemon gave up on this start (its scope failed, or the pool let go)
        # A warm pool's container learns here what it runs and its name, in
        # GO's body; a cold start's GO has none.
        claim = frame.body
        if claim:
            spec = spec.claimed(claim)
            socket.sethostname(spec.hostname)
            journal.retitle(_journal_fields(spec), LogLimit(spec.log_rate_burst, spec.log_rate_interval_sec))
        exit_fd = os.open(exit_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                          dir_fd=run_dir_fd)
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
        command_pid = _spawn_command(spec, out_w, err_w, error_fd)
        os.close(out_w)
        os.close(err_w)
        os.close(error_fd)  # the daemon sees end of file once the command's exec succeeded
        error_fd = -1  # its number may be reused below
        code = InitLoop(command_pid, {out_r: 1, err_r: 2}, journal, listener, run_dir_fd).run()
        os.write(exit_fd, f"{code}\n".encode())
        os._exit(code)
    except BaseException as e:  # a failed start, told to the daemon
        if error_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(error_fd, Failure.of(e).encode())
        os._exit(127)


def _claim_over(listener: socket.socket, error_fd: int) -> tuple[Frame, int]:
    """GO from a daemon that came back, on the control socket; and that connection as the new error pipe.

    The daemon that comes back connects when it adopts this member and sends
    GO on that connection when a create claims it; the answer (a failure, or
    end of file once the command runs) goes back on the same connection.
    A connection that ends without GO (that daemon went too) is waited out.
    """
    os.close(error_fd)  # its reader went with the daemon
    while True:
        conn, _ = listener.accept()
        try:
            frame, _ = wire.receive(conn, 0)
        except (OSError, WireError):
            frame = None
        if frame is not None and frame.kind == Kind.GO:
            return frame, conn.detach()
        conn.close()


def _spawn_command(spec: LaunchSpec, out_w: int, err_w: int, error_fd: int) -> int:
    """Starts the command as init starts an exec: init restricts itself first, then spawns it.

    Init needs no more privilege than its command and execs get, and they
    inherit its restrictions (capabilities, no_new_privs, seccomp filter):
    none of them is restricted on its own, so none needs Python in its
    child, and spawn gives each its session, user, workdir and stdio by
    vfork, without a copy of init's Python image (the most expensive step
    of a start when the command forked it).
    """
    command.restrict(spec.nested_userns)
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        process = command.spawn(spec.command, spec.env, spec.workdir, spec.user, (null, out_w, err_w))
    except command.SpawnFailed as e:
        with contextlib.suppress(OSError):
            os.write(error_fd, e.failure.encode())
        os._exit(127)
    finally:
        os.close(null)
    process.returncode = 0  # reaped by init's loop, never by Popen
    return process.pid


def _journal_fields(spec: LaunchSpec) -> dict[str, str]:
    return {
        "SYSLOG_IDENTIFIER": spec.name,
        "QUILT_CONTAINER_ID": spec.container_id,
        "QUILT_CONTAINER_NAME": spec.name,
    }


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
        mounts.bind_into(root, source, target, read_only, policy=spec.bind_policy)
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


def _listen_for_execs(run_dir: str, userns_base: int) -> socket.socket:
    """The exec channel's socket (see execproto), bound while the host's run dir is still in reach."""
    path = os.path.join(run_dir, execproto.CONTROL_SOCKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by an earlier run of the same container
    listener = execproto.control_socket()
    listener.bind(path)
    listener.listen(1024)
    execs = os.path.join(run_dir, execproto.EXECS_DIR)
    os.makedirs(execs, mode=0o700, exist_ok=True)
    if userns_base:
        # Init writes background execs' status files here after it has
        # become the container's root, a plain host id.
        os.chown(execs, userns_base, userns_base)
    return listener
