"""CommitContainer, ForkContainer and CheckpointContainer against a real quiltd.

What a user checks: the new image runs with the files and settings it was
committed with, forks see the source's files and not each other's writes,
nothing is copied for a fork, shared layers go with their last user, every
refusal leaves nothing behind, and a quiltd killed mid-way comes back whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from quiltd.client import QuiltClient
from tests.system.conftest import BUS, BUSYBOX_TARBALL, REPO, eventually, records, run

pytestmark = pytest.mark.system

DB = "/var/lib/quilt/quilt.db"
LAYERS = "/var/lib/quilt/images/layers"
CONTAINERS = "/var/lib/quilt/containers"


def _layer_dirs(sandbox: Any) -> set[str]:
    path = sandbox.host_path(LAYERS)
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def _du(sandbox: Any, path: str) -> int:
    return int(sandbox.run(["du", "-s", "--block-size=1", path]).stdout.decode().split()[0])


def _sql(sandbox: Any, script: str) -> None:
    sandbox.run(["python3", "-c", f"import sqlite3; c = sqlite3.connect({DB!r}); "
                 f"c.execute('PRAGMA foreign_keys=ON'); c.executescript({script!r}); c.commit()"])


async def _sh(q: Any, container: str, script: str) -> str:
    code, out, err = await q.exec(container, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return str(out.decode())


async def _running(q: Any, name: str) -> None:
    assert await q.wait_started(name) == "running", await q.info(name)


async def _image_names(q: Any) -> list[str]:
    return [row[0] for row in await q.images()]


async def _cleaned(q: Any) -> bool:
    return not (await q.call("GetCleanupStatus"))[0]


def test_commit_makes_an_image_of_the_files_and_settings(sandbox: Any, quilt: Any, name: str) -> None:
    tag = secrets.token_hex(3)
    image, base = f"snap-{tag}", f"base-{tag}"
    layers_before = _layer_dirs(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            await q.import_image(base, BUSYBOX_TARBALL)  # an image of one directory, this test's own
            await q.create(name, base, ["sleep", "1000"], env=["KEEP=1"], workdir="/srv")
            await _running(q, name)
            await _sh(q, name, "mkdir -p /srv && echo state > /srv/state && rm /bin/vi && "
                               "head -c 3000000 /dev/zero > /srv/big")
            image_id = await q.commit(name, image, env=["MODE=agent"], labels={"step": "7"},
                                      cmd=["cat", "/srv/state"])
            assert len(image_id) == 64
            assert image in await _image_names(q)
            # The source runs on, thawed: its processes answer at once.
            assert (await q.info(name))["State"] == "running"
            assert await _sh(q, name, "echo alive") == "alive\n"

            # One new layer holding what was written, not the base.
            new = _layer_dirs(sandbox) - layers_before
            assert len(new) == 1
            assert 3_000_000 <= _du(sandbox, f"{LAYERS}/{new.pop()}") < 3_500_000

            child = f"{name[:50]}-c"
            await q.create(child, image, [])
            assert await q.wait(child) == ("exited", 0)  # its Cmd, from the commit
            lines = await _lines(q, child)
            assert lines == ["state"]
            await q.remove(child)
            await q.create(child, image, ["sleep", "1000"])
            await _running(q, child)
            out = await _sh(q, child, "echo $KEEP $MODE $(pwd); ls /bin/vi 2>&1; wc -c < /srv/big")
            assert out.splitlines()[0] == "1 agent /srv"
            assert "No such file" in out.splitlines()[1]  # the whiteout came along
            assert out.splitlines()[2].strip() == "3000000"

            await q.remove(child, force=True)
            await q.remove(name, force=True)
            # The base is shared, so it stays while the commit stands on it.
            with pytest.raises(errors.InvalidState, match="base of image"):
                await q.remove_image(base)
            await q.remove_image(image)
            await q.remove_image(base)
            assert image not in await _image_names(q)
            await eventually(lambda: _cleaned(q))
        assert _layer_dirs(sandbox) == layers_before

    run(scenario())


async def _lines(q: Any, ref: str) -> list[str]:
    """The container's output lines, as its logs show them."""
    return [str(line) for _, _, line in await q.logs(ref)]


def test_commit_freezes_a_running_container_for_the_copy(sandbox: Any, quilt: Any, name: str) -> None:
    # The writer puts the same count in /a, then /b, as fast as it can. A copy
    # taken while it runs could catch /b far from /a; a frozen one catches
    # them equal, or /a one ahead. The freezer is watched doing it.
    image = f"busy-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", [
                "sh", "-c", "head -c 150000000 /dev/zero > /ballast; i=0; "
                            "while :; do echo $i > /a; echo $i > /b; i=$((i+1)); done"])
            await _running(q, name)
            await eventually(lambda: _count_past(q, name, 1000))
            v1 = sandbox.host_path(f"/sys/fs/cgroup/freezer/quilt/quilt-{cid}.scope/freezer.state")
            v2 = sandbox.host_path(f"/sys/fs/cgroup/quilt.slice/quilt-{cid}.scope/cgroup.freeze")
            seen: set[str] = set()
            commit = asyncio.ensure_future(q.commit(name, image))
            while not commit.done():
                for state in (v1, v2):
                    with contextlib.suppress(OSError):
                        seen.add(state.read_text().strip())
                await asyncio.sleep(0.002)
            await commit
            assert "FROZEN" in seen or "1" in seen, seen
            count = await _count(q, name)
            await asyncio.sleep(0.3)
            assert await _count(q, name) > count  # thawed: still writing
            reader = f"{name[:50]}-r"
            await q.create(reader, image, ["sleep", "1000"])
            await _running(q, reader)
            a, b = (await _sh(q, reader, "cat /a; echo /; cat /b")).replace("\n", "").split("/")
            # Frozen between two writes: equal, /a one ahead, or one of them
            # just truncated by the next write (empty).
            assert not a or not b or int(a) - int(b) in (0, 1), (a, b)
            await q.remove(reader, force=True)
            await q.remove(name, force=True)
            await q.remove_image(image)

            async def group_gone() -> bool:  # the freezer group goes with its container
                return not v1.parent.exists()
            await eventually(group_gone)

    run(scenario())


async def _count(q: Any, name: str) -> int:
    """The writer's count; read again when caught between a truncate and its write."""
    for _ in range(100):
        out = await _sh(q, name, "cat /b")
        if out.strip():
            return int(out)
    raise AssertionError("/b stayed empty")


async def _count_past(q: Any, name: str, at_least: int) -> bool:
    code, out, _ = await q.exec(name, ["cat", "/b"])
    return bool(code == 0 and out.strip() and int(out) >= at_least)


def test_commit_refusals_leave_nothing(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await _running(q, name)
            await _sh(q, name, "echo x > /x")
            tiny = f"{name[:50]}-t"
            await q.create(tiny, "busybox", ["sleep", "1000"], disk_max=8 << 20)
            images_before = await _image_names(q)
            layers_before = _layer_dirs(sandbox)
            refusals: list[tuple[type[errors.QuiltError], Any]] = [
                (errors.NameTaken, q.commit(name, "busybox")),
                (errors.InvalidArgument, q.commit(name, "host")),
                (errors.InvalidArgument, q.commit(name, "bad name!")),
                (errors.InvalidArgument, q.call("CommitContainer", "ssa{sv}", name, "ok-name",
                                                {"colour": _v("s", "red")})),
                (errors.InvalidArgument, q.commit(name, "ok-name", workdir="relative")),
                (errors.InvalidArgument, q.commit(name, "ok-name", env=["no equals sign"])),
                (errors.InvalidArgument, q.call("CommitContainer", "ssa{sv}", name, "ok-name",
                                                {"cmd": _v("s", "not a list")})),
                (errors.NoSuchContainer, q.commit("no-such-container", "ok-name")),
                (errors.NotSupported, q.commit(tiny, "ok-name")),
            ]
            for kind, call in refusals:
                with pytest.raises(kind):
                    await call
            assert await _image_names(q) == images_before
            assert _layer_dirs(sandbox) == layers_before
            assert (await q.info(name))["State"] == "running"
            await q.remove(tiny, force=True)
            await q.remove(name, force=True)

    run(scenario())


def _v(signature: str, value: Any) -> Variant:
    return Variant(signature, value)


def test_commit_that_does_not_fit_is_no_space(sandbox_name: Callable[[str], str],
                                              sandbox_module: ModuleType) -> None:
    # A sandbox of its own, whose layer store is a 16 MiB tmpfs: a 24 MB
    # writable layer cannot be committed there, and says so.
    sb = sandbox_module.Sandbox.start(sandbox_name("nospace"), share=[REPO], die_with_parent=True)
    try:
        sb.install(REPO)
        sb.run(["mkdir", "-p", LAYERS])
        sb.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "small", LAYERS])
        subprocess.run([str(REPO / "tools/make-busybox-image"), str(sb.host_path(BUSYBOX_TARBALL))],
                       check=True, capture_output=True)
        sb.run(["busctl", "call", *BUS, "ImportImage", "ssa{sv}", "busybox", BUSYBOX_TARBALL, "0"])

        async def scenario() -> None:
            q = await QuiltClient.connect(sb.bus_address)
            try:
                await q.create("big", "busybox", ["sleep", "1000"])
                await _running(q, "big")
                await _sh(q, "big", "head -c 24000000 /dev/zero > /big")
                with pytest.raises(errors.NoSpace, match="free"):
                    await q.commit("big", "too-big")
                assert "too-big" not in await _image_names(q)
                assert _layer_dirs(sb) == set()
                assert await _sh(q, "big", "echo alive") == "alive\n"
            finally:
                q.close()

        run(scenario())
    finally:
        sb.stop()


def test_commit_cut_off_by_kill_leaves_no_layer_and_thaws(sandbox: Any, quilt: Any, name: str) -> None:
    image = f"cut-{secrets.token_hex(3)}"

    async def prepare() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await _running(q, name)
            # Many files: the copy takes long enough to be cut off in the middle.
            await _sh(q, name, "mkdir /many && cd /many && seq 1 40000 | xargs touch && "
                               "head -c 200000000 /dev/zero > /many/big")

    run(prepare())
    layers_before = _layer_dirs(sandbox)
    committer = subprocess.Popen(sandbox.argv(["busctl", "--timeout=120", "call", *BUS, "CommitContainer",
                                               "ssa{sv}", name, image, "0"]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(".part-") for n in _layer_dirs(sandbox)):
            assert time.monotonic() < deadline and committer.poll() is None, "the copy never showed"
            time.sleep(0.005)
        sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
        committer.wait(timeout=30)
        assert committer.returncode != 0  # cut off, not finished
    finally:
        if committer.poll() is None:
            committer.kill()
            committer.wait()

    async def check() -> None:
        async with quilt() as q:  # bus activation brings quiltd back
            await eventually(lambda: _cleaned(q), timeout=30)
            assert image not in await _image_names(q)
            assert _layer_dirs(sandbox) == layers_before
            # Frozen when the kill came, thawed by recovery: it answers at once.
            assert (await q.info(name))["State"] == "running"
            assert await asyncio.wait_for(_sh(q, name, "echo alive"), 5) == "alive\n"
            await q.remove(name, force=True)

    run(check())


def test_fork_shares_the_layer_and_it_goes_with_the_last_user(sandbox: Any, quilt: Any, name: str) -> None:
    forks = [f"{name[:50]}-f{i}" for i in range(3)]
    layers_before = _layer_dirs(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await _running(q, name)
            await _sh(q, name, "echo source > /state && head -c 20000000 /dev/zero > /big && rm /bin/vi")
            used = _du(sandbox, "/var/lib/quilt")
            made = await q.fork(name, forks, stop_timeout_sec=1)
            assert [path for _, path in made] == [f"/org/quilt/Quilt1/container/{cid}" for cid, _ in made]
            # Nothing copied: the 20 MB are on disk once.
            assert _du(sandbox, "/var/lib/quilt") - used < 1_000_000
            assert len(_layer_dirs(sandbox) - layers_before) == 1
            for who in (name, *forks):
                await _running(q, who)
                out = await _sh(q, who, "cat /state; wc -c < /big; ls /bin/vi 2>&1; true")
                assert out.splitlines()[:2] == ["source", "20000000"]
                assert "No such file" in out.splitlines()[2]
            # Each goes on with a writable layer of its own.
            await _sh(q, forks[0], "echo mine > /state")
            assert await _sh(q, name, "cat /state") == "source\n"
            assert await _sh(q, forks[1], "cat /state") == "source\n"
            assert (await q.info(forks[0]))["Hostname"] == forks[0]

            # The layer stays while any user is left.
            await q.remove(name, force=True)
            await q.remove(forks[0], force=True)
            assert len(_layer_dirs(sandbox) - layers_before) == 1
            assert await _sh(q, forks[1], "cat /state") == "source\n"
            for f in forks[1:]:
                await q.remove(f, force=True)
            await eventually(lambda: _cleaned(q))
        assert _layer_dirs(sandbox) == layers_before

    run(scenario())


def test_fork_of_a_stopped_container_leaves_it_stopped(sandbox: Any, quilt: Any, name: str) -> None:
    fork = f"{name[:50]}-f"

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "echo one >> /runs"])
            assert await q.wait(name) == ("exited", 0)
            [(fork_id, _)] = await q.fork(name, [fork], start=False,
                                          command=["sh", "-c", "echo fork >> /runs; cat /runs"])
            assert (await q.info(fork))["State"] == "created"
            assert (await q.info(name))["State"] == "exited"
            await q.start(fork)
            assert await q.wait(fork) == ("exited", 0)
            assert await _lines(q, fork) == ["one", "fork"]
            # A fork of a fork stacks both layers.
            grandchild = f"{name[:48]}-g"
            await q.fork(fork, [grandchild], command=["cat", "/runs"])
            assert await q.wait(grandchild) == ("exited", 0)
            assert await _lines(q, grandchild) == ["one", "fork"]
            for who in (grandchild, fork, name):
                await q.remove(who)
            assert fork_id

    run(scenario())


def test_fork_refusals_leave_nothing(sandbox: Any, quilt: Any, name: str) -> None:
    other = f"{name[:50]}-o"

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await q.create(other, "busybox", ["sleep", "1000"], start=False)
            removes_itself = f"{name[:50]}-r"
            await q.create(removes_itself, "busybox", ["sleep", "1000"], auto_remove=True)
            await _running(q, name)
            await _running(q, removes_itself)
            await _sh(q, name, "echo kept > /kept")
            before = await records(q)
            layers_before = _layer_dirs(sandbox)
            refusals: list[tuple[type[errors.QuiltError], Any]] = [
                (errors.NameTaken, q.fork(name, ["fresh-a-" + secrets.token_hex(3), other])),
                (errors.InvalidArgument, q.fork(name, ["same", "same"])),
                (errors.InvalidArgument, q.fork(name, [])),
                (errors.InvalidArgument, q.fork(name, ["bad name!"])),
                (errors.InvalidArgument, q.call("ForkContainer", "sasa{sv}", name, ["ok"],
                                                {"colour": _v("s", "red")})),
                (errors.InvalidArgument, q.fork(name, ["ok"], command=[])),
                (errors.LimitExceeded, q.fork(name, [f"n{i}" for i in range(257)])),
                (errors.NoSuchContainer, q.fork("no-such-container", ["ok"])),
                # Stopping it for the fork would remove it.
                (errors.InvalidState, q.fork(removes_itself, ["ok"])),
            ]
            for kind, call in refusals:
                with pytest.raises(kind):
                    await call
            assert await records(q) == before
            assert _layer_dirs(sandbox) == layers_before
            # Refused before anything was touched: the source never stopped.
            assert (await q.info(name))["State"] == "running"
            assert await _sh(q, name, "cat /kept") == "kept\n"
            assert (await q.info(removes_itself))["State"] == "running"
            for who in (name, other, removes_itself):
                await q.remove(who, force=True)

    run(scenario())


def test_fork_cut_off_is_finished_or_undone_at_start(sandbox: Any, quilt: Any, name: str) -> None:
    # The two moments a kill can split a fork: the writable layer renamed
    # aside, and then either on record or not.
    undone, finished = f"{name[:50]}-u", f"{name[:50]}-d"

    async def prepare() -> dict[str, str]:
        ids = {}
        async with quilt() as q:
            for who in (undone, finished):
                ids[who], _ = await q.create(who, "busybox", ["sh", "-c", f"echo {who} > /mark"])
                assert await q.wait(who) == ("exited", 0)
        return ids

    ids = run(prepare())
    sandbox.run(["systemctl", "stop", "quiltd"])
    not_recorded, recorded = secrets.token_hex(32), secrets.token_hex(32)
    for who, layer in ((undone, not_recorded), (finished, recorded)):
        cdir = sandbox.host_path(f"{CONTAINERS}/{ids[who]}")
        (cdir / "upper").rename(cdir / f"upper.fork-{layer}")
    _sql(sandbox, f"INSERT INTO layers (diff_id, size_bytes) VALUES ('{recorded}', 0); "
                  f"INSERT INTO container_layers (container_id, position, diff_id) "
                  f"VALUES ('{ids[finished]}', 0, '{recorded}');")

    async def check() -> None:
        async with quilt() as q:  # bus activation brings quiltd back, and recovery runs first
            await eventually(lambda: _cleaned(q))
            assert sandbox.host_path(f"{LAYERS}/{recorded}/mark").read_text() == f"{finished}\n"
            assert not sandbox.host_path(f"{LAYERS}/{not_recorded}").exists()
            assert sandbox.host_path(f"{CONTAINERS}/{ids[undone]}/upper/mark").exists()
            for who in (undone, finished):
                fork = f"{who[:52]}-x"
                await q.fork(who, [fork], command=["cat", "/mark"])
                assert await q.wait(fork) == ("exited", 0)
                assert await _lines(q, fork) == [who]
                await q.remove(fork)
                await q.remove(who)
            await eventually(lambda: _cleaned(q))
        assert not sandbox.host_path(f"{LAYERS}/{recorded}").exists()

    run(check())


def test_fork_killed_while_the_source_stops_makes_no_fork(sandbox: Any, quilt: Any, name: str) -> None:
    fork = f"{name[:50]}-f"

    async def prepare() -> None:
        async with quilt() as q:
            # Ignores SIGTERM: the fork waits out its stop timeout, and is killed in it.
            await q.create(name, "busybox", ["sh", "-c", "trap '' TERM; echo kept > /kept; "
                                                         "while :; do sleep 1; done"])
            await _running(q, name)
            await eventually(lambda: _kept(q, name))

    run(prepare())
    layers_before = _layer_dirs(sandbox)
    forker = subprocess.Popen(sandbox.argv(["busctl", "--timeout=120", "call", *BUS, "ForkContainer",
                                            "sasa{sv}", name, "1", fork, "1", "stop_timeout_sec", "u", "60"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        assert forker.poll() is None  # still waiting for the source to stop
        sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
        forker.wait(timeout=30)
        assert forker.returncode != 0
    finally:
        if forker.poll() is None:
            forker.kill()
            forker.wait()

    async def check() -> None:
        async with quilt() as q:
            assert fork not in [row[1] for row in await q.list_containers()]
            assert _layer_dirs(sandbox) == layers_before
            assert (await q.info(name))["State"] == "running"  # as before the fork
            assert await _sh(q, name, "cat /kept") == "kept\n"
            await q.remove(name, force=True)

    run(check())


async def _kept(q: Any, name: str) -> bool:
    code, _, _ = await q.exec(name, ["test", "-f", "/kept"])
    return bool(code == 0)


def test_checkpoint_and_restore_say_why_they_cannot(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            await _running(q, name)
            check = sandbox.run(["criu", "check"], check=False)
            for call in (q.checkpoint, q.restore):
                with pytest.raises(errors.NotSupported) as refused:
                    await call(name)
                if check.returncode != 0:
                    assert "criu check failed on this kernel" in str(refused.value)
                else:
                    assert "does not checkpoint processes yet" in str(refused.value)
                with pytest.raises(errors.NoSuchContainer):
                    await call("no-such-container")
            assert (await q.info(name))["State"] == "running"
            await q.remove(name, force=True)

    run(scenario())
