"""The cleanup service: leftovers are removed by a worker that never gives up.

Removing a container deletes its row and records what is left to undo (its
scope, its layer, its run dir) in one transaction. The worker undoes each
piece right away and, when that fails, again later with growing pauses. The
tasks live in the store, so a daemon killed half-way finishes the job on its
next start, and API calls never wait behind a stubborn leftover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from quiltd.core.mechanisms import Scopes
from quiltd.errors import Busy, Internal, NoSpace
from quiltd.fs.remove import remove_path
from quiltd.model import CleanupKind, CleanupTask
from quiltd.store.database import Store

log = logging.getLogger("quiltd")

FIRST_RETRY_SEC = 1.0
LAST_RETRY_SEC = 300.0


def backoff_sec(attempts: int) -> float:
    return float(min(LAST_RETRY_SEC, FIRST_RETRY_SEC * 2 ** max(0, attempts - 1)))


class Cleaner:
    """Retries each task when its pause is over, timed on the monotonic clock.

    A task's next attempt is also stored as wall-clock µs, for
    GetCleanupStatus and for a daemon that starts again. The wall clock can be
    set back (a day back would stall every retry for a day) or forward, so it
    never times a pause while the daemon runs, and a stored time is believed
    only up to the task's own pause.
    """

    def __init__(self, store: Store, systemd: Scopes, now_usec: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._systemd = systemd
        self._now_usec = now_usec
        self._monotonic = monotonic
        self._due: dict[int, float] = {}  # task id -> monotonic time of its next attempt
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy: set[int] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def status(self) -> list[CleanupTask]:
        return self._store.list_cleanups()

    async def now(self, ids: Iterable[int]) -> None:
        """Tries the given tasks at once; what fails stays queued for the worker.

        Scopes go first, one by one: a process left in one may still be using
        a tree. The trees then go side by side, each on a worker thread, so a
        removal waits for the slowest of them and not for their sum.
        """
        wanted = set(ids)
        tasks = [task for task in self._store.list_cleanups() if task.id in wanted]
        for task in tasks:
            if task.kind == CleanupKind.SCOPE:
                await self._attempt(task)
        await asyncio.gather(*(self._attempt(task) for task in tasks if task.kind != CleanupKind.SCOPE))
        self._wake.set()

    def _due_at(self, task: CleanupTask) -> float:
        due = self._due.get(task.id)
        if due is None:
            # Not timed here yet (queued by another path, or before a
            # restart): its stored time, but never further off than its pause.
            pause = backoff_sec(task.attempts) if task.attempts else 0.0
            ahead = (task.next_usec - self._now_usec()) / 1e6
            due = self._monotonic() + min(max(0.0, ahead), pause)
            self._due[task.id] = due
        return due

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a task queued meanwhile wakes us again
            try:
                for task in self._store.list_cleanups():
                    if self._due_at(task) <= self._monotonic():
                        await self._attempt(task)  # one that finished meanwhile is a no-op
            except (Busy, NoSpace) as e:
                # The store cannot record the outcome now; the tasks stay queued.
                log.warning("cleanup paused: %s", e)
                await asyncio.sleep(FIRST_RETRY_SEC)
                continue
            pending = self._store.list_cleanups()
            live = {t.id for t in pending}
            for gone in set(self._due) - live:
                del self._due[gone]
            wait = None
            if pending:
                wait = max(0.0, min(self._due_at(t) for t in pending) - self._monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _attempt(self, task: CleanupTask) -> None:
        if task.id in self._busy:
            return
        self._busy.add(task.id)
        try:
            await self._perform(task)
        except Exception as e:
            attempts = task.attempts + 1
            delay = backoff_sec(attempts)
            log.warning("cleanup of %s %s failed (attempt %d, next in %.0f s): %s",
                        task.kind.value, task.target, attempts, delay, e)
            with self._store.transaction():
                self._store.defer_cleanup(task.id, attempts, self._now_usec() + int(delay * 1e6), str(e))
            self._due[task.id] = self._monotonic() + delay
        else:
            log.debug("cleaned up %s %s", task.kind.value, task.target)
            with self._store.transaction():
                self._store.finish_cleanup(task.id)
        finally:
            self._busy.discard(task.id)

    def _perform(self, task: CleanupTask) -> Awaitable[None]:
        if task.kind == CleanupKind.SCOPE:
            return self._end_scope(task.target)
        return asyncio.get_running_loop().run_in_executor(None, remove_path, Path(task.target))

    async def _end_scope(self, unit: str) -> None:
        if self._systemd.is_empty(unit):
            # Its processes are gone (the usual case: a removed container's
            # init was waited for): systemd ends and collects an empty scope
            # on its own, and two calls to it would only add their round trips.
            return
        # What is left in a leftover scope has nothing to save, and an init
        # (its PID namespace's first process, as a warm pool's member that
        # outlived the daemon is) takes no SIGTERM from outside: a stop
        # alone would wait out systemd's stop timeout, 90 s by default.
        with contextlib.suppress(Internal):  # not loaded, or empty already
            await self._systemd.kill(unit, signal.SIGKILL)
        await self._systemd.stop(unit)
