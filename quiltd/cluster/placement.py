"""Which host a new sandbox goes on: a pure function of the hosts' reports.

Hosts whose quiltd did not answer are never passed in. Among the hosts with
room, the one with the fewest sandboxes wins (then the most free memory), so
sandboxes spread; a placement none can take fails at once, naming why each
host was ruled out.
"""

from __future__ import annotations

from collections.abc import Sequence

from quiltd.cluster.records import HostInfo, Need
from quiltd.errors import Unplaceable


def why_not(host: HostInfo, need: Need) -> str | None:
    """Why host cannot take need, or None if it can."""
    if need.host is not None and host.name != need.host:
        return "not the host asked for"
    if host.name in need.avoid:
        return "avoided"
    if need.image not in host.images and not need.pull:
        return f"no image {need.image!r}"
    if need.cpus > host.cpu_free + 1e-9:
        return f"{host.cpu_free:g} of {host.cpus:g} CPUs free, {need.cpus:g} asked"
    if need.memory_bytes > host.memory_free:
        return f"{host.memory_free} of {host.memory_bytes} memory bytes free, {need.memory_bytes} asked"
    return None


def choose(hosts: Sequence[HostInfo], need: Need) -> HostInfo:
    fits = [h for h in hosts if why_not(h, need) is None]
    if not fits:
        if not hosts:
            raise Unplaceable(f"{Unplaceable.dbus_name}: no live host with a quiltd that answers")
        reasons = "; ".join(f"{h.name}: {why_not(h, need)}" for h in sorted(hosts, key=lambda h: h.name))
        raise Unplaceable(f"{Unplaceable.dbus_name}: no host can take it ({reasons})")
    return min(fits, key=lambda h: (h.containers, -h.memory_free, h.name))


def claim(host: HostInfo, need: Need) -> HostInfo:
    """The host as it will be once need runs there: the next placement counts it."""
    return HostInfo(
        host.name, host.node_id, host.cpus, host.memory_bytes,
        host.cpu_reserved + need.cpus, host.memory_reserved + need.memory_bytes,
        host.containers + 1, host.images | {need.image},
    )
