"""Configures a container's network from inside it: run by the container's init.

Init is already in the container's network namespace, so plain socket
ioctls reach the right interfaces, with no netlink library to import and no
fork (which is what a library's "enter a namespace" helper would do from the
threaded daemon). Only IPv4, which is all Quilt hands out.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import socket
import struct

SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


class _SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_ushort),
        ("addr", ctypes.c_uint8 * 4),
        ("zero", ctypes.c_uint8 * 8),
    ]


class _RtEntry(ctypes.Structure):
    # struct rtentry from <net/route.h>; ctypes lays out the longs and
    # pointers for the running architecture.
    _fields_ = [
        ("rt_pad1", ctypes.c_ulong),
        ("rt_dst", _SockaddrIn),
        ("rt_gateway", _SockaddrIn),
        ("rt_genmask", _SockaddrIn),
        ("rt_flags", ctypes.c_ushort),
        ("rt_pad2", ctypes.c_short),
        ("rt_pad3", ctypes.c_ulong),
        ("rt_pad4", ctypes.c_void_p),
        ("rt_metric", ctypes.c_short),
        ("rt_dev", ctypes.c_char_p),
        ("rt_mtu", ctypes.c_ulong),
        ("rt_window", ctypes.c_ulong),
        ("rt_irtt", ctypes.c_ushort),
    ]


def _sockaddr(address: str) -> _SockaddrIn:
    sa = _SockaddrIn()
    sa.family = socket.AF_INET
    sa.addr[:] = list(socket.inet_aton(address))
    return sa


def _ifreq_addr(ifname: str, address: str) -> bytes:
    return struct.pack("16s", ifname.encode()) + bytes(_sockaddr(address))


def link_up(sock: socket.socket, ifname: str) -> None:
    ifreq = struct.pack("16sH14x", ifname.encode(), 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", ifname.encode(), flags | IFF_UP))


def configure(ifname: str, interface: str, gateway: str) -> None:
    """Brings up lo and ifname with interface ("10.88.0.5/16") and a default route via gateway."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        link_up(s, "lo")
        if not ifname:
            _close_ipv6_conf()
            return
        iface = ipaddress.IPv4Interface(interface)
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq_addr(ifname, str(iface.ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq_addr(ifname, str(iface.netmask)))
        # While the link is down: no advertisement can have arrived yet, and
        # no IPv6 packet has left. eth0 has no IPv6 at all (lo keeps ::1):
        # Quilt hands out none, and an eth0 with IPv6 sends neighbour and
        # multicast listener discovery as it comes up, which the bridge floods
        # to every port and each container's kernel takes in. Every start cost
        # work in proportion to the containers already on the network: a
        # third of the host's CPU once a burst had started a few hundred.
        _refuse_router_advertisements(ifname)
        _set_ipv6_conf(ifname, "disable_ipv6", b"1")
        _close_ipv6_conf()
        link_up(s, ifname)
        if gateway:
            route = _RtEntry()
            route.rt_dst = _sockaddr("0.0.0.0")
            route.rt_genmask = _sockaddr("0.0.0.0")
            route.rt_gateway = _sockaddr(gateway)
            route.rt_flags = RTF_UP | RTF_GATEWAY
            fcntl.ioctl(s, SIOCADDRT, bytes(route))


# Every group may open ICMP echo sockets (SOCK_DGRAM, IPPROTO_ICMP), as in
# Docker: ping then needs no raw socket, and so no CAP_NET_RAW, which root in
# a user namespace never holds over this network. Only echo is allowed.
PING_GROUP_RANGE = "0 2147483647"
# No IPv6 router advertisement is followed: a neighbour on the bridge could
# otherwise send one and become this container's IPv6 router (its default
# route, and addresses from its prefix). Quilt hands out no IPv6.
IPV6_KNOBS = ("accept_ra", "autoconf")
# This namespace's /proc/sys/net/ipv6/conf, opened while /proc/sys is still
# writable: eth0 is only there after the root switch (see configure).
_ipv6_conf = -1


def prepare_namespace() -> None:
    """Sets this network namespace's sysctls; before /proc/sys turns read-only.

    Network sysctls belong to the namespace of whoever opens the file.
    """
    global _ipv6_conf
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write(PING_GROUP_RANGE)
    try:
        _ipv6_conf = os.open("/proc/sys/net/ipv6/conf", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a kernel without IPv6: nothing to follow
    # For links made later; eth0 may already be there (the daemon makes it
    # meanwhile), so configure() sets its own knobs too. Not "all" for
    # disable_ipv6: that would take ::1 from lo.
    for conf in ("all", "default"):
        _refuse_router_advertisements(conf)
    _set_ipv6_conf("default", "disable_ipv6", b"1")


def _refuse_router_advertisements(conf: str) -> None:
    for knob in IPV6_KNOBS:
        _set_ipv6_conf(conf, knob, b"0")


def _set_ipv6_conf(conf: str, knob: str, value: bytes) -> None:
    if _ipv6_conf < 0:
        return
    fd = os.open(f"{conf}/{knob}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=_ipv6_conf)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


def _close_ipv6_conf() -> None:
    global _ipv6_conf
    if _ipv6_conf >= 0:
        os.close(_ipv6_conf)
        _ipv6_conf = -1
