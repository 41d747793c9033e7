"""State changes nobody waits to see fail are retried until they commit.

A container that exits, or a background start that ends, changes state with
no caller to hand a Busy or NoSpace error to. Dropped, that change would be
lost for good: the container would stay `running` and WaitContainer would
never return. So such a commit goes through this queue: tried at once, and
while the store cannot be written (another process holds its lock, the disk
is full), tried again on the event loop with growing pauses, in the order
the changes happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from quiltd.errors import Busy, NoSpace

log = logging.getLogger("quiltd")

FIRST_RETRY_SEC = 0.1
LAST_RETRY_SEC = 5.0


class CommitQueue:
    def __init__(self, first_sec: float = FIRST_RETRY_SEC, last_sec: float = LAST_RETRY_SEC) -> None:
        self._first = first_sec
        self._last = last_sec
        self._delay = first_sec
        self._pending: deque[tuple[str, Callable[[], None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def run(self, what: str, commit: Callable[[], None]) -> None:
        """Commits now, or once those queued before have committed; any error but Busy/NoSpace raises."""
        if not self._pending:
            try:
                commit()
                return
            except (Busy, NoSpace) as e:
                log.warning("could not record %s, retrying until it commits: %s", what, e)
        self._pending.append((what, commit))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        while self._pending:
            what, commit = self._pending[0]
            try:
                commit()
            except (Busy, NoSpace):
                self._delay = min(self._last, self._delay * 2)
                self._schedule()
                return
            except Exception:
                log.exception("recording %s failed", what)
            else:
                log.info("recorded %s after all", what)
            self._pending.popleft()
        self._delay = self._first

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
