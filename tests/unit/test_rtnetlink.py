"""The hand-built link requests decode, with pyroute2's own parser, to what they mean."""

from __future__ import annotations

import struct
from typing import Any

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from quiltd.net.rtnetlink import delete_message, veth_messages


def _decode(body: bytes) -> Any:
    msg = ifinfmsg(struct.pack("=IHHII", 16 + len(body), 16, 0, 1, 0) + body)
    msg.decode()
    return msg


def test_veth_request_names_ports_namespace_and_mac() -> None:
    (kind, flags, create), (hkind, hflags, hairpin), (akind, aflags, address) = veth_messages(
        "qvabc", "eth0", 7, 4242, bytes.fromhex("02510a580002"))
    assert (kind, flags & 0x600) == (16, 0x600)  # RTM_NEWLINK, create and exclusive
    msg = _decode(create)
    assert msg.get_attr("IFLA_IFNAME") == "qvabc"
    assert msg.get_attr("IFLA_MASTER") == 7
    assert msg["flags"] & 1 and msg["change"] & 1  # up
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0"
    assert peer.get_attr("IFLA_NET_NS_PID") == 4242
    assert peer.get_attr("IFLA_ADDRESS") == "02:51:0a:58:00:02"

    assert (hkind, hflags) == (16, 0)  # a change of the link just made, by its name
    port = _decode(hairpin)
    assert port["index"] == 0 and port.get_attr("IFLA_IFNAME") == "qvabc"
    slave = port.get_attr("IFLA_LINKINFO")
    assert slave.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"
    assert slave.get_attr("IFLA_INFO_SLAVE_DATA").get_attr("IFLA_BRPORT_MODE") == 1

    assert (akind, aflags) == (16, 0)
    port = _decode(address)
    assert port["index"] == 0 and port.get_attr("IFLA_IFNAME") == "qvabc"
    inet6 = port.get_attr("IFLA_AF_SPEC").get_attr("AF_INET6")
    assert inet6.get_attr("IFLA_INET6_ADDR_GEN_MODE") == 1  # none: the port makes no address


def test_without_ipv6_the_port_is_not_asked_for_an_address_mode() -> None:
    assert len(veth_messages("qvabc", "eth0", 7, 4242, bytes(6), ipv6=False)) == 2


def test_delete_names_the_link() -> None:
    kind, _flags, body = delete_message("qvdead")
    assert kind == 17  # RTM_DELLINK
    assert _decode(body).get_attr("IFLA_IFNAME") == "qvdead"
