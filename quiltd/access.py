"""Who may use quiltd: root and members of the `quilt` group.

Plain Python: the bus layer finds a caller's credentials (from the bus or
SO_PEERCRED) and asks here. Ids are only ever taken from the kernel or the
bus, never from a caller's arguments.
"""

from __future__ import annotations

import grp
from dataclasses import dataclass

GROUP = "quilt"


@dataclass(frozen=True)
class Credentials:
    uid: int
    gids: frozenset[int]

    def __str__(self) -> str:
        return f"uid {self.uid}"

    @property
    def is_root(self) -> bool:
        """uid 0: may do everything. Membership of group quilt is not root (see security.md)."""
        return self.uid == 0


def group_id(name: str = GROUP) -> int | None:
    # Looked up at each decision (decisions are cached per connection): the
    # group may be created while quiltd runs, e.g. when the package is installed.
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def allowed(creds: Credentials, group: str = GROUP) -> bool:
    if creds.uid == 0:
        return True
    gid = group_id(group)
    return gid is not None and gid in creds.gids
