"""A fork's writable layer on its way into the layer store, and what recovery does with one cut off.

ForkContainer renames the source's writable layer aside (upper.fork-<layer>)
before the transaction that records the shared layer, and moves it into the
layer store after. A daemon killed in between leaves the renamed directory;
its record decides whether the fork happened.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from quiltd.fs.remove import remove_path
from quiltd.images.layerstore import DIFF_ID_RE

PENDING_PREFIX = "upper.fork-"


def finish_pending(pending: Path, layer: Path) -> None:
    """Moves a frozen writable layer into the layer store and clears the old overlay work dir."""
    os.rename(pending, layer)
    work = pending.parent / "work"
    if work.is_dir():
        remove_path(work)


def recover(container_dirs: Path, recorded: set[str], layers_root: Path) -> list[str]:
    """Finishes or undoes forks a killed daemon left half done; what it did, for the log.

    A writable layer renamed aside (upper.fork-<layer>) whose layer is on
    record goes into the layer store: the fork was committed. One whose layer
    is on no record goes back: the fork never happened.
    """
    done: list[str] = []
    if not container_dirs.is_dir():
        return done
    for cdir in container_dirs.iterdir():
        for pending in cdir.glob(f"{PENDING_PREFIX}*"):
            diff_id = pending.name.removeprefix(PENDING_PREFIX)
            if DIFF_ID_RE.fullmatch(diff_id) and diff_id in recorded:
                finish_pending(pending, layers_root / diff_id)
                done.append(f"fork of {cdir.name}: layer {diff_id} finished")
            elif not (cdir / "upper").exists():
                os.rename(pending, cdir / "upper")
                done.append(f"fork of {cdir.name}: undone, writable layer put back")
            else:
                with contextlib.suppress(OSError):
                    remove_path(pending)
                done.append(f"fork of {cdir.name}: stray {pending.name} removed")
    return done
