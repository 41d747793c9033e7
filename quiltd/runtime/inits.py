"""The daemon's real inits and pidfds, as the core's mechanisms (core/mechanisms.py) declare them.

Thin: each method is the spawner's function of the same name, so the wire
format stays in spawner.py and this module only binds it to one fork server.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Mapping

from quiltd.runtime import spawner
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.spawner import ForkServer, Launched
from quiltd.runtime.wire import Failure


class ForkServerInits:
    """Inits forked ahead by one fork server, driven over their spec and error pipes."""

    def __init__(self, forkserver: ForkServer) -> None:
        self._forkserver = forkserver

    async def launch(self) -> Launched:
        return await self._forkserver.launch()

    def send_spec(self, launched: Launched, spec: LaunchSpec) -> None:
        spawner.send_spec(launched, spec)

    def send_in(self, launched: Launched) -> None:
        spawner.send_in(launched)

    def send_go(self, launched: Launched, claim: Mapping[str, object] | None = None) -> None:
        spawner.send_go(launched, claim)

    async def confirm(self, launched: Launched) -> Failure | None:
        return await spawner.confirm(launched)

    def adopt(self, pid: int, starttime: int, control_socket: str) -> Launched | None:
        return spawner.adopt(pid, starttime, control_socket)


class Pidfds:
    """Processes watched on the event loop through their pidfds."""

    def open_pidfd(self, pid: int, starttime: int) -> int | None:
        return spawner.open_pidfd(pid, starttime)

    def watch_exit(self, pidfd: int, on_exit: Callable[[], None]) -> None:
        spawner.watch_exit(pidfd, on_exit)

    def send_signal(self, pidfd: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)
