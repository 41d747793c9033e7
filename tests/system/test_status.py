"""The daemon's STATUS= line in systemctl follows the containers it holds."""

from __future__ import annotations

from typing import Any

import pytest

from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system


def test_status_catches_up_with_a_burst_of_creates(sandbox: Any, quilt: Any, name: str) -> None:
    def status_text() -> str:
        return str(sandbox.run(["systemctl", "show", "quiltd", "-p", "StatusText", "--value"])
                   .stdout.decode().strip())

    async def matches_counts(q: Any) -> bool:
        counts = (await q.system_info())["Containers"]
        expected = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no containers"
        return status_text() == expected

    async def scenario() -> None:
        async with quilt() as q:
            names = [f"{name}-{i}" for i in range(20)]
            for n in names:
                await q.create(n, "busybox", ["true"], start=False)
            # Updates are gathered, never dropped: the last one says 20 more.
            await eventually(lambda: matches_counts(q))
            assert "created" in status_text()
            for n in names:
                await q.remove(n)
            await eventually(lambda: matches_counts(q))

    run(scenario())
