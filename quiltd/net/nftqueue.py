"""Small nft scripts from many starts and removals, run as few nft processes.

Each container start pins its bridge port (firewall.pin_script) and each
removal unpins it. One nft process per script costs a fork, an exec and a
netlink transaction: under a stream of starts, one per start is a ceiling.
Scripts that arrive while one nft runs are joined and run together next. A
joined run that fails is retried one script at a time, so one bad script
(an element already gone, say) fails only its own caller.

nft runs on a thread of its own (`load`, given by the caller), not on the
network worker, so a start's pin and its veth are made at the same time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from quiltd.errors import Internal

log = logging.getLogger("quiltd")


class NftQueue:
    def __init__(self, load: Callable[[str], Awaitable[None]]) -> None:
        self._load = load  # runs one nft script; Internal if nft refused it
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._running = False

    async def run(self, script: str) -> None:
        """Runs script (joined with others); Internal if nft refused it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((script, done))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        await done

    def submit(self, script: str, what: str) -> None:
        """Runs script without waiting for it; a failure is logged."""
        def report(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.warning("%s: %s", what, done.exception())

        task = asyncio.get_running_loop().create_task(self.run(script))
        task.add_done_callback(report)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._load("".join(script for script, _ in batch))
                    _settle(batch, None)
                except Exception as e:
                    if len(batch) == 1:
                        _settle(batch, e)
                        continue
                    for script, done in batch:  # each on its own, to fail only the bad one
                        try:
                            await self._load(script)
                            _settle([(script, done)], None)
                        except Exception as one:
                            _settle([(script, done)], one)
        finally:
            self._running = False


def _settle(batch: list[tuple[str, asyncio.Future[None]]], error: Exception | None) -> None:
    for _, done in batch:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error if isinstance(error, Internal) else Internal(f"nft: {error}"))
