"""Links in the daemon's network namespace: bridges and containers' veth pairs.

pyroute2's synchronous IPRoute, in the form both Debian 12's 0.7 and the
current releases accept, except for the requests of every start and removal
(a veth and its hairpin flag, a delete), which rtnetlink.py writes itself.
Every call runs on one worker thread that owns the netlink sockets: netlink
requests take milliseconds (deleting a link waits for an RCU grace period,
about 20 ms), and the event loop must not wait for them. One thread also
means one request at a time on a socket, which IPRoute does not promise to
handle from several threads.

The container's end of a veth pair is created directly inside the
container's network namespace, named eth0, so the daemon never has to enter
that namespace; the container's init gives it its address. Its MAC is
derived from that address, so an address leased again, to a new container,
keeps the MAC that neighbours have cached for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from quiltd.errors import Internal
from quiltd.names import veth_name
from quiltd.net.rtnetlink import Rtnetlink, delete_message, veth_messages

T = TypeVar("T")

CONTAINER_IFNAME = "eth0"
# A kernel booted without IPv6 refuses a request that sets a link's IPv6 mode.
_HAS_IPV6 = os.path.isdir("/proc/sys/net/ipv6")
MAC_PREFIX = b"\x02\x51"  # locally administered, unicast; then the 4 bytes of the IPv4 address


def container_mac(address: str) -> str:
    """The MAC of the container's eth0: fixed by its address, as Docker does."""
    return ":".join(f"{b:02x}" for b in MAC_PREFIX + ipaddress.IPv4Address(address).packed)


@dataclass(frozen=True)
class Link:
    name: str
    kind: str
    master: str  # the bridge this link is a port of, or ""


class NetworkError(Internal):
    """A netlink request failed; the message names the request and the kernel's reason."""


class Netlink:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: Any = None
        self._rtnl: Rtnetlink | None = None  # the hot path's requests: rtnetlink.py
        self._bridges: dict[str, int] = {}  # name -> index, of bridges known to be set up

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except NetlinkError as e:
            raise NetworkError(f"{what}: {_reason(e)}") from e

    def _ip(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def _raw(self) -> Rtnetlink:
        if self._rtnl is None:
            self._rtnl = Rtnetlink()
        return self._rtnl

    # The event loop's side

    async def ensure_bridge(self, name: str, gateway: str) -> None:
        """Creates bridge name with address gateway ("10.88.0.1/16") and brings it up, unless it is."""
        await self._run(f"setting up bridge {name}", self._ensure_bridge, name, gateway)

    async def add_veth(self, container_id: str, bridge: str, gateway: str, pid: int, address: str) -> None:
        """A veth pair: the host end a port of bridge, the other eth0 in pid's network namespace.

        address is the container's: it fixes eth0's MAC.
        """
        await self._run(f"creating the veth of {container_id}", self._add_veth, container_id, bridge,
                        gateway, pid, container_mac(address))

    async def delete_link(self, name: str) -> bool:
        """Deletes a link; False if there was none."""
        return await self._run(f"deleting {name}", self._delete_link, name)

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn on the worker thread: other blocking network work, in turn with netlink's."""
        return await self._run(what, fn, *args)

    async def links(self) -> list[Link]:
        return await self._run("listing links", self._links)

    async def set_master(self, name: str, bridge: str) -> None:
        await self._run(f"attaching {name} to {bridge}", self._set_master, name, bridge)

    # The worker thread's side

    def _ensure_bridge(self, name: str, gateway: str) -> int:
        ipr = self._ip()
        iface = ipaddress.IPv4Interface(gateway)
        try:
            index: int = ipr.link("get", ifname=name)[0]["index"]
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            # A fixed MAC: a bridge otherwise takes the lowest of its ports'
            # MACs, which changes as containers come and go and leaves stale
            # ARP entries for the gateway in them.
            ipr.link("add", ifname=name, kind="bridge", address=_local_mac())
            index = ipr.link("get", ifname=name)[0]["index"]
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)
        }
        if (str(iface.ip), iface.network.prefixlen) not in have:
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        # Before it is up: from then on its ports are containers, and a
        # router advertisement from one would give the host a route through it.
        _refuse_router_advertisements(name)
        ipr.link("set", index=index, state="up")
        _route_localnet(name)
        self._bridges[name] = index
        return index

    def _add_veth(self, container_id: str, bridge: str, gateway: str, pid: int, mac: str) -> None:
        index = self._bridges.get(bridge) or self._ensure_bridge(bridge, gateway)
        try:
            self._veth(container_id, index, pid, mac)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                # The container's previous run: the kernel deletes a veth
                # with its namespace, but later, from a work queue.
                self._delete_link(veth_name(container_id))
            elif e.code == errno.ENODEV:
                # The bridge went away behind our back: make it again.
                self._bridges.pop(bridge, None)
                index = self._ensure_bridge(bridge, gateway)
            else:
                raise
            self._veth(container_id, index, pid, mac)

    def _veth(self, container_id: str, bridge_index: int, pid: int, mac: str) -> None:
        # One datagram: created as a port of the bridge, up, with its peer
        # born inside the container's namespace; then its hairpin flag and
        # its IPv6 address mode (rtnetlink.veth_messages).
        self._raw().request(*veth_messages(veth_name(container_id), CONTAINER_IFNAME, bridge_index,
                                           pid, bytes.fromhex(mac.replace(":", "")), ipv6=_HAS_IPV6))

    def _delete_link(self, name: str) -> bool:
        try:
            self._raw().request(delete_message(name))
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        self._bridges.pop(name, None)
        return True

    def _set_master(self, name: str, bridge: str) -> None:
        ipr = self._ip()
        index = ipr.link("get", ifname=bridge)[0]["index"]
        ipr.link("set", ifname=name, master=index)
        _hairpin(ipr, name)  # a port's flags start afresh on each bridge

    def _links(self) -> list[Link]:
        ipr = self._ip()
        raw = list(ipr.get_links())
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in raw}
        result = []
        for m in raw:
            info = m.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            master = names.get(m.get_attr("IFLA_MASTER") or 0, "")
            result.append(Link(m.get_attr("IFLA_IFNAME"), kind or "", master))
        return result


def _hairpin(ipr: Any, port: str) -> None:
    """Lets the bridge send a frame back out of the port it came in on.

    For a container reaching its own published port through a host
    address: where br_netfilter is loaded (as on most Docker hosts), the
    bridge applies the DNAT itself and then bridges the frame to the
    server's port instead of routing it, and that port is the client's.
    """
    ipr.brport("set", index=ipr.link_lookup(ifname=port)[0], mode=1)


def _route_localnet(bridge: str) -> None:
    """Lets the bridge carry packets from and to the host's 127.0.0.0/8.

    A connection to a published port at 127.0.0.1 is DNATed in the output
    hook and then routed to the bridge with its loopback source still on
    it; the kernel refuses to route such packets unless this is set on the
    outgoing link (and on the incoming one, for the replies, whose
    destination is 127.0.0.1 again once un-NATed). Set on quiltd's bridges
    only: the firewall masquerades those connections toward the container
    and drops anything else from the bridge to a loopback address.
    """
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet", "1")


def _refuse_router_advertisements(bridge: str) -> None:
    """Makes the host ignore IPv6 router advertisements arriving on the bridge.

    Only containers are on a bridge, and any of them may send one: the
    kernel would then install a default route through that container (when
    the host does not forward IPv6, as with every network's default) and
    addresses from its prefix. Quilt hands out no IPv6, so nothing
    legitimate is lost. The firewall drops them too (firewall.py).
    """
    for knob in ("accept_ra", "autoconf"):
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{bridge}/{knob}", "0", missing_ok=True)


def _write_sysctl(path: str, value: str, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except FileNotFoundError:
        if not missing_ok:  # IPv6 knobs are absent where the kernel has IPv6 disabled
            raise Internal(f"could not set {path}: no such file") from None
    except OSError as e:
        raise Internal(f"could not set {path}: {e}") from e


def _local_mac() -> str:
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{b:02x}" for b in octets)


def _reason(e: NetlinkError) -> str:
    with contextlib.suppress(TypeError, ValueError, OverflowError):
        return f"{errno.errorcode.get(e.code, e.code)} ({os.strerror(e.code)})"
    return str(e)
