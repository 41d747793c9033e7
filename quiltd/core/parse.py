"""Plain values from a client to typed requests (quiltd.core.requests): the one place options are read.

The bus unwraps a call's a{sv} into plain Python values and calls one
function here per kind of call; each checks every key and every type and
range, with a message a person can act on, and returns a frozen record.
There is one rule for an option nobody knows (`check_known`: its message
names the option and the ones allowed) and one range check (`in_range`),
used by every integer, duration and size; the core never sees a map.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Mapping
from enum import Enum

from quiltd.core import volumes
from quiltd.core.options import DEFAULT_PATH, check_command
from quiltd.core.pool import POOL_OPTIONS
from quiltd.core.requests import (
    DEFAULT_MAX_OUTPUT,
    CommitOptions,
    ContainerFilter,
    CopyOptions,
    CreateOptions,
    ExecOptions,
    ForkOptions,
    ImportOptions,
    LogOptions,
    NetworkOptions,
    RemoveImageOptions,
    Stream,
)
from quiltd.errors import InvalidArgument
from quiltd.grammar import ENV_RE, NAME_RE, USER_RE
from quiltd.images.pull import MAX_TIMEOUT_SEC as MAX_PULL_TIMEOUT_SEC
from quiltd.model import DEFAULT_LOG_RATE_BURST, DEFAULT_LOG_RATE_INTERVAL_SEC, ContainerSpec
from quiltd.net import firewall, networks
from quiltd.runtime import mountopts

Options = Mapping[str, object]

DEFAULT_NETWORK = "bridge"
MIN_MEMORY = 4 << 20  # below this even a shell cannot start; refuse rather than OOM at once
MAX_MEMORY = 1 << 62
MAX_TASKS = 1 << 22
MIN_DISK = 1 << 20  # a writable layer smaller than this cannot hold a shell's history
MAX_DISK = 1 << 40
MAX_TTL_SEC = 1 << 40
MAX_LOG_RATE_BURST = 1 << 32
MAX_LOG_RATE_INTERVAL_SEC = 86400
MAX_CPU_QUOTA = 4096
MIN_CPU_QUOTA = 0.01
PROTOCOLS = ("tcp", "udp")

CREATE_OPTIONS = frozenset({
    "env", "workdir", "hostname", "memory_max", "cpu_quota", "tasks_max", "network",
    "labels", "ttl_sec", "auto_remove", "start", "publish", "mounts", "tmpfs", "volumes",
    "disk_max", "user", "userns", "nested_userns", "log_rate_burst", "log_rate_interval_sec",
    "entrypoint",
})

# Exec: the sum of both streams travels in one D-Bus reply; the system bus
# refuses messages over 32 MiB (dbus-daemon's default max_message_size).
MAX_OUTPUT_LIMIT = 8 << 20
MAX_STDIN = 8 << 20
MAX_EXEC_TIMEOUT_SEC = 1 << 31
MAX_PTY_SIZE = 0xFFFF  # a winsize field

MAX_COPY_BYTES = 1 << 40
MAX_IMAGE_BYTES = 1 << 44
# A reference as docker and OCI layouts write them: no spaces or control characters.
_REF_RE = re.compile(r"[\x21-\x7e]{1,255}")
MAX_LOG_USEC = (1 << 63) - 1


class ExecKind(Enum):
    """Which call an exec's options came with: each takes its own set."""

    FOREGROUND = "Exec"  # output and stdin in the call and its reply
    WITH_FDS = "ExecWithFds"
    BACKGROUND = "ExecStart"
    PTY = "ExecWithPty"


_EXEC_COMMON = frozenset({"env", "workdir", "user", "timeout_sec"})
EXEC_OPTIONS = {
    ExecKind.FOREGROUND: _EXEC_COMMON | {"stdin", "max_output"},
    ExecKind.WITH_FDS: _EXEC_COMMON,
    ExecKind.BACKGROUND: _EXEC_COMMON,
    ExecKind.PTY: _EXEC_COMMON | {"rows", "cols"},
}
# Why an option of Exec is missing from the others: said with the refusal.
_EXEC_WHY = {
    ExecKind.FOREGROUND: "",
    ExecKind.WITH_FDS: " (ExecWithFds takes stdin as a descriptor, and its output goes to the caller's "
                       "descriptors)",
    ExecKind.BACKGROUND: " (ExecStart output goes to the journal, stdin is empty)",
    ExecKind.PTY: " (ExecWithPty's stdin and output are the terminal)",
}


# The one rule and the one range check


def check_known(options: Collection[str], allowed: Collection[str], what: str = "option",
                why: str = "") -> None:
    """InvalidArgument naming every key outside allowed, and the ones allowed."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgument(f"unknown {what}(s){why}: {', '.join(unknown)}; "
                              f"the known ones are {', '.join(sorted(allowed))}")


def in_range(value: object, what: str, low: int, high: int, unit: str = "") -> int:
    """value as an int if it is one from low to high; booleans are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        units = f" {unit}" if unit else ""
        raise InvalidArgument(f"{what} must be an integer from {low} to {high}{units}, got {value!r}")
    return value


def integer(options: Options, key: str, low: int, high: int, default: int, unit: str = "") -> int:
    return in_range(options.get(key, default), f"option {key}", low, high, unit)


def optional_integer(options: Options, key: str, low: int, high: int, unit: str = "") -> int | None:
    value = options.get(key)
    return None if value is None else in_range(value, f"option {key}", low, high, unit)


def duration_sec(options: Options, key: str, low: int, high: int, default: int) -> int:
    return integer(options, key, low, high, default, "seconds")


def size_bytes(options: Options, key: str, low: int, high: int) -> int | None:
    return optional_integer(options, key, low, high, "bytes")


def string(options: Options, key: str, default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"option {key} must be a string (s), got {type(value).__name__}")
    return value


def strings(options: Options, key: str) -> tuple[str, ...]:
    value = options.get(key, [])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"option {key} must be a list of strings (as)")
    return tuple(value)


def boolean(options: Options, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"option {key} must be a boolean (b), got {type(value).__name__}")
    return value


def env_entries(options: Options, key: str = "env") -> tuple[str, ...]:
    env = strings(options, key)
    for item in env:
        if not ENV_RE.match(item) or "\0" in item:
            raise InvalidArgument(f"invalid env entry {item!r}: use NAME=value")
    return env


# CreateContainer and SetWarmPool


def create_options(options: Options) -> CreateOptions:
    check_known(options, CREATE_OPTIONS)
    return _create(options)


def pool_options(options: Options) -> CreateOptions:
    """SetWarmPool's: the create options that shape what a pool's members are made with."""
    check_known(options, POOL_OPTIONS, "warm pool option",
                " (the others cannot be pooled: they are each create's own)")
    return _create(options)


def _create(options: Options) -> CreateOptions:
    given_env = env_entries(options)
    env = given_env if any(item.startswith("PATH=") for item in given_env) else (DEFAULT_PATH, *given_env)
    workdir = string(options, "workdir", "/")
    if not workdir.startswith("/") or "\0" in workdir:
        raise InvalidArgument(f"workdir must be an absolute path, got {workdir!r}")
    hostname = string(options, "hostname", "")  # "": the container's name, filled in by the core
    if "hostname" in options and not NAME_RE.match(hostname):
        raise InvalidArgument(f"invalid hostname {hostname!r}")
    memory_max = size_bytes(options, "memory_max", MIN_MEMORY, MAX_MEMORY)
    cpu_quota = options.get("cpu_quota")
    if cpu_quota is not None:
        if isinstance(cpu_quota, bool) or not isinstance(cpu_quota, int | float) \
                or not math.isfinite(cpu_quota) or not MIN_CPU_QUOTA <= cpu_quota <= MAX_CPU_QUOTA:
            raise InvalidArgument(f"cpu_quota must be a number of cores from {MIN_CPU_QUOTA} to "
                                  f"{MAX_CPU_QUOTA}, got {cpu_quota!r}")
        cpu_quota = float(cpu_quota)
    tasks_max = integer(options, "tasks_max", 1, MAX_TASKS, 1024)
    # "none", or a network's name; the core checks that it exists.
    network = string(options, "network", DEFAULT_NETWORK)
    if network != networks.NONE and not NAME_RE.match(network):
        raise InvalidArgument(f"invalid network name {network!r}")
    labels = options.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidArgument("labels must be a map of strings to strings (a{ss})")
    publish = _publish(options.get("publish", []))
    if publish and network == networks.NONE:
        raise InvalidArgument("publish needs a network: network 'none' has no address to forward to")
    ttl_sec = duration_sec(options, "ttl_sec", 0, MAX_TTL_SEC, 0)
    auto_remove = boolean(options, "auto_remove", False)
    disk_max = size_bytes(options, "disk_max", MIN_DISK, MAX_DISK)
    user = string(options, "user", "")
    if user and not USER_RE.match(user):
        raise InvalidArgument(f"invalid user {user!r}: use a name or number, optionally :group")
    userns = boolean(options, "userns", False)
    nested_userns = boolean(options, "nested_userns", False)
    if nested_userns and not userns:
        # Made from host root's namespace, a nested one would be owned by
        # host root: only a container's own range may own it.
        raise InvalidArgument("nested_userns needs userns=true")
    log_rate_burst = integer(options, "log_rate_burst", 0, MAX_LOG_RATE_BURST, DEFAULT_LOG_RATE_BURST)
    log_rate_interval_sec = duration_sec(options, "log_rate_interval_sec", 1, MAX_LOG_RATE_INTERVAL_SEC,
                                         DEFAULT_LOG_RATE_INTERVAL_SEC)
    binds = _binds(options.get("mounts", []))
    tmpfs = mountopts.parse_tmpfs(options.get("tmpfs", []))
    wanted_volumes = volumes.parse(options.get("volumes", []))
    volumes.check_targets([t for _, t, _ in binds], [t for t, _ in tmpfs], [t for _, t, _ in wanted_volumes])
    entrypoint = None
    if "entrypoint" in options:
        entrypoint = strings(options, "entrypoint")
        if any("\0" in a for a in entrypoint):
            raise InvalidArgument("option entrypoint must not contain NUL characters")
    start = boolean(options, "start", True)
    spec = ContainerSpec(
        env=env, workdir=workdir, hostname=hostname, memory_max=memory_max, cpu_quota=cpu_quota,
        tasks_max=tasks_max, network=network, labels=tuple(sorted(labels.items())), ttl_sec=ttl_sec,
        auto_remove=auto_remove, publish=publish, mounts=binds, tmpfs=tmpfs, volumes=wanted_volumes,
        disk_max=disk_max, user=user, userns=userns, nested_userns=nested_userns,
        log_rate_burst=log_rate_burst, log_rate_interval_sec=log_rate_interval_sec,
    )
    return CreateOptions(spec, start, given_env, entrypoint, frozenset(options))


def _binds(value: object) -> tuple[tuple[str, str, bool], ...]:
    """`mounts` a(ssb): (host source, target, read_only); the core checks each source against its policy."""
    if not isinstance(value, list | tuple):
        raise InvalidArgument("option mounts must be a list of (source, target, read_only) (a(ssb))")
    result = []
    for entry in value:
        if not (isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[2], bool)):
            raise InvalidArgument(f"mounts: entry {entry!r} is not (source, target, read_only)")
        source, target, read_only = entry
        what = f"mount {source} -> {target}"
        if not source.startswith("/") or "\0" in source:
            raise InvalidArgument(f"{what}: the source must be an absolute path")
        result.append((source, mountopts.check_target(target, what), read_only))
    return tuple(result)


def _publish(value: object) -> tuple[tuple[int, int, str], ...]:
    """publish a(qqs): (host port, container port, protocol) entries."""
    if not isinstance(value, list | tuple):
        raise InvalidArgument("option publish must be a list of (host port, container port, proto): a(qqs)")
    entries: list[tuple[int, int, str]] = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise InvalidArgument(f"invalid publish entry {entry!r}: use (host port, container port, proto)")
        host, inner, proto = entry
        for port in (host, inner):
            in_range(port, f"port {port!r} in publish entry {entry!r}", 1, 65535)
        if proto not in PROTOCOLS:
            raise InvalidArgument(f"invalid protocol {proto!r} in publish entry {entry!r}: use tcp or udp")
        if any((host, proto) == (h, p) for h, _, p in entries):
            raise InvalidArgument(f"host port {host}/{proto} is published twice")
        entries.append((host, inner, proto))
    return tuple(entries)


# Exec


def exec_options(options: Options, kind: ExecKind) -> ExecOptions:
    check_known(options, EXEC_OPTIONS[kind], "exec option", _EXEC_WHY[kind])
    env = env_entries(options)
    workdir = options.get("workdir", "")
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")) or "\0" in workdir:
        raise InvalidArgument(f"option workdir must be an absolute path, got {workdir!r}")
    user = options.get("user", "")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(in_range(user, "option user (a uid)", 0, (1 << 32) - 1))
    if not isinstance(user, str) or "\0" in user or "\n" in user or user.count(":") > 1:
        raise InvalidArgument(f"option user must be a name or uid, optionally with ':group', got {user!r}")
    timeout = duration_sec(options, "timeout_sec", 0, MAX_EXEC_TIMEOUT_SEC, 0)
    max_output = integer(options, "max_output", 0, MAX_OUTPUT_LIMIT, DEFAULT_MAX_OUTPUT, "bytes")
    stdin = options.get("stdin", b"")
    # An 'ay' inside a variant may arrive as a list of ints; any other list (an 'as', an 'at'
    # with values past 255) is the wrong type, not bytes() failing.
    if isinstance(stdin, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                                       for b in stdin):
        stdin = bytes(stdin)
    if not isinstance(stdin, bytes):
        raise InvalidArgument("option stdin must be bytes (ay)")
    if len(stdin) > MAX_STDIN:
        raise InvalidArgument(f"option stdin is over {MAX_STDIN} bytes")
    rows = integer(options, "rows", 0, MAX_PTY_SIZE, 0)
    cols = integer(options, "cols", 0, MAX_PTY_SIZE, 0)
    return ExecOptions(env, workdir, user, timeout, stdin, max_output, rows, cols)


# Copies, logs


def copy_options(options: Options) -> CopyOptions:
    check_known(options, {"max_bytes"}, "copy option")
    return CopyOptions(size_bytes(options, "max_bytes", 1, MAX_COPY_BYTES))


def log_options(options: Options) -> LogOptions:
    check_known(options, {"since_usec", "tail", "stream", "exec_id"}, "log option")
    since = integer(options, "since_usec", 0, MAX_LOG_USEC, 0, "µs")
    tail = integer(options, "tail", 0, MAX_LOG_USEC, 0, "lines")
    stream = options.get("stream", Stream.BOTH.value)
    if not isinstance(stream, str) or stream not in {s.value for s in Stream}:
        raise InvalidArgument(f"option stream must be stdout, stderr or both, got {stream!r}")
    exec_id = string(options, "exec_id", "")
    return LogOptions(since, tail, Stream(stream), exec_id)


# Images


def import_options(options: Options) -> ImportOptions:
    check_known(options, {"max_bytes", "ref", "timeout_sec"})
    max_bytes = integer(options, "max_bytes", 1, MAX_IMAGE_BYTES, ImportOptions.max_bytes, "bytes")
    ref = options.get("ref")
    if ref is not None and not (isinstance(ref, str) and _REF_RE.fullmatch(ref)):
        raise InvalidArgument("option ref must be an image reference such as 'busybox:latest' "
                              f"(1-255 printable ASCII characters, no spaces), got {ref!r}")
    timeout = optional_integer(options, "timeout_sec", 1, MAX_PULL_TIMEOUT_SEC, "seconds")
    return ImportOptions(max_bytes, ref, timeout)


def remove_image_options(options: Options) -> RemoveImageOptions:
    check_known(options, {"force"})
    return RemoveImageOptions(boolean(options, "force", False))


# Listings, networks


def container_filter(options: Options) -> ContainerFilter:
    check_known(options, {"state", "name", "image", "labels"}, "filter")
    labels = options.get("labels", {})
    # Values of any other type (an a{sv} sent as labels) are refused here: a list or map
    # among them cannot be compared with the labels on record.
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidArgument("filter labels must be a map of strings (a{ss})")
    state, name, image = (_filter_string(options, key) for key in ("state", "name", "image"))
    return ContainerFilter(state, name, image, tuple(sorted(labels.items())))


def _filter_string(options: Options, key: str) -> str | None:
    value = options.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"filter {key} must be a string (s)")
    return value


def network_options(options: Options) -> NetworkOptions:
    check_known(options, {"subnet", "egress"})
    subnet: ipaddress.IPv4Network | None = None
    if "subnet" in options:
        subnet = networks.parse_subnet(options["subnet"])
    egress, rules = firewall.parse_egress(options.get("egress", firewall.EGRESS_NONE))
    return NetworkOptions(subnet, egress, rules)


# CommitContainer and ForkContainer

COMMIT_OPTIONS = frozenset({"env", "workdir", "user", "entrypoint", "cmd", "labels"})
FORK_OPTIONS = frozenset({"command", "start", "stop_timeout_sec"})


def commit_options(options: Options) -> CommitOptions:
    check_known(options, COMMIT_OPTIONS)
    env = env_entries(options) if "env" in options else None
    workdir = string(options, "workdir", "") if "workdir" in options else None
    if workdir is not None and (not workdir.startswith("/") or "\0" in workdir):
        raise InvalidArgument(f"workdir must be an absolute path, got {workdir!r}")
    user = string(options, "user", "") if "user" in options else None
    if user and not USER_RE.match(user):
        raise InvalidArgument(f"invalid user {user!r}: use a name or number, optionally :group")
    entrypoint = strings(options, "entrypoint") if "entrypoint" in options else None
    cmd = strings(options, "cmd") if "cmd" in options else None
    for value in (entrypoint, cmd):
        if value is not None and any("\0" in a for a in value):
            raise InvalidArgument("entrypoint and cmd must not contain NUL characters")
    labels = options.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise InvalidArgument("labels must be a map of strings to strings (a{ss})")
    return CommitOptions(env, workdir, user, entrypoint, cmd, tuple(sorted(labels.items())))


def fork_options(options: Options) -> ForkOptions:
    check_known(options, FORK_OPTIONS)
    command = None
    if "command" in options:
        command = tuple(check_command(options["command"]))
    return ForkOptions(command, boolean(options, "start", True),
                       duration_sec(options, "stop_timeout_sec", 0, 3600, ForkOptions.stop_timeout_sec))


def no_options(options: Options) -> None:
    """Calls that take an a{sv} for later use and know no key yet."""
    check_known(options, ())
