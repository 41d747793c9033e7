"""CheckpointContainer and RestoreContainer: whether CRIU can work here, and why not.

Saving a container's processes takes CRIU, and CRIU must understand the
running kernel: `criu check` says whether it does. quiltd asks once per
start (the answer cannot change without a reboot or a new criu) and
answers both calls NotSupported with the reason: criu is missing, or
criu check failed (its own error lines), or, where it passes, that quiltd
does not checkpoint processes yet. Nothing about the container changes.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING

from quiltd.errors import NotSupported

if TYPE_CHECKING:
    from quiltd.core.manager import Manager

CHECK_TIMEOUT_SEC = 30


async def criu_status() -> str:
    """Why CRIU cannot checkpoint here, or "" when criu check passes."""
    criu = shutil.which("criu", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if criu is None:
        return "criu is not installed (Debian's package criu)"
    proc = await asyncio.create_subprocess_exec(
        criu, "check", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT_SEC)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return f"criu check did not answer in {CHECK_TIMEOUT_SEC} s"
    if proc.returncode == 0:
        return ""
    errors = [line.strip() for line in out.decode(errors="replace").splitlines() if "Error" in line]
    return "criu check failed on this kernel: " + ("; ".join(errors[-3:]) or f"exit {proc.returncode}")


class Checkpoints:
    def __init__(self, manager: Manager) -> None:
        self._m = manager
        self._status: str | None = None

    async def status(self) -> str:
        if self._status is None:
            self._status = await criu_status()
        return self._status

    async def checkpoint(self, ref: str) -> None:
        await self._refuse(ref, "checkpoint")

    async def restore(self, ref: str) -> None:
        await self._refuse(ref, "restore")

    async def _refuse(self, ref: str, what: str) -> None:
        c = self._m.get(ref)  # NoSuchContainer first: that is the caller's mistake to fix
        why = await self.status()
        if why:
            raise NotSupported(f"cannot {what} container {c.name}: {why}; it needs a criu whose "
                               "`criu check` passes on this kernel (see docs/api.md)")
        raise NotSupported(f"cannot {what} container {c.name}: criu check passes on this host, but "
                           "quiltd does not checkpoint processes yet; CommitContainer and ForkContainer "
                           "save the filesystem")
