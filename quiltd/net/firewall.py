"""quiltd's nftables table: networks kept apart, egress as each network allows.

The whole table is generated from the networks on record and loaded with
one `nft -f -` run: nft applies a file as one transaction, so the rules are
never half-replaced, and a daemon killed at any point leaves a table the
next start simply replaces. The `nft` tool rather than pyroute2's nftables
module: its rule language is stable across nftables versions and readable in
`nft list table inet quilt`, while pyroute2's nftables API differs between
0.7 and current releases and covers few expressions.

Rules, for each network (bridge B, subnet S):
- nothing enters B from elsewhere but replies to its own connections;
- traffic from B goes to its own containers, and beyond only as its egress
  allows: "none" (only ping to its gateway), "all" (masqueraded), or a list
  of CIDRs, each optionally with a port (tcp and udp);
- nothing from B reaches the host's loopback addresses;
- no IPv6 router or neighbour discovery from B reaches the host (an RA
  would give the host a route through a container).

A second table, `bridge quilt`, pins each container's port of its bridge to
the container's MAC and IPv4 address: a frame entering the bridge from the
port with another source MAC, ARP sender or IPv4 source is dropped, and so
is anything but IPv4, ARP and IPv6. It is loaded with the inet table; a
starting container's pins are added to it on their own, before its port
exists, and taken out when the container is removed.

Published ports are DNAT on every local address, for packets from elsewhere
(prerouting) and from the host itself (output). Two kinds of connection to
them are masqueraded behind the gateway: from a loopback address (which the
bridge routes: network.py sets route_localnet on it), and from the
container's own network (hairpin).
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

from quiltd.errors import Internal, InvalidArgument
from quiltd.net import nftlib

TABLE = "quilt"
EGRESS_NONE = "none"
EGRESS_ALL = "all"


@dataclass(frozen=True)
class EgressRule:
    cidr: str
    port: int = 0  # 0: every port and protocol


@dataclass(frozen=True)
class Forward:
    """A published port: host_port/proto on any local address goes to address:port."""

    host_port: int
    proto: str
    address: str
    port: int


@dataclass(frozen=True)
class Pin:
    """A container's bridge port and what it may send from it: its own MAC and address."""

    port: str
    mac: str
    address: str


@dataclass(frozen=True)
class Policy:
    bridge: str
    subnet: str
    gateway: str
    egress: str  # "none", "all" or "list"
    rules: tuple[EgressRule, ...] = ()


def parse_egress(value: object) -> tuple[str, tuple[EgressRule, ...]]:
    """The egress option: "none", "all", or a list of "CIDR" or "CIDR:PORT" strings."""
    if value in (EGRESS_NONE, EGRESS_ALL):
        return str(value), ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidArgument("egress must be 'none', 'all' or a non-empty list of 'CIDR' or 'CIDR:PORT'")
    rules = []
    for item in value:
        cidr, _, port = item.partition(":")
        try:
            network = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as e:
            raise InvalidArgument(f"invalid egress CIDR {cidr!r}: {e}") from e
        if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
            raise InvalidArgument(f"invalid egress port {port!r} in {item!r}: use 1-65535")
        rules.append(EgressRule(str(network), int(port or 0)))
    return "list", tuple(rules)


def ruleset(policies: list[Policy], forwards: tuple[Forward, ...] = (), pins: tuple[Pin, ...] = ()) -> str:
    """The nft script that replaces quiltd's tables with rules for these networks and ports."""
    to_published: list[str] = []
    forward_in: list[str] = []
    forward_out: list[str] = []
    inbound: list[str] = []
    nat: list[str] = []
    for p in policies:
        b = f'"{p.bridge}"'
        # A published port of another network, reached through one of the
        # host's addresses: that is egress to the host, so this network's
        # egress decides, on the address and port the container asked for.
        # (Its own network's published ports it may always reach: hairpin.)
        # (Only the direction that opens connections: replies to clients
        # elsewhere carry the DNAT status too.)
        to_published += [f"iifname {b} oifname != {b} ct direction original ct status dnat {rule}"
                         for rule in _allowed(p, original=True)]
        if p.egress != EGRESS_ALL:
            to_published.append(f"iifname {b} oifname != {b} ct direction original ct status dnat drop")
        forward_in += [
            f"iifname {b} oifname {b} accept",
            f"oifname {b} ct state established,related accept",
            f"oifname {b} ct status dnat accept",  # published ports
            f"oifname {b} drop",
        ]
        allowed = _allowed(p)
        forward_out += [f"iifname {b} {rule}" for rule in allowed] + [f"iifname {b} drop"]
        inbound += [
            # IPv6 router and neighbour discovery from a container: an RA
            # would make the host route through it, an NA or redirect steer
            # the host's traffic. Quilt speaks only IPv4 to its containers.
            f"iifname {b} icmpv6 type {_NDP_TYPES} drop",
            f"iifname {b} ct state established,related accept",
            # The bridge routes loopback addresses (route_localnet, for
            # published ports on the host's 127.0.0.1): no container may
            # use that to reach the host's loopback services, whatever its egress.
            f"iifname {b} ip daddr 127.0.0.0/8 drop",
            f"iifname {b} ip daddr {p.gateway} icmp type echo-request accept",
            *(f"iifname {b} {rule}" for rule in allowed),
            f"iifname {b} drop",
        ]
        nat += [
            # A published port reached from the host's loopback: the
            # container could not answer a loopback source.
            f"oifname {b} ip saddr 127.0.0.0/8 masquerade",
            # Hairpin: a container reaching a published port of its own
            # network through a host address. Unmasqueraded, the server
            # would answer the client directly, from an address the
            # client never connected to.
            f"oifname {b} ip saddr {p.subnet} ct status dnat masquerade",
        ]
        if p.egress != EGRESS_NONE:
            nat.append(f"ip saddr {p.subnet} oifname != {b} masquerade")
    lines = [
        # Declaring the table first makes the delete valid when it does not exist yet.
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        # Every network's inbound rules come first, so one network's egress
        # never opens another network.
        *(f"    {r}" for r in to_published + forward_in + forward_out),
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *(f"    {r}" for r in inbound),
        "  }",
        # Published ports, for packets from elsewhere and from the host itself.
        *(line for hook in ("prerouting", "output") for line in (
            f"  chain {hook} {{",
            # -100 is dstnat; older nft accepts the name only for prerouting.
            f"    type nat hook {hook} priority -100; policy accept;",
            *(f"    fib daddr type local {f.proto} dport {f.host_port} dnat ip to {f.address}:{f.port}"
              for f in forwards),
            "  }",
        )),
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *(f"    {r}" for r in nat),
        "  }",
        "}",
        *_bridge_table(),
        *(pin_script(pin).rstrip("\n") for pin in pins),
    ]
    return "\n".join(lines) + "\n"


def _bridge_table() -> list[str]:
    """The bridge family table that pins each container's port to its MAC and address.

    The inet table sees only what the host routes; frames from one container
    to another are only bridged, so a forged ARP reply or a packet with a
    neighbour's address as its source must be stopped here, as it enters the
    bridge from the container's port (before the bridge learns its source
    MAC). A port with no pin yet sends nothing.
    """
    return [
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table bridge {TABLE} {{",
        f"  set {_PIN_MAC} {{ type ifname . ether_addr; }}",
        f"  set {_PIN_IP} {{ type ifname . ipv4_addr; }}",
        "  chain prerouting {",
        "    type filter hook prerouting priority filter; policy accept;",
        f'    iifname != "{VETH_GLOB}" accept',
        # Only what a container on an IPv4 network sends: no VLAN tags, no
        # other protocol the kernel of a neighbour might parse.
        "    ether type != { ip, arp, ip6 } drop",
        f"    iifname . ether saddr != @{_PIN_MAC} drop",
        f"    iifname . arp saddr ether != @{_PIN_MAC} drop",
        f"    iifname . arp saddr ip != @{_PIN_IP} drop",
        f"    iifname . ip saddr != @{_PIN_IP} drop",
        # Neighbours ignore these too (netconfig); this keeps them off the wire.
        "    icmpv6 type { nd-router-advert, nd-redirect } drop",
        "  }",
        "}",
    ]


def pin_script(pin: Pin) -> str:
    """Adds a port's pins to the loaded table (at a container's start)."""
    return "".join(f"add element bridge {TABLE} {s} {{ {e} }}\n" for s, e in _pin_elements(pin))


def unpin_script(pin: Pin) -> str:
    return "".join(f"delete element bridge {TABLE} {s} {{ {e} }}\n" for s, e in _pin_elements(pin))


def _pin_elements(pin: Pin) -> list[tuple[str, str]]:
    return [(_PIN_MAC, f'"{pin.port}" . {pin.mac}'), (_PIN_IP, f'"{pin.port}" . {pin.address}')]


_PIN_MAC = "port_mac"
_PIN_IP = "port_ip"
VETH_GLOB = "qv*"  # names.VETH_PREFIX: every container's port, and nothing else


# ICMPv6 types 133-137: router solicitation and advertisement, neighbour
# solicitation and advertisement, redirect.
_NDP_TYPES = "133-137"


def remove_script() -> str:
    return "".join(f"table {family} {TABLE} {{}}\ndelete table {family} {TABLE}\n"
                   for family in ("inet", "bridge"))


def _allowed(p: Policy, original: bool = False) -> list[str]:
    """Accept rules for what p's egress allows; original: match the address and port before DNAT."""
    if p.egress == EGRESS_ALL:
        return ["accept"]
    if p.egress == EGRESS_NONE:
        return []
    daddr = "ct original ip daddr" if original else "ip daddr"
    rules = []
    for r in p.rules:
        if not r.port:
            rules.append(f"{daddr} {r.cidr} accept")
        elif original:
            rules += [f"{daddr} {r.cidr} meta l4proto {proto} ct original proto-dst {r.port} accept"
                      for proto in ("tcp", "udp")]
        else:
            rules += [f"{daddr} {r.cidr} {proto} dport {r.port} accept" for proto in ("tcp", "udp")]
    return rules


def load(script: str) -> None:
    """Runs nft on the script (blocking: call from a worker thread).

    In this process through libnftables when it loads (nftlib.py: a
    fraction of an nft process's cost), else by running nft.
    """
    nft = nftlib.library()
    if nft is not None:
        error = nft.run(script)
        if error is not None:
            raise Internal(f"nft failed: {error}")
        return
    try:
        result = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Internal(f"could not run nft: {e}") from e
    if result.returncode != 0:
        raise Internal(f"nft failed: {result.stderr.decode(errors='replace').strip()}")
