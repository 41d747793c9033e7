"""CommitContainer and ForkContainer: a container's writable layer made into a stored layer.

Commit copies the writable (upper) layer into a new layer of the layer
store and records an image stacking it over the container's own lower
layers: the base is never copied. A running container is frozen for the
copy (host/freezer.py, the freezer PauseContainer uses), so no write is half in the image.

Fork copies nothing. The source's writable layer is renamed into the layer
store as a read-only layer that the source and every fork stack over the
image (the container_layers table); the source goes on with a fresh empty
writable layer. An overlay's layers cannot change while it is mounted, so
a running source is stopped first (SIGTERM, then SIGKILL after the
timeout) and started again after the fork: its processes start over on
the same files.

Both are whole or nothing across a kill -9:

- commit extracts into a scratch name of the layer store and names the
  layer only when complete; the image is recorded in one transaction after.
  A layer on no record is removed by recovery (layerstore.leftovers).
- fork renames the writable layer to upper.fork-<layer> in the source's
  own directory, then records the layer, the source's stacking and the
  forks in one transaction, then renames it into the layer store. Recovery
  (recover) finishes a fork whose layer is on record and puts the writable
  layer back where it is not.

Layers made here have a random id of the diff_id's form, not the digest
of a tar: no tar of them is ever made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from quiltd.access import Credentials
from quiltd.core import options
from quiltd.core.forkfiles import PENDING_PREFIX, finish_pending
from quiltd.core.requests import CommitOptions, ForkOptions
from quiltd.errors import (
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NameTaken,
    NoSpace,
    NotSupported,
)
from quiltd.fs.remove import remove_path
from quiltd.host.freezer import FreezerKind
from quiltd.images import hostimage
from quiltd.images.layerstore import MAX_STACKED
from quiltd.model import Container, ContainerSpec, Image, ImageConfig, State

if TYPE_CHECKING:
    from quiltd.core.manager import Manager

log = logging.getLogger("quiltd")

MAX_FORKS = 256
DEFAULT_STOP_TIMEOUT_SEC = 10
def parse_fork_names(names: object) -> tuple[str, ...]:
    if not isinstance(names, list | tuple) or not names:
        raise InvalidArgument("give at least one name for the forks")
    if len(names) > MAX_FORKS:
        raise LimitExceeded(f"at most {MAX_FORKS} forks at once, got {len(names)}")
    checked = tuple(options.check_name(n) for n in names)
    twice = sorted({n for n in checked if checked.count(n) > 1})
    if twice:
        raise InvalidArgument(f"name(s) given twice: {', '.join(twice)}")
    return checked


def committed_config(image: Image, c: Container, o: CommitOptions) -> ImageConfig:
    """The new image's config: the container's settings, then what the options change, as docker commit."""
    ep = image.config.entrypoint
    # The container's argv is the image's Entrypoint and its own Cmd: kept
    # apart, so a create with a command still keeps the Entrypoint.
    entrypoint, cmd = (ep, c.command[len(ep):]) if ep and c.command[:len(ep)] == ep else ((), c.command)
    merged: dict[str, str] = {}
    for item in (*c.spec.env, *(o.env or ())):
        merged[item.split("=", 1)[0]] = item
    labels = dict(image.config.labels)
    labels.update(o.labels)
    if o.entrypoint is not None and o.cmd is None:
        cmd = ()  # written for the Entrypoint it replaces, as in imagedefaults
    return ImageConfig(
        env=tuple(merged.values()),
        workdir=o.workdir if o.workdir is not None else c.spec.workdir,
        entrypoint=o.entrypoint if o.entrypoint is not None else entrypoint,
        cmd=o.cmd if o.cmd is not None else cmd,
        user=o.user if o.user is not None else c.spec.user,
        labels=tuple(sorted(labels.items())),
    )


def new_layer_id() -> str:
    return secrets.token_hex(32)


def tree_size(root: Path) -> int:
    """Bytes of file content under root, as the layers table counts them."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, f))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def check_free_space(source: Path, dest_dir: Path) -> None:
    """NoSpace before a copy that cannot fit, rather than an image half written."""
    needed = sum(os.lstat(os.path.join(d, f)).st_blocks * 512
                 for d, _, fs in os.walk(source) for f in fs)
    st = os.statvfs(dest_dir)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpace(f"the writable layer holds {needed} bytes and the image store's filesystem has "
                      f"{free} free; nothing was made")


def copy_layer(source: Path, dest: Path, container_name: str) -> int:
    """Copies a writable layer (whiteouts, xattrs, owners, hard links) into dest; its size.

    cp -a keeps what overlayfs reads from a layer: whiteout devices, the
    trusted.overlay.opaque attribute of directories, owners and modes. It
    runs in a scope of its own in quilt.slice: the pages it writes (memory
    itself when the state directory is a tmpfs) are charged there, never to
    quiltd.service, whose MemoryMax a large layer would pass.
    """
    check_free_space(source, dest.parent)
    scope = ["systemd-run", "--scope", "--quiet", "--collect", "--slice=quilt.slice",
             f"--unit=quilt-commit-{secrets.token_hex(8)}",
             f"--description=Quilt commit of container {container_name}", "--"]
    result = _run([*scope, "cp", "-a", "--reflink=auto", "--", f"{source}/.", str(dest)], dest)
    if result:
        remove_path(dest)
        if "No space left" in result:
            raise NoSpace(f"the image store's filesystem filled up while the layer was copied: {result}")
        raise OSError(result)
    return tree_size(dest)


def _run(argv: list[str], dest: Path) -> str:
    dest.mkdir(mode=0o755)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return done.stderr.strip() if done.returncode else ""


class Snapshots:
    def __init__(self, manager: Manager) -> None:
        self._m = manager

    @contextlib.asynccontextmanager
    async def _frozen(self, c: Container) -> AsyncIterator[None]:
        """The running container held still for a copy, with PauseContainer's freezer.

        A daemon killed while it is frozen finds it on record as running and
        thaws it at recovery, as it does a pause cut off.
        """
        freezer = self._m.freezer
        if freezer.kind == FreezerKind.NONE:
            raise InvalidState(f"container {c.name} runs and this host has no cgroup freezer to hold it "
                               "still for the copy; stop it and commit it stopped")
        await freezer.freeze(c.unit)
        try:
            yield
        finally:
            await freezer.thaw(c.unit)

    # Commit

    async def commit(self, ref: str, image_name: str, wanted: CommitOptions, *,
                     caller: Credentials) -> Image:
        m = self._m
        options.check_image_name(image_name)
        if image_name == hostimage.NAME:
            raise InvalidArgument(f"the image name {image_name!r} is reserved for the built-in host image")
        self._check_image_free(image_name)
        c = m.get(ref)
        await m._start_settled(c.id)
        async with m.container_lock(c.id):
            c = m.get(c.id)
            image = m._find_image(c.image)
            clayers = m._store.container_layers(c.id)
            self._check_source(c, image, clayers, "commit")
            if c.state in (State.STARTING, State.STOPPING):
                raise InvalidState(f"container {c.name} is {c.state.value}; commit it once it runs or ended")
            self._check_image_free(image_name)
            store = m.layers_store
            scratch = store.scratch()
            upper = m.paths.container_dir(c.id) / "upper"
            loop = asyncio.get_running_loop()
            freeze = self._frozen(c) if c.state == State.RUNNING else contextlib.nullcontext()
            try:
                async with freeze:
                    if upper.is_dir():
                        size = await loop.run_in_executor(None, copy_layer, upper, scratch, c.name)
                    else:
                        scratch.mkdir(mode=0o755)  # never started: nothing written
                        size = 0
            except BaseException:
                await loop.run_in_executor(None, remove_path, scratch)
                raise
            diff_id = new_layer_id()
            store.commit(scratch, diff_id)
            sizes = m._store.layer_sizes()
            base_first = (*image.layers, *reversed(clayers), diff_id)
            path = ":".join([str(store.path(diff_id)), *(str(store.path(d)) for d in clayers), image.path])
            config = committed_config(image, c, wanted)
            new = Image(name=image_name,
                        id=hashlib.sha256(json.dumps([base_first, image.path, str(config)]).encode())
                        .hexdigest(),
                        path=path, size_bytes=image.size_bytes + size + sum(sizes[d] for d in clayers),
                        created_usec=_now_usec(), config=config, layers=base_first)
            try:
                with m._store.transaction():
                    m._store.insert_image(new, tuple((d, size if d == diff_id else sizes[d])
                                                     for d in base_first))
                    if not image.layers:
                        m._store.set_image_base(image_name, image.name)
            except BaseException as e:
                await m._retire_unrecorded([diff_id])
                if isinstance(e, sqlite3.IntegrityError):
                    raise NameTaken(f"an image named {image_name!r} exists already") from e
                raise
        log.info("committed container %s as image %s (layer %s, %d bytes)", c.name, image_name, diff_id, size,
                 extra={"QUILT_CONTAINER_ID": c.id, "QUILT_IMAGE": image_name})
        return new

    def _check_image_free(self, name: str) -> None:
        if self._m._store.find_image(name) is not None:
            raise NameTaken(f"an image named {name!r} exists already")

    def _check_source(self, c: Container, image: Image, clayers: tuple[str, ...], what: str) -> None:
        if image.id == hostimage.IMAGE_ID:
            raise NotSupported(f"container {c.name} runs the built-in image {hostimage.NAME!r}, whose "
                               f"root is the host's /usr: it cannot {what}")
        if c.spec.disk_max:
            raise NotSupported(f"container {c.name} has disk_max: its writable layer is a tmpfs of its "
                               f"own, gone when it stops, so it cannot {what}")
        if c.spec.userns:
            raise NotSupported(f"container {c.name} runs with userns: its writable layer holds host ids "
                               f"of its own range, which another container would see shifted; it cannot "
                               f"{what}")
        lowers = len(image.path.split(":")) + len(clayers)
        if lowers + 1 > MAX_STACKED:
            raise LimitExceeded(f"container {c.name} stacks {lowers} layers already; overlayfs takes at "
                                f"most {MAX_STACKED}, so it cannot {what} again")

    # Fork

    async def fork(self, ref: str, names: object, wanted: ForkOptions, *,
                   caller: Credentials) -> list[Container]:
        m = self._m
        wanted_names = parse_fork_names(names)
        for n in wanted_names:
            m._check_name_free(n)
        source = m.get(ref)
        await m._start_settled(source.id)
        image = m._find_image(source.image)
        self._check_source(source, image, m._store.container_layers(source.id), "fork")
        async with m.container_lock(source.id):
            source = m.get(source.id)
            was_running = source.state.is_active
            if was_running:
                if source.spec.auto_remove:
                    raise InvalidState(f"container {source.name} is {source.state.value} with auto_remove: "
                                       "a fork stops it, which would remove it; fork it once it ended")
                await self._stop(source, wanted.stop_timeout_sec)
            try:
                made = await self._fork_stopped(m.get(source.id), wanted_names, wanted, caller)
            finally:
                if was_running:  # forked or not, the source goes on
                    # Started by the background start, which takes the lock once this call lets it go.
                    m._start_in_background(m._transition(m.get(source.id), state=State.STARTING, reason="",
                                                         _with=m._networks.take_lease), resume=False)
        # Announced as a create announces: added as created, then starting.
        return [m.announce_created(created, starting) for created, starting in made]

    async def _stop(self, c: Container, timeout_sec: int) -> None:
        """Ends c's processes as StopContainer does, without recording 'stopping'.

        A quiltd killed while a stubborn command takes its time finds the
        source running as before, not half stopped.
        """
        m = self._m
        if c.state == State.RUNNING:
            m._signal_init(c, signal.SIGTERM)
        if not await m._wait_exit(c.id, timeout_sec):
            await m._kill_scope(c)
            await m._wait_exit(c.id, None)

    async def _fork_stopped(self, source: Container, names: tuple[str, ...], wanted: ForkOptions,
                            caller: Credentials) -> list[tuple[Container, Container | None]]:
        """The forks of a stopped source as created, and as starting when they start; all recorded."""
        m = self._m
        old = m._store.container_layers(source.id)
        cdir = m.paths.container_dir(source.id)
        upper = cdir / "upper"
        written = upper.is_dir() and any(upper.iterdir())
        diff_id = new_layer_id() if written else None
        pending = cdir / f"{PENDING_PREFIX}{diff_id}"
        layers = (diff_id, *old) if diff_id else old
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(None, tree_size, upper) if written else 0
        forks = [self._fork_of(source, name, wanted, caller) for name in names]
        starts = [replace(f, state=State.STARTING) if wanted.start else None for f in forks]
        if diff_id:
            os.rename(upper, pending)
        try:
            with m._store.transaction():
                if diff_id:
                    m._store.insert_layer(diff_id, size)
                    m._store.set_container_layers(source.id, layers)
                # As a create: starting and the address in the same transaction,
                # so a network out of addresses leaves no fork at all.
                for f, starting in zip(forks, starts, strict=True):
                    m._store.insert_container(f)
                    m._store.set_container_layers(f.id, layers)
                    m.volumes.attach(f.id, [n for n, _, _ in f.spec.volumes])
                    if starting is not None:
                        m._store.update_container(starting)
                        m._networks.take_lease(starting)
        except BaseException as e:
            if diff_id:
                os.rename(pending, upper)
            if isinstance(e, sqlite3.IntegrityError):
                for n in names:
                    m._check_name_free(n)
            raise
        if diff_id:
            finish_pending(pending, m.layers_store.path(diff_id))
        return list(zip(forks, starts, strict=True))

    def _fork_of(self, source: Container, name: str, wanted: ForkOptions, caller: Credentials) -> Container:
        spec: ContainerSpec = source.spec
        # Each fork is its own host: the source's own name is not its hostname,
        # and its published ports stay the source's (one host port, one owner).
        hostname = name if spec.hostname == source.name else spec.hostname
        spec = replace(spec, hostname=hostname, publish=(), creator_uid=caller.uid)
        return Container(id=secrets.token_hex(8), name=name, image=source.image, image_id=source.image_id,
                         command=wanted.command or source.command, spec=spec, created_usec=_now_usec())


def _now_usec() -> int:
    return time.time_ns() // 1000
