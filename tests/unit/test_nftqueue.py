"""NftQueue: scripts that arrive together run as one nft process; a bad one fails alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quiltd.errors import Internal
from quiltd.net.nftqueue import NftQueue


class FakeNft:
    """Loads what the queue gives it, as nft on its thread would, and records the scripts."""

    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def load(self, script: str) -> None:
        self.scripts.append(script)
        await asyncio.sleep(0.01)  # the time an nft run takes, while more arrive
        if "bad" in script:
            raise Internal("nft failed: No such file or directory")


def test_scripts_that_arrive_together_share_one_run() -> None:
    async def scenario() -> FakeNft:
        netlink = FakeNft()
        queue = NftQueue(netlink.load)
        await asyncio.gather(*(queue.run(f"add {i}\n") for i in range(10)))
        return netlink

    netlink = asyncio.run(scenario())
    assert netlink.scripts == ["".join(f"add {i}\n" for i in range(10))]


def test_scripts_that_arrive_during_a_run_share_the_next() -> None:
    async def scenario() -> FakeNft:
        netlink = FakeNft()
        queue = NftQueue(netlink.load)
        first = asyncio.ensure_future(queue.run("add 0\n"))
        await asyncio.sleep(0.005)  # the first is in nft now
        await asyncio.gather(first, *(queue.run(f"add {i}\n") for i in range(1, 10)))
        return netlink

    netlink = asyncio.run(scenario())
    assert netlink.scripts == ["add 0\n", "".join(f"add {i}\n" for i in range(1, 10))]


def test_a_bad_script_fails_only_its_caller() -> None:
    async def scenario() -> tuple[FakeNft, list[Any]]:
        netlink = FakeNft()
        queue = NftQueue(netlink.load)
        first = asyncio.ensure_future(queue.run("add 0\n"))
        await asyncio.sleep(0)
        results = await asyncio.gather(queue.run("add 1\n"), queue.run("bad 2\n"), queue.run("add 3\n"),
                                       return_exceptions=True)
        await first
        return netlink, results

    netlink, results = asyncio.run(scenario())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Internal)
    assert netlink.scripts[-3:] == ["add 1\n", "bad 2\n", "add 3\n"]


def test_submit_does_not_wait_and_logs_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        queue = NftQueue(FakeNft().load)
        queue.submit("bad\n", "unpinning a port")
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert "unpinning a port" in caplog.text
