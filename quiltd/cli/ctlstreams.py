"""quiltctl's side of descriptor passing: tar streams for `cp`, relays for `exec`.

quiltd reads and writes the descriptors quiltctl passes; these helpers make
and consume the other ends, in threads, so quiltctl's event loop only waits
for quiltd's answer.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def passable(fd: int) -> bool:
    """Whether quiltd takes fd as it is: a pipe, a socket or a regular file (never a terminal)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


def start(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def pump(src: int, dst: int, close_dst: bool) -> None:
    """Copies src to dst until end of file or a broken pipe; closes src (and dst if asked)."""
    try:
        while chunk := os.read(src, CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
    except OSError:
        pass
    finally:
        os.close(src)
        if close_dst:
            with contextlib.suppress(OSError):
                os.close(dst)


def write_tar(source: Path, arcname: str, fd: int) -> None:
    """Writes source (recursively, links not followed) as a tar stream named arcname to fd, then closes it."""
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb", buffering=CHUNK) as out, \
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(source, arcname=arcname)


def extract_tar(fd: int, dest: Path, rename_top: str | None, errors: list[str]) -> None:
    """Extracts the tar stream read from fd into dest, its top component renamed if asked; closes fd.

    The stream comes from a container, so it is checked like any untrusted
    archive: no absolute names, no '..', nothing through a symlink it made,
    no device nodes.
    """
    made_links: set[str] = set()
    try:
        with os.fdopen(fd, "rb", buffering=CHUNK) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if rename_top is not None:
                    member.name = _renamed(member.name, rename_top)
                    if member.islnk():
                        member.linkname = _renamed(member.linkname, rename_top)
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts:
                    raise ValueError(f"unsafe name in the stream: {member.name!r}")
                if any("/".join(parts[:i]) in made_links for i in range(1, len(parts))):
                    raise ValueError(f"member {member.name!r} lies under a symlink of the stream")
                if member.ischr() or member.isblk():
                    continue  # device nodes are not made on the host
                if member.issym():
                    made_links.add(member.name)
                if hasattr(tarfile, "tar_filter"):
                    tar.extract(member, dest, filter="tar")
                else:  # Python before 3.11.4: the checks above stand in for the filter
                    tar.extract(member, dest)
            # What quiltd writes after the archive's end, if anything.
            while stream.read(CHUNK):
                pass
    except (OSError, ValueError, tarfile.TarError) as e:
        errors.append(str(e))


def _renamed(name: str, top: str) -> str:
    first, sep, rest = name.partition("/")
    return top + sep + rest if first else name
