"""Background execs: ExecStart, ExecWait, ExecKill, ListExecs, ExecExited, the journal, restarts."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import eventually, run
from tests.system.test_exec import _running

pytestmark = pytest.mark.system


async def _now(value: bool) -> bool:
    return value


def _journal(sandbox: Any, *matches: str, count: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(entries) < count and time.monotonic() < deadline:
        out = sandbox.run(["journalctl", *matches, "-o", "json", "--no-pager"]).stdout.decode()
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        time.sleep(0.1)
    return entries


def test_background_exec_runs_logs_and_reports(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> tuple[str, str]:
        async with quilt() as q:
            cid = await _running(q, name)
            exits: list[list[Any]] = []
            await q.watch_signal("ExecExited", exits.append)
            began = time.monotonic()
            exec_id = await q.exec_start(name, ["sh", "-c", "echo one; echo two >&2; sleep 1; exit 3"])
            assert time.monotonic() - began < 1  # it answers at once, not at the end
            rows = await q.list_execs(name)
            assert [(r[0], r[1], r[2], r[3]) for r in rows] == \
                [(exec_id, "running", ["sh", "-c", "echo one; echo two >&2; sleep 1; exit 3"], -1)]
            with pytest.raises(errors.Timeout):
                await q.exec_wait(exec_id, 100_000)
            assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 3)
            await eventually(lambda: _now(bool(exits)))
            assert exits == [[exec_id, cid, 3]]
            assert [r[1:4:2] for r in await q.list_execs(name)] == [("exited", 3)]
            with pytest.raises(errors.InvalidState):
                await q.exec_kill(exec_id, 15)

            timed = await q.exec_start(name, ["sleep", "100"], timeout_sec=1)
            assert await q.exec_wait(timed, 10_000_000) == ("timed_out", 124)
            with pytest.raises(errors.InvalidArgument, match="stdin"):
                await q.exec_start(name, ["cat"], stdin=b"x")
            return cid, exec_id

    cid, exec_id = run(scenario())
    entries = _journal(sandbox, f"QUILT_EXEC_ID={exec_id}", count=2)
    assert {(e["MESSAGE"], e["QUILT_STREAM"]) for e in entries} == {("one", "stdout"), ("two", "stderr")}
    assert all(e["QUILT_CONTAINER_ID"] == cid and e["QUILT_CONTAINER_NAME"] == name for e in entries)

    async def cleanup() -> None:
        async with quilt() as q:
            await q.remove(name, force=True)
            with pytest.raises(errors.NoSuchExec):
                await q.exec_wait(exec_id)

    run(cleanup())


def test_background_exec_outlives_its_client_and_a_daemon_restart(sandbox: Any, quilt: Any,
                                                                  name: str) -> None:
    async def start() -> tuple[str, str]:
        async with quilt() as q:
            await _running(q, name)
            short = await q.exec_start(name, ["sh", "-c", "sleep 2; exit 4"])
            long = await q.exec_start(name, ["sleep", "1000"])
            return short, long

    short, long = run(start())  # the client is gone now
    sandbox.run(["systemctl", "stop", "quiltd"])
    time.sleep(3)  # the short one ends while no daemon runs

    async def after() -> None:
        async with quilt() as q:  # bus activation starts the daemon again
            assert await q.exec_wait(short, 10_000_000) == ("exited", 4)
            assert {r[0]: r[1] for r in await q.list_execs(name)} == {short: "exited", long: "running"}
            await q.exec_kill(long, 15)
            assert await q.exec_wait(long, 10_000_000) == ("exited", 143)
            again = await q.exec_start(name, ["sleep", "1000"])
            await q.kill(name, 9)  # the container goes, and its execs with it
            assert await q.exec_wait(again, 10_000_000) == ("exited", 137)
            assert await q.wait(name, 10_000_000) == ("exited", 137)
            await q.remove(name)

    run(after())
