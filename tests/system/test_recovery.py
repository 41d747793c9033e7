"""Supervision and recovery: restarts, crashes and leftovers lose nothing."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest

from quiltd import errors
from quiltd.client import QuiltClient
from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system

DB = "/var/lib/quilt/quilt.db"


def sh(sandbox: Any, *argv: str, check: bool = True) -> str:
    return str(sandbox.run(list(argv), check=check).stdout.decode())


def sql(sandbox: Any, query: str) -> str:
    return sh(sandbox, "python3", "-c",
              f"import sqlite3; print(sqlite3.connect({DB!r}).execute({query!r}).fetchall())")


async def _state_is(q: QuiltClient, name: str, state: str) -> bool:
    return bool((await q.info(name))["State"] == state)


def test_restart_keeps_fifty_running_containers(sandbox: Any, quilt: Any, name: str) -> None:
    names = [f"{name}-{i}" for i in range(50)]

    async def start_all() -> dict[str, tuple[int, int]]:
        async with quilt() as q:
            await asyncio.gather(*(q.create(n, "busybox", ["sleep", "1000"]) for n in names))
            for n in names:
                await eventually(lambda n=n: _state_is(q, n, "running"))
            infos = [await q.info(n) for n in names]
            return {i["Name"]: (i["Pid"], i["StartedUsec"]) for i in infos}

    before = run(start_all())
    sandbox.run(["systemctl", "restart", "quiltd"])

    async def check_and_stop() -> None:
        async with quilt() as q:
            after = {}
            for n in names:
                info = await q.info(n)
                assert info["State"] == "running", n
                after[n] = (info["Pid"], info["StartedUsec"])
            assert after == before
            # Each still answers an exec, in its own namespaces.
            results = await asyncio.gather(*(q.exec(n, ["hostname"]) for n in names))
            assert [r[1].decode().strip() for r in results] == names
            # Still controllable: each one stops through the adopted pidfd.
            await asyncio.gather(*(q.stop(n, 10) for n in names))
            assert {await q.wait(n) for n in names} == {("exited", 143)}
            await asyncio.gather(*(q.remove(n) for n in names))

    run(check_and_stop())


def test_socket_unit_restart_while_quiltd_runs(sandbox: Any, quilt: Any, name: str) -> None:
    """`systemctl restart quiltd.socket` works as for any socket unit, and the new socket answers."""
    # As at boot: the socket first (systemd starts no socket unit under a running service).
    sandbox.run(["systemctl", "stop", "quiltd"])
    sandbox.run(["systemctl", "reset-failed", "quiltd", "quiltd.socket"], check=False)
    sandbox.run(["systemctl", "start", "quiltd.socket", "quiltd"])

    async def create() -> int:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await eventually(lambda: _state_is(q, name, "running"))
            return int((await q.info(name))["Pid"])

    pid = run(create())
    try:
        restarted = sandbox.run(["systemctl", "restart", "quiltd.socket"], check=False)
        assert restarted.returncode == 0, restarted.stderr
        # quiltd restarts with it (a job of its own, which systemctl does not wait for).
        deadline = time.monotonic() + 30
        units = ("quiltd.socket", "quiltd")
        while (states := sh(sandbox, "systemctl", "is-active", *units, check=False).split()) != ["active"]*2:
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        status = sh(sandbox, "systemctl", "status", "quiltd", "--no-pager", check=False)
        assert "TriggeredBy: ● quiltd.socket" in status
        # The direct socket answers, and the container lived through it all.
        listed = sh(sandbox, "busctl", "--address=unix:path=/run/quilt/quiltd.sock", "--json=short", "call",
                    "org.quilt.Quilt1", "/org/quilt/Quilt1", "org.quilt.Quilt1.Manager", "GetContainerInfo",
                    "s", name)
        assert '"State":{"type":"s","data":"running"}' in listed
        assert f'"Pid":{{"type":"u","data":{pid}}}' in listed
    finally:
        sandbox.run(["systemctl", "stop", "quiltd.socket"], check=False)

        async def remove() -> None:
            async with quilt() as q:
                await q.remove(name, True)

        run(remove())


def test_ttl_and_auto_remove_hold_across_a_restart(sandbox: Any, quilt: Any, name: str) -> None:
    async def create() -> None:
        async with quilt() as q:
            await q.create(name + "-ttl", "busybox", ["sleep", "1000"], ttl_sec=2)
            await q.create(name + "-auto", "busybox", ["sh", "-c", "sleep 1; exit 4"], auto_remove=True)
            await eventually(lambda: _state_is(q, name + "-ttl", "running"))
            await eventually(lambda: _state_is(q, name + "-auto", "running"))

    run(create())
    sandbox.run(["systemctl", "stop", "quiltd"])
    time.sleep(3)  # both end while the daemon is down

    async def check() -> None:
        async with quilt() as q:
            assert await q.wait(name + "-ttl", 10_000_000) == ("exited", 143)
            remaining: list[Any] = []

            async def auto_removed() -> bool:
                remaining[:] = [r for r in await q.list_containers() if r[1] == name + "-auto"]
                return not remaining

            await eventually(auto_removed)
            await q.remove(name + "-ttl")

    run(check())


def test_leftovers_on_no_record_are_cleaned_at_start(sandbox: Any, quilt: Any, name: str) -> None:
    async def create() -> str:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"])
            await eventually(lambda: _state_is(q, name, "running"))
            return cid

    cid = run(create())
    sandbox.run(["systemctl", "stop", "quiltd"])
    # The row vanishes behind the daemon's back: scope, layer and run dir are orphans.
    sandbox.run(["python3", "-c", f"import sqlite3; c = sqlite3.connect({DB!r}); "
                 f"c.execute('DELETE FROM containers WHERE id = ?', ({cid!r},)); c.commit()"])
    stray = sandbox.host_path("/var/lib/quilt/containers/0123456789abcdef")
    (stray / "upper").mkdir(parents=True)

    async def check() -> None:
        async with quilt() as q:
            async def clean() -> bool:
                return not (await q.call("GetCleanupStatus"))[0]

            await eventually(clean)
        active = sh(sandbox, "systemctl", "is-active", f"quilt-{cid}.scope", check=False).strip()
        assert active in ("inactive", "unknown")
        assert not sandbox.host_path(f"/var/lib/quilt/containers/{cid}").exists()
        assert not stray.exists()
        log = sh(sandbox, "journalctl", "-u", "quiltd", "-o", "cat", "--no-pager")
        assert f"container {cid} is on no record" in log

    run(check())


def test_bus_restart_daemon_comes_back(sandbox: Any, quilt: Any, name: str) -> None:
    async def create() -> int:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await eventually(lambda: _state_is(q, name, "running"))
            return int((await q.info(name))["Pid"])

    pid = run(create())
    sandbox.run(["systemctl", "restart", "dbus"])

    async def check() -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with quilt() as q:
                    info = await q.info(name)
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert (info["State"], info["Pid"]) == ("running", pid)
        async with quilt() as q:
            await q.remove(name, force=True)

    run(check())


ROUNDS = int(os.environ.get("QUILT_CRASH_ROUNDS", "20"))
OPS_PER_ROUND = int(os.environ.get("QUILT_CRASH_OPS", "240"))
CLIENTS = 8


class Ledger:
    """What clients were told: only acknowledged operations may be asserted on."""

    def __init__(self) -> None:
        self.created: set[str] = set()
        self.removed: set[str] = set()
        self.remove_tried: set[str] = set()  # the answer may have been lost: gone or not
        self.ops = 0


async def _client(sandbox: Any, prefix: str, ledger: Ledger, quota: int, seed: int) -> None:
    rng = random.Random(seed)
    live: list[str] = []
    done = 0
    serial = 0
    q: QuiltClient | None = None
    while done < quota:
        try:
            if q is None:
                q = await QuiltClient.connect(sandbox.bus_address)
            if len(live) >= 4 or (live and rng.random() < 0.3):
                victim = live.pop(0)
                ledger.remove_tried.add(victim)
                await q.remove(victim, force=True)
                ledger.removed.add(victim)
            else:
                serial += 1
                name = f"{prefix}-{serial}"
                live.append(name)  # may exist even if the answer is lost
                # Half in user namespaces: a resumed start must keep the range on record.
                await q.create(name, "busybox", ["sleep", "1000"], userns=rng.random() < 0.5)
                ledger.created.add(name)
            done += 1
            ledger.ops += 1
        except errors.NoSuchContainer:
            done += 1  # a remove whose first try committed before the crash
            ledger.ops += 1
        except Exception:
            # The daemon died under us: the answer is lost, the outcome unknown.
            if q is not None:
                q.close()
                q = None
            await asyncio.sleep(0.05)
    if q is not None:
        q.close()


def test_sigkill_at_random_moments_loses_nothing(sandbox: Any, quilt: Any, name: str) -> None:
    ledger = Ledger()
    rng = random.Random(name)

    async def one_round(number: int) -> None:
        quota = OPS_PER_ROUND // CLIENTS
        clients = [
            asyncio.ensure_future(_client(sandbox, f"{name[:20]}-{number}-{i}", ledger, quota, rng.random()))
            for i in range(CLIENTS)
        ]
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        kill = ["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "quiltd"]
        await asyncio.to_thread(sandbox.run, kill)
        await asyncio.wait_for(asyncio.gather(*clients), 240)

    async def check() -> None:
        q = await QuiltClient.connect(sandbox.bus_address)
        try:
            async def settled() -> bool:
                rows = await q.list_containers()
                pending = (await q.call("GetCleanupStatus"))[0]
                return not pending and all(r[3] not in ("starting", "stopping") for r in rows)

            await eventually(settled, 60)
            rows = await q.list_containers()
            infos = [await q.info(r[0]) for r in rows if r[3] == "running"]
        finally:
            q.close()
        names = {r[1] for r in rows}
        assert ledger.created - ledger.remove_tried <= names, "an acknowledged create is missing"
        assert not (ledger.removed & names), "a removed container came back"
        assert len(names) == len(rows)
        running = {f"quilt-{r[0]}.scope" for r in rows if r[3] == "running"}
        units = sh(sandbox, "systemctl", "list-units", "--state=active", "--no-legend", "--plain",
                   "quilt-*.scope")
        active = {line.split()[0] for line in units.splitlines() if line.strip()}
        assert active == running
        for info in infos:  # each init runs as its recorded range's root, or as host root
            status = sh(sandbox, "cat", f"/proc/{info['Pid']}/status")
            uid = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
            assert int(uid) == info["UserNamespaceBase"], (info["Name"], uid)
        layers = {p.name for p in sandbox.host_path("/var/lib/quilt/containers").iterdir()}
        assert layers <= {r[0] for r in rows}
        assert sql(sandbox, "PRAGMA integrity_check").strip() == "[('ok',)]"
        assert "/var/lib/quilt/containers" not in sh(sandbox, "findmnt", "-rn", "-o", "TARGET")

    for number in range(ROUNDS):
        run(one_round(number))
        run(check())
    assert ledger.ops >= ROUNDS * OPS_PER_ROUND

    async def tidy() -> None:
        async with quilt() as q:
            for row in await q.list_containers():
                if row[1].startswith(name[:20]):
                    await q.remove(row[0], force=True)

    run(tidy())


def test_a_create_cut_off_by_a_kill_is_found_by_retrying_it(sandbox: Any, quilt: Any, name: str) -> None:
    # quiltd is killed while creates are in flight: some were committed and
    # never answered. Retrying each with its name tells the client which.
    names = [f"{name}-{i}" for i in range(40)]

    async def create_while_killed() -> None:
        async with quilt() as q:
            calls = [asyncio.ensure_future(q.create(n, "busybox", ["sleep", "1000"])) for n in names]
            await asyncio.sleep(0.02)
            sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
            await asyncio.gather(*calls, return_exceptions=True)

    async def retry_all() -> dict[str, str]:
        found = {}
        async with quilt() as q:
            for n in names:
                try:
                    cid, _ = await q.create(n, "busybox", ["sleep", "1000"])
                    found[n] = f"new {cid}"
                except errors.NameTaken as e:
                    existing = str(e).rsplit("id ", 1)[1]
                    assert existing == (await q.info(n))["Id"], str(e)
                    found[n] = "taken"
            for n in names:
                await eventually(lambda n=n: _state_is(q, n, "running"))
                await q.remove(n, force=True)
        return found

    run(create_while_killed())
    found = run(retry_all())
    # The kill landed among the creates: the retries found both kinds.
    assert "taken" in found.values(), found
