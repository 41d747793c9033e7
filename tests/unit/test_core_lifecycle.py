"""The container state machine against fake mechanisms: creates, starts, exits, stops, kills, removes.

What a user would check, seen from the core: the state and exit code on
record, the events in order, and what is left on the host (scopes, veths,
inits, directories, leases) after each path, failures at every step of a
start included.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from quiltd.core import parse
from quiltd.core.manager import Manager
from quiltd.errors import Internal, InvalidState, NoSuchContainer, StartFailed
from quiltd.model import NO_EXIT_CODE, State
from quiltd.names import veth_name
from quiltd.net import networks
from tests.unit.fakes import IMAGE, ROOT, Events, World, run


async def create(m: Manager, name: str, **opts: object) -> State:
    c = await m.create(name, IMAGE, ["sh", "-c", "exit 3"], parse.create_options(opts), caller=ROOT)
    return c.state


async def settle(m: Manager, name: str) -> State:
    return (await m.wait_started(name, 0)).state


def assert_nothing_left(w: World, m: Manager, container_id: str) -> None:
    """No scope, veth, lease, directory or live init of the container is left."""
    assert f"quilt-{container_id}.scope" not in w.scopes.units
    assert veth_name(container_id) not in w.links.veths()
    assert m.ip_address(container_id) == ""
    assert not w.paths.container_dir(container_id).exists()
    assert not w.paths.container_run_dir(container_id).exists()
    assert all(not i.alive or i.abandoned for i in w.inits.made
               if i.spec is not None and i.spec.container_id == container_id)


def test_a_create_without_start_makes_only_a_row(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        assert await create(m, "idle", start=False) == State.CREATED
        assert w.inits.made == [] and w.scopes.units == {}
        assert m.ip_address(m.get("idle").id) == ""  # a lease is taken by a start
        assert events.states("idle") == ["created"]

    run(main())


def test_a_start_runs_the_command_in_its_scope_on_its_network(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        assert await create(m, "web", memory_max=64 << 20, labels={"team": "a"}) == State.STARTING
        assert await settle(m, "web") == State.RUNNING
        c = m.get("web")
        init = w.init_of(c)
        assert init.spec is not None and init.spec.command == ("sh", "-c", "exit 3")
        assert init.went and c.pid == init.pid and c.pid_starttime == init.starttime
        assert w.scopes.units[c.unit] == [init.pid]
        assert w.scopes.limits[c.unit].memory_max == 64 << 20
        assert w.links.links_by_name[veth_name(c.id)].master == "quilt0"
        assert m.ip_address(c.id).startswith("10.88.")
        assert init.spec.net_interface == m.ip_address(c.id) + "/16"
        assert any(veth_name(c.id) in script for script in w.links.nft_scripts)  # its port pinned
        info = await m.info("web")
        assert info.usage is not None and info.usage.tasks_current == 1
        assert events.states("web") == ["created", "starting", "running"]

    run(main())


def test_the_exit_code_init_records_is_the_containers(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        await create(m, "job")
        await settle(m, "job")
        w.init_of(m.get("job")).exit(3)
        c = await m.wait("job", 0)
        assert (c.state, c.exit_code, c.reason) == (State.EXITED, 3, "")
        assert c.finished_usec >= c.started_usec > 0
        assert c.unit not in w.scopes.units  # systemd collected the empty scope
        assert await m.info("job") is not None and (await m.info("job")).usage is None
        assert events.states("job") == ["created", "starting", "running", "exited"]

    run(main())


def test_an_init_killed_outright_reports_137(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await create(m, "oom")
        await settle(m, "oom")
        w.processes.kill(w.init_of(m.get("oom")).pid)  # the kernel's OOM killer, say
        c = await m.wait("oom", 0)
        assert (c.state, c.exit_code, c.reason) == (State.EXITED, 137, "killed by SIGKILL")

    run(main())


# Failures at every step of a start: each leaves the container failed with
# the reason, and nothing of the attempt behind.

def test_a_start_the_fork_server_cannot_serve_fails_with_its_reason(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        w.inits.fail_launch = Internal("could not create the container's namespaces: ENOSPC")
        await create(m, "nofork")
        assert await settle(m, "nofork") == State.FAILED
        c = m.get("nofork")
        assert c.reason == "could not create the container's namespaces: ENOSPC"
        assert c.pid == 0 and w.scopes.calls == []
        assert events.states("nofork") == ["created", "starting", "failed"]

    run(main())


def test_a_start_whose_scope_fails_abandons_its_init_and_veth(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        w.scopes.fail_start = Internal("job for quilt-x.scope failed: resources")
        await create(m, "noscope")
        assert await settle(m, "noscope") == State.FAILED
        c = m.get("noscope")
        assert c.reason == "job for quilt-x.scope failed: resources"
        init = w.inits.made[0]
        assert init.abandoned and not init.went  # the command never ran outside a scope
        assert veth_name(c.id) not in w.links.veths()
        assert ("stop", c.unit) in w.scopes.calls

    run(main())


def test_a_start_whose_veth_fails_stops_its_scope(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        w.links.fail_veth = Internal("creating the veth of x: File exists")
        await create(m, "noveth")
        assert await settle(m, "noveth") == State.FAILED
        c = m.get("noveth")
        assert c.reason == "creating the veth of x: File exists"
        assert c.unit not in w.scopes.units and w.inits.made[0].abandoned
        # A failed start keeps its lease: the next start uses the same address.
        assert m.ip_address(c.id) != ""

    run(main())


def test_a_command_init_cannot_run_fails_with_inits_reason_and_127(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        w.inits.failure = "exec: sh: No such file or directory"
        await create(m, "noexec")
        assert await settle(m, "noexec") == State.FAILED
        c = m.get("noexec")
        assert (c.reason, c.exit_code, c.pid) == ("sh: No such file or directory", 127, 0)
        assert c.unit not in w.scopes.units

    run(main())


def test_start_of_an_ended_container_raises_start_failed_and_can_be_retried(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await create(m, "again", start=False)
        w.scopes.fail_start = Internal("no")
        with pytest.raises(StartFailed, match="container again failed to start: no"):
            await m.start("again")
        assert m.get("again").state == State.FAILED
        w.scopes.fail_start = None
        c = await m.start("again")
        assert (c.state, c.reason, c.exit_code) == (State.RUNNING, "", NO_EXIT_CODE)
        with pytest.raises(InvalidState, match="is running"):
            await m.start("again")

    run(main())


# Stop and kill

def test_stop_sends_sigterm_to_init_and_records_the_commands_code(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        await create(m, "polite")
        await settle(m, "polite")
        c = await m.stop("polite", 10)
        assert (c.state, c.exit_code) == (State.EXITED, 143)
        assert w.init_of(c).signals == [signal.SIGTERM]
        assert events.states("polite")[-2:] == ["stopping", "exited"]
        assert (await m.stop("polite", 10)).state == State.EXITED  # idempotent

    run(main())


def test_stop_past_its_timeout_kills_the_scope(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await create(m, "stubborn")
        await settle(m, "stubborn")
        init = w.init_of(m.get("stubborn"))
        init.ignores_term = True
        c = await m.stop("stubborn", 0)
        assert (c.state, c.exit_code, c.reason) == (State.EXITED, 137, "killed by SIGKILL")
        assert init.signals == [signal.SIGTERM, signal.SIGKILL]

    run(main())


def test_kill_signals_init_or_the_whole_scope(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await create(m, "k")
        await settle(m, "k")
        c = m.get("k")
        init = w.init_of(c)
        await m.kill("k", signal.SIGUSR1)
        assert init.signals == [signal.SIGUSR1]  # passed on by init
        await m.kill("k", signal.SIGSTOP)  # init cannot catch it: the scope gets it
        assert (f"kill {signal.SIGSTOP}", c.unit) in w.scopes.calls and m.get("k").state == State.RUNNING
        await m.kill("k", signal.SIGKILL)
        c = await m.wait("k", 0)
        assert (c.exit_code, c.reason) == (137, "killed by SIGKILL")
        with pytest.raises(InvalidState, match="not running"):
            await m.kill("k", signal.SIGTERM)

    run(main())


# Remove, and races with a start still under way

def test_remove_takes_everything_the_container_had(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        await create(m, "gone")
        await settle(m, "gone")
        cid = m.get("gone").id
        with pytest.raises(InvalidState, match="stop it first"):
            await m.remove("gone", force=False)
        assert m.get("gone").state == State.RUNNING
        await m.remove("gone", force=True)
        with pytest.raises(NoSuchContainer):
            m.get("gone")
        assert_nothing_left(w, m, cid)
        assert m.cleanup_status() == []
        assert events.seen[-1][:2] == ("removed", "gone")

    run(main())


def test_remove_during_a_start_waits_for_it_then_leaves_nothing(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        w.scopes.hold = asyncio.Event()
        await create(m, "racer")
        cid = m.get("racer").id
        removal = asyncio.create_task(m.remove("racer", force=True))
        await asyncio.sleep(0.01)
        assert not removal.done() and m.get("racer").state == State.STARTING
        w.scopes.hold.set()
        await removal
        assert_nothing_left(w, m, cid)
        assert m.containers() == []

    run(main())


def test_stop_during_a_start_stops_what_the_start_made(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        w.scopes.hold = asyncio.Event()
        await create(m, "early")
        stopping = asyncio.create_task(m.stop("early", 10))
        await asyncio.sleep(0.01)
        w.scopes.hold.set()
        c = await stopping
        assert (c.state, c.exit_code) == (State.EXITED, 143)
        assert events.states("early") == ["created", "starting", "running", "stopping", "exited"]

    run(main())


def test_a_name_is_free_again_once_its_container_is_removed(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await create(m, "reuse", start=False)
        first = m.get("reuse").id
        await m.remove("reuse", force=False)
        await create(m, "reuse")
        assert await settle(m, "reuse") == State.RUNNING and m.get("reuse").id != first

    run(main())


def test_events_reach_every_listener_in_order(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        other = Events()
        m.add_listener(other)
        await create(m, "heard")
        await settle(m, "heard")
        await m.stop("heard", 10)
        await m.remove("heard", force=False)
        assert other.seen == events.seen
        assert events.states("heard") == ["created", "starting", "running", "stopping", "exited"]
        assert events.seen[-1][:2] == ("removed", "heard")

    run(main())


def test_two_removes_at_once_remove_once(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        await create(m, "twice")
        await settle(m, "twice")
        results = await asyncio.gather(m.remove("twice", force=True), m.remove("twice", force=True),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["NoSuchContainer", "NoneType"]
        assert [e for e, n, _ in events.seen if n == "twice"].count("removed") == 1

    run(main())


def test_a_command_that_ends_at_once_is_recorded_as_run_then_exited(w: World) -> None:
    async def main() -> None:
        m, events = w.manager()
        w.inits.answer_at_go = False
        await create(m, "instant")
        while not (w.inits.made and w.inits.made[0].went):
            await asyncio.sleep(0.001)
        w.inits.made[0].exit(0)  # executed, and already gone when the daemon looks
        c = await m.wait("instant", 0)
        assert (c.state, c.exit_code) == (State.EXITED, 0)
        assert events.states("instant") == ["created", "starting", "running", "exited"]

    run(main())


def test_a_wait_on_a_start_that_fails_returns_the_failed_container(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        w.scopes.hold = asyncio.Event()
        w.scopes.fail_start = Internal("no scope")
        await create(m, "doomed")
        waiting = asyncio.create_task(m.wait("doomed", 0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        w.scopes.hold.set()
        c = await waiting
        assert (c.state, c.reason) == (State.FAILED, "no scope")

    run(main())


def test_a_veth_that_outlives_its_removed_container_is_deleted_a_little_later(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "STRAY_VETH_SEC", 0.05)

    async def main() -> None:
        m, _ = w.manager()
        await create(m, "held")
        assert await settle(m, "held") == State.RUNNING
        c = m.get("held")
        w.links.held.add(veth_name(c.id))  # its namespace kept by something else
        await m.remove("held", force=True)
        assert veth_name(c.id) in w.links.veths()  # the removal did not wait for it
        await asyncio.sleep(0.2)
        assert_nothing_left(w, m, c.id)

    run(main())
