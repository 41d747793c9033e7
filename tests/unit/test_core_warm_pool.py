"""Warm pools against fake mechanisms: a member is a start stopped before GO, and a claim sends GO."""

from __future__ import annotations

import asyncio
from typing import Any

from quiltd.core import parse
from quiltd.model import State
from quiltd.names import veth_name
from tests.unit.fakes import IMAGE, ROOT, World, run


async def until(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_create_claims_a_ready_member_and_the_pool_is_refilled(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        await m.recover()
        await m.set_warm_pool(IMAGE, 1, parse.pool_options({"memory_max": 64 << 20}), caller=ROOT)
        await until(lambda: m.warm_pools()[0].ready == 1)
        [member] = w.inits.made
        assert member.went_in and not member.went  # in its scope with its veth, waiting for a claim
        assert member.spec is not None and member.spec.command == ()
        assert m.containers() == [] and events.seen == []  # no one's container yet
        c = await m.create("claimed", IMAGE, ["echo", "hi"], parse.create_options({"memory_max": 64 << 20}),
                           caller=ROOT)
        assert c.id == member.spec.container_id and member.went
        assert member.claim is not None  # the claim goes with GO
        assert member.claim["name"] == "claimed" and tuple(member.claim["command"]) == ("echo", "hi")
        c = await m.wait_started("claimed", 0)
        assert c.state == State.RUNNING and w.scopes.units[c.unit] == [member.pid]
        assert veth_name(c.id) in w.links.veths()
        assert events.states("claimed") == ["created", "starting", "running"]
        await until(lambda: len(w.inits.made) == 2 and m.warm_pools()[0].ready == 1)  # refilled
        # A create with other options is a cold start, and leaves the member ready.
        other = await m.create("cold", IMAGE, ["true"], parse.create_options({}), caller=ROOT)
        assert other.id not in {i.spec.container_id for i in w.inits.made[:2] if i.spec}
        assert (await m.wait_started("cold", 0)).state == State.RUNNING
        assert m.warm_pools()[0].ready == 1
        m.cleaner.stop()

    run(main())


def test_a_member_whose_init_dies_is_discarded_and_replaced(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await m.recover()
        await m.set_warm_pool(IMAGE, 1, parse.pool_options({}), caller=ROOT)
        await until(lambda: m.warm_pools()[0].ready == 1)
        [first] = w.inits.made
        assert first.spec is not None
        w.processes.kill(first.pid)
        await until(lambda: len(w.inits.made) == 2 and m.warm_pools()[0].ready == 1)
        await until(lambda: m.cleanup_status() == [])
        assert f"quilt-{first.spec.container_id}.scope" not in w.scopes.units
        assert veth_name(first.spec.container_id) not in w.links.veths()
        await m.set_warm_pool(IMAGE, 0, parse.pool_options({}), caller=ROOT)
        assert m.warm_pools() == [] and w.inits.made[1].abandoned
        m.cleaner.stop()

    run(main())


def fill_pool_in_a_first_run(w: World, size: int) -> None:
    """One daemon's run that sets a pool of size and waits until it is full."""
    async def first() -> None:
        m, _ = w.manager()
        await m.recover()
        await m.set_warm_pool(IMAGE, size, parse.pool_options({}), caller=ROOT)
        await until(lambda: m.warm_pools()[0].ready == size)
        m.cleaner.stop()

    run(first())


def test_ready_members_outlive_the_daemon_and_are_claimed_after_it(w: World) -> None:
    async def after() -> None:
        m, events = w.manager()
        await m.recover()
        assert m.warm_pools()[0].ready == 2 and len(w.inits.made) == 2  # the same two, none made again
        members = {i.spec.container_id: i for i in w.inits.made if i.spec}
        assert m.containers() == [] and events.seen == []
        c = await m.create("after", IMAGE, ["echo", "hi"], parse.create_options({}), caller=ROOT)
        member = members[c.id]
        assert member.went and member.claim is not None and member.claim["name"] == "after"
        c = await m.wait_started("after", 0)
        assert c.state == State.RUNNING and w.scopes.units[c.unit] == [member.pid]
        await until(lambda: len(w.inits.made) == 3 and m.warm_pools()[0].ready == 2)  # refilled
        m.cleaner.stop()

    fill_pool_in_a_first_run(w, 2)
    run(after())


def test_a_member_that_died_while_the_daemon_was_down_is_removed(w: World) -> None:
    async def after() -> None:
        m, _ = w.manager()
        await m.recover()
        await until(lambda: len(w.inits.made) == 2 and m.warm_pools()[0].ready == 1)  # made anew
        await until(lambda: m.cleanup_status() == [])
        assert f"quilt-{dead.spec.container_id}.scope" not in w.scopes.units
        assert veth_name(dead.spec.container_id) not in w.links.veths()
        m.cleaner.stop()

    fill_pool_in_a_first_run(w, 1)
    [dead] = w.inits.made
    assert dead.spec is not None
    w.processes.kill(dead.pid)
    run(after())
