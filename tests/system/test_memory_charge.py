"""What running containers cost quiltd.service: the daemon's own records, not the containers' inits.

Memory is charged to the cgroup a process is in when it touches it, and the
charge stays when the process moves. An init forked in quiltd.service and
moved into its scope afterwards left megabytes there for the container's
whole life, and about 400 containers took the service past its MemoryMax:
the kernel killed quiltd mid-burst.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system

CONTAINERS = 40
# quiltd holds about 90 KiB per running container (quiltd.service's comment);
# an init's copied pages were 2 MiB and more each.
MAX_CHARGE_PER_CONTAINER = 512 << 10


def memory_current(sandbox: Any, unit: str) -> int:
    return int(sandbox.run(["systemctl", "show", "-p", "MemoryCurrent", "--value", unit]).stdout.decode())


def test_running_containers_are_not_charged_to_quiltd(sandbox: Any, quilt: Any, name: str) -> None:
    names = [f"{name}-{i}" for i in range(CONTAINERS)]

    async def running(q: Any, refs: list[str]) -> bool:
        states = [(await q.info(ref))["State"] for ref in refs]
        return all(state == "running" for state in states)

    async def scenario() -> None:
        async with quilt() as q:
            try:
                # The first one on the network makes its bridge and files: not per container.
                await q.create(f"{name}-first", "busybox", ["sleep", "3600"], network="bridge")
                await eventually(lambda: running(q, [f"{name}-first"]))
                before = memory_current(sandbox, "quiltd.service")
                await asyncio.gather(*(q.create(n, "busybox", ["sleep", "3600"], network="bridge")
                                       for n in names))
                await eventually(lambda: running(q, names), timeout=60)
                grown = memory_current(sandbox, "quiltd.service") - before
                assert grown < CONTAINERS * MAX_CHARGE_PER_CONTAINER, (
                    f"quiltd.service grew {grown >> 10} KiB for {CONTAINERS} containers")
                # The fork server, which makes the inits, is in a scope of its own.
                daemon = sandbox.run(["systemctl", "show", "-p", "MainPID", "--value", "quiltd"])
                children = sandbox.run(["pgrep", "-P", daemon.stdout.decode().strip(), "-f",
                                        "quiltd.runtime.forkserver"])
                (forkserver,) = children.stdout.decode().split()
                cgroup = sandbox.run(["cat", f"/proc/{forkserver}/cgroup"]).stdout.decode()
                assert "/system.slice/quiltd-forkserver.scope" in cgroup
                assert "quiltd.service" not in cgroup
            finally:
                for n in [*names, f"{name}-first"]:
                    with contextlib.suppress(errors.NoSuchContainer):
                        await q.remove(n, force=True)

    run(scenario())
