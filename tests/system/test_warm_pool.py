"""Warm pools: a create claims a container made ready ahead, and the pool leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from quiltd import errors
from quiltd.client import QuiltClient
from quiltd.names import veth_name
from tests.system.conftest import BUS, REPO, eventually, run
from tests.system.test_access import AS_MEMBER, member  # noqa: F401 (a fixture)

pytestmark = pytest.mark.system

DB = "/var/lib/quilt/quilt.db"


def sql(sandbox: Any, query: str) -> list[Any]:
    out = sandbox.run(["python3", "-c", f"import sqlite3; print(sqlite3.connect({DB!r}).execute({query!r})"
                       ".fetchall())"]).stdout.decode()
    result: list[Any] = eval(out)  # the repr of a list of tuples of str and int
    return result


def pool_ids(sandbox: Any) -> set[str]:
    """The ids of the containers held ready, as the state database has them."""
    return {row[0] for row in sql(sandbox, "SELECT id FROM containers WHERE pool != ''")}


async def ready(q: QuiltClient, want: int, **options: Any) -> bool:
    pools = await q.warm_pools()
    return any(image == "busybox" and size == want and n == want
               and all(opts.get(k) == v for k, v in options.items())
               for image, opts, size, n in pools)


@pytest.fixture
def pools(sandbox: Any, busybox_image: str) -> Iterator[None]:
    """Every pool a test sets is gone after it: other tests' creates must run cold."""
    yield

    async def clear() -> None:
        async with await_client(sandbox) as q:
            for image, opts, _, _ in await q.warm_pools():
                await q.set_warm_pool(image, 0, **opts)

    run(clear())


class await_client:
    """A client that waits for quiltd to answer (it may be restarting)."""

    def __init__(self, sandbox: Any) -> None:
        self._sandbox = sandbox
        self._q: QuiltClient | None = None

    async def __aenter__(self) -> QuiltClient:
        deadline = time.monotonic() + 30
        while True:
            try:
                q = await QuiltClient.connect(self._sandbox.bus_address)
                await q.system_info()
                self._q = q
                return q
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def __aexit__(self, *_: object) -> None:
        if self._q is not None:
            self._q.close()


def left_behind(sandbox: Any, ids: set[str]) -> list[str]:
    """What of these containers still exists: scopes, veths, directories, rows and leases."""
    found = []
    for cid in ids:
        state = sandbox.run(["systemctl", "is-active", f"quilt-{cid}.scope"], check=False).stdout.strip()
        if state not in (b"inactive", b"unknown"):
            found.append(f"scope of {cid}: {state.decode()}")
        for parent in ("/var/lib/quilt/containers", "/run/quilt/containers"):
            if sandbox.host_path(f"{parent}/{cid}").exists():
                found.append(f"{parent}/{cid}")
    links = sandbox.run(["ip", "-o", "link"]).stdout.decode()
    found += [f"veth of {cid}" for cid in ids if veth_name(cid) + "@" in links]
    quoted = ", ".join(f"'{cid}'" for cid in ids)
    found += [f"row {row}" for row in sql(sandbox, f"SELECT id FROM containers WHERE id IN ({quoted})")]
    leases = sql(sandbox, f"SELECT * FROM leases WHERE container_id IN ({quoted})")
    found += [f"lease {row}" for row in leases]
    return found


async def nothing_left(sandbox: Any, ids: set[str]) -> None:
    """left_behind comes to nothing: the veths go a moment after the rest, with their namespaces."""
    deadline = time.monotonic() + 5.0
    while (left := left_behind(sandbox, ids)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == []


def test_a_create_claims_a_ready_container(sandbox: Any, quilt: Any, pools: None, name: str) -> None:
    async def check() -> None:
        async with quilt() as q:
            before = await q.list_containers()
            counts = (await q.system_info())["Containers"]
            await q.set_warm_pool("busybox", 2)
            await eventually(lambda: ready(q, 2, network="bridge"))
            info = await q.system_info()
            assert (info["WarmPoolSize"], info["WarmPoolReady"]) == (2, 2)
            # Held ready, but no one's container: not listed, not counted.
            assert await q.list_containers() == before
            assert info["Containers"] == counts
            held = pool_ids(sandbox)
            assert len(held) == 2
            with pytest.raises(errors.NoSuchContainer):
                await q.info(next(iter(held)))

            cid, _ = await q.create(name, "busybox", ["sh", "-c", "echo started as $GREETING; sleep 1000"],
                                    env=["GREETING=hello"], labels={"kind": "warm"})
            assert cid in held
            await q.call("WaitContainerStarted", "st", name, 10_000_000)
            c = await q.info(name)
            assert (c["Id"], c["Name"], c["State"], c["Image"]) == (cid, name, "running", "busybox")
            assert c["Labels"] == {"kind": "warm"}
            assert c["StartedUsec"] >= c["CreatedUsec"] > 0
            assert (cid, name, "busybox", "running") in [tuple(r[:4]) for r in await q.list_containers()]
            assert (await q.system_info())["Containers"]["running"] == counts["running"] + 1
            # Named, and running the command it was given, with its environment.
            code, out, _ = await q.exec(name, ["hostname"])
            assert (code, out.decode().strip()) == (0, name)
            code, out, _ = await q.exec(name, ["cat", "/etc/hosts"])
            assert name in out.decode()

            async def logged() -> bool:
                return any(line == "started as hello" for _, _, line in await q.logs(name))

            await eventually(logged)
            journal = sandbox.run(["journalctl", f"QUILT_CONTAINER_ID={cid}", "-o", "verbose",
                                   "--no-pager"]).stdout.decode()
            assert f"QUILT_CONTAINER_NAME={name}" in journal
            assert sql(sandbox, f"SELECT name, pool FROM containers WHERE id = '{cid}'") == [(name, "")]
            # The pool is made full again in the background.
            await eventually(lambda: ready(q, 2))
            assert cid not in pool_ids(sandbox) and len(pool_ids(sandbox)) == 2
            await q.remove(name, force=True)

    run(check())


def test_a_create_the_pool_cannot_serve_runs_cold(sandbox: Any, quilt: Any, pools: None, name: str) -> None:
    async def check() -> None:
        async with quilt() as q:
            await q.set_warm_pool("busybox", 1, network="none", memory_max=64 << 20)
            await eventually(lambda: ready(q, 1, network="none"))
            held = pool_ids(sandbox)
            cold = [
                (f"{name}-net", {"memory_max": 64 << 20}),  # network bridge, the default
                (f"{name}-mem", {"network": "none"}),  # no memory_max
                (f"{name}-tmp", {"network": "none", "memory_max": 64 << 20,
                                 "tmpfs": [["/scratch", 1 << 20]]}),
            ]
            for cold_name, opts in cold:
                cid, _ = await q.create(cold_name, "busybox", ["sleep", "1000"], **opts)
                assert cid not in held
                await q.call("WaitContainerStarted", "st", cold_name, 10_000_000)
                assert (await q.info(cold_name))["State"] == "running"
            assert pool_ids(sandbox) == held
            # start=false is never served from a pool: the container stays created.
            cid, _ = await q.create(f"{name}-later", "busybox", ["true"], network="none", memory_max=64 << 20,
                                    start=False)
            assert cid not in held and (await q.info(cid))["State"] == "created"
            # The same options spelled another way serve from the pool.
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"], network="none", memory_max=64 << 20,
                                    tasks_max=1024, hostname="elsewhere")
            assert cid in held
            await q.call("WaitContainerStarted", "st", name, 10_000_000)
            code, out, _ = await q.exec(name, ["hostname"])
            assert (code, out.decode().strip()) == (0, "elsewhere")
            for gone in (name, f"{name}-later", *(n for n, _ in cold)):
                await q.remove(gone, force=True)

    run(check())


PROBE = "grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status; pwd; sleep 1000"


def test_a_claimed_command_runs_as_a_cold_one_would(sandbox: Any, quilt: Any, pools: None, name: str) -> None:
    async def check() -> None:
        async with quilt() as q:
            await q.set_warm_pool("busybox", 2, network="none")
            await eventually(lambda: ready(q, 2, network="none"))
            held = pool_ids(sandbox)
            seen = {}
            # tasks_max differs from the pool's default only so the cold one runs cold.
            for user in ("", "65534:65534"):
                for path, opts in (("warm", {}), ("cold", {"tasks_max": 1000})):
                    cid, _ = await q.create(f"{name}-{path}-{user[:1]}", "busybox", ["sh", "-c", PROBE],
                                            network="none", user=user, workdir="/tmp", **opts)
                    assert (cid in held) == (path == "warm")
                    await q.call("WaitContainerStarted", "st", cid, 10_000_000)

                    async def logged(cid: str = cid) -> bool:
                        return any(line == "/tmp" for _, _, line in await q.logs(cid))

                    await eventually(logged)
                    seen[path, user] = {line.split(":")[0]: line for _, _, line in await q.logs(cid)}
                    await q.remove(cid, force=True)
                    await eventually(lambda: ready(q, 2, network="none"))
                    held = pool_ids(sandbox)
            # The same user, capabilities, no_new_privs, seccomp filter and workdir.
            assert seen["warm", ""] == seen["cold", ""]
            assert seen["warm", ""]["Seccomp"] == "Seccomp:\t2"
            assert seen["warm", ""]["NoNewPrivs"] == "NoNewPrivs:\t1"
            warm, cold = seen["warm", "65534:65534"], seen["cold", "65534:65534"]
            assert warm["Uid"].startswith("Uid:\t65534")
            # Both started by a restricted init, as an exec is: a command of
            # another user has root's reduced bounding set, warm or cold.
            assert warm == cold
            assert int(cold["CapBnd"].split()[1], 16) == int(seen["cold", ""]["CapBnd"].split()[1], 16)
            # A command that cannot run fails the claimed start as it fails a cold one.
            reasons = {}
            for path, opts in (("warm", {}), ("cold", {"tasks_max": 1000})):
                cid, _ = await q.create(f"{name}-{path}-bad", "busybox", ["/no/such/program"], network="none",
                                        **opts)
                assert (cid in held) == (path == "warm")
                state, code = await q.wait(cid)
                reasons[path] = (state, code, (await q.info(cid))["Reason"])
            assert reasons["warm"] == reasons["cold"]
            assert reasons["warm"][:2] == ("failed", 127) and "/no/such/program" in reasons["warm"][2]
            for path in ("warm", "cold"):
                await q.remove(f"{name}-{path}-bad", force=True)

    run(check())


def test_a_pool_with_userns_claims_into_its_range(sandbox: Any, quilt: Any, pools: None, name: str) -> None:
    async def check() -> None:
        async with quilt() as q:
            await q.set_warm_pool("busybox", 1, userns=True, network="none")
            await eventually(lambda: ready(q, 1, userns=True))
            held = pool_ids(sandbox)
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"], userns=True, network="none")
            assert cid in held
            await q.call("WaitContainerStarted", "st", cid, 10_000_000)
            info = await q.info(cid)
            assert info["State"] == "running" and info["UserNamespaceBase"] > 0
            # Named after the claim although init had entered its user namespace's range by then.
            code, out, _ = await q.exec(cid, ["hostname"])
            assert (code, out.decode().strip()) == (0, name)
            status = sandbox.run(["cat", f"/proc/{info['Pid']}/status"]).stdout.decode()
            uid = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
            assert int(uid) == info["UserNamespaceBase"]
            await q.remove(cid, force=True)

    run(check())


def test_size_zero_leaves_nothing_behind(sandbox: Any, quilt: Any, pools: None) -> None:
    async def check() -> None:
        async with quilt() as q:
            await q.set_warm_pool("busybox", 3)
            await eventually(lambda: ready(q, 3))
            held = pool_ids(sandbox)
            assert len(held) == 3
            # Each holds a scope, a layer and a run directory, a veth, a row and a lease.
            assert len(left_behind(sandbox, held)) == 3 * 6
            await q.set_warm_pool("busybox", 1)
            assert len(pool_ids(sandbox)) == 1
            await q.set_warm_pool("busybox", 0, network="bridge", tasks_max=1024)  # the same pool
            assert await q.warm_pools() == []
            assert pool_ids(sandbox) == set()
            info = await q.system_info()
            assert (info["WarmPoolSize"], info["WarmPoolReady"]) == (0, 0)

            async def cleaned() -> bool:
                return not (await q.call("GetCleanupStatus"))[0]

            await eventually(cleaned)
            await nothing_left(sandbox, held)

    run(check())


def test_ready_containers_outlive_a_killed_daemon(sandbox: Any, quilt: Any, pools: None, name: str) -> None:
    async def fill() -> set[str]:
        async with quilt() as q:
            await q.set_warm_pool("busybox", 2)
            await eventually(lambda: ready(q, 2))
            # One claimed just before the kill: it is a container like any other.
            await q.create(name, "busybox", ["sleep", "1000"])
            await q.call("WaitContainerStarted", "st", name, 10_000_000)
            await eventually(lambda: ready(q, 2))
        return pool_ids(sandbox)

    held = run(fill())
    sandbox.run(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "quiltd"])
    after = name[:50] + "-after"

    async def check() -> None:
        async with await_client(sandbox) as q:
            await eventually(lambda: ready(q, 2), 30)
            assert pool_ids(sandbox) == held  # the same two, still waiting: none was made again
            assert (await q.info(name))["State"] == "running"
            code, out, _ = await q.exec(name, ["hostname"])
            assert (code, out.decode().strip()) == (0, name)
            # A create after the restart claims one of them, and runs as any other.
            cid, _ = await q.create(after, "busybox", ["sh", "-c", "hostname; echo $0"])
            assert cid in held
            assert await q.wait(after) == ("exited", 0)
            assert [line for _, _, line in await q.logs(after)] == [after, "sh"]
            await q.set_warm_pool("busybox", 0)  # the other one goes, and at once
            await nothing_left(sandbox, held - {cid})
            for n in (name, after):
                await q.remove(n, force=True)

    run(check())


def test_bad_pools_are_refused(sandbox: Any, quilt: Any, pools: None) -> None:
    async def check() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="cannot be pooled"):
                await q.set_warm_pool("busybox", 1, env=["A=b"])
            with pytest.raises(errors.InvalidArgument, match="0 to 256"):
                await q.set_warm_pool("busybox", 257)
            with pytest.raises(errors.NoSuchImage):
                await q.set_warm_pool("no-such-image", 1)
            with pytest.raises(errors.InvalidArgument):
                await q.set_warm_pool("busybox", 1, memory_max=1)
            assert await q.warm_pools() == []
            await q.set_warm_pool("busybox", 1)
            with pytest.raises(errors.InvalidState, match="warm pool"):
                await q.call("RemoveImage", "s", "busybox")
            await q.call("CreateNetwork", "sa{sv}", "pooled", {})
            try:
                await q.set_warm_pool("busybox", 1, network="pooled")
                with pytest.raises(errors.InvalidState, match="network pooled has 1 warm pool"):
                    await q.call("RemoveNetwork", "s", "pooled")
                await q.set_warm_pool("busybox", 0, network="pooled")
            finally:
                await q.call("RemoveNetwork", "s", "pooled")

    run(check())


def doc_commands(section: str) -> list[str]:
    """The commands of the sh block in a section of docs/api.md, comments left out."""
    text = (REPO / "docs/api.md").read_text()
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = part.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_documented_commands_run_as_written(sandbox: Any, quilt: Any, pools: None) -> None:
    make, listing, create, remove = doc_commands("Warm pools")
    sandbox.run(["sh", "-c", make])
    listed = sandbox.run(["sh", "-c", listing]).stdout.decode()
    assert listed.startswith('a(sa{sv}uu) 1 "busybox" 4 ') and '"network" s "bridge"' in listed

    async def claim() -> None:
        async with quilt() as q:
            await eventually(lambda: ready(q, 2))
            held = pool_ids(sandbox)
            out = sandbox.run(["sh", "-c", create]).stdout.decode()
            assert out.split()[1].strip('"') in held
            await q.remove("agent-1", force=True)

    run(claim())
    sandbox.run(["sh", "-c", remove])
    assert pool_ids(sandbox) == set()
    assert sandbox.run(["sh", "-c", listing]).stdout.decode().strip() == "a(sa{sv}uu) 0"


def test_only_root_sets_a_pool(sandbox: Any, member: str, busybox_image: str) -> None:  # noqa: F811
    denied = sandbox.run([*AS_MEMBER, "busctl", "call", *BUS, "SetWarmPool", "sua{sv}", "busybox", "1", "0"],
                         check=False)
    assert denied.returncode != 0
    assert "may not set a warm pool" in denied.stderr.decode()
    listed = sandbox.run([*AS_MEMBER, "busctl", "call", *BUS, "ListWarmPools"])
    assert listed.stdout.decode().strip() == "a(sa{sv}uu) 0"


def test_quiltctl_pool_verbs_run_as_documented(sandbox: Any, quilt: Any, pools: None) -> None:
    text = (REPO / "docs/quiltctl.md").read_text()
    block = text.split("as written by the test suite:\n\n```sh\nquiltctl pool set", 1)[1]
    make, listing, claim, remove_container, remove = ("quiltctl pool set" + block).split("```", 1)[0] \
        .strip().splitlines()
    path = f"PATH={REPO / '.venv/bin'}:/usr/sbin:/usr/bin:/sbin:/bin"

    def sh(line: str, check: bool = True) -> Any:
        return sandbox.run(["env", path, "sh", "-c", line], check=check)

    assert sh(make).stdout == b"busybox\n"

    async def claimed() -> None:
        async with quilt() as q:
            await eventually(lambda: ready(q, 2))
            rows = sh(listing).stdout.decode().splitlines()
            assert rows[0].split() == ["IMAGE", "SIZE", "READY", "OPTIONS"]
            image, size, ready_now, options = rows[1].split()
            assert (image, size, ready_now) == ("busybox", "2", "2") and "network=bridge" in options
            held = pool_ids(sandbox)
            cid = sh(claim).stdout.decode().strip()
            assert cid in held  # a container made ready ahead, now warm-1
            await q.call("WaitContainerStarted", "st", "warm-1", 10_000_000)
            assert (await q.info("warm-1"))["State"] == "running"
            sh(remove_container)
            await eventually(lambda: ready(q, 2))

    run(claimed())
    [pool] = json.loads(sh(listing.replace("ls", "ls --json")).stdout)
    assert (pool["image"], pool["size"], pool["ready"]) == ("busybox", 2, 2)
    assert pool["options"]["network"] == "bridge"
    assert sh(remove).stdout == b"busybox\n"
    assert pool_ids(sandbox) == set() and json.loads(sh("quiltctl pool --json").stdout) == []
    too_big = sh("quiltctl pool set busybox 257", check=False)
    assert too_big.returncode == 1 and b"(InvalidArgument)" in too_big.stderr, too_big
    negative = sh("quiltctl pool set busybox -1", check=False)
    assert negative.returncode == 2 and b"0 or more" in negative.stderr, negative
    limited = sh("quiltctl pool set -m 64M --pids-limit 50 busybox 1")
    assert limited.stdout == b"busybox\n"
    [pool] = json.loads(sh("quiltctl pool ls --json").stdout)
    assert (pool["options"]["memory_max"], pool["options"]["tasks_max"]) == (64 << 20, 50)
