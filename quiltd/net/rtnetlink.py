"""The link requests every container start and removal makes, built by hand.

pyroute2 costs about 3 ms of CPU to make one container's veth (the
create, then a lookup of its index and the hairpin flag, each through its
generic message classes), against about 0.8 ms for the same requests
written here with struct: at a hundred starts a second that is a large part
of the daemon's time. Everything else about links stays with pyroute2
(network.py); only these requests, whose layout is fixed, are hand-built.

A veth's requests go in one datagram: the kernel handles the messages of a
datagram in order and acknowledges each, so the hairpin flag (and the
port's IPv6 address mode) is set on the port by name right after it is
made, with no lookup and no second system call. A failure is raised as
pyroute2's NetlinkError, with the kernel's errno, so callers handle both
kinds of request alike.
"""

from __future__ import annotations

import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError

_NLMSG_ERROR = 2
_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400
_IFLA_ADDRESS = 1
_IFLA_IFNAME = 3
_IFLA_MASTER = 10
_IFLA_LINKINFO = 18
_IFLA_NET_NS_PID = 19
_IFLA_INFO_KIND = 1
_IFLA_INFO_DATA = 2
_IFLA_INFO_SLAVE_KIND = 4
_IFLA_INFO_SLAVE_DATA = 5
_VETH_INFO_PEER = 1
_IFLA_BRPORT_MODE = 4  # hairpin
_IFLA_AF_SPEC = 26
_IFLA_INET6_ADDR_GEN_MODE = 8
_IN6_ADDR_GEN_MODE_NONE = 1
_NLA_F_NESTED = 0x8000
_IFF_UP = 0x1
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _ifinfo(flags: int = 0, change: int = 0) -> bytes:
    """An ifinfomsg naming no index: the link is named by IFLA_IFNAME."""
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, flags, change)


def _name(name: str) -> bytes:
    return _attr(_IFLA_IFNAME, name.encode() + b"\0")


Message = tuple[int, int, bytes]  # type, flags, body


def veth_messages(host: str, peer: str, bridge_index: int, pid: int, mac: bytes,
                  ipv6: bool = True) -> list[Message]:
    """The create of a veth pair (host end up, a port of the bridge; peer in pid's
    network namespace with mac), the hairpin flag on its port and, where the
    kernel has IPv6, no IPv6 address of its own for the port."""
    peer_msg = (_ifinfo() + _name(peer) + _attr(_IFLA_NET_NS_PID, struct.pack("=I", pid))
                + _attr(_IFLA_ADDRESS, mac))
    create = (_ifinfo(_IFF_UP, _IFF_UP) + _name(host)
              + _attr(_IFLA_MASTER, struct.pack("=I", bridge_index))
              + _nest(_IFLA_LINKINFO, _attr(_IFLA_INFO_KIND, b"veth\0"),
                      _nest(_IFLA_INFO_DATA, _attr(_VETH_INFO_PEER, peer_msg))))
    hairpin = (_ifinfo() + _name(host)
               + _nest(_IFLA_LINKINFO, _attr(_IFLA_INFO_SLAVE_KIND, b"bridge\0"),
                       _nest(_IFLA_INFO_SLAVE_DATA, _attr(_IFLA_BRPORT_MODE, b"\1"))))
    messages = [(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, create), (_RTM_NEWLINK, 0, hairpin)]
    if ipv6:
        # A port is no host of its own: without a link-local address it runs
        # no duplicate address detection and no multicast listener reports,
        # and adds no routes to the host's IPv6 table, which the kernel walks
        # as links come and go. Set before the peer is up, so before the
        # port has carrier, when the kernel would make that address.
        no_address = (_ifinfo() + _name(host)
                      + _nest(_IFLA_AF_SPEC, _nest(socket.AF_INET6, _attr(
                          _IFLA_INET6_ADDR_GEN_MODE, bytes([_IN6_ADDR_GEN_MODE_NONE])))))
        messages.append((_RTM_NEWLINK, 0, no_address))
    return messages


def delete_message(name: str) -> Message:
    return (_RTM_DELLINK, 0, _ifinfo() + _name(name))


class Rtnetlink:
    """One NETLINK_ROUTE socket; used from one thread at a time (network.py's worker)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, *messages: Message) -> None:
        """Sends the messages in one datagram; raises NetlinkError for the first that failed.

        Each is acknowledged, so every answer is read even after a failure:
        none is left on the socket for the next request.
        """
        out = bytearray()
        sequences = []
        for kind, flags, body in messages:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            sequences.append(self._seq)
            out += _HEADER.pack(_HEADER.size + len(body), kind, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                                self._seq, 0) + body
        self._sock.send(out)
        errors: dict[int, int] = {}
        while not all(s in errors for s in sequences):
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                size, kind, _flags, seq, _port = _HEADER.unpack_from(data, offset)
                if kind == _NLMSG_ERROR and seq in sequences:
                    errors[seq] = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                offset += max((size + 3) & ~3, _HEADER.size)
        for seq in sequences:
            if errors[seq]:
                raise NetlinkError(errors[seq])
