"""Checks on the CreateContainer options that add mounts: `mounts` and `tmpfs`.

quiltd.core.parse reads the options with these; the core checks the
sources of binds against the caller's policy when it creates.

Every refusal is an InvalidArgument that names the offending entry, and it
happens before anything is recorded or made.
"""

from __future__ import annotations

import os

from quiltd.errors import AccessDenied, InvalidArgument
from quiltd.runtime import mounts

# Init mounts its own filesystems there after the binds: a bind below would be hidden or fight them.
RESERVED_TARGETS = ("/proc", "/sys", "/dev")
MIN_TMPFS = 4096
MAX_TMPFS = 1 << 40


def check_target(target: object, what: str) -> str:
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        raise InvalidArgument(f"{what}: the target must be an absolute path, got {target!r}")
    parts = target.split("/")[1:]
    if ".." in parts or "." in parts or "" in parts[:-1]:
        raise InvalidArgument(f"{what}: the target {target!r} must be a plain path, without '.', '..' "
                              "or '//'")
    target = target.rstrip("/") or "/"
    if target == "/":
        raise InvalidArgument(f"{what}: the root cannot be a mount target")
    for reserved in RESERVED_TARGETS:
        if target == reserved or target.startswith(reserved + "/"):
            raise InvalidArgument(f"{what}: the target {target!r} is under {reserved}, "
                                  "which quiltd mounts itself")
    return target


def check_sources(binds: tuple[tuple[str, str, bool], ...], policy: mounts.SourcePolicy) -> None:
    """Each bind's host source (its shape checked already) exists and is one policy allows.

    The source is opened and checked here, for a clear answer now; init
    opens and checks it again at each start, and binds what it opened.
    """
    for source, target, _ in binds:
        what = f"mount {source} -> {target}"
        try:
            os.close(mounts.open_source(source, policy))
        except mounts.StateSource as e:
            raise InvalidArgument(f"{what}: {e.strerror}") from None
        except mounts.SourceRefused as e:
            raise AccessDenied(f"{what}: {e.strerror}; only root may bind other host paths") from None
        except FileNotFoundError:
            raise InvalidArgument(f"{what}: unknown mount source {source!r}: no such file or directory") \
                from None
        except OSError as e:
            raise InvalidArgument(f"{what}: cannot open the source {source!r}: {e.strerror}") from None


def parse_tmpfs(value: object) -> tuple[tuple[str, int], ...]:
    """`tmpfs` a(st): (target, size in bytes)."""
    if not isinstance(value, list | tuple):
        raise InvalidArgument("option tmpfs must be a list of (target, size_bytes) (a(st))")
    result = []
    for entry in value:
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)):
            raise InvalidArgument(f"tmpfs: entry {entry!r} is not (target, size_bytes)")
        target, size = entry
        what = f"tmpfs {target}"
        if not MIN_TMPFS <= size <= MAX_TMPFS:
            raise InvalidArgument(f"{what}: size must be between {MIN_TMPFS} and {MAX_TMPFS} bytes, "
                                  f"got {size}")
        result.append((check_target(target, what), size))
    return tuple(result)
