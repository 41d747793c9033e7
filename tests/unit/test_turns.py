"""FairTurns: a bounded number of starts at once, callers served in turn, Busy past the queue."""

from __future__ import annotations

import asyncio

import pytest

from quiltd.core.turns import FairTurns
from quiltd.errors import Busy


def test_a_flooding_caller_does_not_starve_another() -> None:
    async def scenario() -> list[str]:
        turns = FairTurns(limit=2, max_waiting=100)
        order: list[str] = []
        release = asyncio.Event()

        async def start(who: str, uid: int) -> None:
            async with turns.turn(uid):
                order.append(who)
                await release.wait()
                await asyncio.sleep(0)

        flood = [asyncio.create_task(start(f"a{i}", 1000)) for i in range(10)]
        await asyncio.sleep(0)
        other = asyncio.create_task(start("b", 2000))
        await asyncio.sleep(0)
        assert turns.running == 2 and turns.waiting == 9
        release.set()
        await asyncio.gather(*flood, other)
        return order

    order = asyncio.run(scenario())
    # Two ran at once; of the waiters, uid 1000's next and then uid 2000's.
    assert order.index("b") == 3, order
    assert sorted(order) == sorted([f"a{i}" for i in range(10)] + ["b"])


def test_busy_past_the_queue_and_nothing_held_after_cancel() -> None:
    async def scenario() -> None:
        turns = FairTurns(limit=1, max_waiting=2)
        hold = asyncio.Event()

        async def start() -> None:
            async with turns.turn(0):
                await hold.wait()

        tasks = [asyncio.create_task(start()) for _ in range(3)]
        await asyncio.sleep(0)
        assert (turns.running, turns.waiting) == (1, 2)
        with pytest.raises(Busy, match="2 starts are waiting"):
            turns.check_room("starts")
        tasks[1].cancel()
        await asyncio.sleep(0)
        assert turns.waiting == 1
        turns.check_room("starts")
        hold.set()
        await asyncio.gather(tasks[0], tasks[2])
        assert (turns.running, turns.waiting) == (0, 0)

    asyncio.run(scenario())
