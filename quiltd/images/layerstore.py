"""Image layers kept once, by diff_id, and shared by every image built on them.

A layer is the directory layers/<diff_id> (the sha256 of its uncompressed
tar, as the image config names it), in overlayfs's format: images/ holds
no copy of a layer per image, and a container's overlay stacks the layers
of its image as lower directories. The store (SQLite) records which image
holds which layer; this module owns the directories.

A layer is extracted into layers/.part-<random> and renamed to its diff_id
only once it is complete and verified, so a crash leaves a .part directory,
never a half layer under a real name; recovery removes those. A layer no
image uses any more is renamed to .gone-<random> first (atomic, so a start
never sees half of it), then removed by the cleaner.

Imports run in worker threads and RemoveImage on the event loop: an import
pins each layer it looked up, and a pinned layer is never retired, so a
layer found present stays present until the image using it is on record.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from quiltd.fs.remove import remove_path

DIFF_ID_RE = re.compile(r"[0-9a-f]{64}")
# overlayfs takes its options in one page: past this many stacked layers an
# image is extracted into one directory of its own instead, as before.
MAX_STACKED = 24
_SCRATCH = ".part-"
_RETIRED = ".gone-"


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._pins: collections.Counter[str] = collections.Counter()

    def path(self, diff_id: str) -> Path:
        assert DIFF_ID_RE.fullmatch(diff_id), diff_id
        return self.root / diff_id

    def pin(self, diff_id: str) -> bool:
        """Keeps the layer from being retired until unpin; True if it is stored already."""
        with self._lock:
            self._pins[diff_id] += 1
            return self.path(diff_id).is_dir()

    def unpin(self, diff_ids: Iterable[str]) -> None:
        with self._lock:
            for diff_id in diff_ids:
                self._pins[diff_id] -= 1
                if self._pins[diff_id] <= 0:
                    del self._pins[diff_id]

    def scratch(self) -> Path:
        """A new name to extract a layer into, under the store."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root / f"{_SCRATCH}{secrets.token_hex(8)}"

    def commit(self, scratch: Path, diff_id: str) -> None:
        """Gives the complete, verified layer in scratch its name; a copy stored meanwhile wins."""
        try:
            os.rename(scratch, self.path(diff_id))
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_path(scratch)  # another import stored the same layer first

    def retire(self, diff_id: str) -> Path | None:
        """Takes an unused layer out of use: its new name for the cleaner, None if pinned or gone."""
        with self._lock:
            if self._pins[diff_id] > 0:
                return None
            gone = self.root / f"{_RETIRED}{secrets.token_hex(8)}"
            try:
                os.rename(self.path(diff_id), gone)
            except FileNotFoundError:
                return None
            return gone

    def leftovers(self, recorded: set[str]) -> list[Path]:
        """What a cut-off import or removal left: scratch, retired and unrecorded layers.

        For recovery, which runs before any import of this daemon.
        """
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name.startswith((_SCRATCH, _RETIRED))
                      or (DIFF_ID_RE.fullmatch(p.name) and p.name not in recorded))
