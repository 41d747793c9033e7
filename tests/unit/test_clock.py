"""A wall clock set back: order, durations and retry pauses must not follow it.

A system test cannot move the clock: the sandbox shares the host's. So the
store, the exit time and the cleaner are tested here with the clocks they
are handed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from quiltd.core import cleanup
from quiltd.core.cleanup import Cleaner
from quiltd.core.manager import finished_usec
from quiltd.model import CleanupKind, Container, ContainerSpec
from quiltd.store.database import MIGRATIONS, Store

DAY_USEC = 86_400 * 1_000_000
T0 = 1_800_000_000 * 1_000_000


def _container(cid: str, created_usec: int) -> Container:
    return Container(id=cid, name=f"c{cid}", image="busybox", image_id="x", command=("true",),
                     spec=ContainerSpec(), created_usec=created_usec)


def test_list_containers_keeps_the_order_of_creation_when_the_clock_goes_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    # Created one after the other, while the wall clock was set back a day each time.
    for i, created in enumerate((T0, T0 - DAY_USEC, T0 - 2 * DAY_USEC)):
        with store.transaction():
            store.insert_container(_container(f"{i:016x}", created))
    assert [c.id[-1] for c in store.list_containers()] == ["0", "1", "2"]
    with store.transaction():
        store.delete_container(f"{2:016x}")  # the newest gone, the next still comes last
        store.insert_container(_container(f"{3:016x}", T0 - 3 * DAY_USEC))
    assert [c.id[-1] for c in store.list_containers()] == ["0", "1", "3"]
    assert [c.id[-1] for c in store.list_container_listings()] == ["0", "1", "3"]  # what ListContainers reads


def test_rows_from_before_the_sequence_keep_their_created_order(tmp_path: Path) -> None:
    path = tmp_path / "quilt.db"
    # The schema just before the migration that brought the sequence.
    old = MIGRATIONS[:next(i for i, script in enumerate(MIGRATIONS) if "ADD COLUMN seq" in script)]
    db = sqlite3.connect(path)
    for number, script in enumerate(old, start=1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={number}")
    for cid, created in (("b", T0 + 1), ("a", T0), ("c", T0 + 1)):
        db.execute("INSERT INTO containers (id, name, image, image_id, command, spec, state, created_usec) "
                   "VALUES (?, ?, 'busybox', 'x', ?, ?, 'created', ?)",
                   (cid, cid, '["true"]', '{"env": [], "labels": []}', created))
    db.commit()
    db.close()
    store = Store(path)
    assert [c.id for c in store.list_containers()] == ["a", "b", "c"]
    with store.transaction():
        store.insert_container(_container("d", T0 - DAY_USEC))
    assert [c.id for c in store.list_containers()] == ["a", "b", "c", "d"]


def test_a_run_lasts_what_the_boot_clock_says_whatever_the_wall_clock_did() -> None:
    c = Container(id="0", name="c", image="busybox", image_id="x", command=("true",), spec=ContainerSpec(),
                  created_usec=T0 - 5, started_usec=T0, started_boot_usec=1_000_000)
    # Ran 3 s by the boot clock; meanwhile the wall clock was set back a day.
    finished = finished_usec(c, now=T0 - DAY_USEC + 3_000_000, boot_now=4_000_000)
    assert finished - c.started_usec == 3_000_000
    # Found ended after a restart, with no boot clock to go by: never before its start.
    assert finished_usec(c, now=T0 - DAY_USEC, boot_now=None) == T0


class _FailingOnce:
    """systemd's StopUnit: fails the first time, then works."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def is_empty(self, unit: str) -> bool:
        return False  # processes are left: the cleaner must stop it

    async def kill(self, unit: str, signum: int) -> None:
        pass  # the cleaner kills what is left before it stops the scope

    async def stop(self, unit: str) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) == 1:
            raise RuntimeError("systemd is busy")


def test_a_cleanup_retry_is_not_held_up_by_a_clock_set_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    wall = [T0]
    systemd = _FailingOnce()

    async def scenario() -> None:
        cleaner = Cleaner(store, systemd, lambda: wall[0])  # type: ignore[arg-type]
        with store.transaction():
            store.add_cleanup(CleanupKind.SCOPE, "quilt-0123456789abcdef.scope")
        cleaner.start()
        try:
            while not systemd.calls:
                await asyncio.sleep(0.01)
            wall[0] -= DAY_USEC  # right after the first attempt failed
            deadline = time.monotonic() + cleanup.FIRST_RETRY_SEC + 3
            while store.list_cleanups() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            cleaner.stop()
        assert store.list_cleanups() == [], "the retry waited for the wall clock to catch up"
        assert len(systemd.calls) == 2
        assert systemd.calls[1] - systemd.calls[0] >= cleanup.FIRST_RETRY_SEC * 0.9

    asyncio.run(scenario())


def test_a_stored_next_attempt_is_believed_only_up_to_its_pause(tmp_path: Path) -> None:
    # A task deferred before a restart, by a clock that was a day ahead then.
    store = Store(tmp_path / "quilt.db")
    with store.transaction():
        task_id = store.add_cleanup(CleanupKind.SCOPE, "quilt-0123456789abcdef.scope")
        store.defer_cleanup(task_id, 1, T0 + DAY_USEC, "failed")
    mono = [100.0]
    cleaner = Cleaner(store, _FailingOnce(), lambda: T0, lambda: mono[0])  # type: ignore[arg-type]
    (task,) = store.list_cleanups()
    assert cleaner._due_at(task) == 100.0 + cleanup.backoff_sec(1)
