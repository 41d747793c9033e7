"""Freezing and thawing every process of a container's scope (PauseContainer, ResumeContainer).

Two ways, chosen once from the host's cgroup layout:

- ``systemd``: on the unified hierarchy (cgroup v2), systemd's own
  FreezeUnit/ThawUnit on the scope, which write cgroup.freeze and answer
  once the kernel reports the scope frozen or thawed.
- ``cgroup-v1``: on a legacy or hybrid host systemd cannot freeze (its
  FreezeUnit answers NotSupported), and it manages no v1 freezer hierarchy.
  quiltd then keeps a freezer cgroup of its own per scope,
  ``/sys/fs/cgroup/freezer/quilt/<scope>``, moves every process of the
  scope into it and writes FROZEN. A process forked while the moves are
  under way can land outside it: the moves are repeated until every
  process of the scope is in the frozen group (a frozen process forks no
  more, and one moved into a frozen group is frozen on arrival). The
  processes stay in that group once thawed, which costs nothing; the group
  is removed with the container.

Neither way needs the container's cooperation, and a frozen process stays
frozen whether or not quiltd runs: a paused container outlives a restart
of the daemon as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import time
from pathlib import Path
from typing import Protocol

from quiltd.errors import Internal, Timeout

CGROUP_ROOT = Path("/sys/fs/cgroup")
# How long a v1 freeze may stay FREEZING (a process in an uninterruptible
# sleep, on a slow disk say) before it is undone and the pause refused.
FREEZE_TIMEOUT_SEC = 5.0
MOVE_ROUNDS = 20


class FreezerKind(str, enum.Enum):
    SYSTEMD = "systemd"  # FreezeUnit/ThawUnit, cgroup v2
    CGROUP_V1 = "cgroup-v1"  # quiltd's own groups in the v1 freezer hierarchy
    NONE = "none"  # neither: pause is refused


class UnitFreezer(Protocol):
    """What the systemd way needs of scopes.Systemd."""

    async def freeze(self, unit: str) -> None: ...
    async def thaw(self, unit: str) -> None: ...


def detect(root: Path = CGROUP_ROOT) -> FreezerKind:
    if (root / "cgroup.controllers").exists():
        return FreezerKind.SYSTEMD
    if (root / "freezer" / "cgroup.procs").exists():
        return FreezerKind.CGROUP_V1
    return FreezerKind.NONE


class Freezer:
    def __init__(self, systemd: UnitFreezer, slice_name: str, root: Path = CGROUP_ROOT,
                 kind: FreezerKind | None = None) -> None:
        self._systemd = systemd
        self.kind = detect(root) if kind is None else kind
        # The scope's processes, as systemd placed them: its named hierarchy
        # exists on legacy and hybrid hosts alike.
        self._scopes = root / "systemd" / slice_name
        self._groups = root / "freezer" / "quilt"

    async def freeze(self, unit: str) -> None:
        if self.kind == FreezerKind.SYSTEMD:
            await self._systemd.freeze(unit)
        elif self.kind == FreezerKind.CGROUP_V1:
            await asyncio.to_thread(self._freeze_v1, unit)
        else:
            raise Internal("this host has no cgroup freezer quiltd can use")

    async def thaw(self, unit: str) -> None:
        if self.kind == FreezerKind.SYSTEMD:
            await self._systemd.thaw(unit)
        elif self.kind == FreezerKind.CGROUP_V1:
            await asyncio.to_thread(self._thaw_v1, unit)

    def forget(self, unit: str) -> None:
        """Removes the unit's v1 freezer group once its processes are gone; a no-op otherwise."""
        if self.kind != FreezerKind.CGROUP_V1:
            return
        try:
            os.rmdir(self._groups / unit)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBUSY):
                raise Internal(f"could not remove the freezer group of {unit}: {e}") from e

    def groups(self) -> list[str]:
        """The units that have a v1 freezer group (none for the systemd way)."""
        if self.kind != FreezerKind.CGROUP_V1 or not self._groups.is_dir():
            return []
        return sorted(p.name for p in self._groups.iterdir() if p.is_dir())

    def frozen(self, unit: str) -> bool | None:
        """Whether the unit's v1 group is frozen or freezing; None where quiltd keeps no group."""
        if self.kind != FreezerKind.CGROUP_V1:
            return None
        try:
            return (self._groups / unit / "freezer.state").read_text().strip() != "THAWED"
        except FileNotFoundError:
            return False

    # cgroup v1

    def _freeze_v1(self, unit: str) -> None:
        group = self._groups / unit
        try:
            group.mkdir(parents=True, exist_ok=True)
            for _ in range(MOVE_ROUNDS):
                self._move_all(unit, group)
                self._set_state(group, "FROZEN")
                self._wait_frozen(group)
                if _pids(self._scopes / unit) <= _pids(group):
                    return
        except FileNotFoundError as e:
            # The container ended meanwhile, and its exit removed the group
            # (forget): Internal, which the manager answers by the state.
            with contextlib.suppress(Internal):
                self._thaw_v1(unit)
            raise Internal(f"the freezer group of {unit} went while it was frozen: {e.strerror}") from e
        except BaseException:
            self._thaw_v1(unit)
            raise
        self._thaw_v1(unit)
        raise Internal(f"the processes of {unit} kept forking outside its freezer group")

    def _thaw_v1(self, unit: str) -> None:
        group = self._groups / unit
        if group.is_dir():
            self._set_state(group, "THAWED")

    def _move_all(self, unit: str, group: Path) -> None:
        scope = self._scopes / unit
        if not scope.is_dir():
            raise Internal(f"{unit} has no cgroup: its container is not running")
        inside = _pids(group)
        fd = os.open(group / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for pid in sorted(_pids(scope) - inside):
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    @staticmethod
    def _set_state(group: Path, state: str) -> None:
        try:
            (group / "freezer.state").write_text(state)
        except OSError as e:
            raise Internal(f"could not set {group} {state}: {e}") from e

    @staticmethod
    def _wait_frozen(group: Path) -> None:
        deadline = time.monotonic() + FREEZE_TIMEOUT_SEC
        pause = 0.001
        while (group / "freezer.state").read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                raise Timeout(f"the container's processes did not freeze within {FREEZE_TIMEOUT_SEC:g} s "
                              "(one may be in an uninterruptible sleep); it was left running")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _pids(group: Path) -> set[int]:
    """Every process in a cgroup and the cgroups below it."""
    found: set[int] = set()
    for dirpath, _, _ in os.walk(group):
        with contextlib.suppress(FileNotFoundError):  # a group removed meanwhile
            found.update(int(line) for line in Path(dirpath, "cgroup.procs").read_text().split())
    return found
