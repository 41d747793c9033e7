"""What the fork server needs to know to bring up one container.

It crosses a process boundary as the body of a SPEC frame (see wire), so it
holds plain values only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from quiltd.runtime.mounts import NO_BINDS, SourcePolicy

# On an init's spec pipe, after the SPEC frame: IN tells the init that it is
# in its scope and its veth is in place, so it builds the root and does all
# else that needs no claim (the network, its cgroup root); GO lets it run
# the command. A warm pool's init gets its claim in GO's body (see
# LaunchSpec.claimed), a cold start's GO has none and follows IN at once.
# What a claim of a warm pool's container sets: what the command is and how
# it is named. Everything the root, the scope and the network are made of was
# in the LaunchSpec.
CLAIMED = ("name", "hostname", "command", "env", "workdir", "user")


def claim(name: str, hostname: str, command: tuple[str, ...], env: tuple[str, ...], workdir: str,
          user: str, log_rate_burst: int, log_rate_interval_sec: int) -> dict[str, object]:
    """The CLAIMED fields, for the init of a warm pool's container: the body of its GO."""
    return {"name": name, "hostname": hostname, "command": command, "env": env, "workdir": workdir,
            "user": user, "log_rate_burst": log_rate_burst, "log_rate_interval_sec": log_rate_interval_sec}


@dataclass(frozen=True)
class LaunchSpec:
    container_id: str
    name: str
    hostname: str
    command: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    lowerdir: str  # the image's root, shared and never written
    upperdir: str  # this container's writes
    overlay_workdir: str
    rootfs: str  # where the overlay is mounted, inside the container's own mount namespace
    exit_path: str  # where init leaves the command's exit status
    journal_socket: str
    # (host source, target inside the root, read-only), bound in this order
    binds: tuple[tuple[str, str, bool], ...] = ()
    volume_binds: tuple[tuple[str, str, bool], ...] = ()  # the same, for named volumes, bound after
    tmpfs: tuple[tuple[str, int], ...] = ()  # (target inside the root, size_bytes)
    # The container's network; empty for loopback only. The veth's inner end
    # is already in the container's namespace when init reads this.
    net_ifname: str = ""
    net_interface: str = ""  # address/prefix
    net_gateway: str = ""
    hosts_file: str = ""  # bind-mounted read-only onto /etc/hosts
    resolv_file: str = ""  # and onto /etc/resolv.conf
    # With disk_max, init mounts a tmpfs of that size here first; upperdir
    # and overlay_workdir are inside it.
    disk_dir: str = ""
    disk_max: int = 0
    user: str = ""  # looked up in the container's /etc/passwd and /etc/group; "" = root
    # The first host id of the container's user namespace range; 0 = none.
    userns_base: int = 0
    nested_userns: bool = False  # the command may make user namespaces (and mount in them)
    # Where the sources of binds may come from, checked by init on what it
    # opens; the default binds nothing.
    bind_policy: SourcePolicy = NO_BINDS
    log_rate_burst: int = 0  # lines per interval the container may log; 0 = no limit of Quilt's own
    log_rate_interval_sec: int = 30
    # A warm pool's member: if the daemon goes before its claim, it waits for
    # GO on its control socket from the daemon that comes back.
    pool_member: bool = False

    def body(self) -> dict[str, object]:
        return asdict(self)

    def claimed(self, raw: Mapping[str, Any]) -> LaunchSpec:
        """This spec with the claim fields of a GO's body (see claim)."""
        return replace(self, name=str(raw["name"]), hostname=str(raw["hostname"]),
                       command=tuple(str(a) for a in raw["command"]), env=tuple(str(e) for e in raw["env"]),
                       workdir=str(raw["workdir"]), user=str(raw["user"]),
                       log_rate_burst=int(raw["log_rate_burst"]),
                       log_rate_interval_sec=int(raw["log_rate_interval_sec"]))

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LaunchSpec:
        raw = dict(body)
        raw["command"] = tuple(raw["command"])
        raw["env"] = tuple(raw["env"])
        for key in ("binds", "volume_binds"):
            raw[key] = tuple((str(s), str(t), bool(ro)) for s, t, ro in raw.get(key, ()))
        raw["tmpfs"] = tuple((str(t), int(size)) for t, size in raw.get("tmpfs", ()))
        raw["bind_policy"] = SourcePolicy.from_json(raw.get("bind_policy"))
        return cls(**raw)
