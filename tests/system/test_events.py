"""Events: a client sees every state change of many containers, in order, none missing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quiltd.names import CONTAINER_PATH_PREFIX
from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system

COUNT = 100


def test_hundred_containers_every_transition_in_order(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            props: dict[str, list[dict[str, Any]]] = {}  # per container, one dict per signal
            states: dict[str, list[str]] = {}
            removed: list[str] = []

            def on_properties(body: list[Any]) -> None:
                path, _, values, _ = body
                changed = {k: v.value for k, v in values.items() if k in ("State", "Pid", "ExitCode")}
                if changed:
                    props.setdefault(path.rsplit("/", 1)[-1], []).append(changed)

            await q.watch_signal("PropertiesChanged", on_properties,
                                 interface="org.freedesktop.DBus.Properties",
                                 path_namespace=CONTAINER_PATH_PREFIX.rstrip("/"))
            await q.watch_signal("ContainerStateChanged", lambda b: states.setdefault(b[0], []).append(b[2]))
            await q.watch_signal("ContainerRemoved", lambda b: removed.append(b[0]))

            names = [f"{name[:50]}-{i}" for i in range(COUNT)]
            created = await asyncio.gather(*(q.create(n, "busybox", ["sh", "-c", f"exit {i % 7}"])
                                             for i, n in enumerate(names)))
            ids = [cid for cid, _ in created]
            results = await asyncio.gather(*(q.wait(n, 120_000_000) for n in names))
            assert results == [("exited", i % 7) for i in range(COUNT)]

            async def all_seen() -> bool:
                return all(len(states.get(cid, [])) >= 4 for cid in ids)

            await eventually(all_seen, timeout=30)
            for i, cid in enumerate(ids):
                assert states[cid] == ["created", "starting", "running", "exited"], (cid, states[cid])
                # starting; the init's pid while still starting; running; and
                # the exit, which clears the pid and sets the code at once.
                seen = props[cid]
                assert len(seen) == 4, seen
                assert seen[0] == {"State": "starting"}
                assert set(seen[1]) == {"Pid"} and seen[1]["Pid"] > 0
                assert seen[2] == {"State": "running"}
                assert seen[3] == {"State": "exited", "Pid": 0, "ExitCode": i % 7}

            await asyncio.gather(*(q.remove(n) for n in names))

            async def all_removed() -> bool:
                return sorted(removed) == sorted(ids)

            await eventually(all_removed)

    run(scenario())
