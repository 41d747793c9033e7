"""Container networks: addresses, bridges, veths and the name files containers read.

The core's side of networking. Addresses are leased in the store, inside
the transaction that moves a container to starting, and kept until the
container is removed (so a restarted container, or a restarted daemon, keeps
its address). Links are made through network.Netlink. Each network has one
hosts file and one resolv.conf in the run dir, bind-mounted read-only into
its containers; the hosts file lists every active container of the network
by name and is rewritten in place as they come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from quiltd.errors import (
    AddressesExhausted,
    Internal,
    InvalidArgument,
    InvalidState,
    NameTaken,
    NoSuchNetwork,
)
from quiltd.fs.remove import remove_path
from quiltd.model import Container, Lease, Network
from quiltd.names import VETH_PREFIX, veth_name
from quiltd.net import firewall, hostreset
from quiltd.net.network import CONTAINER_IFNAME, Link, container_mac
from quiltd.net.nftqueue import NftQueue
from quiltd.paths import Paths
from quiltd.store.database import Store

log = logging.getLogger("quiltd")
T = TypeVar("T")

NONE = "none"  # the network option for loopback only
DEFAULT = "bridge"  # the default network's name; its bridge device is quilt0
HOSTS_HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
BRIDGE_PREFIX = "qb"  # bridges of created networks: qb + 12 hex digits
# Subnets handed out when CreateNetwork names none: 10.89.0.0/16 upwards.
AUTO_SUBNETS = [ipaddress.IPv4Network(f"10.{n}.0.0/16") for n in range(89, 255)]
MAX_PREFIX = 29  # the smallest network: a gateway and five containers
STRAY_VETH_SEC = 2.0  # how long a removed container's veth may take to go by itself (release)


@dataclass(frozen=True)
class Attachment:
    """What a container's init needs to join its network."""

    ifname: str
    interface: str  # address/prefix, e.g. 10.88.0.5/16
    gateway: str
    hosts_file: str
    resolv_file: str


def pick_address(network: Network, used: set[str]) -> str | None:
    """The lowest free host address of the network, or None when all are taken."""
    # Counted as integers: an address object per candidate cost more than the
    # rest of a container's start once a few hundred ran.
    taken = {_address_number(a) for a in used}
    taken.add(_address_number(network.gateway))
    subnet = ipaddress.IPv4Network(network.subnet)
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    if subnet.prefixlen < 31:
        first, last = first + 1, last - 1  # no network or broadcast address
    for number in range(first, last + 1):
        if number not in taken:
            return socket.inet_ntoa(number.to_bytes(4, "big"))
    return None


def _address_number(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


def render_hosts(entries: list[tuple[str, str, str]]) -> str:
    """The hosts file for (address, name, hostname) entries."""
    lines = [HOSTS_HEADER]
    for address, name, hostname in sorted(entries, key=lambda e: _address_number(e[0])):
        names = name if hostname in ("", name) else f"{name} {hostname}"
        lines.append(f"{address}\t{names}\n")
    return "".join(lines)


def render_resolv_conf(host: str) -> str:
    """The host's resolv.conf without loopback name servers, which a container cannot reach."""
    kept = []
    for line in host.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
        if words[:1] in (["nameserver"], ["search"], ["options"], ["domain"]):
            kept.append(line)
    return "".join(f"{line}\n" for line in kept)


def write_in_place(path: Path, text: str) -> None:
    """Rewrites a file keeping its inode: containers see it through bind mounts of that inode."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def parse_subnet(value: object) -> ipaddress.IPv4Network:
    """The subnet option: CIDR, no host bits, large enough for a gateway and a few containers."""
    if not isinstance(value, str):
        raise InvalidArgument("option subnet must be a string (s) in CIDR form, e.g. 10.90.0.0/16")
    try:
        subnet = ipaddress.IPv4Network(value)
    except ValueError as e:
        raise InvalidArgument(f"invalid subnet {value!r}: {e}") from e
    if subnet.prefixlen > MAX_PREFIX:
        raise InvalidArgument(f"subnet {value} is too small: use a prefix of /{MAX_PREFIX} or shorter")
    return subnet


def check_free(subnet: ipaddress.IPv4Network, others: list[Network]) -> ipaddress.IPv4Network:
    for other in others:
        if subnet.overlaps(ipaddress.IPv4Network(other.subnet)):
            raise InvalidArgument(f"subnet {subnet} overlaps network {other.name} ({other.subnet})")
    return subnet


def policy(network: Network) -> firewall.Policy:
    egress, rules = firewall.parse_egress(
        network.egress if network.egress in (firewall.EGRESS_NONE, firewall.EGRESS_ALL)
        else network.egress.split(",")
    )
    return firewall.Policy(network.bridge, network.subnet, network.gateway, egress, rules)


class Links(Protocol):
    """The host's links, as Networks uses them: network.Netlink, or a fake in the unit tests.

    Each raises errors.Internal (network.NetworkError) with the kernel's reason.
    """

    async def ensure_bridge(self, name: str, gateway: str) -> None:
        """Makes the bridge with the gateway's address on it, if it is not there yet."""

    async def add_veth(self, container_id: str, bridge: str, gateway: str, pid: int, address: str) -> None:
        """The container's veth pair: the host end a port of bridge, the other eth0 in pid's netns."""

    async def delete_link(self, name: str) -> bool:
        """Deletes a link; False if there was none."""

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(*args) in turn with the link work (the firewall's reload)."""

    async def links(self) -> list[Link]:
        """Every link of the host's network namespace."""

    async def set_master(self, name: str, bridge: str) -> None:
        """Makes the link a port of bridge."""


class Networks:
    def __init__(self, paths: Paths, store: Store, netlink: Links,
                 load_nft: Callable[[str], Awaitable[None]] | None = None) -> None:
        """load_nft runs an nft script (the port pins); nft on a worker thread unless given."""
        self._paths = paths
        self._store = store
        self._netlink = netlink
        self._stale_hosts: set[str] = set()
        self._nft = NftQueue(load_nft or _load_nft)
        # Per network, the hosts file's entries by container id: kept up to
        # date from the container events, so a change costs one lookup and
        # not a read of every container on record.
        self._host_entries: dict[str, dict[str, tuple[str, str, str]]] = {}
        self._stray_deletes: set[asyncio.Task[None]] = set()

    # Checks and leases (on the event loop, inside the caller's transaction)

    def find(self, name: str) -> Network:
        network = self._store.find_network(name)
        if network is None:
            known = ", ".join([NONE, *(n.name for n in self._store.list_networks())])
            raise NoSuchNetwork(f"no network {name!r}: known are {known}")
        return network

    def take_lease(self, c: Container) -> Lease | None:
        """The container's lease, taken now if it has none. Call inside a store transaction."""
        if c.spec.network == NONE:
            return None
        lease = self._store.find_lease(c.id)
        if lease is not None:
            return lease
        network = self.find(c.spec.network)
        address = pick_address(network, self._store.lease_addresses(network.name))
        if address is None:
            raise AddressesExhausted(f"network {network.name} ({network.subnet}) has no free address left")
        lease = Lease(container_id=c.id, network=network.name, address=address)
        self._store.insert_lease(lease)
        return lease

    def address(self, container_id: str) -> str:
        lease = self._store.find_lease(container_id)
        return lease.address if lease else ""

    def attachment(self, c: Container) -> Attachment | None:
        lease = self._store.find_lease(c.id)
        if lease is None:
            return None
        network = self.find(lease.network)
        # The init binds these while the veth is still being made: they
        # must exist before it is told what to bind.
        if not self._hosts_path(network.name).exists():
            self._write_files(network)
        prefix = ipaddress.IPv4Network(network.subnet).prefixlen
        return Attachment(
            ifname=CONTAINER_IFNAME,
            interface=f"{lease.address}/{prefix}",
            gateway=network.gateway,
            hosts_file=str(self._hosts_path(network.name)),
            resolv_file=str(self._dir(network.name) / "resolv.conf"),
        )

    # Networks

    def all(self) -> list[Network]:
        return self._store.list_networks()

    async def create_network(self, name: str, wanted: ipaddress.IPv4Network | None, egress: str,
                             rules: tuple[firewall.EgressRule, ...]) -> Network:
        """A network on wanted (None: the first free /16) whose containers may send out as egress says."""
        if name == NONE:
            raise InvalidArgument("'none' is not a network name: it means no network")
        if self._store.find_network(name) is not None:
            raise NameTaken(f"a network named {name!r} exists already")
        others = self._store.list_networks()
        if wanted is not None:
            subnet = check_free(wanted, others)
        else:
            taken = [ipaddress.IPv4Network(o.subnet) for o in others]
            free = [s for s in AUTO_SUBNETS if not any(s.overlaps(t) for t in taken)]
            if not free:
                raise AddressesExhausted("no free /16 left in 10.89.0.0-10.254.255.255: give a subnet")
            subnet = free[0]
        stored = egress if egress != "list" else ",".join(
            f"{r.cidr}:{r.port}" if r.port else r.cidr for r in rules
        )
        network = Network(
            name=name, bridge=BRIDGE_PREFIX + secrets.token_hex(6), subnet=str(subnet),
            gateway=str(next(subnet.hosts())), egress=stored, created_usec=time.time_ns() // 1000,
        )
        try:
            with self._store.transaction():
                self._store.insert_network(network)
        except sqlite3.IntegrityError as e:
            raise NameTaken(f"a network named {name!r} exists already") from e
        try:
            self._write_files(network)
            await self._netlink.ensure_bridge(network.bridge, self._gateway_interface(network))
            await self.apply_firewall()
        except Exception:
            with self._store.transaction():
                self._store.delete_network(name)
            await self._undo_network(network)
            raise
        return network

    async def remove_network(self, name: str) -> None:
        network = self.find(name)
        if name == DEFAULT:
            raise InvalidState("the default network cannot be removed")
        users = self._store.containers_on_network(name)
        if users:
            raise InvalidState(f"network {name} is used by container(s) {', '.join(users)}")
        with self._store.transaction():
            self._store.delete_network(name)
        await self._undo_network(network)

    async def _undo_network(self, network: Network) -> None:
        self._host_entries.pop(network.name, None)
        with contextlib.suppress(Internal):
            await self._netlink.delete_link(network.bridge)
        with contextlib.suppress(Internal):
            await self.apply_firewall()
        with contextlib.suppress(OSError):
            remove_path(self._dir(network.name))

    def check_published(self, c: Container) -> None:
        """NameTaken if another container on record publishes one of c's host ports."""
        mine = {(host, proto) for host, _, proto in c.spec.publish}
        if not mine:
            return
        for other in self._store.list_containers():
            for host, _, proto in other.spec.publish:
                if other.id != c.id and (host, proto) in mine:
                    raise NameTaken(f"host port {host}/{proto} is published by container {other.name}")

    async def apply_firewall(self) -> None:
        policies = [policy(n) for n in self._store.list_networks()]
        leases = {lease.container_id: lease.address for lease in self._store.leases()}
        forwards = tuple(
            firewall.Forward(host, proto, leases[c.id], port)
            for c in self._store.list_containers() if c.spec.publish and c.id in leases
            for host, port, proto in c.spec.publish
        )
        # Every container that may have a port now; a stopped one's is gone, and harmless.
        active = {c.id for c in self._store.list_containers() if c.state.is_active}
        pins = tuple(pin(cid, address) for cid, address in leases.items() if cid in active)
        await self._netlink.call("loading the nftables rules", _load_firewall, policies, forwards, pins,
                                 self._paths.ip_forward_before)

    async def forget(self, c: Container) -> None:
        """After a container's row is gone: its published ports go too."""
        if c.spec.publish:
            await self.apply_firewall()

    # Links

    async def attach(self, c: Container, pid: int) -> None:
        """Makes the container's veth, its end inside pid's namespace; the bridge first if needed."""
        lease = self._store.find_lease(c.id)
        if lease is None:
            return
        network = self.find(lease.network)
        # The pin and the veth are made at the same time: nothing in the
        # container can send before GO, and GO waits for both. The bridge is
        # made on first use, by the network worker, in the veth's request.
        pinned, veth = await asyncio.gather(
            self._nft.run(firewall.pin_script(pin(c.id, lease.address))),
            self._netlink.add_veth(c.id, network.bridge, self._gateway_interface(network), pid,
                                   lease.address),
            return_exceptions=True,
        )
        for result in (pinned, veth):
            if isinstance(result, BaseException):
                raise result
        if c.spec.publish:
            await self.apply_firewall()

    async def detach(self, c: Container) -> None:
        """Deletes the container's veth, if it still exists (it goes by itself with the namespace)."""
        await self._netlink.delete_link(veth_name(c.id))
        self._unpin(c)

    def release(self, c: Container) -> None:
        """For a container gone for good: unpins its port and deletes a veth that outlives it.

        The kernel deletes a veth with its network namespace, soon after the
        namespace's last process is gone. A delete sent meanwhile waits for
        that cleanup, 10-50 ms on the network worker that every start's veth
        waits behind; so only a veth still there after STRAY_VETH_SEC is
        deleted (its namespace held by something else). Its name is never
        used again: the container's id goes with it.
        """
        self._unpin(c)
        name = veth_name(c.id)
        loop = asyncio.get_running_loop()
        loop.call_later(STRAY_VETH_SEC, lambda: self._keep(loop.create_task(self._delete_stray(name))))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._stray_deletes.add(task)
        task.add_done_callback(self._stray_deletes.discard)

    async def _delete_stray(self, name: str) -> None:
        try:
            if await self._netlink.delete_link(name):
                log.info("deleted %s: its network namespace outlived its container", name)
        except Internal as e:
            log.warning("could not delete %s: %s", name, e)

    def _unpin(self, c: Container) -> None:
        lease = self._store.find_lease(c.id)
        if lease is not None:
            # Not waited for: the port is gone, and a pin names its port, so a
            # stale one lets nothing through. Absent after a reload that found
            # the container stopped: the failure is only logged then.
            self._nft.submit(firewall.unpin_script(pin(c.id, lease.address)), f"unpinning the port of {c.id}")

    async def recover(self, active: list[Container]) -> None:
        """After a restart: bridges up, running containers' veths on their bridges, strays deleted."""
        await self.apply_firewall()
        links = {link.name: link for link in await self._netlink.links()}
        wanted = {veth_name(c.id): c for c in active}
        bridges = {n.bridge for n in self._store.list_networks()}
        for name, link in links.items():
            if name.startswith(BRIDGE_PREFIX) and link.kind == "bridge" and name not in bridges:
                log.warning("deleting bridge %s: it belongs to no network on record", name)
                await self._netlink.delete_link(name)
        for network in self._store.list_networks():
            if network.bridge in links or any(
                lease.container_id in {c.id for c in active} for lease in self._store.leases(network.name)
            ):
                self._write_files(network)
                await self._netlink.ensure_bridge(network.bridge, self._gateway_interface(network))
        for name, link in links.items():
            if not name.startswith(VETH_PREFIX) or link.kind != "veth":
                continue
            c = wanted.get(name)
            if c is None:
                log.warning("deleting %s: it belongs to no running container", name)
                await self._netlink.delete_link(name)
                continue
            lease = self._store.find_lease(c.id)
            if lease is not None:
                # Also when it is on the right bridge already: that sets the
                # port's hairpin mode, which ports made by an older quiltd lack.
                await self._netlink.set_master(name, self.find(lease.network).bridge)

    # Files

    def _dir(self, network: str) -> Path:
        return self._paths.run_dir / "networks" / network

    def _hosts_path(self, network: str) -> Path:
        return self._dir(network) / "hosts"

    def _write_files(self, network: Network) -> None:
        directory = self._dir(network.name)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            host = HOST_RESOLV_CONF.read_text()
        except OSError:
            host = ""
        write_in_place(directory / "resolv.conf", render_resolv_conf(host))
        self._stale_hosts.discard(network.name)
        write_in_place(self._hosts_path(network.name), self._hosts(network.name))

    def _hosts(self, network: str) -> str:
        return render_hosts(list(self._entries(network).values()))

    def _entries(self, network: str) -> dict[str, tuple[str, str, str]]:
        entries = self._host_entries.get(network)
        if entries is None:
            # A warm pool's unclaimed member is in no hosts file: it is named when claimed.
            containers = {c.id: c for c in self._store.list_containers() if c.state.is_active and not c.pool}
            entries = self._host_entries[network] = {
                lease.container_id: (lease.address, containers[lease.container_id].name,
                                     containers[lease.container_id].spec.hostname)
                for lease in self._store.leases(network)
                if lease.container_id in containers
            }
        return entries

    def hosts_changed(self, network: str) -> None:
        """Rewrites a network's hosts file soon, once however many containers changed this turn."""
        if network in self._stale_hosts or not self._hosts_path(network).parent.exists():
            return
        self._stale_hosts.add(network)
        asyncio.get_running_loop().call_soon(self._flush_hosts)

    def _flush_hosts(self) -> None:
        for network in list(self._stale_hosts):
            self._stale_hosts.discard(network)
            try:
                write_in_place(self._hosts_path(network), self._hosts(network))
            except OSError:
                log.exception("could not update the hosts file of network %s", network)

    # Listener: the hosts files follow containers becoming active and ending.

    def container_added(self, c: Container) -> None:
        pass

    def container_changed(self, c: Container, old: Container) -> None:
        if c.state.is_active != old.state.is_active and c.spec.network != NONE:
            self._update_entry(c)

    def container_removed(self, c: Container) -> None:
        if c.spec.network != NONE:
            self._host_entries.get(c.spec.network, {}).pop(c.id, None)
            self.hosts_changed(c.spec.network)

    def _update_entry(self, c: Container) -> None:
        entries = self._host_entries.get(c.spec.network)
        if entries is not None:  # else it is read whole when first needed
            lease = self._store.find_lease(c.id) if c.state.is_active else None
            if lease is None:
                entries.pop(c.id, None)
            else:
                entries[c.id] = (lease.address, c.name, c.spec.hostname)
        self.hosts_changed(c.spec.network)

    @staticmethod
    def _gateway_interface(network: Network) -> str:
        return f"{network.gateway}/{ipaddress.IPv4Network(network.subnet).prefixlen}"


def pin(container_id: str, address: str) -> firewall.Pin:
    return firewall.Pin(veth_name(container_id), container_mac(address), address)


def _load_firewall(policies: list[firewall.Policy], forwards: tuple[firewall.Forward, ...],
                   pins: tuple[firewall.Pin, ...], ip_forward_before: Path) -> None:
    if forwards or any(p.egress != firewall.EGRESS_NONE for p in policies):
        # Egress and published ports need routing between the bridges and the
        # host's links. The value found first is kept, for the package's removal.
        hostreset.remember_ip_forward(ip_forward_before)
        hostreset.IP_FORWARD.write_text("1\n")
    firewall.load(firewall.ruleset(policies, forwards, pins))


async def _load_nft(script: str) -> None:
    await asyncio.get_running_loop().run_in_executor(None, firewall.load, script)
