"""Stops every process of a container's scope for a moment, and lets them go on.

CommitContainer copies a running container's writable layer: its processes
must not write while the copy is read, or the image holds half a write.

On cgroup v2 the scope's own cgroup.freeze is written. On v1 systemd puts
no scope in the freezer hierarchy, so the scope's processes are moved into
a freezer group of our own (quilt-freeze-<id>), frozen there, and moved
back to the root group when thawed. A child a process forks while the moves
run lands in its parent's group, so the moves repeat until every process of
the scope is in the group. A daemon killed while a container is frozen
leaves such a group: recovery (thaw_leftovers) thaws it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from quiltd.errors import Internal

CGROUP_ROOT = Path("/sys/fs/cgroup")
SLICE = "quilt.slice"
GROUP_PREFIX = "quilt-freeze-"
FREEZE_TIMEOUT_SEC = 10.0


class Freezer:
    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self._root = root
        self._unified = (root / "cgroup.controllers").exists()

    @property
    def method(self) -> str:
        """What freezes: "cgroup-v2" (cgroup.freeze) or "cgroup-v1-freezer"."""
        return "cgroup-v2" if self._unified else "cgroup-v1-freezer"

    @contextlib.asynccontextmanager
    async def frozen(self, container_id: str, unit: str) -> AsyncIterator[None]:
        """Every process of unit is frozen inside the block, and thawed after it, whatever happens."""
        await self._freeze(container_id, unit)
        try:
            yield
        finally:
            self._thaw(container_id, unit)

    def _scope(self, unit: str) -> Path:
        if self._unified:
            return self._root / SLICE / unit
        return self._root / "systemd" / SLICE / unit

    def _group(self, container_id: str) -> Path:
        return self._root / "freezer" / f"{GROUP_PREFIX}{container_id}"

    async def _freeze(self, container_id: str, unit: str) -> None:
        try:
            if self._unified:
                (self._scope(unit) / "cgroup.freeze").write_text("1")
                await self._until(lambda: "frozen 1" in (self._scope(unit) / "cgroup.events").read_text())
                return
            group = self._group(container_id)
            group.mkdir(exist_ok=True)
            for _ in range(100):
                outside = _pids(self._scope(unit)) - _pids(group)
                if not outside:
                    break
                for pid in outside:
                    with contextlib.suppress(ProcessLookupError):
                        (group / "cgroup.procs").write_text(str(pid))
            (group / "freezer.state").write_text("FROZEN")
            await self._until(lambda: (group / "freezer.state").read_text().strip() == "FROZEN")
        except OSError as e:
            self._thaw(container_id, unit)
            raise Internal(f"could not freeze {unit}: {e}") from e

    async def _until(self, done: object) -> None:
        assert callable(done)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FREEZE_TIMEOUT_SEC
        while not done():
            if loop.time() > deadline:
                raise OSError(f"not frozen after {FREEZE_TIMEOUT_SEC:.0f} s")
            await asyncio.sleep(0.005)

    def _thaw(self, container_id: str, unit: str) -> None:
        if self._unified:
            with contextlib.suppress(OSError):
                (self._scope(unit) / "cgroup.freeze").write_text("0")
            return
        thaw_group(self._group(container_id))

    def thaw_leftovers(self) -> list[str]:
        """Thaws what a daemon killed mid-commit left frozen (v1); the ids of those containers."""
        parent = self._root / "freezer"
        if self._unified or not parent.is_dir():
            return []
        thawed = []
        for group in parent.iterdir():
            if group.is_dir() and group.name.startswith(GROUP_PREFIX):
                thaw_group(group)
                thawed.append(group.name.removeprefix(GROUP_PREFIX))
        return thawed


def thaw_group(group: Path) -> None:
    """Thaws a v1 freezer group, moves its processes back to the root group and removes it."""
    with contextlib.suppress(FileNotFoundError):
        (group / "freezer.state").write_text("THAWED")
        root_procs = group.parent / "cgroup.procs"
        for _ in range(100):
            pids = _pids(group)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    root_procs.write_text(str(pid))
        with contextlib.suppress(OSError):
            os.rmdir(group)


def _pids(group: Path) -> set[int]:
    try:
        return {int(line) for line in (group / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()
