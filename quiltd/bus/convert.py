"""Core records to D-Bus values and back."""

import contextlib
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dbus_next.signature import Variant

from quiltd.core.capacity import Capacity
from quiltd.core.manager import ContainerInfo, ImportResult, SystemInfo
from quiltd.core.pool import PoolState
from quiltd.model import ContainerListing, ContainerSpec
from quiltd.names import container_path

T = TypeVar("T")


def unwrap(options: dict[str, Variant]) -> dict[str, Any]:
    """a{sv} to plain values; quiltd.core.parse checks their types."""
    return {key: _plain(value) for key, value in options.items()}


def request(read: Callable[[dict[str, Any]], T], options: dict[str, Variant], fds: Sequence[int] = ()) -> T:
    """options read into their request by the core's parser.

    A call that carries descriptors hands them to the core, which closes
    them whatever happens; options refused before that would leave them
    open, so they are closed here then.
    """
    try:
        return read(unwrap(options))
    except BaseException:
        for fd in set(fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def container_row(c: ContainerListing) -> list[Any]:
    return [c.id, c.name, c.image, c.state.value, container_path(c.id)]


def container_info(info: ContainerInfo) -> dict[str, Variant]:
    c, usage = info.container, info.usage
    return {
        **_fixed_info(c.id, c.name, c.image, c.image_id, c.command, c.spec, c.userns_base, c.unit),
        "State": Variant("s", c.state.value),
        "Reason": Variant("s", c.reason),
        "Pid": Variant("u", c.pid),
        "ExitCode": Variant("i", c.exit_code),
        "IPAddress": Variant("s", info.ip_address),
        "CreatedUsec": Variant("t", c.created_usec),
        "StartedUsec": Variant("t", c.started_usec),
        "FinishedUsec": Variant("t", c.finished_usec),
        "MemoryCurrent": Variant("t", usage.memory_current if usage else 0),
        "CPUUsageNSec": Variant("t", usage.cpu_usage_nsec if usage else 0),
        "TasksCurrent": Variant("t", usage.tasks_current if usage else 0),
        "LogLinesDropped": Variant("t", info.log_lines_dropped),
    }


# What a container was created with never changes: its part of the answer is
# made once (a Variant checks its value against its signature when made, and
# two thirds of GetContainerInfo's values are these). Read-only, shared.
# Sized for the thousand containers a host runs: 4,096 held 15 MiB after a
# load that made and removed thousands.
@functools.lru_cache(maxsize=1024)
def _fixed_info(container_id: str, name: str, image: str, image_id: str, command: tuple[str, ...],
                spec: ContainerSpec, userns_base: int, unit: str) -> dict[str, Variant]:
    return {
        "Id": Variant("s", container_id),
        "Name": Variant("s", name),
        "Image": Variant("s", image),
        "ImageId": Variant("s", image_id),
        "Command": Variant("as", list(command)),
        "Env": Variant("as", list(spec.env)),
        "Workdir": Variant("s", spec.workdir),
        "Hostname": Variant("s", spec.hostname),
        "Network": Variant("s", spec.network),
        "Publish": Variant("a(qqs)", [list(entry) for entry in spec.publish]),
        "Labels": Variant("a{ss}", dict(spec.labels)),
        "MemoryMax": Variant("t", spec.memory_max or 0),
        "CPUQuota": Variant("d", spec.cpu_quota or 0.0),
        "TasksMax": Variant("t", spec.tasks_max),
        "TTLSec": Variant("t", spec.ttl_sec),
        "AutoRemove": Variant("b", spec.auto_remove),
        "Mounts": Variant("a(ssb)", [list(m) for m in spec.mounts]),
        "Tmpfs": Variant("a(st)", [list(t) for t in spec.tmpfs]),
        "Volumes": Variant("a(ssb)", [list(v) for v in spec.volumes]),
        "DiskMax": Variant("t", spec.disk_max or 0),
        "User": Variant("s", spec.user),
        "UserNamespaceBase": Variant("u", userns_base),
        "NestedUserNamespaces": Variant("b", spec.nested_userns),
        "Unit": Variant("s", unit),
        "LogRateBurst": Variant("t", spec.log_rate_burst),
        "LogRateIntervalSec": Variant("t", spec.log_rate_interval_sec),
    }


def import_result(result: ImportResult) -> dict[str, Variant]:
    image = result.image
    return {
        "Name": Variant("s", image.name),
        "Id": Variant("s", image.id),
        "SizeBytes": Variant("t", image.size_bytes),
        "Format": Variant("s", result.kind),
        "SkippedDevices": Variant("u", result.skipped_devices),
    }


def system_info(info: SystemInfo) -> dict[str, Variant]:
    return {
        "Version": Variant("s", info.version),
        "Containers": Variant("a{su}", info.containers_by_state),
        "Images": Variant("u", info.images),
        "StateDirectory": Variant("s", info.state_dir),
        "RuntimeDirectory": Variant("s", info.run_dir),
        "Kernel": Variant("s", info.kernel),
        "StartsRunning": Variant("u", info.starts_running),
        "StartsWaiting": Variant("u", info.starts_waiting),
        "StartTurns": Variant("u", info.start_turns),
        "MaxWaitingStarts": Variant("u", info.max_waiting_starts),
        "WarmPoolSize": Variant("u", info.warm_pool_size),
        "WarmPoolReady": Variant("u", info.warm_pool_ready),
        "Freezer": Variant("s", info.freezer),
    } | _capacity(info.capacity)


def _capacity(cap: Capacity | None) -> dict[str, Variant]:
    if cap is None:
        return {}
    return {
        "CPUs": Variant("d", cap.cpus),
        "MemoryBytes": Variant("t", cap.memory_bytes),
        "CPUReserved": Variant("d", cap.cpu_reserved),
        "MemoryReserved": Variant("t", cap.memory_reserved),
    }


# The D-Bus type of each option a warm pool may hold (pool.POOL_OPTIONS).
_POOL_OPTION_TYPES = {"network": "s", "memory_max": "t", "cpu_quota": "d", "tasks_max": "t",
                      "tmpfs": "a(st)", "disk_max": "t", "userns": "b", "nested_userns": "b"}


def warm_pool(state: PoolState) -> list[Any]:
    opts = json.loads(state.pool.options)
    return [state.pool.image, {k: Variant(_POOL_OPTION_TYPES[k], v) for k, v in opts.items()},
            state.pool.size, state.ready]
