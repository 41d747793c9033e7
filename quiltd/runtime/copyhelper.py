"""Copies a tar stream into or out of one container: the process the fork server forks for it.

The daemon has threads and never forks, and a copy may take a while, so it
runs here, in a child of the fork server, and the daemon's loop only waits
for its answer on a pipe.

- A running container: the daemon first moves this process into the
  container's scope (its device policy and memory limit apply to what we
  open and write), then lets it go. The root is the init's /proc/PID/root,
  opened once the init is proven to be the process the daemon recorded
  (pidfd plus start time). If the init ends during the copy, the copy stops.
- A stopped container: there is no root to borrow, so this process makes
  one in a mount namespace of its own: the overlay of the image and the
  container's upper layer (nodev, nosuid), with the container's bind mounts
  and, read-only and empty, its tmpfs mounts, exactly where a start would
  put them. The daemon holds the container's lock meanwhile, so no start
  mounts the same upper layer at the same time. The namespace, and the
  mounts with it, go when this process exits.

Either way the copy itself (rootcopy) works from a descriptor of that root.
A copy in which no byte moves for idle_timeout_sec ends with a timeout,
whatever the caller's descriptor does (a blocking write to a reader that
never reads is interrupted by the timer's signal).
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any, NoReturn

from quiltd import linux
from quiltd.runtime import mounts, rootcopy, userns
from quiltd.runtime.copyspec import CopyResult, CopySpec, Direction
from quiltd.runtime.rootcopy import CopyError, Progress
from quiltd.runtime.wire import Code, Failure, Frame, Kind, read_frame


def run(spec: CopySpec, go_fd: int, data_fd: int, result_fd: int) -> NoReturn:
    """Entry point in the forked child; never returns."""
    progress = Progress(tick=lambda: None)
    try:
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        go = read_frame(go_fd)
        if go is None or go.kind != Kind.GO:
            os._exit(0)  # the daemon gave up on this copy
        os.close(go_fd)
        os.umask(0)  # modes come from the tar stream or the files, exactly
        root_fd, init_pidfd, userns_fd = _open_root(spec)
        if userns_fd is not None:
            # The copy acts as the container's root: what it makes is owned
            # by the container's ids, and it may touch only what that root may.
            userns.enter(userns_fd)
            os.close(userns_fd)
        _Watch(spec, init_pidfd, progress).start()
        if spec.direction == Direction.IN:
            rootcopy.extract(root_fd, spec.path, data_fd, spec.max_bytes, progress)
        else:
            rootcopy.archive(root_fd, spec.path, data_fd, progress, spec.max_bytes)
        signal.setitimer(signal.ITIMER_REAL, 0)
        result = Frame(Kind.COPIED, CopyResult(progress.bytes, progress.entries).body())
    except CopyError as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        result = Frame(Kind.FAILED, Failure(e.failure, str(e)).body())
    except RecursionError:
        signal.setitimer(signal.ITIMER_REAL, 0)
        result = Frame(Kind.FAILED, Failure(Code.IO, "the tree is nested too deep to copy").body())
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        result = Frame(Kind.FAILED, Failure.of(e).body())
    try:
        os.close(data_fd)  # the caller sees the end of the stream before the reply
        os.write(result_fd, result.encode())
    except OSError:
        pass
    os._exit(0)


def _open_root(spec: CopySpec) -> tuple[int, int | None, int | None]:
    """A descriptor of the container's root, the init's pidfd when it runs, and its user namespace if any."""
    if spec.init_pid:
        try:
            pidfd = os.pidfd_open(spec.init_pid)
        except ProcessLookupError:
            raise CopyError(Code.GONE, f"container {spec.name} is not running") from None
        root_fd = os.open(f"/proc/{spec.init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        userns_fd = userns.foreign(spec.init_pid)
        # Checked after opening, while the pidfd pins the process: the root
        # cannot be that of a process that took over a reused pid.
        if select.select([pidfd], [], [], 0)[0] or \
                linux.process_starttime(spec.init_pid) != spec.init_starttime:
            raise CopyError(Code.GONE, f"container {spec.name} is not running")
        return root_fd, pidfd, userns_fd
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # A namespace with the container's map, made again: its ids are on record.
    userns_fd = userns.create(spec.userns_base) if spec.userns_base else None
    try:
        mounts.mount_overlay(spec.rootfs, spec.lowerdir, spec.upperdir, spec.overlay_workdir,
                             linux.MS_NODEV | linux.MS_NOSUID, userns_fd, spec.userns_base)
        for source, target, read_only in spec.binds:
            mounts.bind_into(spec.rootfs, source, target, read_only, policy=spec.bind_policy)
        for source, target, read_only in spec.volume_binds:
            mounts.bind_into(spec.rootfs, source, target, read_only, userns_fd)
        for target in spec.tmpfs:
            mounts.mount_in_root(spec.rootfs, target, "tmpfs",
                                 linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RDONLY, "size=4k")
    except OSError as e:
        raise CopyError(Code.IO, f"cannot mount the container's volumes: {e}") from None
    return os.open(spec.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), None, userns_fd


class _Watch:
    """Once a second: has anything moved lately, and does the init still run?"""

    def __init__(self, spec: CopySpec, init_pidfd: int | None, progress: Progress) -> None:
        self.spec = spec
        self.init_pidfd = init_pidfd
        self.last = time.monotonic()
        progress.tick = self.tick

    def tick(self) -> None:
        self.last = time.monotonic()

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self.check)
        signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)

    def check(self, signum: int, frame: Any) -> None:
        # Raised from the handler: it interrupts a read or write that blocks.
        if self.init_pidfd is not None and select.select([self.init_pidfd], [], [], 0)[0]:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise CopyError(Code.GONE, f"container {self.spec.name} stopped during the copy")
        if time.monotonic() - self.last > self.spec.idle_timeout_sec:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise CopyError(Code.TIMEOUT, f"no data moved for {self.spec.idle_timeout_sec} s; "
                            "the copy was abandoned")
