"""The core: containers' life cycle and images, above the mechanisms.

Plain typed Python on the event loop: the bus layer calls in, events go out
through a Listener. Every state change is committed to the store before it
is announced, and before the method that caused it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import platform
import re
import secrets
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from quiltd import __version__, grammar
from quiltd.access import Credentials
from quiltd.core import fdcheck, forkfiles, imagedefaults, options, parse, pool, volumes
from quiltd.core.capacity import CLAIMING, Capacity, capacity
from quiltd.core.cleanup import Cleaner
from quiltd.core.config import Config
from quiltd.core.mechanisms import Inits, Networking, Processes, Scopes
from quiltd.core.requests import (
    ContainerFilter,
    CreateOptions,
    ImportOptions,
    NetworkOptions,
    RemoveImageOptions,
)
from quiltd.core.retries import CommitQueue
from quiltd.core.turns import FairTurns
from quiltd.errors import (
    AccessDenied,
    Internal,
    InvalidArgument,
    InvalidImage,
    InvalidState,
    LimitExceeded,
    NameTaken,
    NoSuchContainer,
    NoSuchImage,
    StartFailed,
    Timeout,
)
from quiltd.fs.remove import remove_path
from quiltd.host import callerfiles
from quiltd.host.freezer import Freezer, FreezerKind
from quiltd.host.scopes import SLICE, ScopeLimits, Usage
from quiltd.images import extract, hostimage, imageexport, imageimport, pull
from quiltd.images.layerstore import LayerStore
from quiltd.model import (
    NO_EXIT_CODE,
    CleanupKind,
    CleanupTask,
    Container,
    ContainerListing,
    ContainerSpec,
    Image,
    Network,
    State,
    WarmPool,
    scope_unit,
)
from quiltd.net import networks
from quiltd.paths import Paths
from quiltd.runtime import execproto, launchspec, mountopts, mounts, userns
from quiltd.runtime.journalstream import LOG_DROPPED_FILE
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.spawner import (
    Launched,
    let_go,
    read_answer,
)
from quiltd.runtime.wire import Failure, Frame
from quiltd.store.database import Store

log = logging.getLogger("quiltd")
T = TypeVar("T")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SIGKILL_EXIT = 128 + signal.SIGKILL
# Starts at once, and starts that may wait for a turn before a new one is
# refused with Busy (see turns.py). A start holds its turn mostly while
# systemd makes the scope; more at once only slow each other down.
START_TURNS = 16
MAX_WAITING_STARTS = 1024


class Listener(Protocol):
    """Who hears about containers appearing, changing and going away."""

    def container_added(self, c: Container) -> None: ...
    def container_changed(self, c: Container, old: Container) -> None: ...
    def container_removed(self, c: Container) -> None: ...


class RecoveryOutcome(enum.Enum):
    ADOPTED = "adopted"
    EXITED_WHILE_DOWN = "exited while down"
    RESTARTED = "start resumed"


@dataclass(frozen=True)
class ContainerInfo:
    container: Container
    usage: Usage | None  # None when no process runs
    ip_address: str = ""
    log_lines_dropped: int = 0  # since the container last started


@dataclass(frozen=True)
class SystemInfo:
    version: str
    containers_by_state: dict[str, int]
    images: int
    state_dir: str
    run_dir: str
    kernel: str
    starts_running: int
    starts_waiting: int
    start_turns: int
    max_waiting_starts: int
    warm_pool_size: int = 0  # containers the warm pools are to hold, all pools together
    warm_pool_ready: int = 0  # ready in them now
    freezer: str = FreezerKind.NONE.value  # how PauseContainer freezes: "systemd", "cgroup-v1" or "none"
    capacity: Capacity | None = None


def _describe_fd(fd: int) -> str:
    """The file behind a caller's descriptor, for messages only: it is never opened by this name."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "the image descriptor"


@dataclass(frozen=True)
class ImportResult:
    """What ImportImage made, and what of the source it left out."""

    image: Image
    kind: str  # "rootfs", "oci" or "docker": the format the source was read as
    skipped_devices: int  # device node members not created (docs/images.md)


# An import extracts into images/<16 hex digits>; recovery removes one no image names.
IMPORT_DIR_BYTES = 8
IMPORT_DIR = re.compile(f"[0-9a-f]{{{2 * IMPORT_DIR_BYTES}}}")


def now_usec() -> int:
    return time.time_ns() // 1000


def boot_usec() -> int:
    """CLOCK_BOOTTIME: monotonic, and counting suspend, so a duration on it is the time that passed."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


def finished_usec(c: Container, now: int, boot_now: int | None) -> int:
    """When c's command ended, seen now (wall clock, µs); never before its start.

    With boot_now (the exit was seen while the process was watched, so in the
    boot it started in) it is the start plus how long the command ran on
    CLOCK_BOOTTIME: a wall clock set back or forward meanwhile changes neither
    FinishedUsec - StartedUsec nor its sign. Otherwise it is the wall clock,
    held to no earlier than the start.
    """
    if boot_now is not None and c.started_usec and c.started_boot_usec and boot_now >= c.started_boot_usec:
        return c.started_usec + boot_now - c.started_boot_usec
    return max(now, c.started_usec, c.created_usec)


TTL_EXPIRED = "ttl expired"
# A paused container whose TTL runs out is thawed this long after systemd's
# stop of its scope is due, so the stop's SIGTERM is waiting when it thaws.
TTL_THAW_SLACK_USEC = 500_000
# How long a start may take between asking systemd for the scope and
# recording the container running: an adopted container's scope began at
# most this long before its StartedUsec.
START_SLACK_USEC = 5_000_000


def ttl_expired(c: Container, scope_since: int | None, boot_now: int | None, stopped_by_client: bool) -> bool:
    """Whether c's exit, seen at boot_now, was systemd ending its scope for ttl_sec (RuntimeMaxSec).

    scope_since is when quiltd asked for the scope (CLOCK_BOOTTIME, µs),
    no later than when systemd began counting; None for a container
    adopted from an earlier run of quiltd, whose start is then taken from
    its record. An exit a client asked for (Stop, or Kill with SIGKILL) is
    the client's, whenever it came.
    """
    if (not c.spec.ttl_sec or boot_now is None or stopped_by_client
            or c.state not in (State.RUNNING, State.PAUSED)):
        return False
    if scope_since is None:
        if not c.started_boot_usec:
            return False
        scope_since = c.started_boot_usec - START_SLACK_USEC
    return boot_now - scope_since >= c.spec.ttl_sec * 1_000_000


class Manager:
    def __init__(self, paths: Paths, store: Store, systemd: Scopes, inits: Inits, processes: Processes,
                 networks: Networking, config: Config | None = None, freezer: Freezer | None = None) -> None:
        """The mechanisms come in as interfaces (mechanisms.py): daemon.py passes the real ones."""
        self.paths = paths
        self._config = config or Config()  # none: members get only what needs no setting
        self._store = store
        self._systemd = systemd
        self._inits = inits
        self._processes = processes
        self._networks = networks
        self.freezer = freezer or Freezer(systemd, SLICE)
        self._ttl_thaws: dict[str, asyncio.TimerHandle] = {}  # paused containers with a TTL running out
        self._listeners: list[Listener] = [self._networks]
        self._locks: dict[str, asyncio.Lock] = {}
        self._pidfds: dict[str, int] = {}
        self._killed_with: dict[str, int] = {}  # signals that end init itself, for the exit code
        self._scope_since: dict[str, int] = {}  # CLOCK_BOOTTIME µs when each running scope was asked for
        self._exit_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_starts: dict[str, asyncio.Task[None]] = {}  # starts not yet settled
        self.cleaner = Cleaner(store, systemd, now_usec)
        self.layers_store = LayerStore(paths.images / "layers")
        self._run_containers = str(paths.run_containers)  # joined as a string by status calls
        self._host_image: Image | None = None
        self.volumes = volumes.Volumes(store, paths, self.cleaner, now_usec)
        self._progress_listeners: list[Callable[[str, int, int], None]] = []
        self.commits = CommitQueue()  # state changes with no caller to fail to: retried until they commit
        self._starts = FairTurns(START_TURNS, MAX_WAITING_STARTS)
        self.pools = pool.WarmPools(store, self._make_pool_member, self._discard_pool_member,
                                    lambda: self._starts.waiting > 0)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_import_progress_listener(self, listener: Callable[[str, int, int], None]) -> None:
        """Called on the event loop with (image name, bytes read, bytes in total) during imports."""
        self._progress_listeners.append(listener)

    # Queries

    def get(self, ref: str) -> Container:
        c = self._store.find_container(ref)
        if c is None or c.pool:  # a warm pool's member is no one's container until claimed
            raise NoSuchContainer(f"no container {ref!r}")
        return c

    def list_containers(self, wanted: ContainerFilter) -> list[ContainerListing]:
        listings = self._store.list_container_listings(wanted.state, wanted.name, wanted.image)
        labels = dict(wanted.labels)
        if not labels:
            return listings
        # Labels are in the spec: only then is it read, for the rows left.
        matching = {c.id for c in map(self._store.find_container, (item.id for item in listings))
                    if c is not None and set(labels.items()) <= set(c.spec.labels)}
        return [item for item in listings if item.id in matching]

    def containers(self) -> list[Container]:
        """Every container on record, whole (not the warm pools' unclaimed members)."""
        return [c for c in self._store.list_containers() if not c.pool]

    async def info(self, ref: str) -> ContainerInfo:
        c = self.get(ref)
        return ContainerInfo(c, await self.usage(c), self._networks.address(c.id), self.log_lines_dropped(c))

    def log_lines_dropped(self, c: Container) -> int:
        """What the container's init counted in its file (see journalstream); 0 before any start."""
        # os.open and os.read on a joined string: a status call reads this,
        # and Python's file objects and paths cost more than the read.
        try:
            path = os.path.join(self._run_containers, c.id, LOG_DROPPED_FILE)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            return int(os.read(fd, 64) or b"0")
        except (OSError, ValueError):
            return 0
        finally:
            os.close(fd)

    def ip_address(self, container_id: str) -> str:
        return self._networks.address(container_id)

    async def usage(self, c: Container) -> Usage | None:
        if c.state not in (State.RUNNING, State.STOPPING, State.PAUSED):
            return None
        try:
            return await self._systemd.usage(c.unit)
        except Internal:
            return None  # the scope went away between the two reads

    def system_info(self) -> SystemInfo:
        pools = self.pools.states()
        return SystemInfo(
            version=__version__,
            containers_by_state=self.counts(),
            images=len(self._store.list_images()),
            state_dir=str(self.paths.state_dir),
            run_dir=str(self.paths.run_dir),
            kernel=platform.release(),
            starts_running=self._starts.running, starts_waiting=self._starts.waiting,
            start_turns=self._starts.limit, max_waiting_starts=self._starts.max_waiting,
            warm_pool_size=sum(p.pool.size for p in pools), warm_pool_ready=sum(p.ready for p in pools),
            freezer=self.freezer.kind.value,
            capacity=capacity(*self._store.claimed_limits(CLAIMING)),
        )

    def counts(self) -> dict[str, int]:
        # Counted by SQLite: STATUS= is refreshed on every change, and loading
        # every row for it made each create slower as containers piled up.
        return {s.value: 0 for s in State} | self._store.count_by_state()

    # Life cycle

    async def create(
        self, name: str, image_name: str, command: list[str], request: CreateOptions, *,
        caller: Credentials,
    ) -> Container:
        options.check_name(name)
        options.check_image_name(image_name)
        if command:
            options.check_command(command)
        start = request.start
        spec = replace(request.spec, hostname=request.spec.hostname or name, creator_uid=caller.uid)
        mountopts.check_sources(spec.mounts, self._source_policy(caller.uid, host_image=False))
        image = self._find_image(image_name)
        self._check_host_image(image, caller.uid)
        if spec.network != networks.NONE:
            self._networks.find(spec.network)
        argv, spec = imagedefaults.apply(image.config, command, request, spec)
        self._check_name_free(name)
        c = Container(
            id=secrets.token_hex(8), name=name, image=image.name, image_id=image.id,
            command=argv, spec=spec, created_usec=now_usec(),
        )
        self._networks.check_published(c)
        if start:
            member = self.pools.claim(image.name, pool.profile(spec))
            if member is not None:
                return self._claimed(c, member)  # takes no start turn: served even when they are all taken
            self._starts.check_room("starts")
        volume_names = [n for n, _, _ in spec.volumes]
        made = self.volumes.ensure(volume_names)
        # Committed as starting, with its address and its user namespace
        # range, before the reply: a daemon killed right after answering
        # resumes this start when it comes back. One transaction, so a
        # failed lease leaves no row and no range taken.
        try:
            with self._store.transaction():
                if spec.userns:
                    c = replace(c, userns_base=self._free_userns_base())
                starting = replace(c, state=State.STARTING) if start else None
                self._store.insert_container(c)
                self.volumes.attach(c.id, volume_names)
                if starting is not None:
                    self._store.update_container(starting)
                    self._networks.take_lease(starting)
        except sqlite3.IntegrityError as e:
            self.volumes.undo(made)
            self._check_name_free(name)
            raise NameTaken(f"a container named {name!r} exists already") from e
        except BaseException:
            self.volumes.undo(made)
            raise
        return self.announce_created(c, starting)

    def announce_created(self, c: Container, starting: Container | None) -> Container:
        """Tells the listeners of a container just committed (and of its start, if it starts), and
        starts it in the background. Its current record."""
        for listener in self._listeners:
            listener.container_added(c)
        if starting is None:
            return c
        for listener in self._listeners:
            listener.container_changed(starting, c)
        self._start_in_background(starting, resume=False)
        return starting

    def _claimed(self, c: Container, member: pool.Ready) -> Container:
        """c made from a warm pool's member: its row becomes c's, and the init is sent c's command.

        From here on it is what a cold create makes: the same row, the same
        events (added as created, then starting), the same start settled in
        the background; only what the start had to make is made already.
        """
        row = self._store.find_container(member.container_id)
        assert row is not None and row.pool  # rows of ready members go only with the member
        claimed = replace(c, id=row.id, userns_base=row.userns_base, state=State.STARTING, pid=row.pid,
                          pid_starttime=row.pid_starttime)
        try:
            with self._store.transaction():
                self._store.claim_container(claimed)
        except sqlite3.IntegrityError as e:
            self.pools.give_back(row.pool, member)
            self._check_name_free(c.name)
            raise NameTaken(f"a container named {c.name!r} exists already") from e
        except BaseException:
            self.pools.give_back(row.pool, member)
            raise
        # Sent as soon as the claim is on record: the init starts the command
        # while the events and the reply go out.
        self._inits.send_go(member.launched, launchspec.claim(
            c.name, c.spec.hostname, c.command, c.spec.env, c.spec.workdir, c.spec.user,
            c.spec.log_rate_burst, c.spec.log_rate_interval_sec))
        created = replace(claimed, state=State.CREATED, pid=0, pid_starttime=0)
        for listener in self._listeners:
            listener.container_added(created)
        for listener in self._listeners:
            listener.container_changed(claimed, created)
        self._track_start(claimed.id, self._background(
            self._locked(claimed.id, lambda: self._confirm_claim(claimed, member.launched))))
        return claimed

    async def _confirm_claim(self, c: Container, launched: Launched) -> Container:
        try:
            failure = await self._inits.confirm(launched)
        except Exception as e:
            return await self._start_failed(c, launched, e)
        return await self._started(c, launched, failure)

    def _check_name_free(self, name: str) -> None:
        # The id is in the message: a client whose create got no answer (the
        # daemon was killed meanwhile) retries with the same name and learns
        # from this which container its first call made (docs/api.md).
        taken = self._store.container_named(name)
        if taken is not None:
            raise NameTaken(f"a container named {name!r} exists already: id {taken}")

    async def start(self, ref: str) -> Container:
        c = self.get(ref)
        async with self._lock(c.id):
            c = self.get(c.id)
            if c.state not in (State.CREATED, State.EXITED, State.FAILED):
                raise InvalidState(f"container {c.name} is {c.state.value}; only created or ended "
                                   "containers can be started")
            self._starts.check_room("starts")
            c = self._transition(c, state=State.STARTING, reason="", exit_code=NO_EXIT_CODE,
                                 _with=self._networks.take_lease)
            c = await self._run_start(c.id) or c
        if c.state == State.FAILED:
            raise StartFailed(f"container {c.name} failed to start: {c.reason}")
        return c

    async def _run_start(self, container_id: str) -> Container | None:
        """Brings a container in state starting to running, or to failed with a reason.

        None when the start was overtaken: the container was removed first.
        """
        c = self._store.find_container(container_id)
        if c is None or c.state != State.STARTING:
            return c
        async with self._starts.turn(c.spec.creator_uid):
            return await self._start_now(container_id)

    async def _start_now(self, container_id: str) -> Container | None:
        c = self._store.find_container(container_id)
        if c is None or c.state != State.STARTING:
            return c  # removed, or its start overtaken, while it waited for its turn
        launched: Launched | None = None
        try:
            image = self._find_image(c.image)
            spec = self._launch_spec(c, image)
            self.paths.exit_file(c.id).unlink(missing_ok=True)
            launched = await self._inits.launch()
            # The scope and the veth are made at the same time; init builds
            # the root once it is in the scope (IN), so what that costs in
            # memory is the container's, then runs the command (GO).
            self._inits.send_spec(launched, spec)
            self._scope_since[c.id] = boot_usec()
            scope, veth = await asyncio.gather(
                self._systemd.start_scope(
                    c.unit, launched.pid,
                    ScopeLimits(c.spec.memory_max, c.spec.cpu_quota, c.spec.tasks_max,
                                c.spec.ttl_sec or None),
                    f"Quilt container {c.name}",
                ),
                self._networks.attach(c, launched.pid),
                return_exceptions=True,
            )
            for result in (scope, veth):
                if isinstance(result, BaseException):
                    raise result
            c = self._transition(c, pid=launched.pid, pid_starttime=launched.starttime)
            self._inits.send_in(launched)
            self._inits.send_go(launched)
            failure = await self._inits.confirm(launched)
        except Exception as e:
            return await self._start_failed(c, launched, e)
        return await self._started(c, launched, failure)

    async def _start_failed(self, c: Container, launched: Launched | None, e: Exception) -> Container:
        self._scope_since.pop(c.id, None)
        if launched is not None:
            launched.close()  # init reads end of file instead of a spec and exits
            with contextlib.suppress(Internal):
                await self._systemd.stop(c.unit)
            with contextlib.suppress(Internal):
                await self._networks.detach(c)
        log.exception("starting container %s failed", c.name, exc_info=e)
        return self._settle(c, state=State.FAILED, reason=str(e), pid=0, pid_starttime=0,
                            finished_usec=finished_usec(c, now_usec(), None))

    async def _started(self, c: Container, launched: Launched, failure: Failure | None) -> Container:
        """The end of a start, once init has answered GO: the command runs, or the start failed."""
        if failure:
            self._scope_since.pop(c.id, None)
            os.close(launched.pidfd)
            return self._settle(c, state=State.FAILED, reason=failure.message, pid=0,
                                pid_starttime=0, exit_code=127,
                                finished_usec=finished_usec(c, now_usec(), None))
        c = self._settle(c, state=State.RUNNING, started_usec=max(now_usec(), c.created_usec),
                         started_boot_usec=boot_usec(), finished_usec=0)
        self._watch(c, launched.pidfd)  # an exit seen before the commit queues behind it
        return c

    def _settle(self, c: Container, **changes: object) -> Container:
        """The last change of a start: committed now, or retried until it is (retries.py)."""
        new = replace(c, **changes)  # type: ignore[arg-type]

        def commit() -> None:
            row = self._store.find_container(c.id)
            if row is not None and row.state == c.state:  # not removed or overtaken meanwhile
                self._transition(row, **changes)  # type: ignore[arg-type]

        self.commits.run(f"container {c.name} {new.state.value}", commit)
        return new

    async def _resume_start(self, c: Container) -> Container | None:
        # The scope of the interrupted attempt may linger for a moment, and
        # its name is the one this start needs.
        with contextlib.suppress(Internal):
            await self._systemd.stop(c.unit)
        return await self._run_start(c.id)

    def _launch_spec(self, c: Container, image: Image) -> LaunchSpec:
        # Checked again at each start: the administrator may have taken back
        # what the container was created with.
        self._check_host_image(image, c.spec.creator_uid)
        layer = self.paths.container_dir(c.id)
        # With disk_max the writable layer is on a tmpfs init mounts over
        # "disk" in the container's own mount namespace: nothing of it is on
        # the host's disk, and it ends with the container.
        writable = layer / "disk" if c.spec.disk_max else layer
        for sub in ("disk", "rootfs") if c.spec.disk_max else ("upper", "work", "rootfs"):
            (layer / sub).mkdir(parents=True, exist_ok=True)
        self.paths.container_run_dir(c.id).mkdir(parents=True, exist_ok=True)
        spec = LaunchSpec(
            container_id=c.id, name=c.name, hostname=c.spec.hostname, command=c.command,
            env=c.spec.env, workdir=c.spec.workdir, lowerdir=self._lowerdir(c, image),
            upperdir=str(writable / "upper"), overlay_workdir=str(writable / "work"),
            disk_dir=str(writable) if c.spec.disk_max else "", disk_max=c.spec.disk_max or 0,
            user=c.spec.user,
            rootfs=str(layer / "rootfs"), exit_path=str(self.paths.exit_file(c.id)),
            journal_socket=JOURNAL_SOCKET,
            binds=(hostimage.binds() if image.id == hostimage.IMAGE_ID else ()) + c.spec.mounts,
            volume_binds=self._volume_binds(c),
            tmpfs=c.spec.tmpfs, userns_base=c.userns_base, nested_userns=c.spec.nested_userns,
            bind_policy=self._source_policy(c.spec.creator_uid, image.id == hostimage.IMAGE_ID),
            log_rate_burst=c.spec.log_rate_burst, log_rate_interval_sec=c.spec.log_rate_interval_sec,
        )
        net = self._networks.attachment(c)
        if net is None:
            return spec
        return replace(spec, net_ifname=net.ifname, net_interface=net.interface, net_gateway=net.gateway,
                       hosts_file=net.hosts_file, resolv_file=net.resolv_file)

    def _lowerdir(self, c: Container, image: Image) -> str:
        """The overlay's lower layers, top first: what forks froze of c's writes, then its image."""
        frozen = self._store.container_layers(c.id)
        return ":".join([*(str(self.layers_store.path(d)) for d in frozen), image.path])

    def _source_policy(self, creator_uid: int, host_image: bool) -> mounts.SourcePolicy:
        """Where the binds of a container made by creator_uid may come from (see mounts.SourcePolicy)."""
        forbidden = (str(self.paths.state_dir), str(self.paths.run_dir))
        if creator_uid == 0:
            return mounts.SourcePolicy(forbidden, None)
        # The host image's own binds (/usr and the like) are quiltd's choice,
        # not the member's, and were allowed by _check_host_image.
        extra = tuple(source for source, _, _ in hostimage.binds()) if host_image else ()
        return mounts.SourcePolicy(forbidden, self._config.member_mount_roots + extra)

    def _check_host_image(self, image: Image, creator_uid: int) -> None:
        if image.id != hostimage.IMAGE_ID or creator_uid == 0 or self._config.member_host_image:
            return
        raise AccessDenied(f"uid {creator_uid} may not use the image {hostimage.NAME!r}: it shows the "
                           "host's /usr to the container; only root may, unless the administrator sets "
                           "host_image = yes in [members] of /etc/quilt/quiltd.conf")

    def _free_userns_base(self) -> int:
        base = userns.free_base(self._store.userns_bases())
        if base is None:
            raise LimitExceeded("every user namespace range is in use: remove a container made with userns")
        return base

    def _volume_binds(self, c: Container) -> tuple[tuple[str, str, bool], ...]:
        # Made again if someone removed the directory by hand: a volume is
        # on record for as long as a container names it.
        self.volumes.ensure(n for n, _, _ in c.spec.volumes)
        return tuple((self.volumes.path(n), target, ro) for n, target, ro in c.spec.volumes)

    def layers(self, c: Container) -> LaunchSpec:
        """What a start would mount for c (its layers, binds and tmpfs), for work on a stopped container."""
        return self._launch_spec(c, self._find_image(c.image))

    def container_lock(self, container_id: str) -> asyncio.Lock:
        """Held by start, stop and remove; work on a stopped container's layers holds it too."""
        return self._lock(container_id)

    async def go_in_scope(self, c: Container, unit: str, pid: int, go_fd: int,
                          answer_fd: int) -> Frame | None:
        """Lets a child of the fork server go and returns its answer; takes go_fd and answer_fd over.

        The child is moved into unit first (c's scope; "" leaves it where it
        is), so its cgroup and limits are the container's before it does
        anything. End of file without GO stops it. None: it ended without
        an answer.
        """
        try:
            if unit:
                await self._systemd.attach(unit, pid)
        except BaseException as e:
            os.close(go_fd)
            os.close(answer_fd)
            if isinstance(e, Internal) and self.get(c.id).state != State.RUNNING:
                raise InvalidState(f"container {c.name} is not running") from e
            raise
        try:
            let_go(go_fd)
        except BaseException:
            os.close(answer_fd)
            raise
        return await read_answer(answer_fd)

    def _watch(self, c: Container, pidfd: int) -> None:
        self._pidfds[c.id] = pidfd
        self._processes.watch_exit(pidfd, lambda: self._on_exit(c.id, boot_usec()))

    def _on_exit(self, container_id: str, boot_now: int | None) -> None:
        """The command ended; boot_now if it was seen ending, None if it was found gone."""
        self._pidfds.pop(container_id, None)
        c = self._store.find_container(container_id)
        if c is None or not c.state.is_active:
            return
        # Read once: the record of the exit must not change between retries.
        by_client = c.id in self._killed_with
        code, reason = self._exit_status(c)
        if ttl_expired(c, self._scope_since.pop(container_id, None), boot_now, by_client):
            reason = TTL_EXPIRED
        finished = finished_usec(c, now_usec(), boot_now)
        self.commits.run(f"the exit of container {c.name}",
                         lambda: self._record_exit(container_id, code, reason, finished))

    def _record_exit(self, container_id: str, code: int, reason: str, finished_usec: int) -> None:
        c = self._store.find_container(container_id)
        if c is None or not c.state.is_active:
            return
        c = self._transition(c, state=State.EXITED, exit_code=code, reason=reason, pid=0,
                             pid_starttime=0, finished_usec=finished_usec)
        self._disarm_ttl_thaw(container_id)
        with contextlib.suppress(Internal):
            self.freezer.forget(c.unit)
        for waiter in self._exit_waiters.pop(container_id, []):
            if not waiter.done():
                waiter.set_result(None)
        if c.spec.auto_remove:
            self._background(self.remove(c.id, force=True))

    def _exit_status(self, c: Container) -> tuple[int, str]:
        """The command's exit code as init recorded it, or how init itself was ended."""
        try:
            return int(self.paths.exit_file(c.id).read_text()), ""
        except (FileNotFoundError, ValueError):
            pass
        signum = self._killed_with.pop(c.id, signal.SIGKILL)
        return 128 + signum, f"killed by {signal.Signals(signum).name}"

    async def stop(self, ref: str, timeout_sec: int) -> Container:
        c = self.get(ref)
        await self._start_settled(c.id)
        async with self._lock(c.id):
            c = self.get(c.id)
            if not c.state.is_active:
                return c  # already stopped: stopping is idempotent, as in podman
            if c.state == State.PAUSED:
                # A frozen process does not act on SIGTERM: the stop thaws
                # it, and the command gets its SIGTERM as usual.
                await self._thaw_for_end(c)
                c = self.get(c.id)
                if not c.state.is_active:
                    return c
            c = self._transition(c, state=State.STOPPING)
            self._signal_init(c, signal.SIGTERM)
            if not await self._wait_exit(c.id, timeout_sec):
                await self._kill_scope(c)
                await self._wait_exit(c.id, None)
        return self.get(c.id)

    async def kill(self, ref: str, signum: int) -> None:
        if not 1 <= signum <= signal.SIGRTMAX:
            raise InvalidArgument(f"invalid signal number {signum}")
        c = self.get(ref)
        if c.state not in (State.RUNNING, State.STOPPING, State.PAUSED):
            raise InvalidState(f"container {c.name} is {c.state.value}, not running")
        if signum == signal.SIGKILL:
            await self._kill_scope(c)
        elif signum in (signal.SIGSTOP, signal.SIGCONT):
            # Init cannot catch SIGSTOP, and a stopped init cannot pass SIGCONT
            # on: both go to every process of the scope.
            with contextlib.suppress(Internal):
                await self._systemd.kill(c.unit, signum)
        else:
            self._signal_init(c, signum)

    def _signal_init(self, c: Container, signum: int) -> None:
        """Sends signum to init, which passes it on to the command."""
        pidfd = self._pidfds.get(c.id)
        if pidfd is not None:
            self._processes.send_signal(pidfd, signum)

    async def _kill_scope(self, c: Container) -> None:
        self._killed_with[c.id] = signal.SIGKILL
        with contextlib.suppress(Internal):
            await self._systemd.kill(c.unit, signal.SIGKILL)
        now = self._store.find_container(c.id)
        if now is not None and now.state == State.PAUSED:
            # The v1 freezer holds even SIGKILL until the thaw; thawed with
            # the SIGKILL pending, no process runs another instruction of its own.
            await self._thaw_for_end(c)

    # Pause and resume

    async def pause(self, ref: str) -> Container:
        """Freezes every process of a running container; its state becomes paused."""
        c = self.get(ref)
        await self._start_settled(c.id)
        async with self._lock(c.id):
            c = self.get(c.id)
            if c.state != State.RUNNING:
                raise InvalidState(f"container {c.name} is {c.state.value}; only a running container "
                                   "can be paused")
            if self.freezer.kind == FreezerKind.NONE:
                raise InvalidState("this host has no cgroup freezer (neither cgroup v2 nor the v1 "
                                   "freezer controller is mounted): containers cannot be paused")
            try:
                await self.freezer.freeze(c.unit)
            except Internal:
                if self.get(c.id).state != State.RUNNING:
                    raise InvalidState(f"container {c.name} ended while it was being paused") from None
                raise
            # Read again: an exit recorded meanwhile must not be overwritten.
            c = self.get(c.id)
            try:
                if c.state != State.RUNNING:
                    raise InvalidState(f"container {c.name} ended while it was being paused")
                c = self._transition(c, state=State.PAUSED)
            except BaseException:
                with contextlib.suppress(Internal):
                    await self.freezer.thaw(c.unit)  # not recorded: left running, as the caller is told
                raise
            self._arm_ttl_thaw(c)
        return c

    async def resume(self, ref: str) -> Container:
        """Thaws a paused container; its state becomes running again."""
        c = self.get(ref)
        async with self._lock(c.id):
            c = self.get(c.id)
            if c.state != State.PAUSED:
                raise InvalidState(f"container {c.name} is {c.state.value}, not paused")
            await self.freezer.thaw(c.unit)
            self._disarm_ttl_thaw(c.id)
            c = self.get(c.id)
            if c.state == State.PAUSED:
                c = self._transition(c, state=State.RUNNING)
        return c

    async def _thaw_for_end(self, c: Container) -> None:
        """Thaws a paused container that is being ended; running again on record, as it now is."""
        with contextlib.suppress(Internal):
            await self.freezer.thaw(c.unit)
        self._disarm_ttl_thaw(c.id)
        now = self._store.find_container(c.id)
        if now is not None and now.state == State.PAUSED:
            self._transition(now, state=State.RUNNING)

    def _arm_ttl_thaw(self, c: Container) -> None:
        """With a TTL, a paused container is thawed when it runs out, so systemd's stop can end it.

        The TTL is the scope's RuntimeMaxSec, and systemd keeps counting
        while the container is paused. Its SIGTERM reaches frozen processes
        only once they are thawed; so the thaw comes a little after it.
        """
        if not c.spec.ttl_sec or not c.started_boot_usec:
            return
        due = c.started_boot_usec + c.spec.ttl_sec * 1_000_000 + TTL_THAW_SLACK_USEC
        delay = max(0.0, (due - boot_usec()) / 1e6)
        self._disarm_ttl_thaw(c.id)
        self._ttl_thaws[c.id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._background(self._ttl_thaw(c.id)))

    def _disarm_ttl_thaw(self, container_id: str) -> None:
        handle = self._ttl_thaws.pop(container_id, None)
        if handle is not None:
            handle.cancel()

    async def _ttl_thaw(self, container_id: str) -> None:
        self._ttl_thaws.pop(container_id, None)
        c = self._store.find_container(container_id)
        if c is None or c.state != State.PAUSED:
            return
        async with self._lock(container_id):
            c = self.get(container_id)
            if c.state == State.PAUSED:
                log.info("container %s: its TTL ran out while paused; thawed so that it ends", c.name)
                await self._thaw_for_end(c)

    async def _wait_exit(self, container_id: str, timeout: float | None) -> bool:
        c = self.get(container_id)
        if not c.state.is_active:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._exit_waiters.setdefault(container_id, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_started(self, ref: str, timeout_usec: int) -> Container:
        """Waits until the container is no longer starting; timeout 0 waits as long as it takes."""
        c = self.get(ref)
        if c.state == State.CREATED:
            raise InvalidState(f"container {c.name} was never started")
        if c.state == State.STARTING:
            limit = timeout_usec / 1e6 if timeout_usec else None
            try:
                await asyncio.wait_for(self._start_settled(c.id), limit)
            except asyncio.TimeoutError:
                raise Timeout(f"container {c.name} still starting after {timeout_usec} µs") from None
        return self.get(c.id)

    async def wait(self, ref: str, timeout_usec: int) -> Container:
        """Waits until the container has ended; timeout 0 waits as long as it takes."""
        c = self.get(ref)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_usec / 1e6 if timeout_usec else None
        while not c.state.is_final:
            if c.state == State.CREATED:
                raise InvalidState(f"container {c.name} was never started")
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if c.state == State.STARTING:
                # No process to wait on yet: wait for the start to settle.
                try:
                    await asyncio.wait_for(self._start_settled(c.id), left)
                except asyncio.TimeoutError:
                    left = 0.0
            if left == 0.0 or (c.state != State.STARTING and not await self._wait_exit(c.id, left)):
                raise Timeout(f"container {c.name} still {self.get(c.id).state.value} after "
                              f"{timeout_usec} µs")
            c = self.get(c.id)
        return c

    def _start_in_background(self, c: Container, resume: bool) -> None:
        work = self._resume_start(c) if resume else self._run_start(c.id)
        self._track_start(c.id, self._background(self._locked(c.id, lambda: work)))

    def _track_start(self, container_id: str, task: asyncio.Task[None]) -> None:
        self._pending_starts[container_id] = task
        task.add_done_callback(lambda _: self._pending_starts.pop(container_id, None))

    async def _start_settled(self, container_id: str) -> None:
        """Returns once a start begun in the background has ended, one way or the other."""
        task = self._pending_starts.get(container_id)
        if task is not None:
            await asyncio.shield(task)

    async def remove(self, ref: str, force: bool) -> None:
        c = self.get(ref)
        await self._start_settled(c.id)
        async with self._lock(c.id):
            c = self.get(c.id)
            if c.state.is_active:
                if not force:
                    raise InvalidState(f"container {c.name} is {c.state.value}; stop it first or "
                                       "remove with force")
                await self._kill_scope(c)
                await self._wait_exit(c.id, None)
            # Its veth goes with its namespace (a stray one a little later).
            self._networks.release(c)
            # The row goes and what is left to undo is recorded in one
            # transaction; the cleaner undoes it now, or later if it must.
            # A container never started has nothing to undo: a start commits
            # `starting` before it makes a scope or a directory.
            with contextlib.suppress(Internal):
                self.freezer.forget(c.unit)  # its processes are gone by now
            with self._store.transaction():
                self._store.delete_container(c.id)
                leftovers = [] if c.state == State.CREATED else self._queue_container_leftovers(c.id)
                # The last container stacking a layer a fork froze takes it along.
                leftovers += self._retire_unused_layers()
            if leftovers:
                await self.cleaner.now(leftovers)
            with contextlib.suppress(Internal):
                await self._networks.forget(c)
        self._locks.pop(c.id, None)
        for listener in self._listeners:
            listener.container_removed(c)

    def _queue_container_leftovers(self, container_id: str) -> list[int]:
        return [
            self._store.add_cleanup(CleanupKind.SCOPE, scope_unit(container_id)),
            self._store.add_cleanup(CleanupKind.TREE, str(self.paths.container_dir(container_id))),
            self._store.add_cleanup(CleanupKind.TREE, str(self.paths.container_run_dir(container_id))),
        ]

    def cleanup_status(self) -> list[CleanupTask]:
        return self.cleaner.status()

    # Images

    def _host(self) -> Image:
        """The built-in image, written on first use after each daemon start."""
        if self._host_image is None:
            self._host_image = hostimage.prepare(self.paths.images)
        return self._host_image

    def _find_image(self, name: str) -> Image:
        if name == hostimage.NAME:
            return self._host()
        image = self._store.find_image(name)
        if image is None:
            raise NoSuchImage(f"no image {name!r}")
        return image

    async def import_image(self, name: str, source: str, request: ImportOptions, *,
                           caller: Credentials) -> ImportResult:
        """Imports the file or layout directory at source, opened with the caller's credentials.

        A `docker://`, `oci-archive:` or `docker-archive:` source is a pull (see pull.py).
        """
        pulled = pull.parse_source(source)
        if pulled is not None:
            return await self._pull(name, pulled, request, caller)
        if request.timeout_sec is not None:
            raise InvalidArgument("the option timeout_sec is a pull's: only a docker:// source takes it")
        import_options = self._check_import(name, request)
        if not source.startswith("/"):
            raise InvalidArgument(f"the image source must be an absolute path, got {source!r}")
        loop = asyncio.get_running_loop()
        # O_NONBLOCK so a FIFO planted at the path cannot hang the open.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = await loop.run_in_executor(None, callerfiles.open_as, caller, callerfiles.AT_FDCWD,
                                            source, flags)
        except FileNotFoundError:
            raise InvalidImage(f"{source}: no such file") from None
        except PermissionError as e:
            raise AccessDenied(f"{caller} may not read {source}: {e.strerror}; quiltd opens an image "
                               "with its caller's permissions") from None
        except OSError as e:
            raise InvalidImage(f"{source}: cannot open: {e.strerror}") from None
        return await self._import(name, fd, source, import_options, caller)

    async def import_image_fd(self, name: str, fd: int, request: ImportOptions, *,
                              caller: Credentials) -> ImportResult:
        """Imports the file or layout directory the caller opened; takes fd over."""
        try:
            if request.timeout_sec is not None:
                raise InvalidArgument("the option timeout_sec is a pull's: only a docker:// source takes it")
            import_options = self._check_import(name, request)
            fdcheck.check_source(fd, "the image")
        except BaseException:
            os.close(fd)
            raise
        return await self._import(name, fd, _describe_fd(fd), import_options, caller)

    async def _pull(self, name: str, source: pull.PullSource, request: ImportOptions,
                    caller: Credentials) -> ImportResult:
        timeout_sec = pull.DEFAULT_TIMEOUT_SEC if request.timeout_sec is None else request.timeout_sec
        if source.transport is not pull.Transport.DOCKER:
            # A local archive: the path import, which opens it with the caller's permissions.
            if source.ref is not None:
                if request.ref is not None:
                    raise InvalidArgument(f"{source} names its image already; leave out the option ref")
                request = replace(request, ref=source.ref)
            return await self.import_image(name, source.reference, replace(request, timeout_sec=None),
                                           caller=caller)
        if request.ref is not None:
            raise InvalidArgument("the option ref picks an image of an archive; a docker:// source "
                                  "names its image itself")
        import_options = self._check_import(name, request)
        work = pull.pulls_dir(self.paths.state_dir) / secrets.token_hex(IMPORT_DIR_BYTES)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._import_progress, name, done, total)

        try:
            layout = await loop.run_in_executor(None, pull.copy, source, work, timeout_sec,
                                                import_options.limits.max_bytes, progress)
            fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # The layout is the daemon's own: its files are opened as root, not as the caller.
            return await self._import(name, fd, str(source), import_options, pull.ROOT)
        finally:
            await loop.run_in_executor(None, pull.remove, work)

    def _check_import(self, name: str, request: ImportOptions) -> imageimport.ImportOptions:
        options.check_image_name(name)
        limits = extract.ImageLimits(max_bytes=request.max_bytes)
        import_options = imageimport.ImportOptions(limits, request.ref)
        if name == hostimage.NAME:
            raise InvalidArgument(f"the image name {name!r} is reserved for the built-in host image")
        if self._store.find_image(name) is not None:
            raise NameTaken(f"an image named {name!r} exists already")
        return import_options

    async def _import(self, name: str, fd: int, label: str, import_options: imageimport.ImportOptions,
                      caller: Credentials) -> ImportResult:
        """Imports from fd (taken over); the files of a layout directory are opened as caller."""
        dest = self.paths.images / secrets.token_hex(IMPORT_DIR_BYTES)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._import_progress, name, done, total)

        store = self.layers_store
        # overlayfs splits its lowerdir option at ':' and ','; a state dir
        # holding either keeps every image in one directory, as before.
        committed: list[str] = []
        stacked = None if any(c in str(store.root) for c in ":,") else \
            imageimport.Layers(store, self._store.layer_sizes(), committed)
        try:
            imported = await loop.run_in_executor(None, imageimport.run, fd, label, dest,
                                                  import_options.limits, progress, import_options.ref,
                                                  callerfiles.opener(caller), stacked)
        except BaseException:
            # Its pins are released: what it stored and no image recorded goes.
            await self._retire_unrecorded(committed)
            raise
        diff_ids = tuple(layer.diff_id for layer in imported.layers)
        path = ":".join(str(store.path(d)) for d in reversed(diff_ids)) if diff_ids else str(dest)
        image = Image(name=name, id=imported.image_id, path=path, size_bytes=imported.size_bytes,
                      created_usec=now_usec(), config=imported.config, layers=diff_ids)
        try:
            with self._store.transaction():
                self._store.insert_image(image, tuple((x.diff_id, x.size_bytes) for x in imported.layers))
        except sqlite3.IntegrityError as e:
            if diff_ids:
                store.unpin(imported.pinned)
                await self._retire_unrecorded([x.diff_id for x in imported.layers if x.new])
            else:
                remove_path(dest)
            raise NameTaken(f"an image named {name!r} exists already") from e
        store.unpin(imported.pinned)
        # The skipped nodes are worth a line: an image that needs one at run
        # time (a tool opening /dev/something unusual) fails there, not here.
        log.info("imported image %s (%s, %s), %d bytes; %d device node(s) in it skipped",
                 name, imported.kind, image.id, image.size_bytes, imported.skipped_devices,
                 extra={"QUILT_IMAGE": name, "QUILT_IMAGE_ID": image.id,
                        "QUILT_SKIPPED_DEVICES": str(imported.skipped_devices)})
        return ImportResult(image, imported.kind, imported.skipped_devices)

    def _import_progress(self, name: str, done: int, total: int) -> None:
        for listener in self._progress_listeners:
            listener(name, done, total)

    async def export_image(self, name: str, fd: int, fmt: str) -> imageexport.Exported:
        """Writes the image as an OCI archive or a docker-archive to fd; takes fd over."""
        try:
            archive_format = imageexport.parse_format(fmt)
            fdcheck.check(fd, writable=True, what="the archive")
            if name == hostimage.NAME:
                raise InvalidArgument("the built-in image 'host' is the host's own root: "
                                      "it cannot be exported")
            image = self._find_image(name)
            # Pinned, its layers stay while they are read, whatever RemoveImage does meanwhile.
            for diff_id in image.layers:
                self.layers_store.pin(diff_id)
            try:
                return await asyncio.to_thread(imageexport.write, image, archive_format, fd)
            finally:
                self.layers_store.unpin(image.layers)
        finally:
            os.close(fd)

    def list_images(self) -> list[Image]:
        return [self._host(), *self._store.list_images()]

    async def remove_image(self, name: str, request: RemoveImageOptions | None = None) -> None:
        """Removes an image; with force, first the ended containers that use it."""
        force = request is not None and request.force
        if name == hostimage.NAME:
            raise InvalidArgument(f"the image {name!r} is built in and cannot be removed")
        image = self._find_image(name)
        pools = self.pools.uses_image(name)
        if pools:
            raise InvalidState(f"image {name!r} has {len(pools)} warm pool(s): set their size to 0 first "
                               "(SetWarmPool)")
        users = self._store.containers_using_image(name)
        if users and force:
            # Running containers have the image as their lower layer: never
            # pulled from under them, force or not.
            active = [c.name for c in map(self.get, users) if c.state.is_active]
            if active:
                raise InvalidState(f"image {name!r} is used by active container(s) {', '.join(active)}; "
                                   "stop them first")
            for user in users:
                await self.remove(user, force=False)
            users = self._store.containers_using_image(name)
        if users:
            raise InvalidState(f"image {name!r} is used by container(s) {', '.join(users)}")
        derived = self._store.images_based_on(name)
        if derived:
            raise InvalidState(f"image {name!r} is the base of image(s) {', '.join(derived)}, "
                               "committed over it: remove those first")
        with self._store.transaction():
            self._store.delete_image(name)
            if image.layers:
                leftovers = self._retire_unused_layers()
            else:
                leftovers = [self._store.add_cleanup(CleanupKind.TREE, image.path)]
        await self.cleaner.now(leftovers)

    def _retire_unused_layers(self) -> list[int]:
        """Hands layers no image stacks any more to the cleaner; in the caller's transaction.

        A layer an import has just found and pinned stays: that image will use it.
        """
        tasks = []
        for diff_id in self._store.unused_layers():
            gone = self.layers_store.retire(diff_id)
            if gone is not None:
                self._store.delete_layer(diff_id)
                tasks.append(self._store.add_cleanup(CleanupKind.TREE, str(gone)))
        return tasks

    async def _retire_unrecorded(self, diff_ids: list[str]) -> None:
        """Removes layers an import stored but could not record, unless on record meanwhile."""
        if not diff_ids:
            return
        recorded = self._store.layer_sizes()
        tasks = []
        with self._store.transaction():
            for diff_id in diff_ids:
                if diff_id not in recorded and (gone := self.layers_store.retire(diff_id)) is not None:
                    tasks.append(self._store.add_cleanup(CleanupKind.TREE, str(gone)))
        await self.cleaner.now(tasks)

    # Networks

    async def create_network(self, name: str, request: NetworkOptions) -> Network:
        if not grammar.NAME_RE.match(name):
            raise InvalidArgument(f"invalid network name {name!r}: use 1-63 letters, digits or '-', "
                                  "not starting with '-'")
        return await self._networks.create_network(name, request.subnet, request.egress, request.rules)

    async def remove_network(self, name: str) -> None:
        pools = [state.pool for state in self.pools.states()
                 if json.loads(state.pool.options).get("network") == name]
        if pools:
            raise InvalidState(f"network {name} has {len(pools)} warm pool(s), of image(s) "
                               f"{', '.join(sorted({p.image for p in pools}))}: set their size to 0 first "
                               "(SetWarmPool)")
        await self._networks.remove_network(name)

    def list_networks(self) -> list[Network]:
        return self._networks.all()

    # Warm pools

    async def set_warm_pool(self, image_name: str, size: int, request: CreateOptions, *,
                            caller: Credentials) -> WarmPool:
        """Keeps size containers ready for creates of image_name with these options; 0 removes the pool."""
        if not caller.is_root:
            # Each member holds a scope, namespaces, memory and maybe an
            # address for as long as the pool exists, whoever claims it.
            raise AccessDenied(f"{caller} may not set a warm pool: only root may")
        if not 0 <= size <= pool.MAX_POOL_SIZE:
            raise InvalidArgument(f"a warm pool's size must be 0 to {pool.MAX_POOL_SIZE}, got {size}")
        options.check_image_name(image_name)
        image = self._find_image(image_name)
        profile = self._profile_of(image, request)
        wanted = WarmPool("", image.name, pool.canonical_options(profile), size)
        wanted = replace(wanted, id=pool.pool_id(wanted.image, wanted.options))
        await self.pools.set(wanted, profile)
        return wanted

    def warm_pools(self) -> list[pool.PoolState]:
        return self.pools.states()

    def _profile_of(self, image: Image, request: CreateOptions) -> ContainerSpec:
        spec = request.spec
        if spec.network != networks.NONE:
            self._networks.find(spec.network)
        self._check_host_image(image, 0)
        return pool.profile(spec)

    def _pool_profile(self, wanted: WarmPool) -> ContainerSpec:
        # The pool's options as canonical_options stored them, read as SetWarmPool reads a client's.
        stored = parse.pool_options(json.loads(wanted.options))
        return self._profile_of(self._find_image(wanted.image), stored)

    async def _make_pool_member(self, wanted: WarmPool, profile: ContainerSpec) -> pool.Ready | None:
        """A container of the pool started up to GO: root built, in its scope, veth in place."""
        image = self._find_image(wanted.image)
        cid = secrets.token_hex(8)
        # The name holds a '.', which no caller's name may: it never clashes.
        c = Container(id=cid, name=f"pool.{cid}", image=image.name, image_id=image.id, command=(),
                      spec=replace(profile, hostname="pool"), state=State.STARTING, created_usec=now_usec(),
                      pool=wanted.id)
        with self._store.transaction():
            if c.spec.userns:
                c = replace(c, userns_base=self._free_userns_base())
            self._store.insert_container(c)
            self._networks.take_lease(c)
        launched: Launched | None = None
        try:
            spec = replace(self._launch_spec(c, image), pool_member=True)
            launched = await self._inits.launch()
            self._inits.send_spec(launched, spec)
            results = await asyncio.gather(
                self._systemd.start_scope(
                    c.unit, launched.pid,
                    ScopeLimits(c.spec.memory_max, c.spec.cpu_quota, c.spec.tasks_max, None),
                    f"Quilt container {c.name}",
                ),
                self._networks.attach(c, launched.pid),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            with self._store.transaction():
                self._store.update_container(replace(c, pid=launched.pid, pid_starttime=launched.starttime))
            self._inits.send_in(launched)
        except Exception:
            log.exception("making a member of the warm pool of image %s failed", image.name)
            await self._discard_pool_member(cid, launched)
            return None
        return pool.Ready(cid, launched)

    async def _discard_pool_member(self, container_id: str, launched: Launched | None) -> None:
        """Ends an unclaimed member and removes all it made: scope, veth, row, lease and files."""
        if launched is not None:
            launched.close()  # before IN, init reads end of file and leaves
        c = self._store.find_container(container_id)
        if c is None or not c.pool:
            return
        # After IN it waits for a claim past the daemon's end, and as its
        # PID namespace's init it takes no SIGTERM from outside: the stop
        # would wait out its timeout.
        with contextlib.suppress(Internal):
            await self._systemd.kill(c.unit, signal.SIGKILL)
        with contextlib.suppress(Internal):
            await self._systemd.stop(c.unit)
        self._networks.release(c)
        with self._store.transaction():
            self._store.delete_container(c.id)
            leftovers = self._queue_container_leftovers(c.id)
        await self.cleaner.now(leftovers)

    # Recovery

    async def recover(self) -> dict[RecoveryOutcome, list[str]]:
        """Makes the store agree with the processes and scopes that exist now."""
        found: dict[RecoveryOutcome, list[str]] = {o: [] for o in RecoveryOutcome}
        # A fork or commit cut off: its writable layer goes where its record
        # says, before anything starts. What a commit froze is thawed with
        # what a pause cut off left frozen (_reconcile_freezer).
        for done in forkfiles.recover(self.paths.state_dir / "containers", set(self._store.layer_sizes()),
                                      self.layers_store.root):
            log.warning("recovery: %s", done)
        adopted = self._adopt_pool_members()
        for c in self._store.list_containers():
            if not c.state.is_active or c.pool:
                continue
            pidfd = self._processes.open_pidfd(c.pid, c.pid_starttime) if c.pid else None
            if pidfd is not None:
                if c.state == State.STARTING:
                    c = self._transition(c, state=State.RUNNING,
                                         started_usec=c.started_usec or max(now_usec(), c.created_usec),
                                         started_boot_usec=c.started_boot_usec or boot_usec())
                self._watch(c, pidfd)
                if c.state == State.PAUSED:
                    # Frozen, not hung: it stays paused, and its TTL (if any) is watched again.
                    self._arm_ttl_thaw(c)
                found[RecoveryOutcome.ADOPTED].append(c.name)
            elif c.state == State.STARTING and not self.paths.exit_file(c.id).exists():
                # Killed before the command ran: the start is done again.
                c = self._transition(c, pid=0, pid_starttime=0)
                self._start_in_background(c, resume=True)
                found[RecoveryOutcome.RESTARTED].append(c.name)
            else:
                self._on_exit(c.id, None)  # when it ended is not known: the daemon was down
                found[RecoveryOutcome.EXITED_WHILE_DOWN].append(c.name)
        active = [c for c in self._store.list_containers() if c.state.is_active and c.pid]
        try:
            await self._networks.recover(active)
        except Internal:
            log.exception("could not recover the networks")
        self._queue_orphans(await self._systemd.list_scopes())
        self._reconcile_freezer()
        # v1 freezer groups of containers that ended or went while quiltd was down.
        active_units = {c.unit for c in self._store.list_containers() if c.state.is_active}
        for unit in self.freezer.groups():
            if unit not in active_units:
                with contextlib.suppress(Internal):
                    self.freezer.forget(unit)
        self.cleaner.start()
        self.pools.start(self._pool_profile, adopted)
        return found

    def _adopt_pool_members(self) -> dict[str, list[pool.Ready]]:
        """The warm pools' ready members that outlived the daemon, by pool; the rest are removed.

        A member whose init had its root built (IN) waits for a claim from
        the daemon that comes back (see containerinit); one cut off before
        that left when its spec pipe closed. Those rows go, and what they
        made goes to the cleaner.
        """
        adopted: dict[str, list[pool.Ready]] = {}
        gone = []
        for member in self._store.pool_members():
            launched = None
            if member.pid:
                control = self.paths.container_run_dir(member.id) / execproto.CONTROL_SOCKET
                launched = self._inits.adopt(member.pid, member.pid_starttime, str(control))
            if launched is None:
                gone.append(member)
            else:
                adopted.setdefault(member.pool, []).append(pool.Ready(member.id, launched))
        if gone:
            with self._store.transaction():
                for member in gone:
                    self._store.delete_container(member.id)
                    self._queue_container_leftovers(member.id)
        return adopted

    def _reconcile_freezer(self) -> None:
        """A daemon killed between a freeze (or a thaw) and its record left the two apart.

        The record wins for a pause that never answered (thawed again) and
        the processes for a resume that did not record (they run: running).
        """
        for c in self._store.list_containers():
            if c.state not in (State.RUNNING, State.PAUSED) or c.pool:
                continue
            frozen = self.freezer.frozen(c.unit)
            if frozen is None:
                continue
            if c.state == State.PAUSED and not frozen:
                log.warning("container %s is on record as paused but runs: recorded running", c.name)
                self._disarm_ttl_thaw(c.id)
                self._transition(c, state=State.RUNNING)
            elif c.state == State.RUNNING and frozen:
                log.warning("container %s was left frozen by a pause that never answered: thawing it", c.name)
                self._background(self.freezer.thaw(c.unit))

    def _queue_orphans(self, scopes: list[tuple[str, str]]) -> None:
        """Scopes and directories that belong to no container on record go to the cleaner."""
        known = {c.id for c in self._store.list_containers()}
        orphans = {unit.removeprefix("quilt-").removesuffix(".scope") for unit, _ in scopes}
        for parent in (self.paths.state_dir / "containers", self.paths.run_dir / "containers"):
            if parent.is_dir():
                orphans.update(p.name for p in parent.iterdir())
        partial = self._partial_imports()
        # Made here, not by the first import: the images dir then looks the
        # same before and after an import that failed.
        self.layers_store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._store.transaction():
            # A daemon stopped between removing an image and retiring its
            # layers, or an import cut off after storing a layer and before
            # recording its image, leaves layers no image stacks.
            self._retire_unused_layers()
            for path in self.layers_store.leftovers(set(self._store.layer_sizes())):
                log.warning("layer directory %s is on no record (an import cut off): removing it", path)
                self._store.add_cleanup(CleanupKind.TREE, str(path))
            for container_id in sorted(orphans - known):
                log.warning("container %s is on no record: cleaning up its leftovers", container_id)
                self._queue_container_leftovers(container_id)
            for path in partial:
                log.warning("image directory %s is on no record (an import cut off): removing it", path)
                self._store.add_cleanup(CleanupKind.TREE, str(path))
            for path in pull.leftovers(self.paths.state_dir):
                log.warning("pull directory %s is left from a pull cut off: removing it", path)
                self._store.add_cleanup(CleanupKind.TREE, str(path))

    def _partial_imports(self) -> list[Path]:
        """Import directories no image names: what a daemon killed during ImportImage left.

        Recovery runs before any call is served, so no import of this daemon is under way.
        """
        recorded = {Path(image.path).name for image in self._store.list_images()}
        if not self.paths.images.is_dir():
            return []
        return sorted(p for p in self.paths.images.iterdir()
                      if IMPORT_DIR.fullmatch(p.name) and p.name not in recorded)

    # Helpers

    def _transition(self, c: Container, _with: Callable[[Container], object] | None = None,
                    **changes: object) -> Container:
        """Commits changes to c; _with(new) runs inside the same transaction."""
        new = replace(c, **changes)  # type: ignore[arg-type]
        with self._store.transaction():
            self._store.update_container(new)
            if _with is not None:
                _with(new)
        for listener in self._listeners:
            listener.container_changed(new, c)
        return new

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    async def _locked(self, container_id: str, work: Callable[[], Awaitable[T]]) -> None:
        async with self._lock(container_id):
            await work()

    def _background(self, work: Awaitable[object]) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("background work failed")

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
