"""Fair turns: a bounded number at once, callers served in turn.

Used for starts and for copies (each a process of its own).

A start makes namespaces, a scope and a veth; a few hundred at once only
make each other slow and hold a pre-forked init, pipes and a lease each
while they wait on systemd. So at most `limit` starts run at once. The rest
wait in one queue per caller (uid), and a freed turn goes to the next
caller in round robin: one client that floods creates cannot starve the
others. Past `max_waiting` a new start is refused with Busy instead of
joining a queue it would wait in for minutes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from quiltd.errors import Busy


class FairTurns:
    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self._running = 0
        self._queues: OrderedDict[int, deque[asyncio.Future[None]]] = OrderedDict()
        self._waiting = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def check_room(self, what: str) -> None:
        """Busy if a new turn would wait behind max_waiting others: say so before anything is made."""
        if self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} {what} are waiting for one of {self.limit} turns; try again shortly")

    @asynccontextmanager
    async def turn(self, uid: int) -> AsyncIterator[None]:
        if self._running < self.limit and not self._waiting:
            self._running += 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self._queues.setdefault(uid, deque()).append(granted)
            self._waiting += 1
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()  # handed a turn while being cancelled: pass it on
                else:
                    self._forget(uid, granted)
                raise
        try:
            yield
        finally:
            self._release()

    def _forget(self, uid: int, granted: asyncio.Future[None]) -> None:
        queue = self._queues.get(uid)
        if queue is not None and granted in queue:
            queue.remove(granted)
            self._waiting -= 1
            if not queue:
                del self._queues[uid]

    def _release(self) -> None:
        self._running -= 1
        while self._queues and self._running < self.limit:
            uid, queue = next(iter(self._queues.items()))
            granted = queue.popleft()
            self._waiting -= 1
            # This caller goes to the back: the next turn is someone else's.
            del self._queues[uid]
            if queue:
                self._queues[uid] = queue
            if not granted.done():
                self._running += 1
                granted.set_result(None)
