"""Checks on what clients send: names, commands and container options.

Values arrive as plain Python values (the bus layer has unwrapped the D-Bus
variants), so every type is checked here, with a message a person can act on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from quiltd.errors import InvalidArgument
from quiltd.grammar import ENV_RE, IMAGE_NAME_RE, NAME_RE, USER_RE
from quiltd.model import DEFAULT_LOG_RATE_BURST, DEFAULT_LOG_RATE_INTERVAL_SEC, ContainerSpec

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_NETWORK = "bridge"
MIN_MEMORY = 4 << 20  # below this even a shell cannot start; refuse rather than OOM at once
MAX_TASKS = 1 << 22
MIN_DISK = 1 << 20  # a writable layer smaller than this cannot hold a shell's history
MAX_DISK = 1 << 40
MAX_LOG_RATE_BURST = 1 << 32
MAX_LOG_RATE_INTERVAL_SEC = 86400

KNOWN_OPTIONS = frozenset({
    "env", "workdir", "hostname", "memory_max", "cpu_quota", "tasks_max", "network",
    "labels", "ttl_sec", "auto_remove", "start", "publish",
    "mounts", "tmpfs",  # checked by mountopts
    "volumes",  # checked by volumes
    "disk_max", "user", "userns", "nested_userns",
    "log_rate_burst", "log_rate_interval_sec",
    "entrypoint",  # checked by imagedefaults, which knows the image's
})
PROTOCOLS = ("tcp", "udp")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: use 1-63 letters, digits or '-', not starting with '-'"
        )
    return name


def check_image_name(name: object) -> str:
    if not isinstance(name, str) or not IMAGE_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid image name {name!r}: use 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return name


def check_command(command: object) -> tuple[str, ...]:
    if not isinstance(command, list | tuple) or not command:
        raise InvalidArgument("the command is empty: give at least the program to run")
    if not all(isinstance(a, str) for a in command) or not command[0]:
        raise InvalidArgument("the command must be a list of strings with a non-empty program")
    if any("\0" in a for a in command):
        raise InvalidArgument("the command must not contain NUL characters")
    return tuple(command)


def parse_create_options(options: Mapping[str, object], name: str) -> tuple[ContainerSpec, bool]:
    """The container's spec, and whether to start it now."""
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown option(s): {', '.join(unknown)}")
    env = _str_list(options, "env")
    for item in env:
        if not ENV_RE.match(item) or "\0" in item:
            raise InvalidArgument(f"invalid env entry {item!r}: use NAME=value")
    if not any(item.startswith("PATH=") for item in env):
        env = [DEFAULT_PATH, *env]
    workdir = _str(options, "workdir", "/")
    if not workdir.startswith("/") or "\0" in workdir:
        raise InvalidArgument(f"workdir must be an absolute path, got {workdir!r}")
    hostname = _str(options, "hostname", name)
    if not NAME_RE.match(hostname):
        raise InvalidArgument(f"invalid hostname {hostname!r}")
    memory_max = _optional_int(options, "memory_max", MIN_MEMORY, 1 << 62)
    cpu_quota = options.get("cpu_quota")
    if cpu_quota is not None:
        if isinstance(cpu_quota, bool) or not isinstance(cpu_quota, int | float) \
                or not math.isfinite(cpu_quota) or not 0.01 <= cpu_quota <= 4096:
            raise InvalidArgument(f"cpu_quota must be a number of cores from 0.01 to 4096, got {cpu_quota!r}")
        cpu_quota = float(cpu_quota)
    tasks_max = _optional_int(options, "tasks_max", 1, MAX_TASKS)
    # "none", or a network's name; the core checks that it exists.
    network = _str(options, "network", DEFAULT_NETWORK)
    if network != "none" and not NAME_RE.match(network):
        raise InvalidArgument(f"invalid network name {network!r}")
    labels = options.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidArgument("labels must be a map of strings to strings (a{ss})")
    publish = _publish(options.get("publish", []))
    if publish and network == "none":
        raise InvalidArgument("publish needs a network: network 'none' has no address to forward to")
    ttl_sec = _optional_int(options, "ttl_sec", 0, 1 << 40) or 0
    auto_remove = _bool(options, "auto_remove", False)
    disk_max = _optional_int(options, "disk_max", MIN_DISK, MAX_DISK)
    user = _str(options, "user", "")
    if user and not USER_RE.match(user):
        raise InvalidArgument(f"invalid user {user!r}: use a name or number, optionally :group")
    userns = _bool(options, "userns", False)
    nested_userns = _bool(options, "nested_userns", False)
    if nested_userns and not userns:
        # Made from host root's namespace, a nested one would be owned by
        # host root: only a container's own range may own it.
        raise InvalidArgument("nested_userns needs userns=true")
    log_rate_burst = _optional_int(options, "log_rate_burst", 0, MAX_LOG_RATE_BURST)
    log_rate_interval_sec = _optional_int(options, "log_rate_interval_sec", 1, MAX_LOG_RATE_INTERVAL_SEC)
    start = _bool(options, "start", True)
    spec = ContainerSpec(
        env=tuple(env),
        workdir=workdir,
        hostname=hostname,
        memory_max=memory_max,
        cpu_quota=cpu_quota,
        tasks_max=tasks_max if tasks_max is not None else 1024,
        network=network,
        labels=tuple(sorted(labels.items())),
        ttl_sec=ttl_sec,
        auto_remove=auto_remove,
        publish=publish,
        disk_max=disk_max,
        user=user,
        userns=userns,
        nested_userns=nested_userns,
        log_rate_burst=DEFAULT_LOG_RATE_BURST if log_rate_burst is None else log_rate_burst,
        log_rate_interval_sec=log_rate_interval_sec or DEFAULT_LOG_RATE_INTERVAL_SEC,
    )
    return spec, start


def _publish(value: object) -> tuple[tuple[int, int, str], ...]:
    """publish a(qqs): (host port, container port, protocol) entries."""
    if not isinstance(value, list):
        raise InvalidArgument("option publish must be a list of (host port, container port, proto): a(qqs)")
    entries: list[tuple[int, int, str]] = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise InvalidArgument(f"invalid publish entry {entry!r}: use (host port, container port, proto)")
        host, inner, proto = entry
        for port in (host, inner):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidArgument(f"invalid port {port!r} in publish entry {entry!r}: use 1-65535")
        if proto not in PROTOCOLS:
            raise InvalidArgument(f"invalid protocol {proto!r} in publish entry {entry!r}: use tcp or udp")
        if any((host, proto) == (h, p) for h, _, p in entries):
            raise InvalidArgument(f"host port {host}/{proto} is published twice")
        entries.append((host, inner, proto))
    return tuple(entries)


def _str(options: Mapping[str, object], key: str, default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"option {key} must be a string (s), got {type(value).__name__}")
    return value


def _str_list(options: Mapping[str, object], key: str) -> list[str]:
    value = options.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"option {key} must be a list of strings (as)")
    return value


def _bool(options: Mapping[str, object], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"option {key} must be a boolean (b), got {type(value).__name__}")
    return value


def _optional_int(options: Mapping[str, object], key: str, low: int, high: int) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"option {key} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgument(f"option {key} must be between {low} and {high}, got {value}")
    return value
