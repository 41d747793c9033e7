"""Named volumes: directories under the state dir that outlive the containers using them.

A volume is a row in the store and a directory, <state dir>/volumes/<name>.
It is made when first asked for, by CreateVolume or by a container's
`volumes` option, and it stays until RemoveVolume, which the store refuses
while any container on record names it. Containers get it bound the same way
as a `mounts` entry (quiltd/mounts.py), so its target is resolved inside the
container's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from quiltd import grammar
from quiltd.core.cleanup import Cleaner
from quiltd.errors import InvalidArgument, InvalidState, NameTaken, NoSuchVolume
from quiltd.model import CleanupKind, Volume
from quiltd.paths import Paths
from quiltd.runtime import mountopts
from quiltd.store.database import Store


def check_name(name: object) -> str:
    """Volume names follow the container-name rules: they end up as a path component."""
    if not isinstance(name, str) or not grammar.NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid volume name {name!r}: use 1-63 letters, digits or '-', not starting with '-'"
        )
    return name


def parse(value: object) -> tuple[tuple[str, str, bool], ...]:
    """`volumes` a(ssb): (volume name, target, read_only)."""
    if not isinstance(value, list):
        raise InvalidArgument("option volumes must be a list of (name, target, read_only) (a(ssb))")
    result = []
    names: set[str] = set()
    for entry in value:
        if not (isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[2], bool)):
            raise InvalidArgument(f"volumes: entry {entry!r} is not (name, target, read_only)")
        name, target, read_only = entry
        check_name(name)
        if name in names:
            raise InvalidArgument(f"conflicting options: volume {name!r} is given more than once")
        names.add(name)
        result.append((name, mountopts.check_target(target, f"volume {name} -> {target}"), read_only))
    return tuple(result)


def check_targets(*target_lists: Iterable[str]) -> None:
    """No two mounts of any kind may share a target: one would hide the other."""
    seen: set[str] = set()
    for targets in target_lists:
        for target in targets:
            if target in seen:
                raise InvalidArgument(
                    f"conflicting options: {target!r} is the target of more than one mount"
                )
            seen.add(target)


def make_dir(path: Path) -> bool:
    """Makes a volume's directory; True if it was made now, False if it was there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        return False
    return True


def retire_dir(path: Path) -> Path | None:
    """Moves a removed volume's directory out of the way, under a name no volume can have.

    The name is free at once for a new volume, and the cleaner can take its
    time with the old content without ever touching the new one.
    """
    if not os.path.lexists(path):
        return None
    retired = path.parent / f".removed-{secrets.token_hex(8)}"
    os.rename(path, retired)
    return retired


def size_bytes(path: Path) -> int:
    """Bytes of the files under path, counted without following links; may run for a while."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we counted: the container is running
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    elif stat.S_ISREG(st.st_mode):
                        total += st.st_size
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


class Volumes:
    """CreateVolume, RemoveVolume, ListVolumes, and the volumes a container asks for."""

    def __init__(self, store: Store, paths: Paths, cleaner: Cleaner, now_usec: Callable[[], int]) -> None:
        self._store = store
        self._paths = paths
        self._cleaner = cleaner
        self._now_usec = now_usec

    def create(self, name: str) -> Volume:
        check_name(name)
        if self._store.find_volume(name) is not None:
            raise NameTaken(f"a volume named {name!r} exists already")
        made = self.ensure([name])
        try:
            with self._store.transaction():
                self._record(name)
        except BaseException:
            self.undo(made)
            raise
        volume = self._store.find_volume(name)
        assert volume is not None
        return volume

    def ensure(self, names: Iterable[str]) -> list[Path]:
        """Makes the directories of the named volumes; returns those made now, for undo."""
        made: list[Path] = []
        try:
            for name in names:
                path = self._paths.volume_dir(name)
                if make_dir(path):
                    made.append(path)
        except BaseException:
            self.undo(made)
            raise
        return made

    def undo(self, made: Iterable[Path]) -> None:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()

    def attach(self, container_id: str, names: Iterable[str]) -> None:
        """Within the caller's transaction: records the volumes (new ones too) as used by the container."""
        for name in names:
            self._record(name)
            self._store.use_volume(container_id, name)

    def _record(self, name: str) -> None:
        self._store.insert_volume(Volume(name, str(self._paths.volume_dir(name)), self._now_usec()))

    def path(self, name: str) -> str:
        return str(self._paths.volume_dir(name))

    async def remove(self, name: str) -> None:
        check_name(name)
        if self._store.find_volume(name) is None:
            raise NoSuchVolume(f"no volume {name!r}")
        users = self._store.containers_using_volume(name)
        if users:
            raise InvalidState(f"volume {name!r} is used by container(s) {', '.join(users)}")
        path = self._paths.volume_dir(name)
        retired = retire_dir(path)
        try:
            with self._store.transaction():
                self._store.delete_volume(name)
                leftovers = [self._store.add_cleanup(CleanupKind.TREE, str(retired))] if retired else []
        except BaseException:
            if retired is not None:
                os.rename(retired, path)
            raise
        await self._cleaner.now(leftovers)

    async def list(self) -> list[tuple[Volume, int]]:
        """Every volume with the bytes of its files, counted in a thread."""
        loop = asyncio.get_running_loop()
        result = []
        for v in self._store.list_volumes():
            result.append((v, await loop.run_in_executor(None, size_bytes, Path(v.path))))
        return result
