"""Warm pools: containers made ready ahead, so a create can claim one in a millisecond.

A pool is an image and a set of setup options (the ones that shape the root,
the scope and the network: POOL_OPTIONS), with a size kept in SQLite. Its
members are containers started as far as a start goes before the command:
the init has built the root and waits for GO in its scope, with its veth in
place. Their rows carry the pool's id, so no listing or count shows them.

This module keeps the ready members and refills pools; the manager makes,
claims and discards members (it owns the start machinery). The refill makes
one member at a time, only while no start waits for a turn (turns.py), and
begins a moment after a claim: a pool is there to make callers faster, never
to hold them back. A claim takes
a ready member or nothing, at once: it never waits for a refill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from quiltd.model import DEFAULT_LOG_RATE_BURST, DEFAULT_LOG_RATE_INTERVAL_SEC, ContainerSpec, WarmPool
from quiltd.runtime.spawner import Launched
from quiltd.store.database import Store

log = logging.getLogger("quiltd")

# The create options a pool may be made with; a create with any other option
# that changes its setup (mounts, volumes, publish, ttl_sec) runs cold.
# Options that only say what runs and how it is named (env, workdir, user,
# hostname, labels, auto_remove, the log rate limit) are the claim's own.
POOL_OPTIONS = frozenset({"network", "memory_max", "cpu_quota", "tasks_max", "tmpfs", "disk_max",
                          "userns", "nested_userns"})
MAX_POOL_SIZE = 256  # per pool: each member holds a scope, namespaces and maybe an address
# After a claim the refill waits this long (seconds): the claimed container's
# start, and often its whole short run, then has the CPUs, the network lock
# and systemd to itself instead of sharing them with the next member's.
REFILL_DELAY = 0.1
REFILL_PAUSE = 0.05  # seconds between looks while starts wait for a turn
FAILURE_PAUSES = (1.0, 2.0, 5.0, 10.0, 30.0)  # after members that could not be made, in a row


def pool_id(image: str, options: str) -> str:
    return hashlib.sha256(f"{image}\0{options}".encode()).hexdigest()[:16]


def profile(spec: ContainerSpec) -> ContainerSpec:
    """What of a container's spec a pool member is made with: all but what a claim sets.

    A create is served from a pool whose profile equals its own. Whatever is
    not cleared here must match, so a setting no pool can hold makes the
    create run cold.
    """
    return replace(spec, env=(), workdir="/", hostname="", user="", labels=(), auto_remove=False,
                   creator_uid=0, log_rate_burst=DEFAULT_LOG_RATE_BURST,
                   log_rate_interval_sec=DEFAULT_LOG_RATE_INTERVAL_SEC)


def canonical_options(spec: ContainerSpec) -> str:
    """A profile's pool options as sorted JSON: equal profiles give the same text."""
    opts: dict[str, object] = {"network": spec.network, "tasks_max": spec.tasks_max, "userns": spec.userns,
                               "nested_userns": spec.nested_userns}
    if spec.memory_max is not None:
        opts["memory_max"] = spec.memory_max
    if spec.cpu_quota is not None:
        opts["cpu_quota"] = float(spec.cpu_quota)
    if spec.disk_max is not None:
        opts["disk_max"] = spec.disk_max
    if spec.tmpfs:
        opts["tmpfs"] = [list(entry) for entry in spec.tmpfs]
    return json.dumps(opts, sort_keys=True)


@dataclass(frozen=True)
class Ready:
    """A pool member waiting for its claim: its container's id and its init's pipes."""

    container_id: str
    launched: Launched


@dataclass(frozen=True)
class PoolState:
    pool: WarmPool
    ready: int


# What the manager gives the pools: make a member of a pool (None if it could
# not be made), discard one (its init, scope, veth, row and files).
MakeMember = Callable[[WarmPool, ContainerSpec], Awaitable[Ready | None]]
DiscardMember = Callable[[str, Launched | None], Awaitable[None]]


class WarmPools:
    def __init__(self, store: Store, make: MakeMember, discard: DiscardMember,
                 starts_waiting: Callable[[], bool]) -> None:
        self._store = store
        self._make = make
        self._discard = discard
        self._starts_waiting = starts_waiting
        self._pools: dict[str, WarmPool] = {}
        self._profiles: dict[str, ContainerSpec] = {}  # what a create's spec must match, per pool
        self._ready: dict[str, deque[Ready]] = {}
        # Held while a member is made and while sizes change, so a pool set to
        # 0 has no member still being made when SetWarmPool returns.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._discards: set[asyncio.Task[None]] = set()

    def start(self, profile: Callable[[WarmPool], ContainerSpec], adopted: dict[str, list[Ready]]) -> None:
        """Loads the pools on record, with the members that outlived the daemon, and starts filling them.

        adopted: by pool id, the ready members whose inits waited for the
        daemon to come back. Those of a pool that is gone, or past its size,
        are discarded.
        """
        for pool in self._store.list_warm_pools():
            try:
                self._add(pool, profile(pool))
            except Exception as e:  # the image or network went meanwhile: kept on record, not filled
                log.warning("warm pool of image %s (%s) is not filled: %s", pool.image, pool.options, e)
        for pool_key, members in adopted.items():
            size = self._pools[pool_key].size if pool_key in self._pools else 0
            for member in members[:size]:
                self._keep(pool_key, member)
            for member in members[size:]:
                self._discard_later(member.container_id, member.launched)
        self._task = asyncio.get_running_loop().create_task(self._refill())
        self._wake.set()

    def _add(self, pool: WarmPool, profile: ContainerSpec) -> None:
        self._pools[pool.id] = pool
        self._profiles[pool.id] = profile
        self._ready.setdefault(pool.id, deque())

    def states(self) -> list[PoolState]:
        return [PoolState(pool, len(self._ready.get(pool.id, ()))) for pool in self._store.list_warm_pools()]

    def uses_image(self, image: str) -> list[WarmPool]:
        return [pool for pool in self._store.list_warm_pools() if pool.image == image]

    # Claims (never wait)

    def claim(self, image: str, profile: ContainerSpec) -> Ready | None:
        """A ready member of a pool of image whose profile is this, taken out of the pool; or None."""
        for pool_key, pool in self._pools.items():
            if pool.image != image or self._profiles[pool_key] != profile:
                continue
            ready = self._ready[pool_key]
            if not ready:
                return None
            member = ready.popleft()
            loop = asyncio.get_running_loop()
            loop.remove_reader(member.launched.pidfd)
            loop.call_later(REFILL_DELAY, self._wake.set)
            return member
        return None

    def give_back(self, pool_key: str, member: Ready) -> None:
        """A claimed member the claim did not use after all (the name was taken)."""
        if pool_key in self._pools:
            self._keep(pool_key, member)
        else:
            self._discard_later(member.container_id, member.launched)

    # Sizes

    async def set(self, pool: WarmPool, profile: ContainerSpec) -> None:
        """Records pool's size (0 removes it) and discards the members past it before returning."""
        async with self._lock:
            with self._store.transaction():
                if pool.size:
                    self._store.set_warm_pool(pool)
                else:
                    self._store.delete_warm_pool(pool.id)
            if pool.size:
                self._add(pool, profile)
            else:
                self._pools.pop(pool.id, None)
                self._profiles.pop(pool.id, None)
            ready = self._ready.get(pool.id, deque())
            extra = []
            while len(ready) > pool.size:
                member = ready.pop()
                asyncio.get_running_loop().remove_reader(member.launched.pidfd)
                extra.append(member)
            if not pool.size:
                self._ready.pop(pool.id, None)
            for member in extra:
                await self._discard(member.container_id, member.launched)
        self._wake.set()

    # Refill

    async def _refill(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (pool := self._short()) is not None:
                if self._starts_waiting():
                    await asyncio.sleep(REFILL_PAUSE)
                    continue
                async with self._lock:
                    if self._short() != pool:
                        continue  # resized meanwhile
                    try:
                        member = await self._make(pool, self._profiles[pool.id])
                    except Exception:
                        log.exception("could not make a member of the warm pool of image %s", pool.image)
                        member = None
                    if member is not None:
                        self._keep(pool.id, member)
                if member is None:
                    await asyncio.sleep(FAILURE_PAUSES[min(failures, len(FAILURE_PAUSES) - 1)])
                    failures += 1
                else:
                    failures = 0

    def _short(self) -> WarmPool | None:
        for pool_key, pool in self._pools.items():
            if len(self._ready[pool_key]) < pool.size:
                return pool
        return None

    def _keep(self, pool_key: str, member: Ready) -> None:
        self._ready[pool_key].append(member)
        loop = asyncio.get_running_loop()

        def ended() -> None:  # a ready member's init died (killed, or its root could not be built)
            loop.remove_reader(member.launched.pidfd)
            with contextlib.suppress(ValueError):
                self._ready[pool_key].remove(member)
            log.warning("warm pool member %s ended while ready: discarding it", member.container_id)
            self._discard_later(member.container_id, member.launched)
            self._wake.set()

        loop.add_reader(member.launched.pidfd, ended)

    def _discard_later(self, container_id: str, launched: Launched | None) -> None:
        async def discard() -> None:
            try:
                await self._discard(container_id, launched)
            except Exception:
                log.exception("could not discard warm pool member %s", container_id)

        task = asyncio.get_running_loop().create_task(discard())
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)
