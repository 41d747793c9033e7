"""Takes quiltd's marks off the host's network, for the package's removal.

What quiltd adds to the host's network namespace: the nftables tables
`inet quilt` and `bridge quilt`, the bridges quilt0 and qb<12 hex> (with
their addresses, routes and per-bridge sysctls), the host ends of the
containers' veths (qv...), and net.ipv4.ip_forward=1 once a network routes
beyond itself. `quiltd --reset-host-network` removes all of them and sets
ip_forward back to the value quiltd found before it first set it (kept in
the run directory; a reboot resets both). The Debian package runs it from
prerm on remove, after the daemon and every container are stopped.

Links are told apart by name and kind, not from the database: a removal
must work when the database is gone or unreadable.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from quiltd.errors import Internal
from quiltd.net import firewall

log = logging.getLogger("quiltd")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
DEFAULT_BRIDGE = "quilt0"  # store.py's row of the default network
_OURS = re.compile(r"(quilt0|qb[0-9a-f]{12})")  # networks.BRIDGE_PREFIX + 12 hex digits
_VETH = re.compile(r"qv[0-9a-f]{13}")  # names.VETH_PREFIX + 13 hex digits


def remember_ip_forward(saved: Path) -> None:
    """Before quiltd first sets ip_forward: what it was, unless already kept this boot."""
    if saved.exists():
        return
    saved.write_text(IP_FORWARD.read_text())


def reset(saved: Path) -> list[str]:
    """Removes quiltd's tables and links and restores ip_forward; what it did, one line each."""
    done = []
    try:
        firewall.load(firewall.remove_script())
        done.append(f"deleted nftables tables inet {firewall.TABLE} and bridge {firewall.TABLE}")
    except Internal as e:
        log.warning("%s", e)  # no nft: no table of ours either
    with IPRoute() as ipr:
        for name, kind in _links(ipr):
            if (kind == "bridge" and _OURS.fullmatch(name)) or (kind == "veth" and _VETH.fullmatch(name)):
                try:
                    ipr.link("del", ifname=name)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:  # a veth goes with its peer's namespace meanwhile
                        raise
                done.append(f"deleted {kind} {name}")
    if saved.exists():
        before = saved.read_text().strip()
        if before in ("0", "1"):
            IP_FORWARD.write_text(before + "\n")
            done.append(f"net.ipv4.ip_forward set back to {before}")
        saved.unlink()
    return done


def _links(ipr: Any) -> list[tuple[str, str]]:
    out = []
    for m in ipr.get_links():
        info = m.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        out.append((str(m.get_attr("IFLA_IFNAME")), str(kind or "")))
    return out
