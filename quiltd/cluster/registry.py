"""The cluster-wide name registry: which host each sandbox name lives on.

One detached Ray actor on the head node holds it, so names stay unique
across drivers, and a driver that restarts finds its sandboxes. Its methods
run one at a time (a plain Ray actor), which makes reserve-then-commit
atomic. It holds nothing the hosts do not also hold: every container the
cluster makes carries the cluster's label, so after a head restart the
registry is rebuilt from the hosts as drivers see them (adopt).
"""

from __future__ import annotations

from dataclasses import replace

from quiltd.cluster.records import SandboxRecord
from quiltd.errors import NameTaken, NoSuchContainer


class Registry:
    def __init__(self) -> None:
        self._records: dict[str, SandboxRecord] = {}
        self._pending: set[str] = set()  # reserved, create under way

    def reserve(self, name: str) -> None:
        if name in self._records or name in self._pending:
            where = self._records[name].host if name in self._records else "a create under way"
            raise NameTaken(f"{NameTaken.dbus_name}: sandbox {name!r} exists in the cluster (on {where})")
        self._pending.add(name)

    def reserve_many(self, names: list[str]) -> None:
        """All or none: a name taken (or given twice) reserves nothing."""
        if len(set(names)) != len(names):
            raise NameTaken(f"{NameTaken.dbus_name}: a name is given twice")
        done = []
        try:
            for name in names:
                self.reserve(name)
                done.append(name)
        except NameTaken:
            self._pending.difference_update(done)
            raise

    def commit(self, record: SandboxRecord) -> None:
        self._pending.discard(record.name)
        self._records[record.name] = record

    def commit_many(self, records: list[SandboxRecord]) -> None:
        for r in records:
            self.commit(r)

    def release_many(self, names: list[str]) -> None:
        for name in names:
            self.release(name)

    def release(self, name: str) -> None:
        """Forget a name (its sandbox is removed, or its create failed)."""
        self._pending.discard(name)
        self._records.pop(name, None)

    def get(self, name: str) -> SandboxRecord:
        try:
            return self._records[name]
        except KeyError:
            raise NoSuchContainer(f"{NoSuchContainer.dbus_name}: no sandbox {name!r} in the cluster") \
                from None

    def records(self) -> list[SandboxRecord]:
        return sorted(self._records.values(), key=lambda r: r.name)

    def move(self, name: str, host: str, container_id: str) -> SandboxRecord:
        r = replace(self.get(name), host=host, container_id=container_id,
                    generation=self.get(name).generation + 1)
        self._records[name] = r
        return r

    def adopt(self, found: list[SandboxRecord]) -> dict[str, SandboxRecord | None]:
        """Takes in what a host holds that the registry lacks; answers the record each name has now.

        A name the registry places elsewhere (or on another container) keeps
        its record, and the host removes its copy; a name being created right
        now is left to that create (None).
        """
        for r in found:
            if r.name not in self._records and r.name not in self._pending:
                self._records[r.name] = r
        return {r.name: self._records.get(r.name) for r in found}
