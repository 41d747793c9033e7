"""Pause and resume: a container frozen whole, and everything a user does to it meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from quiltd import errors
from quiltd.client import StateChange
from tests.system.conftest import BUS, REPO, eventually, records, run
from tests.system.test_logs import UNIT_CPU

pytestmark = pytest.mark.system

BUSY = ["sh", "-c", "while :; do :; done"]
QUILTCTL = str(REPO / ".venv/bin/quiltctl")


def cpu_sec(sandbox: Any, unit: str) -> float:
    """CPU time of the scope's processes, from /proc: CPUUsageNSec needs CPU accounting, which
    a cgroup v1 host may not have on for the scopes."""
    ticks, per_sec = sandbox.run(["sh", "-c", UNIT_CPU, "cpu", unit]).stdout.split()
    return int(ticks) / int(per_sec)


async def cpu_over(sandbox: Any, q: Any, ref: str, seconds: float) -> float:
    """CPU seconds the container uses in the next `seconds`."""
    unit = (await q.info(ref))["Unit"]
    before = cpu_sec(sandbox, unit)
    await asyncio.sleep(seconds)
    return cpu_sec(sandbox, unit) - before


def test_a_paused_busy_loop_uses_no_cpu_and_resumes(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            seen: list[StateChange] = []
            await q.watch_states(lambda s: seen.append(s) if s.name == name else None)
            await q.create(name, "busybox", BUSY)
            assert await q.wait_started(name) == "running"
            assert await cpu_over(sandbox, q, name, 1.0) > 0.05  # it spins (a share of a shared core)
            await q.pause(name)
            info = await q.info(name)
            assert info["State"] == "paused"
            path = f"/org/quilt/Quilt1/container/{info['Id']}"
            (state,) = await q.call("Get", "ss", "org.quilt.Quilt1.Container", "State", path=path,
                                    interface="org.freedesktop.DBus.Properties")
            assert state.value == "paused"
            used = await cpu_over(sandbox, q, name, 2.0)
            assert used <= 0.02, f"a paused container used {used} s of CPU in 2 s"
            await q.resume(name)
            assert (await q.info(name))["State"] == "running"
            assert await cpu_over(sandbox, q, name, 1.0) > 0.05
            await eventually(lambda: _true(len(seen) >= 5))
            assert [s.state for s in seen] == ["created", "starting", "running", "paused", "running"]
            assert (await q.system_info())["Freezer"] in ("systemd", "cgroup-v1")
            await q.remove(name, force=True)

    run(scenario())


def test_this_host_freezes_with_the_v1_controller(quilt: Any) -> None:
    """The development machine is cgroup v1 hybrid: systemd cannot freeze, the v1 controller does."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("a cgroup v2 host: systemd freezes")

    async def scenario() -> None:
        async with quilt() as q:
            assert (await q.system_info())["Freezer"] == "cgroup-v1"

    run(scenario())


def test_a_paused_container_refuses_exec_copies_and_a_second_pause(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"])
            assert await q.wait_started(name) == "running"
            with pytest.raises(errors.InvalidState, match="not paused"):
                await q.resume(name)
            await q.pause(name)
            with pytest.raises(errors.InvalidState, match="paused"):
                await q.exec(name, ["true"])
            with pytest.raises(errors.InvalidState, match="paused"):
                await q.exec_start(name, ["true"])
            r, w = os.pipe()
            try:
                with pytest.raises(errors.InvalidState, match="paused"):
                    await q.copy_out(name, "/etc", w)
            finally:
                os.close(r)
                os.close(w)
            with pytest.raises(errors.InvalidState, match="only a running container"):
                await q.pause(name)
            assert (await q.info(name))["State"] == "paused"
            await q.resume(name)
            assert (await q.exec(name, ["echo", "back"]))[1] == b"back\n"
            await q.remove(name, force=True)

    run(scenario())


def test_pause_of_what_is_not_running_is_refused(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            with pytest.raises(errors.NoSuchContainer):
                await q.pause(f"{name}-none")
            with pytest.raises(errors.NoSuchContainer):
                await q.resume(f"{name}-none")
            assert await records(q) == before
            await q.create(name, "busybox", ["true"], start=False)
            with pytest.raises(errors.InvalidState, match="created"):
                await q.pause(name)
            await q.start(name)
            assert await q.wait(name) == ("exited", 0)
            with pytest.raises(errors.InvalidState, match="exited"):
                await q.pause(name)
            with pytest.raises(errors.InvalidState, match="exited, not paused"):
                await q.resume(name)
            assert (await q.info(name))["State"] == "exited"
            await q.remove(name)

    run(scenario())


def test_stop_kill_and_remove_end_a_paused_container(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            for suffix in ("stop", "kill", "rm"):
                await q.create(f"{name}-{suffix}", "busybox", ["sleep", "600"])
            for suffix in ("stop", "kill", "rm"):
                assert await q.wait_started(f"{name}-{suffix}") == "running"
                await q.pause(f"{name}-{suffix}")
            # Stop thaws it: the command gets its SIGTERM, well within the 30 s grace.
            started = time.monotonic()
            await q.stop(f"{name}-stop", 30)
            assert time.monotonic() - started < 10
            assert await q.wait(f"{name}-stop") == ("exited", 128 + signal.SIGTERM)
            await q.kill(f"{name}-kill", signal.SIGKILL)
            assert await q.wait(f"{name}-kill", 10_000_000) == ("exited", 128 + signal.SIGKILL)
            await q.remove(f"{name}-rm", force=True)
            assert f"{name}-rm" not in [row[1] for row in await q.list_containers()]
            for suffix in ("stop", "kill"):
                await q.remove(f"{name}-{suffix}")

    run(scenario())


def test_a_signal_to_a_paused_container_waits_for_the_resume(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"])
            assert await q.wait_started(name) == "running"
            await q.pause(name)
            await q.kill(name, signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert (await q.info(name))["State"] == "paused"
            await q.resume(name)
            assert await q.wait(name, 10_000_000) == ("exited", 128 + signal.SIGTERM)
            await q.remove(name)

    run(scenario())


def test_a_paused_container_stays_paused_across_a_restart(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", BUSY)
            assert await q.wait_started(name) == "running"
            await q.pause(name)
            pid = (await q.info(name))["Pid"]
        sandbox.run(["systemctl", "restart", "quiltd"])
        async with quilt() as q:
            info = await q.info(name)
            assert (info["State"], info["Pid"]) == ("paused", pid)  # adopted, not taken for hung or gone
            used = await cpu_over(sandbox, q, name, 2.0)
            assert used <= 0.02, f"a paused container used {used} s of CPU in 2 s"
            await q.resume(name)
            assert await cpu_over(sandbox, q, name, 1.0) > 0.05
            await q.pause(name)
        # A daemon killed outright, too.
        sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
        await asyncio.sleep(0.5)
        async with quilt() as q:
            await eventually(lambda: _state_is(q, name, "paused"), timeout=20)
            await q.stop(name, 5)
            assert (await q.info(name))["State"] == "exited"
            await q.remove(name)

    run(scenario())


def test_a_paused_container_whose_ttl_runs_out_ends(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"], ttl_sec=3)
            assert await q.wait_started(name) == "running"
            await q.pause(name)
            state, _ = await q.wait(name, 20_000_000)
            info = await q.info(name)
            assert (state, info["Reason"]) == ("exited", "ttl expired")
            await q.remove(name)

    run(scenario())


def test_quiltctl_pause_and_unpause(sandbox: Any, busybox_image: str, name: str) -> None:
    sandbox.run([QUILTCTL, "run", "-d", "--name", name, "busybox", "sleep", "600"])
    assert sandbox.run([QUILTCTL, "pause", name]).stdout.decode().split() == [name]
    listed = sandbox.run([QUILTCTL, "ps", "--filter", f"name={name}", "--format", "json"]).stdout.decode()
    assert '"state": "paused"' in listed
    out = sandbox.run(["busctl", "call", *BUS, "GetContainerInfo", "s", name]).stdout.decode()
    assert '"State" s "paused"' in out
    refused = sandbox.run([QUILTCTL, "pause", name], check=False)
    assert refused.returncode != 0 and b"InvalidState" in refused.stderr
    assert sandbox.run([QUILTCTL, "unpause", name]).stdout.decode().split() == [name]
    out = sandbox.run(["busctl", "call", *BUS, "GetContainerInfo", "s", name]).stdout.decode()
    assert '"State" s "running"' in out
    sandbox.run([QUILTCTL, "rm", "-f", name])


async def _true(value: bool) -> bool:
    return value


async def _state_is(q: Any, ref: str, state: str) -> bool:
    try:
        return bool((await q.info(ref))["State"] == state)
    except errors.QuiltError:
        return False


def test_the_freezer_is_out_of_the_containers_reach(quilt: Any, name: str) -> None:
    """What a container would need to thaw itself (or a process of its own) is not there."""
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"])
            assert await q.wait_started(name) == "running"
            thaw = "echo THAWED > /sys/fs/cgroup/freezer/freezer.state && echo wrote"
            code, out, _ = await q.exec(name, ["sh", "-c", thaw], user="0")
            assert code != 0 and b"wrote" not in out
            await q.remove(name, force=True)

    run(scenario())


def test_a_restart_settles_a_freeze_and_a_record_left_apart(sandbox: Any, quilt: Any, name: str) -> None:
    """What a daemon killed between a v1 freeze and its record (or a thaw and its record) leaves:
    the processes frozen under a running record, and thawed under a paused one."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("a cgroup v2 host: systemd keeps the freezer state")

    async def scenario() -> None:
        async with quilt() as q:
            for suffix in ("frozen", "thawed"):
                await q.create(f"{name}-{suffix}", "busybox", BUSY)
            for suffix in ("frozen", "thawed"):
                assert await q.wait_started(f"{name}-{suffix}") == "running"
            frozen_unit = (await q.info(f"{name}-frozen"))["Unit"]
            await q.pause(f"{name}-thawed")
            thawed_unit = (await q.info(f"{name}-thawed"))["Unit"]
        groups = "/sys/fs/cgroup/freezer/quilt"
        sandbox.run(["sh", "-c", f"""
            mkdir -p {groups}/{frozen_unit}
            for pid in $(cat /sys/fs/cgroup/systemd/quilt.slice/{frozen_unit}/cgroup.procs); do
                echo $pid > {groups}/{frozen_unit}/cgroup.procs
            done
            echo FROZEN > {groups}/{frozen_unit}/freezer.state
            echo THAWED > {groups}/{thawed_unit}/freezer.state
        """])
        sandbox.run(["systemctl", "restart", "quiltd"])
        async with quilt() as q:
            for suffix in ("frozen", "thawed"):
                ref = f"{name}-{suffix}"
                assert (await q.info(ref))["State"] == "running", suffix
                await asyncio.sleep(0.2)  # the thaw runs just after recovery
                assert await cpu_over(sandbox, q, ref, 1.0) > 0.05, suffix
                await q.remove(ref, force=True)

    run(scenario())


def test_the_container_object_pauses_and_resumes(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid, path = await q.create(name, "busybox", ["sleep", "600"])
            assert await q.wait_started(name) == "running"
            container = {"path": path, "interface": "org.quilt.Quilt1.Container"}
            await q.call("Pause", **container)
            (state,) = await q.call("Get", "ss", "org.quilt.Quilt1.Container", "State", path=path,
                                    interface="org.freedesktop.DBus.Properties")
            assert state.value == "paused"
            with pytest.raises(errors.InvalidState):
                await q.call("Pause", **container)
            await q.call("Resume", **container)
            assert (await q.info(cid))["State"] == "running"
            await q.remove(name, force=True)

    run(scenario())
