"""Container networking as a user sees it: addresses, links in the sandbox, names, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from quiltd.net.network import container_mac
from tests.system.conftest import eventually, records, run

pytestmark = pytest.mark.system

GATEWAY = "10.88.0.1"
BRIDGE = "quilt0"


# A removed container's veth goes with its network namespace when the kernel
# cleans that up, a moment after its last process; quiltd deletes one that is
# still there after 2 s (networks.STRAY_VETH_SEC).
VETH_GONE_SEC = 5.0


def sh(sandbox: Any, *argv: str, check: bool = True) -> str:
    return sandbox.run(list(argv), check=check).stdout.decode()


def ports(sandbox: Any) -> set[str]:
    """The bridge's ports, as `ip link` in the daemon's network namespace shows them."""
    out = sh(sandbox, "ip", "-br", "link", "show", "master", BRIDGE, check=False)
    return {line.split()[0].split("@")[0] for line in out.splitlines() if line.strip()}


def in_netns(sandbox: Any, pid: int, *argv: str, check: bool = True) -> str:
    return sh(sandbox, "nsenter", "-t", str(pid), "-n", *argv, check=check)


async def running(q: Any, name: str) -> dict[str, Any]:
    info: dict[str, Any]
    async def is_running() -> bool:
        return bool((await q.info(name))["State"] == "running")

    try:
        await eventually(is_running)
    except AssertionError:
        info = await q.info(name)
        raise AssertionError(f"{name} is {info['State']}, not running: {info['Reason']}") from None
    info = await q.info(name)
    return info


def test_default_network_gives_an_address_a_route_and_a_veth(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid, path = await q.create(name, "busybox", ["sleep", "600"])
            try:
                info = await running(q, name)
                address = info["IPAddress"]
                assert info["Network"] == "bridge"
                assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("10.88.0.0/16")
                prop = await q.call("Get", "ss", "org.quilt.Quilt1.Container", "IPAddress", path=path,
                                    interface="org.freedesktop.DBus.Properties")
                assert prop[0].value == address
                pid = info["Pid"]
                assert f"inet {address}/16" in in_netns(sandbox, pid, "ip", "-4", "addr", "show", "eth0")
                assert f"default via {GATEWAY} dev eth0" in in_netns(sandbox, pid, "ip", "route")
                assert "UP" in in_netns(sandbox, pid, "ip", "link", "show", "lo")
                ipv6 = in_netns(sandbox, pid, "ip", "-6", "addr")
                assert "::1/128" in ipv6 and "eth0" not in ipv6  # lo keeps ::1; eth0 has no IPv6
                in_netns(sandbox, pid, "busybox", "ping", "-6", "-c1", "-W2", "::1")
                in_netns(sandbox, pid, "busybox", "ping", "-c1", "-W2", GATEWAY)
                assert f"qv{cid[:13]}" in ports(sandbox)
                # A port, not a host: no IPv6 address of its own.
                assert sh(sandbox, "ip", "-6", "addr", "show", "dev", f"qv{cid[:13]}") == ""
                assert f"{GATEWAY}/16" in sh(sandbox, "ip", "-4", "addr", "show", BRIDGE)
            finally:
                await q.remove(name, force=True)
            # The veth goes with the container's network namespace, as the kernel cleans it up.
            await eventually(lambda: _true(f"qv{cid[:13]}" not in sh(sandbox, "ip", "-br", "link")),
                             VETH_GONE_SEC)
            assert f"qv{cid[:13]}" not in ports(sandbox)

    run(scenario())


def test_a_veth_whose_namespace_outlives_its_container_goes(sandbox: Any, quilt: Any, name: str) -> None:
    # Something on the host keeps the container's network namespace (a bind
    # mount, as `ip netns attach` makes): the kernel keeps the veth with it.
    held = f"/run/held-netns-{name}"

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"])
            info = await running(q, name)
            veth = f"qv{info['Id'][:13]}"
            sh(sandbox, "touch", held)
            sh(sandbox, "mount", "--bind", f"/proc/{info['Pid']}/ns/net", held)
            try:
                await q.remove(name, force=True)
                await eventually(lambda: _true(veth not in sh(sandbox, "ip", "-br", "link")), VETH_GONE_SEC)
                assert veth not in ports(sandbox)
            finally:
                sh(sandbox, "umount", held, check=False)
                sh(sandbox, "rm", "-f", held, check=False)

    run(scenario())


def test_network_none_keeps_only_loopback(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"], network="none")
            try:
                info = await running(q, name)
                assert info["IPAddress"] == "" and info["Network"] == "none"
                links = in_netns(sandbox, info["Pid"], "ip", "-br", "link")
                assert [line.split()[0] for line in links.splitlines()] == ["lo"]
            finally:
                await q.remove(name, force=True)

    run(scenario())


def test_unknown_network_is_refused_and_leaves_nothing(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            with pytest.raises(errors.NoSuchNetwork, match="nowhere"):
                await q.create(name, "busybox", ["true"], network="nowhere")
            assert await records(q) == before

    run(scenario())


def test_address_is_kept_across_restarts_of_container_and_daemon(sandbox: Any, quilt: Any,
                                                                  name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "600"])
            try:
                first = (await running(q, name))["IPAddress"]
                await q.stop(name, 0)
                await q.start(name)
                assert (await running(q, name))["IPAddress"] == first
                sandbox.run(["systemctl", "restart", "quiltd"])
            except BaseException:
                await q.remove(name, force=True)
                raise
        async with quilt() as q:
            try:
                info = await running(q, name)
                assert info["IPAddress"] == first
                assert f"qv{cid[:13]}" in ports(sandbox)
                in_netns(sandbox, info["Pid"], "busybox", "ping", "-c1", "-W2", GATEWAY)
            finally:
                await q.remove(name, force=True)

    run(scenario())


def test_containers_reach_each_other_by_name(sandbox: Any, quilt: Any, name: str) -> None:
    server, client = f"{name}-srv", f"{name}-cli"

    async def scenario() -> None:
        async with quilt() as q:
            try:
                # What the server received goes to a file it keeps: this test is
                # about names and TCP, not about the journal. Each connection
                # gets its own reader, so whatever reaches the port is kept.
                await q.create(server, "busybox",
                               ["nc", "-ll", "-p", "5000", "-e", "sh", "-c", "cat >> /tmp/got"])
                await running(q, server)
                await q.create(client, "busybox", [
                    "sh", "-c",
                    f"for i in $(seq 50); do echo hello-from-client | nc -w 1 {server} 5000 && exit 0; "
                    "sleep 0.2; done; exit 1",
                ])
                assert await q.wait(client, 30_000_000) == ("exited", 0)
                got = b""
                deadline = time.monotonic() + 10
                while b"hello-from-client" not in got and time.monotonic() < deadline:
                    got = (await q.exec(server, ["cat", "/tmp/got"]))[1]
                    await asyncio.sleep(0.1)
                assert b"hello-from-client\n" in got, got
            finally:
                for ref in (server, client):
                    await _remove(q, ref)

    run(scenario())


def test_hosts_follow_containers_coming_and_going(sandbox: Any, quilt: Any, name: str) -> None:
    watcher, other = f"{name}-w", f"{name}-o"

    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create(watcher, "busybox", ["sleep", "600"])
                pid = (await running(q, watcher))["Pid"]

                def hosts() -> str:
                    return sh(sandbox, "nsenter", "-t", str(pid), "-m", "cat", "/etc/hosts")

                assert f"\t{watcher}\n" in hosts()
                await q.create(other, "busybox", ["sleep", "600"])
                address = (await running(q, other))["IPAddress"]
                await eventually(lambda: _true(f"{address}\t{other}\n" in hosts()))
                await q.kill(other, 9)  # ended but on record: no longer a host
                await eventually(lambda: _true(other not in hosts()))
                await q.start(other)
                address = (await running(q, other))["IPAddress"]
                await eventually(lambda: _true(f"{address}\t{other}\n" in hosts()))
                await q.remove(other, force=True)
                await eventually(lambda: _true(other not in hosts()))
                # Read-only for the container.
                out = sandbox.run(["nsenter", "-t", str(pid), "-m", "-n", "-p", "sh", "-c",
                                   "echo x >> /etc/hosts"], check=False)
                assert out.returncode != 0
            finally:
                for ref in (watcher, other):
                    await _remove(q, ref)

    run(scenario())


def test_200_concurrent_creates_get_distinct_addresses(sandbox: Any, quilt: Any, name: str) -> None:
    names = [f"{name}-{i}" for i in range(200)]
    infos: list[dict[str, Any]] = []

    async def scenario() -> None:
        # The system bus allows a connection 128 pending calls: four clients
        # with 50 calls in flight each.
        async with quilt() as q0, quilt() as q1, quilt() as q2, quilt() as q3:
            clients = (q0, q1, q2, q3)
            try:
                started = time.monotonic()
                await asyncio.gather(*(
                    clients[i % 4].create(n, "busybox", ["sleep", "600"]) for i, n in enumerate(names)
                ))

                async def all_running() -> bool:
                    rows = await q0.list_containers(state="running")
                    return len({r[1] for r in rows} & set(names)) == len(names)

                await eventually(all_running, timeout=300)
                elapsed = time.monotonic() - started
                infos.extend(await asyncio.gather(*(clients[i % 4].info(n) for i, n in enumerate(names))))
                addresses = [i["IPAddress"] for i in infos]
                assert all(addresses) and len(set(addresses)) == len(names)
                assert {f"qv{i['Id'][:13]}" for i in infos} <= ports(sandbox)
                # The last one reaches the first across the bridge.
                in_netns(sandbox, infos[-1]["Pid"], "busybox", "ping", "-c1", "-W2", addresses[0])
                print(f"200 containers running on one bridge after {elapsed:.1f} s")
            finally:
                await asyncio.gather(*(_remove(clients[i % 4], n) for i, n in enumerate(names)))
            await eventually(lambda: _true(not {f"qv{i['Id'][:13]}" for i in infos} & ports(sandbox)),
                             VETH_GONE_SEC)

    run(scenario())


async def _remove(q: Any, ref: str) -> None:
    with contextlib.suppress(errors.NoSuchContainer):
        await q.remove(ref, force=True)


async def _true(value: bool) -> bool:
    return value


def snapshot(sandbox: Any) -> tuple[str, str, str]:
    """Links, addresses and quiltd's nft rules in the daemon's network namespace."""
    links = sh(sandbox, "ip", "-br", "link")
    addrs = sh(sandbox, "ip", "-br", "addr")
    rules = sh(sandbox, "nft", "list", "table", "inet", "quilt", check=False)
    # Bridges show carrier and MACs that change with their ports; names and addresses are what count.
    return (
        "\n".join(sorted(line.split()[0] for line in links.splitlines())),
        "\n".join(sorted(" ".join(w for w in line.split() if not w.startswith("fe80")) for line in
                         addrs.splitlines())).replace(" UP", "").replace(" DOWN", "").replace(" UNKNOWN", ""),
        rules,
    )


async def connects(sandbox: Any, pid: int, address: str, port: int, tries: int = 1) -> bool:
    """Whether a TCP connection from the container's namespace to address:port succeeds."""
    for _ in range(tries):
        out = sandbox.run(["nsenter", "-t", str(pid), "-n", "busybox", "nc", "-w", "2", address, str(port)],
                          input=b"ping\n", check=False)
        if out.returncode == 0:
            return True
        await asyncio.sleep(0.5)
    return False


def test_networks_are_isolated_from_each_other(sandbox: Any, quilt: Any, name: str) -> None:
    net_a, net_b = f"{name}-a"[:63], f"{name}-b"[:63]
    before = snapshot(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create_network(net_a)
                # egress all: routing is on, so only the rules keep b out of a.
                await q.create_network(net_b, egress="all")
                listed = {row[0]: row for row in await q.networks()}
                assert listed[net_b][4] == "all" and listed[net_a][4] == "none"
                await q.create(f"{name}-srv", "busybox", ["nc", "-ll", "-p", "5000", "-e", "true"],
                               network=net_a)
                await q.create(f"{name}-peer", "busybox", ["sleep", "600"], network=net_a)
                await q.create(f"{name}-out", "busybox", ["sleep", "600"], network=net_b)
                srv = await running(q, f"{name}-srv")
                peer = await running(q, f"{name}-peer")
                out = await running(q, f"{name}-out")
                assert srv["IPAddress"].rsplit(".", 1)[0] == peer["IPAddress"].rsplit(".", 1)[0]
                assert await connects(sandbox, peer["Pid"], srv["IPAddress"], 5000, tries=5)
                assert not await connects(sandbox, out["Pid"], srv["IPAddress"], 5000)
                with pytest.raises(errors.InvalidState, match=f"{name}-srv"):
                    await q.remove_network(net_a)
            finally:
                for ref in (f"{name}-srv", f"{name}-peer", f"{name}-out"):
                    await _remove(q, ref)
                for net in (net_a, net_b):
                    with contextlib.suppress(errors.NoSuchNetwork):
                        await q.remove_network(net)
            assert net_a not in {row[0] for row in await q.networks()}

    run(scenario())
    assert snapshot(sandbox) == before


@pytest.mark.parametrize(("egress", "reach_8080", "reach_8081"), [
    ("none", False, False),
    ("all", True, True),
    (["GATEWAY:8080"], True, False),
])
def test_egress_to_the_host_side(sandbox: Any, quilt: Any, name: str, egress: Any, reach_8080: bool,
                                 reach_8081: bool) -> None:
    """Host services, and another network's published port on a host address, as egress allows."""
    net = f"{name}-n"[:63]
    published = f"{name}-pub"

    async def scenario() -> None:
        async with quilt() as q:
            servers = []
            try:
                gateway = "10.123.0.1"
                wanted = egress
                if isinstance(egress, list):
                    wanted = [e.replace("GATEWAY", gateway) for e in egress]
                assert await q.create_network(net, subnet="10.123.0.0/24", egress=wanted) == "10.123.0.0/24"
                for port in (8080, 8081):
                    unit = f"egress-{port}-{name}"[:60]
                    sandbox.run(["systemd-run", f"--unit={unit}", "busybox", "nc", "-ll", "-p", str(port),
                                 "-e", "true"])
                    servers.append(unit)
                # On the default network: its port 18084 is on every host address.
                await q.create(published, "busybox", ["nc", "-ll", "-p", "80", "-e", "true"],
                               publish=[[18084, 80, "tcp"]])
                await q.create(name, "busybox", ["sleep", "600"], network=net)
                pid = (await running(q, name))["Pid"]
                await running(q, published)
                # Expected successes get a few tries: the servers may not be listening yet.
                assert await connects(sandbox, pid, gateway, 8080, 5 if reach_8080 else 1) == reach_8080
                assert await connects(sandbox, pid, gateway, 8081, 5 if reach_8081 else 1) == reach_8081
                assert await connects(sandbox, pid, gateway, 18084, 5 if reach_8081 else 1) == reach_8081
                in_netns(sandbox, pid, "busybox", "ping", "-c1", "-W2", gateway)  # always allowed
            finally:
                await _remove(q, name)
                await _remove(q, published)
                for unit in servers:
                    sandbox.run(["systemctl", "stop", unit], check=False)
                with contextlib.suppress(errors.NoSuchNetwork):
                    await q.remove_network(net)

    run(scenario())


def test_network_bad_input_leaves_nothing(sandbox: Any, quilt: Any, name: str) -> None:
    before = snapshot(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            listed = await q.networks()
            cases: list[tuple[str, dict[str, Any], type[errors.QuiltError], str]] = [
                ("bridge", {}, errors.NameTaken, "bridge"),
                ("-bad", {}, errors.InvalidArgument, "invalid network name"),
                ("none", {}, errors.InvalidArgument, "none"),
                (name, {"subnet": "10.88.5.0/24"}, errors.InvalidArgument, "overlaps network bridge"),
                (name, {"subnet": "10.1.2.3/33"}, errors.InvalidArgument, "invalid subnet"),
                (name, {"subnet": "10.77.0.0/30"}, errors.InvalidArgument, "too small"),
                (name, {"egress": "some"}, errors.InvalidArgument, "egress"),
                (name, {"egress": ["10.0.0.0/8:99999"]}, errors.InvalidArgument, "port"),
                (name, {"colour": "red"}, errors.InvalidArgument, "colour"),
            ]
            for net, opts, error, match in cases:
                with pytest.raises(error, match=match):
                    await q.create_network(net, **opts)
            with pytest.raises(errors.NoSuchNetwork):
                await q.remove_network(name)
            with pytest.raises(errors.InvalidState, match="default"):
                await q.remove_network("bridge")
            assert await q.networks() == listed

    run(scenario())
    assert snapshot(sandbox) == before


def test_subnet_exhausted_is_a_named_error_and_leaves_nothing(quilt: Any, name: str) -> None:
    net = f"{name}-tiny"[:63]

    async def scenario() -> None:
        async with quilt() as q:
            await q.create_network(net, subnet="10.124.0.0/29")  # five addresses
            names = [f"{name}-{i}" for i in range(5)]
            try:
                for n in names:
                    await q.create(n, "busybox", ["true"], network=net)
                before = await records(q)
                with pytest.raises(errors.AddressesExhausted, match=net):
                    await q.create(f"{name}-6", "busybox", ["true"], network=net)
                assert await records(q) == before
                await q.create(f"{name}-6", "busybox", ["true"], network=net, start=False)
                with pytest.raises(errors.AddressesExhausted):
                    await q.start(f"{name}-6")
                assert (await q.info(f"{name}-6"))["State"] == "created"
                await q.remove(names[0], force=True)
                await q.start(f"{name}-6")  # the freed address
            finally:
                for n in [*names, f"{name}-6"]:
                    await _remove(q, n)
                await q.remove_network(net)

    run(scenario())


def test_kill_9_leaves_nothing_the_next_start_does_not_clean(sandbox: Any, quilt: Any, name: str) -> None:
    before = snapshot(sandbox)
    # What a daemon killed half-way through RemoveNetwork or a start could
    # leave: a bridge of no network on record, a stray veth, stale rules.
    sandbox.run(["ip", "link", "add", "qbdeadbeef0000", "type", "bridge"])
    sandbox.run(["ip", "link", "add", "qv0000deadbeef0", "type", "veth", "peer", "name", "qvpeer-stray"])
    sandbox.run(["nft", "add", "rule", "inet", "quilt", "forward", "iifname", "qbdeadbeef0000", "accept"])
    main_pid = sh(sandbox, "systemctl", "show", "-p", "MainPID", "--value", "quiltd").strip()
    sandbox.run(["kill", "-9", main_pid])

    async def scenario() -> None:
        # systemd restarts it, or the next call activates it; the first
        # calls may still reach the dying one.
        for _ in range(50):
            with contextlib.suppress(errors.QuiltError):
                async with quilt() as q:
                    await q.system_info()
                    return
            await asyncio.sleep(0.2)

    run(scenario())
    assert snapshot(sandbox) == before


def test_published_port_reaches_the_container_and_conflicts_are_named(sandbox: Any, quilt: Any,
                                                                       name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create(name, "busybox", ["nc", "-ll", "-p", "80", "-e", "echo", "published-ok"],
                               publish=[[18080, 80, "tcp"]])
                await running(q, name)
                with pytest.raises(errors.NameTaken, match=f"18080/tcp is published by container {name}"):
                    await q.create(f"{name}-2", "busybox", ["true"], publish=[[18080, 81, "tcp"]])
                with pytest.raises(errors.InvalidArgument, match="network"):
                    await q.create(f"{name}-2", "busybox", ["true"], network="none",
                                   publish=[[18081, 80, "tcp"]])
                with pytest.raises(errors.InvalidArgument, match="protocol"):
                    await q.create(f"{name}-2", "busybox", ["true"], publish=[[18081, 80, "sctp"]])
                assert "18080" in sh(sandbox, "nft", "list", "table", "inet", "quilt")
                # From the host side: any of its addresses, here the gateway.
                for _ in range(10):
                    out = sandbox.run(["busybox", "nc", "-w", "2", GATEWAY, "18080"], check=False)
                    if b"published-ok" in out.stdout:
                        break
                    await asyncio.sleep(0.5)
                assert b"published-ok" in out.stdout
            finally:
                await _remove(q, name)
            assert "18080" not in sh(sandbox, "nft", "list", "table", "inet", "quilt")

    run(scenario())


async def answer(sandbox: Any, pid: int | None, address: str, port: int, expect: bytes) -> bytes:
    """What a TCP client gets from address:port: from the sandbox's host side, or a container's namespace."""
    argv = ["busybox", "nc", "-w", "2", address, str(port)]
    if pid is not None:
        argv = ["nsenter", "-t", str(pid), "-n", *argv]
    out = b""
    for _ in range(10):  # the server may not be listening yet
        out = sandbox.run(argv, check=False).stdout
        if expect in out:
            break
        await asyncio.sleep(0.5)
    return out


def test_published_port_answers_on_the_hosts_localhost(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create(name, "busybox", ["nc", "-ll", "-p", "80", "-e", "echo", "local-ok"],
                               publish=[[18082, 80, "tcp"]])
                await running(q, name)
                assert b"local-ok" in await answer(sandbox, None, "127.0.0.1", 18082, b"local-ok")
                # Every loopback address is one of the host's, as on docker and podman.
                assert b"local-ok" in await answer(sandbox, None, "127.0.0.2", 18082, b"local-ok")
            finally:
                await _remove(q, name)
            assert "18082" not in sh(sandbox, "nft", "list", "table", "inet", "quilt")
            out = sandbox.run(["busybox", "nc", "-w", "2", "127.0.0.1", "18082"], check=False)
            assert b"local-ok" not in out.stdout

    run(scenario())


def test_published_port_hairpin_through_the_gateway(sandbox: Any, quilt: Any, name: str) -> None:
    """Containers of the server's own network, and the server itself, reach it at host address:port.

    The server gets an address that a removed container had, and that the
    host has talked to: what the host cached for it must still be right.
    """
    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create(f"{name}-old", "busybox", ["nc", "-ll", "-p", "80", "-e", "echo", "old-ok"])
                old = (await running(q, f"{name}-old"))["IPAddress"]
                assert b"old-ok" in await answer(sandbox, None, old, 80, b"old-ok")
                await q.remove(f"{name}-old", force=True)
                await q.create(name, "busybox", ["nc", "-ll", "-p", "80", "-e", "echo", "hairpin-ok"],
                               publish=[[18083, 80, "tcp"]])
                await q.create(f"{name}-client", "busybox", ["sleep", "600"])
                server = await running(q, name)
                client = (await running(q, f"{name}-client"))["Pid"]
                assert server["IPAddress"] == old  # the lowest free address
                assert b"hairpin-ok" in await answer(sandbox, client, GATEWAY, 18083, b"hairpin-ok")
                assert b"hairpin-ok" in await answer(sandbox, server["Pid"], GATEWAY, 18083, b"hairpin-ok")
            finally:
                for ref in (f"{name}-old", name, f"{name}-client"):
                    await _remove(q, ref)
            assert "18083" not in sh(sandbox, "nft", "list", "table", "inet", "quilt")

    run(scenario())


def test_no_container_reaches_the_hosts_loopback(sandbox: Any, quilt: Any, name: str) -> None:
    """The bridges route loopback addresses, for published ports: that opens no loopback service.

    Even with egress all, and with the container routing 127.0.0.2 to its
    gateway, as a container with CAP_NET_ADMIN can.
    """
    net = f"{name}-n"[:63]
    unit = f"loopback-{name}"[:60]
    gateway = "10.125.0.1"
    sandbox.run(["systemd-run", f"--unit={unit}", "busybox", "nc", "-ll", "-p", "9998",
                 "-e", "echo", "loopback-secret"])

    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create_network(net, subnet="10.125.0.0/24", egress="all")
                await q.create(name, "busybox", ["sleep", "600"], network=net)
                pid = (await running(q, name))["Pid"]
                for command in ("sysctl -q -w net.ipv4.conf.all.route_localnet=1",
                                "sysctl -q -w net.ipv4.conf.eth0.route_localnet=1",
                                "ip rule add pref 100 table local",
                                "ip rule del pref 0 table local",
                                "ip rule add to 127.0.0.2 lookup 100 pref 10",
                                f"ip route add 127.0.0.2 via {gateway} dev eth0 table 100"):
                    in_netns(sandbox, pid, *command.split())
                assert f"via {gateway}" in in_netns(sandbox, pid, "ip", "route", "get", "127.0.0.2")
                secret = b"loopback-secret"
                assert secret in await answer(sandbox, None, "127.0.0.2", 9998, secret)  # it listens
                assert not await connects(sandbox, pid, "127.0.0.2", 9998)
            finally:
                await _remove(q, name)
                with contextlib.suppress(errors.NoSuchNetwork):
                    await q.remove_network(net)

    try:
        run(scenario())
    finally:
        sandbox.run(["systemctl", "stop", unit], check=False)


def test_egress_all_is_masqueraded_to_a_remote_host(sandbox: Any, quilt: Any, name: str) -> None:
    """A "remote" host in a network namespace of the sandbox, with no route back to any container."""
    net = f"{name}-n"[:63]
    netns = f"remote-{name}"[:40]
    unit = f"remote-server-{name}"[:60]
    sandbox.run(["ip", "netns", "add", netns])
    try:
        sandbox.run(["ip", "link", "add", "qtestremote", "type", "veth",
                     "peer", "name", "eth0", "netns", netns])
        sandbox.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "qtestremote"])
        sandbox.run(["ip", "link", "set", "qtestremote", "up"])
        sandbox.run(["ip", "-n", netns, "addr", "add", "192.0.2.2/24", "dev", "eth0"])
        sandbox.run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        sandbox.run(["systemd-run", f"--unit={unit}", "ip", "netns", "exec", netns,
                     "busybox", "nc", "-ll", "-p", "9000", "-e", "echo", "remote-ok"])

        async def scenario() -> None:
            async with quilt() as q:
                try:
                    await q.create_network(net, egress="all")
                    await q.create(name, "busybox", ["sleep", "600"], network=net)
                    await q.create(f"{name}-none", "busybox", ["sleep", "600"])  # default: egress none
                    pid = (await running(q, name))["Pid"]
                    closed = (await running(q, f"{name}-none"))["Pid"]
                    assert await connects(sandbox, pid, "192.0.2.2", 9000, tries=5)
                    assert not await connects(sandbox, closed, "192.0.2.2", 9000)
                finally:
                    await _remove(q, name)
                    await _remove(q, f"{name}-none")
                    with contextlib.suppress(errors.NoSuchNetwork):
                        await q.remove_network(net)

        run(scenario())
    finally:
        sandbox.run(["systemctl", "stop", unit], check=False)
        sandbox.run(["ip", "link", "del", "qtestremote"], check=False)
        sandbox.run(["ip", "netns", "del", netns], check=False)


ROGUE = (Path(__file__).parent / "rogue.py").read_text()


def rogue(sandbox: Any, pid: int, *args: str) -> None:
    """Sends forged packets from a container's network namespace, with every capability."""
    sandbox.run(["nsenter", "-t", str(pid), "-n", "python3", "-c", ROGUE, *args])


def bridge_of(sandbox: Any, container_id: str) -> str:
    shown = sh(sandbox, "ip", "-o", "link", "show", "dev", f"qv{container_id[:13]}").split()
    return shown[shown.index("master") + 1]


def test_router_advertisements_from_a_container_route_nothing(sandbox: Any, quilt: Any, name: str) -> None:
    """A container announces itself as IPv6 router: neither the host nor a neighbour may follow it."""
    net = f"{name}-n"[:63]

    async def scenario() -> None:
        async with quilt() as q:
            try:
                # egress all: the host routes for the network, which is where an RA hurts most.
                await q.create_network(net, subnet="10.125.0.0/24", egress="all")
                cid, _ = await q.create(name, "busybox", ["sleep", "600"], network=net)
                await q.create(f"{name}-nb", "busybox", ["sleep", "600"], network=net)
                attacker = (await running(q, name))["Pid"]
                neighbour = (await running(q, f"{name}-nb"))["Pid"]
                bridge = bridge_of(sandbox, cid)
                rogue(sandbox, attacker, "ra")
                await asyncio.sleep(1)
                assert sh(sandbox, "ip", "-6", "route", "show", "default") == ""
                assert "2001:db8:66" not in sh(sandbox, "ip", "-6", "addr", "show", "dev", bridge)
                assert in_netns(sandbox, neighbour, "ip", "-6", "route", "show", "default") == ""
                assert "2001:db8:66" not in in_netns(sandbox, neighbour, "ip", "-6", "addr")
                # What keeps a neighbour safe even from an RA that reaches it:
                # its eth0 takes in no IPv6 at all, and would follow no RA.
                conf = "/proc/sys/net/ipv6/conf/eth0"
                assert in_netns(sandbox, neighbour, "cat", f"{conf}/disable_ipv6") == "1\n"
                assert in_netns(sandbox, neighbour, "cat", f"{conf}/accept_ra") == "0\n"
                # The host has two locks: its bridge ignores RAs, and the
                # firewall drops them. With the first opened, the second holds.
                knob = f"/proc/sys/net/ipv6/conf/{bridge}/accept_ra"
                assert sh(sandbox, "cat", knob) == "0\n"
                sh(sandbox, "sh", "-c", f"echo 1 > {knob}")
                rogue(sandbox, attacker, "ra")
                await asyncio.sleep(1)
                assert sh(sandbox, "ip", "-6", "route", "show", "default") == ""
            finally:
                await _remove(q, name)
                await _remove(q, f"{name}-nb")
                with contextlib.suppress(errors.NoSuchNetwork):
                    await q.remove_network(net)

    run(scenario())


LISTEN = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7000))
s.settimeout(3)
got = set()
try:
    while True:
        got.add(s.recvfrom(100)[0].decode())
except socket.timeout:
    pass
print(" ".join(sorted(got)))
"""


def test_a_container_cannot_spoof_its_neighbours_or_the_gateway(sandbox: Any, quilt: Any, name: str) -> None:
    """Forged ARP replies, source addresses and MACs, sent with CAP_NET_RAW, poison no one."""
    net = f"{name}-n"[:63]
    gateway = "10.126.0.1"

    async def scenario() -> None:
        async with quilt() as q:
            try:
                await q.create_network(net, subnet="10.126.0.0/24")
                attacker_id, _ = await q.create(name, "busybox", ["sleep", "600"], network=net)
                victim_id, _ = await q.create(f"{name}-v", "busybox", ["sleep", "600"], network=net)
                attacker = await running(q, name)
                victim = await running(q, f"{name}-v")
                a_ip, v_ip = attacker["IPAddress"], victim["IPAddress"]
                a_mac, v_mac = container_mac(a_ip), container_mac(v_ip)
                bridge = bridge_of(sandbox, attacker_id)
                shown = sh(sandbox, "ip", "-o", "link", "show", "dev", bridge).split()
                bridge_mac = shown[shown.index("link/ether") + 1]
                # The host and the victim know each other's MAC, as after any traffic.
                sh(sandbox, "busybox", "ping", "-c1", "-W2", v_ip)
                assert bridge_mac in in_netns(sandbox, victim["Pid"], "ip", "neigh", "show", gateway)
                await asyncio.sleep(1.2)  # past the neighbour entries' locktime: replies may now override
                # ARP replies: to the victim "the gateway is at my MAC", to the host "the victim is".
                rogue(sandbox, attacker["Pid"], "arp", a_mac, v_mac, v_ip, gateway)
                rogue(sandbox, attacker["Pid"], "arp", a_mac, bridge_mac, gateway, v_ip)
                await asyncio.sleep(0.5)
                seen = {
                    "victim's gateway entry": in_netns(sandbox, victim["Pid"], "ip", "neigh", "show",
                                                       gateway),
                    "host's victim entry": sh(sandbox, "ip", "neigh", "show", v_ip, "dev", bridge),
                }
                # Datagrams to the victim: one as the gateway, one honest (which must arrive).
                listener = asyncio.create_task(asyncio.to_thread(
                    in_netns, sandbox, victim["Pid"], "python3", "-c", LISTEN))
                await asyncio.sleep(0.5)
                rogue(sandbox, attacker["Pid"], "udp", a_mac, gateway, v_mac, v_ip, "7000", "as-gateway")
                rogue(sandbox, attacker["Pid"], "udp", a_mac, a_ip, v_mac, v_ip, "7000", "honest")
                received = (await listener).split()
                # The victim's MAC as source: the bridge would learn it on the attacker's
                # port and send it the victim's frames.
                rogue(sandbox, attacker["Pid"], "udp", v_mac, a_ip, bridge_mac, gateway, "9", "as-victim")
                fdb = sh(sandbox, "bridge", "fdb", "show", "br", bridge)
                outcome = {
                    **{what: a_mac in entry for what, entry in seen.items()},
                    "datagrams received": received,
                    "victim's MAC on the attacker's port": f"{v_mac} dev qv{attacker_id[:13]}" in fdb,
                    "victim's MAC on its own port": f"{v_mac} dev qv{victim_id[:13]}" in fdb,
                }
                assert outcome == {"victim's gateway entry": False, "host's victim entry": False,
                                   "datagrams received": ["honest"],
                                   "victim's MAC on the attacker's port": False,
                                   "victim's MAC on its own port": True}, (seen, fdb)
            finally:
                await _remove(q, name)
                await _remove(q, f"{name}-v")
                with contextlib.suppress(errors.NoSuchNetwork):
                    await q.remove_network(net)

    run(scenario())
