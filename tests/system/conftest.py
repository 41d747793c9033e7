"""Fixtures for tests against a real quiltd in a sandbox with its own systemd."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from quiltd.client import QuiltClient

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_TARBALL = "/var/tmp/quilt-test-busybox.tar.gz"
BUS = ("org.quilt.Quilt1", "/org/quilt/Quilt1", "org.quilt.Quilt1.Manager")
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def busybox_image(sandbox: Any) -> str:
    """The busybox image, imported once through busctl (which bus-activates quiltd)."""
    subprocess.run([str(REPO / "tools/make-busybox-image"), str(sandbox.host_path(BUSYBOX_TARBALL))],
                   check=True, capture_output=True)
    listed = sandbox.run(["busctl", "call", *BUS, "ListImages"]).stdout.decode()
    if '"busybox"' not in listed:
        sandbox.run(["busctl", "call", *BUS, "ImportImage", "ssa{sv}", "busybox", BUSYBOX_TARBALL, "0"])
    return "busybox"


@pytest.fixture
def quilt(sandbox: Any, busybox_image: str) -> Callable[[], Any]:
    """Opens a client on the sandbox's system bus: `async with quilt() as q:`."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[QuiltClient]:
        client = await QuiltClient.connect(sandbox.bus_address)
        try:
            yield client
        finally:
            client.close()

    return connect


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A container name no other test uses."""
    base = request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    return f"{base[:40]}-{secrets.token_hex(3)}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def records(q: Any) -> list[tuple[str, str]]:
    """(id, name) of every container on record: what a refused call must leave as it was.

    States are left out: containers of earlier tests may still be starting or ending.
    """
    return [(row[0], row[1]) for row in await q.list_containers()]
