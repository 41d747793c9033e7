"""The warm pools' bookkeeping: matching, claims that never wait, refills that yield to starts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from quiltd.core import pool
from quiltd.model import ContainerSpec, WarmPool
from quiltd.runtime.spawner import Launched
from quiltd.store.database import Store

PROFILE = pool.profile(ContainerSpec(network="bridge"))


class Members:
    """Stands in for the manager: members are pipes, whose read end stands for the init's pidfd."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.discarded: list[str] = []
        self.ends: dict[str, int] = {}  # container id -> write end: writing to it "ends the init"
        self.starts_waiting = False
        self.fail = False

    async def make(self, wanted: WarmPool, profile: ContainerSpec) -> pool.Ready | None:
        await asyncio.sleep(0)
        if self.fail:
            return None
        cid = f"{wanted.id[:4]}-{len(self.made)}"
        r, w = os.pipe()
        self.made.append(cid)
        self.ends[cid] = w
        return pool.Ready(cid, Launched(0, 0, r, os.dup(w), os.dup(w)))

    async def discard(self, cid: str, launched: Launched | None) -> None:
        if launched is not None:
            launched.close()
        self.discarded.append(cid)

    def close(self) -> None:
        for w in self.ends.values():
            os.close(w)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "quilt.db")
    yield s
    s.close()


def wanted(size: int, image: str = "busybox") -> WarmPool:
    options = pool.canonical_options(PROFILE)
    return WarmPool(pool.pool_id(image, options), image, options, size)


async def settle(pools: pool.WarmPools, ready: int) -> None:
    for _ in range(200):
        if sum(s.ready for s in pools.states()) == ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {ready} ready: {pools.states()}")


def run_with_pools(store: Store, test: object) -> Members:
    members = Members()

    async def main() -> None:
        pools = pool.WarmPools(store, members.make, members.discard, lambda: members.starts_waiting)
        pools.start(lambda _: PROFILE, {})
        try:
            await test(pools, members)  # type: ignore[operator]
        finally:
            members.close()

    asyncio.run(main())
    return members


def test_same_setup_spelled_differently_is_one_pool() -> None:
    implicit = ContainerSpec(network="bridge", cpu_quota=1.0)
    explicit = ContainerSpec(network="bridge", cpu_quota=1, tasks_max=1024, userns=False)  # type: ignore[arg-type]
    assert pool.canonical_options(pool.profile(implicit)) == pool.canonical_options(pool.profile(explicit))
    # What a claim sets is not part of the match; what shapes the container is.
    claim = replace(implicit, env=("A=b",), workdir="/tmp", hostname="h", user="1:1", labels=(("k", "v"),),
                    auto_remove=True, creator_uid=1000)
    assert pool.profile(claim) == pool.profile(implicit)
    for setup in ({"memory_max": 1 << 26}, {"tmpfs": (("/t", 1 << 20),)}, {"mounts": (("/a", "/b", True),)},
                  {"ttl_sec": 5}, {"network": "none"}, {"publish": ((80, 80, "tcp"),)}):
        assert pool.profile(replace(implicit, **setup)) != pool.profile(implicit), setup  # type: ignore[arg-type]


def test_a_pool_is_filled_kept_on_record_and_claimed_without_waiting(store: Store) -> None:
    async def test(pools: pool.WarmPools, members: Members) -> None:
        await pools.set(wanted(2), PROFILE)
        await settle(pools, 2)
        assert store.list_warm_pools() == [wanted(2)]
        assert pools.claim("busybox", replace(PROFILE, network="none")) is None  # no pool of that setup
        assert pools.claim("alpine", PROFILE) is None
        first = pools.claim("busybox", PROFILE)
        second = pools.claim("busybox", PROFILE)
        assert first is not None and second is not None and first != second
        assert pools.claim("busybox", PROFILE) is None  # empty: the caller goes cold, now
        await settle(pools, 2)  # refilled after the claims
        assert len(members.made) == 4

    run_with_pools(store, test)


def test_the_refill_waits_while_starts_wait_for_a_turn(store: Store) -> None:
    async def test(pools: pool.WarmPools, members: Members) -> None:
        members.starts_waiting = True
        await pools.set(wanted(1), PROFILE)
        await asyncio.sleep(0.3)
        assert members.made == []
        members.starts_waiting = False
        await settle(pools, 1)

    run_with_pools(store, test)


def test_size_zero_discards_every_ready_member_before_returning(store: Store) -> None:
    async def test(pools: pool.WarmPools, members: Members) -> None:
        await pools.set(wanted(3), PROFILE)
        await settle(pools, 3)
        await pools.set(wanted(1), PROFILE)
        assert len(members.discarded) == 2 and pools.states()[0].ready == 1
        await pools.set(wanted(0), PROFILE)
        assert sorted(members.discarded) == sorted(members.made)
        assert store.list_warm_pools() == [] and pools.states() == []
        assert pools.claim("busybox", PROFILE) is None

    run_with_pools(store, test)


def test_a_member_that_ends_while_ready_is_replaced(store: Store) -> None:
    async def test(pools: pool.WarmPools, members: Members) -> None:
        await pools.set(wanted(1), PROFILE)
        await settle(pools, 1)
        gone = members.made[0]
        os.write(members.ends[gone], b"x")  # its "pidfd" becomes readable: the init ended
        for _ in range(200):
            if len(members.made) == 2 and pools.states()[0].ready == 1:
                break
            await asyncio.sleep(0.01)
        assert members.discarded == [gone] and len(members.made) == 2

    run_with_pools(store, test)


def test_members_that_cannot_be_made_are_retried_later(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "FAILURE_PAUSES", (0.05,))

    async def test(pools: pool.WarmPools, members: Members) -> None:
        members.fail = True
        await pools.set(wanted(1), PROFILE)
        await asyncio.sleep(0.2)
        assert pools.states()[0].ready == 0
        members.fail = False
        await settle(pools, 1)

    run_with_pools(store, test)


def test_every_pool_option_is_listed_with_its_dbus_type() -> None:
    from quiltd.bus import convert

    spec = ContainerSpec(network="none", memory_max=1 << 26, cpu_quota=0.5, tasks_max=64,
                         tmpfs=(("/scratch", 1 << 20),), disk_max=1 << 24, userns=True, nested_userns=True)
    options = pool.canonical_options(pool.profile(spec))
    image, listed, size, ready = convert.warm_pool(pool.PoolState(WarmPool("x", "busybox", options, 3), 2))
    assert (image, size, ready) == ("busybox", 3, 2)
    assert set(listed) == pool.POOL_OPTIONS
    assert {k: (v.signature, v.value) for k, v in listed.items()} == {
        "network": ("s", "none"), "memory_max": ("t", 1 << 26), "cpu_quota": ("d", 0.5),
        "tasks_max": ("t", 64),
        "tmpfs": ("a(st)", [["/scratch", 1 << 20]]), "disk_max": ("t", 1 << 24), "userns": ("b", True),
        "nested_userns": ("b", True),
    }
