"""Address leases in the store and the files containers read: no kernel involved."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from quiltd.errors import AddressesExhausted, InvalidArgument, NoSuchNetwork
from quiltd.model import Container, ContainerSpec, Lease, Network
from quiltd.net import firewall
from quiltd.net.network import Netlink, container_mac
from quiltd.net.networks import (
    Networks,
    check_free,
    parse_subnet,
    pick_address,
    render_hosts,
    render_resolv_conf,
    write_in_place,
)
from quiltd.paths import Paths
from quiltd.store.database import Store

SMALL = Network(name="small", bridge="qbsmall", subnet="10.9.0.0/29", gateway="10.9.0.1")


def container(cid: str, network: str = "bridge") -> Container:
    return Container(id=cid, name=f"c{cid}", image="busybox", image_id="x", command=("true",),
                     spec=ContainerSpec(network=network, hostname=f"c{cid}"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "quilt.db")
    with s.transaction():
        s.insert_network(SMALL)
    return s


def test_pick_skips_gateway_and_used_and_ends() -> None:
    assert pick_address(SMALL, set()) == "10.9.0.2"
    assert pick_address(SMALL, {"10.9.0.2", "10.9.0.4"}) == "10.9.0.3"
    # /29: .1 gateway, .2-.6 hosts, .7 broadcast
    assert pick_address(SMALL, {f"10.9.0.{i}" for i in range(2, 7)}) is None


def test_default_network_is_in_a_fresh_store(store: Store) -> None:
    default = store.find_network("bridge")
    assert default == Network("bridge", "quilt0", "10.88.0.0/16", "10.88.0.1", "none", 0)


def test_leases_are_distinct_kept_and_go_with_the_container(store: Store, tmp_path: Path) -> None:
    nets = Networks(Paths(tmp_path, tmp_path / "run"), store, Netlink())
    taken = []
    for i in range(5):
        c = container(f"{i:016x}", "small")
        with store.transaction():
            store.insert_container(c)
            lease = nets.take_lease(c)
        assert lease is not None
        taken.append(lease.address)
        with store.transaction():
            assert nets.take_lease(c) == lease  # a second start keeps it
    assert sorted(taken) == [f"10.9.0.{i}" for i in range(2, 7)]
    late = container("f" * 16, "small")
    with pytest.raises(AddressesExhausted, match="small"), store.transaction():
        store.insert_container(late)
        nets.take_lease(late)
    assert store.find_container(late.id) is None  # rolled back with the lease
    with store.transaction():
        store.delete_container(f"{0:016x}")
    assert "10.9.0.2" not in {le.address for le in store.leases("small")}
    with store.transaction():
        store.insert_container(late)
        assert nets.take_lease(late) == Lease(late.id, "small", "10.9.0.2")


def test_the_store_refuses_an_address_twice(store: Store) -> None:
    a, b = container("a" * 16, "small"), container("b" * 16, "small")
    with store.transaction():
        store.insert_container(a)
        store.insert_container(b)
        store.insert_lease(Lease(a.id, "small", "10.9.0.2"))
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.insert_lease(Lease(b.id, "small", "10.9.0.2"))


def test_unknown_network(store: Store, tmp_path: Path) -> None:
    nets = Networks(Paths(tmp_path, tmp_path / "run"), store, Netlink())
    with pytest.raises(NoSuchNetwork, match="nowhere"):
        nets.find("nowhere")


def test_hosts_and_resolv_conf() -> None:
    hosts = render_hosts([("10.88.0.10", "web", "web"), ("10.88.0.9", "db", "database")])
    assert hosts.splitlines()[2:] == ["10.88.0.9\tdb database", "10.88.0.10\tweb"]
    assert hosts.startswith("127.0.0.1\tlocalhost\n")
    resolv = render_resolv_conf("# c\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch lan\nbogus\n")
    assert resolv == "nameserver 192.0.2.1\nsearch lan\n"


def test_write_in_place_keeps_the_inode(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    write_in_place(path, "a much longer first version\n")
    inode = path.stat().st_ino
    write_in_place(path, "short\n")
    assert path.read_text() == "short\n" and path.stat().st_ino == inode


def test_egress_option_and_rules() -> None:
    assert firewall.parse_egress("none") == ("none", ())
    assert firewall.parse_egress(["10.1.2.3/8", "192.0.2.1:443"]) == (
        "list", (firewall.EgressRule("10.0.0.0/8"), firewall.EgressRule("192.0.2.1/32", 443)))
    for bad in ("some", [], ["10.0.0.0/33"], ["10.0.0.0/8:0"], ["10.0.0.0/8:x"], [1]):
        with pytest.raises(InvalidArgument):
            firewall.parse_egress(bad)
    script = firewall.ruleset([
        firewall.Policy("qba", "10.89.0.0/16", "10.89.0.1", "none"),
        firewall.Policy("qbb", "10.90.0.0/16", "10.90.0.1", "all"),
    ])
    forward = script[script.index("chain forward"):script.index("chain input")]
    # Both networks' doors are shut before either's egress is opened.
    assert forward.index('oifname "qba" drop') < forward.index('iifname "qbb" accept')
    assert 'ip saddr 10.90.0.0/16 oifname != "qbb" masquerade' in script
    assert "10.89.0.0/16 oifname" not in script
    assert script.startswith("table inet quilt {}\ndelete table inet quilt\n")
    # Router advertisements from containers are dropped before egress "all" accepts anything.
    inbound = script[script.index("chain input"):]
    assert inbound.index('iifname "qbb" icmpv6 type 133-137 drop') < inbound.index('iifname "qbb" accept')


def test_published_port_rules() -> None:
    script = firewall.ruleset(
        [firewall.Policy("qba", "10.89.0.0/16", "10.89.0.1", "none"),
         firewall.Policy("qbb", "10.90.0.0/16", "10.90.0.1", "all")],
        (firewall.Forward(8080, "tcp", "10.89.0.2", 80),),
    )
    chains = {name: script[script.index(f"chain {name} "):].split("}")[0]
              for name in ("input", "prerouting", "output", "postrouting")}
    for hook in ("prerouting", "output"):  # from elsewhere, and from the host itself
        assert "fib daddr type local tcp dport 8080 dnat ip to 10.89.0.2:80" in chains[hook]
    # Loopback sources (host's 127.0.0.1) and hairpin connections come from the gateway.
    assert 'oifname "qba" ip saddr 127.0.0.0/8 masquerade' in chains["postrouting"]
    assert 'oifname "qba" ip saddr 10.89.0.0/16 ct status dnat masquerade' in chains["postrouting"]
    # The bridges route loopback addresses: no egress opens the host's own loopback.
    assert chains["input"].index('iifname "qbb" ip daddr 127.0.0.0/8 drop') < chains["input"].index(
        'iifname "qbb" accept')


def test_container_mac_follows_the_address() -> None:
    assert container_mac("10.88.0.2") == "02:51:0a:58:00:02"
    assert container_mac("10.89.255.254") == "02:51:0a:59:ff:fe"


def test_subnet_checks() -> None:
    others = [Network("a", "qba", "10.89.0.0/16", "10.89.0.1")]
    assert str(check_free(parse_subnet("10.90.0.0/24"), others)) == "10.90.0.0/24"
    for bad, why in (("10.89.1.0/24", "overlaps network a"), ("10.90.0.1/24", "host bits"),
                     ("10.90.0.0/30", "too small"), ("nonsense", "invalid subnet"),
                     ("300.0.0.0/8", "invalid")):
        with pytest.raises(InvalidArgument, match=why):
            check_free(parse_subnet(bad), others)


def test_ports_are_pinned_to_their_mac_and_address() -> None:
    pin = firewall.Pin("qv0123456789abc", "02:51:0a:59:00:02", "10.89.0.2")
    script = firewall.ruleset([firewall.Policy("qba", "10.89.0.0/16", "10.89.0.1", "none")], (), (pin,))
    bridge = script[script.index("table bridge quilt {\n"):]
    # Replaced whole, like the inet table, and the pins come with it.
    assert script.index("delete table bridge quilt") < script.index("table bridge quilt {\n")
    assert 'add element bridge quilt port_mac { "qv0123456789abc" . 02:51:0a:59:00:02 }' in bridge
    assert 'add element bridge quilt port_ip { "qv0123456789abc" . 10.89.0.2 }' in bridge
    for rule in ("iifname . ether saddr != @port_mac drop", "iifname . arp saddr ip != @port_ip drop",
                 "iifname . ip saddr != @port_ip drop"):
        assert rule in bridge
    assert firewall.unpin_script(pin) == firewall.pin_script(pin).replace("add element", "delete element")
