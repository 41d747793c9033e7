"""Recovery after a daemon restart, against fake mechanisms that outlive the daemon.

Each daemon's run is one event loop and one Manager over its own store
connection; the fake inits and scopes are the host, which stays. A test
makes the host as a first run left it, then checks what the second run
decides: adopt, mark exited, resume the start, or clean up.
"""

from __future__ import annotations

import asyncio

from quiltd.core import parse
from quiltd.core.manager import Manager, RecoveryOutcome
from quiltd.errors import Internal
from quiltd.model import CleanupKind, State
from quiltd.names import veth_name
from quiltd.net.network import Link
from tests.unit.fakes import IMAGE, ROOT, World, run


def first_run(w: World, *names: str, hold_scopes: bool = False) -> dict[str, str]:
    """A daemon that creates and starts the named containers, then is killed: their ids by name.

    With hold_scopes, systemd never answers for the scopes: the starts are
    cut off before their pids are committed.
    """
    async def main() -> dict[str, str]:
        m, _ = w.manager()
        w.scopes.hold = asyncio.Event() if hold_scopes else None
        for name in names:
            await m.create(name, IMAGE, ["sleep", "1000"], parse.create_options({}), caller=ROOT)
        if not hold_scopes:
            for name in names:
                assert (await m.wait_started(name, 0)).state == State.RUNNING
        else:
            await asyncio.sleep(0.01)
        return {name: m.get(name).id for name in names}

    ids = run(main())  # the loop's end is the daemon's: its tasks are cancelled, its watches gone
    w.scopes.hold = None
    return ids


async def recover(m: Manager) -> dict[RecoveryOutcome, list[str]]:
    found = await m.recover()
    m.cleaner.stop()
    return found


def test_a_running_container_is_adopted_and_its_later_exit_seen(w: World) -> None:
    first_run(w, "survivor")

    async def main() -> None:
        m, _ = w.manager()
        found = await recover(m)
        assert found[RecoveryOutcome.ADOPTED] == ["survivor"]
        c = m.get("survivor")
        assert c.state == State.RUNNING and c.unit in w.scopes.units
        assert veth_name(c.id) in w.links.veths()  # kept, and on its bridge
        w.init_of(c).exit(7)
        c = await m.wait("survivor", 0)
        assert (c.state, c.exit_code) == (State.EXITED, 7)

    run(main())


def test_an_exit_while_the_daemon_was_down_keeps_its_code(w: World) -> None:
    ids = first_run(w, "quick", "killed")
    for init in w.inits.made:
        assert init.spec is not None
        if init.spec.container_id == ids["quick"]:
            init.exit(5)
        else:
            w.processes.kill(init.pid)  # no exit file: init itself was killed

    async def main() -> None:
        m, _ = w.manager()
        found = await recover(m)
        assert sorted(found[RecoveryOutcome.EXITED_WHILE_DOWN]) == ["killed", "quick"]
        assert found[RecoveryOutcome.ADOPTED] == []
        assert (m.get("quick").state, m.get("quick").exit_code) == (State.EXITED, 5)
        assert (m.get("killed").exit_code, m.get("killed").reason) == (137, "killed by SIGKILL")
        c = await m.wait("quick", 0)  # answers at once: the exit is on record
        assert c.exit_code == 5

    run(main())


def test_a_start_cut_off_before_its_pid_was_committed_is_done_again(w: World) -> None:
    ids = first_run(w, "interrupted", hold_scopes=True)
    first_init = w.inits.made[0]

    async def main() -> None:
        m, events = w.manager()
        assert m.get("interrupted").pid == 0
        found = await recover(m)
        assert found[RecoveryOutcome.RESTARTED] == ["interrupted"]
        c = await m.wait_started("interrupted", 0)
        assert c.state == State.RUNNING and c.id == ids["interrupted"]
        # The attempt's scope was stopped first (its name is this start's), and a new init runs.
        assert ("stop", c.unit) in w.scopes.calls
        assert c.pid != first_init.pid and w.scopes.units[c.unit] == [c.pid]
        assert events.states("interrupted") == ["starting", "running"]

    run(main())


def test_leftovers_on_no_record_are_cleaned_up(w: World) -> None:
    stray = "0123456789abcdef"
    w.scopes._units[f"quilt-{stray}.scope"] = [424242]  # a scope systemd still has
    w.paths.container_dir(stray).mkdir(parents=True)
    (w.paths.container_dir(stray) / "upper").mkdir()
    w.paths.container_run_dir(stray).mkdir(parents=True)
    w.links.links_by_name[veth_name(stray)] = Link(veth_name(stray), "veth", "quilt0")
    first_run(w, "kept")

    async def main() -> None:
        m, _ = w.manager()
        await m.recover()
        await asyncio.sleep(0.05)  # the cleaner's first round
        m.cleaner.stop()
        assert f"quilt-{stray}.scope" not in w.scopes.units
        assert not w.paths.container_dir(stray).exists() and not w.paths.container_run_dir(stray).exists()
        assert veth_name(stray) not in w.links.veths()
        assert m.cleanup_status() == []
        kept = m.get("kept")
        assert kept.state == State.RUNNING and w.paths.container_dir(kept.id).exists()

    run(main())


def test_a_failed_scope_stop_is_retried_until_it_succeeds(w: World) -> None:
    async def main() -> None:
        m, _ = w.manager()
        await m.recover()
        await m.create("sticky", IMAGE, ["sleep", "1"], parse.create_options({}), caller=ROOT)
        await m.wait_started("sticky", 0)
        unit = m.get("sticky").unit
        # The scope's stop fails when the removal tries it at once; the
        # cleaner's retry, a second later, succeeds.
        w.scopes.fail_stop = [Internal("systemd is reloading")]
        w.processes.kill(m.get("sticky").pid)
        await m.wait("sticky", 0)
        w.scopes._units[unit] = [424242]  # a process of the scope that outlived init
        await m.remove("sticky", force=False)  # removal does not wait for the stubborn leftover
        [task] = [t for t in m.cleanup_status() if t.kind == CleanupKind.SCOPE]
        assert (task.target, task.attempts, task.last_error) == (unit, 1, "systemd is reloading")
        assert unit in w.scopes.units
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while m.cleanup_status() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        m.cleaner.stop()
        assert m.cleanup_status() == [] and unit not in w.scopes.units
        assert [call for call in w.scopes.calls if call == ("stop", unit)] == [("stop", unit)] * 2

    run(main())
