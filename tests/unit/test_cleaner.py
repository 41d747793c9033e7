"""The cleaner's immediate attempt (Cleaner.now), as RemoveContainer uses it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from quiltd.core.cleanup import Cleaner
from quiltd.model import CleanupKind
from quiltd.store.database import Store

UNIT = "quilt-0123456789abcdef.scope"


class _Scopes:
    """systemd's KillUnit and StopUnit: notes which trees still existed when the scope stopped."""

    def __init__(self, trees: list[Path], empty: bool = False) -> None:
        self.trees = trees
        self.empty = empty
        self.trees_at_stop: list[bool] = []
        self.calls: list[str] = []

    def is_empty(self, unit: str) -> bool:
        return self.empty

    async def kill(self, unit: str, signum: int) -> None:
        self.calls.append("kill")

    async def stop(self, unit: str) -> None:
        self.calls.append("stop")
        await asyncio.sleep(0.01)  # a round trip to systemd: the trees must wait for it all the same
        self.trees_at_stop = [tree.exists() for tree in self.trees]


def _tree(root: Path, name: str) -> Path:
    tree = root / name
    (tree / "upper" / "etc").mkdir(parents=True)
    (tree / "upper" / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    return tree


def test_the_scope_stops_before_any_tree_goes_and_then_every_task_is_done(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    trees = [_tree(tmp_path, "layer"), _tree(tmp_path, "run")]
    scopes = _Scopes(trees)
    cleaner = Cleaner(store, scopes, lambda: time.time_ns() // 1000)  # type: ignore[arg-type]
    with store.transaction():
        ids = [store.add_cleanup(CleanupKind.TREE, str(trees[0])),
               store.add_cleanup(CleanupKind.SCOPE, UNIT),
               store.add_cleanup(CleanupKind.TREE, str(trees[1]))]

    asyncio.run(cleaner.now(ids))

    assert scopes.calls == ["kill", "stop"]
    assert scopes.trees_at_stop == [True, True], "a tree went while its scope could still hold it"
    assert not any(tree.exists() for tree in trees)
    assert store.list_cleanups() == []


def test_a_tree_that_cannot_go_stays_queued_and_the_other_still_goes(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    good = _tree(tmp_path, "good")
    stubborn = _tree(tmp_path, "stubborn")
    cleaner = Cleaner(store, _Scopes([]), lambda: time.time_ns() // 1000)  # type: ignore[arg-type]
    with store.transaction():
        ids = [store.add_cleanup(CleanupKind.TREE, str(stubborn / "not-a-dir" / "x")),
               store.add_cleanup(CleanupKind.TREE, str(good))]
    (stubborn / "not-a-dir").write_text("a file where a directory is expected")

    asyncio.run(cleaner.now(ids))

    assert not good.exists()
    (left,) = store.list_cleanups()
    assert left.target == str(stubborn / "not-a-dir" / "x")
    assert left.attempts == 1 and "Not a directory" in left.last_error


def test_a_scope_with_no_process_left_costs_no_call_to_systemd(tmp_path: Path) -> None:
    # systemd ends and collects an empty scope itself.
    store = Store(tmp_path / "quilt.db")
    scopes = _Scopes([], empty=True)
    cleaner = Cleaner(store, scopes, lambda: time.time_ns() // 1000)  # type: ignore[arg-type]
    with store.transaction():
        ids = [store.add_cleanup(CleanupKind.SCOPE, UNIT)]

    asyncio.run(cleaner.now(ids))

    assert scopes.calls == []
    assert store.list_cleanups() == []
