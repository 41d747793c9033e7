"""Transient systemd scopes, one per container, through systemd's D-Bus API.

The manager calls here; this is the only module that speaks to systemd.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd.errors import Internal
from quiltd.host.cgroupusage import CgroupUsage
from quiltd.model import Usage as Usage  # re-exported: the core and the bus import it from here

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
SLICE = "quilt.slice"
UNSET = (1 << 64) - 1  # systemd's "infinity" and "not known" for u64 properties
# The only devices a container may open, whatever nodes it makes (it keeps
# CAP_MKNOD): the ones its /dev holds, and its own pseudo-terminals.
DEVICE_ALLOW = (
    ("/dev/null", "rwm"), ("/dev/zero", "rwm"), ("/dev/full", "rwm"), ("/dev/random", "rwm"),
    ("/dev/urandom", "rwm"), ("/dev/tty", "rwm"), ("/dev/ptmx", "rwm"), ("char-pts", "rwm"),
)


@dataclass(frozen=True)
class ScopeLimits:
    memory_max: int | None = None  # bytes
    cpu_quota: float | None = None  # cores
    tasks_max: int | None = None
    runtime_max_sec: int | None = None  # systemd stops the scope after this long


MAX_PENDING_CALLS = 64


def unit_path(unit: str) -> str:
    """systemd's object path for a unit name (its bus_label_escape)."""
    escaped = "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)
    return f"{SYSTEMD_PATH}/unit/{escaped}"


class Systemd:
    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._cgroups = CgroupUsage(SLICE)
        # The system bus refuses a connection more than 128 pending calls
        # (LimitsExceeded); hundreds of containers started or removed at
        # once would go past that. Replies from clients share the budget.
        self._in_flight = asyncio.Semaphore(MAX_PENDING_CALLS)
        self._waiting: dict[str, asyncio.Future[str]] = {}
        # JobRemoved can arrive before the reply that names the job.
        self._finished: OrderedDict[str, str] = OrderedDict()

    async def connect(self) -> None:
        self._bus.add_message_handler(self._on_message)
        await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
            [f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'"],
        )
        await self._manager("Subscribe", "", [])

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.member == "JobRemoved" \
                and msg.interface == MANAGER_IFACE:
            _, job, _, result = msg.body
            waiter = self._waiting.pop(job, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(result)
            else:
                self._finished[job] = result
                while len(self._finished) > 1024:
                    self._finished.popitem(last=False)
        return False

    async def start_scope(self, unit: str, pid: int, limits: ScopeLimits, description: str) -> None:
        """Creates the scope with pid in it and returns once systemd has it running."""
        # dbus-next wants structs as lists.
        props: list[list[object]] = [
            ["Description", Variant("s", description)],
            ["PIDs", Variant("au", [pid])],
            ["Slice", Variant("s", SLICE)],
            ["Delegate", Variant("b", True)],
            ["CollectMode", Variant("s", "inactive-or-failed")],
            ["MemoryAccounting", Variant("b", True)],
            ["CPUAccounting", Variant("b", True)],
            ["TasksAccounting", Variant("b", True)],
            ["DevicePolicy", Variant("s", "closed")],
            ["DeviceAllow", Variant("a(ss)", [list(d) for d in DEVICE_ALLOW])],
        ]
        if limits.memory_max is not None:
            props.append(["MemoryMax", Variant("t", limits.memory_max)])
        if limits.cpu_quota is not None:
            props.append(["CPUQuotaPerSecUSec", Variant("t", round(limits.cpu_quota * 1_000_000))])
        if limits.tasks_max is not None:
            props.append(["TasksMax", Variant("t", limits.tasks_max)])
        if limits.runtime_max_sec is not None:
            props.append(["RuntimeMaxUSec", Variant("t", limits.runtime_max_sec * 1_000_000)])
        await self._start_transient(unit, props)

    async def start_helper_scope(self, unit: str, pid: int, description: str) -> None:
        """A scope in the system slice for a helper of the daemon's, with accounting and no limits.

        Memory a process touches stays charged to the cgroup it was in, even
        after it moves: the fork server and the inits it makes ahead run here,
        so what each container's init touched before it joined its own scope
        is not charged to quiltd.service (whose MemoryMax is the daemon's).
        """
        await self._start_transient(unit, [
            ["Description", Variant("s", description)],
            ["PIDs", Variant("au", [pid])],
            ["Slice", Variant("s", "system.slice")],
            ["CollectMode", Variant("s", "inactive-or-failed")],
            ["MemoryAccounting", Variant("b", True)],
            ["CPUAccounting", Variant("b", True)],
            ["TasksAccounting", Variant("b", True)],
        ])

    async def _start_transient(self, unit: str, props: list[list[object]]) -> None:
        for attempt in range(20):
            try:
                (job,) = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))",
                                             [unit, "fail", props, []])
                break
            except Internal as e:
                # A unit of that name can be loaded until systemd collects
                # it: a container's scope when it starts again right after it
                # exited, the fork server's when the daemon was just restarted.
                # Stopping it ends whatever is left in it.
                if "UnitExists" not in str(e) or attempt == 19:
                    raise
                await self.stop(unit)
                await asyncio.sleep(0.05)
        result = await self._job_result(job)
        if result != "done":
            raise Internal(f"systemd could not start {unit}: job {result}")

    async def _job_result(self, job: str) -> str:
        if job in self._finished:
            return self._finished.pop(job)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[job] = waiter
        result: str = await waiter
        return result

    async def attach(self, unit: str, pid: int) -> None:
        """Moves pid into the unit's cgroup, in every hierarchy systemd manages (v1, hybrid or v2)."""
        await self._manager("AttachProcessesToUnit", "ssau", [unit, "", [pid]])

    async def kill(self, unit: str, signal: int) -> None:
        await self._manager("KillUnit", "ssi", [unit, "all", signal])

    async def freeze(self, unit: str) -> None:
        """Freezes every process of the unit (cgroup v2); systemd answers once they are frozen."""
        await self._manager("FreezeUnit", "s", [unit])

    async def thaw(self, unit: str) -> None:
        await self._manager("ThawUnit", "s", [unit])

    async def stop(self, unit: str) -> None:
        """Stops the unit (killing what is left in it) if it is still loaded."""
        try:
            (job,) = await self._manager("StopUnit", "ss", [unit, "replace"])
        except Internal as e:
            if "NoSuchUnit" in str(e):
                return
            raise
        await self._job_result(job)

    async def usage(self, unit: str) -> Usage:
        """The unit's live usage: from its cgroup's files, or else from systemd itself."""
        usage = self._cgroups.read(unit)
        if usage is not None:
            return usage
        (values,) = await self._call(
            SYSTEMD, unit_path(unit), PROPERTIES_IFACE, "GetAll", "s", ["org.freedesktop.systemd1.Scope"]
        )

        def number(name: str) -> int:
            variant = values.get(name)
            value = int(variant.value) if variant is not None else UNSET
            return 0 if value == UNSET else value

        return Usage(number("MemoryCurrent"), number("CPUUsageNSec"), number("TasksCurrent"))

    def is_empty(self, unit: str) -> bool:
        """From the unit's cgroup, without a call to systemd: see CgroupUsage.tasks."""
        return self._cgroups.tasks(unit) == 0

    async def list_scopes(self, pattern: str = "quilt-*.scope") -> list[tuple[str, str]]:
        """(unit, active state) of every loaded unit matching pattern."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas", [[], [pattern]])
        return [(u[0], u[3]) for u in units]

    async def _manager(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        return await self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, member, signature, body)

    async def _call(
        self, destination: str, path: str, interface: str, member: str, signature: str, body: list[object]
    ) -> list[Any]:
        async with self._in_flight:
            reply = await self._bus.call(
                Message(destination=destination, path=path, interface=interface, member=member,
                        signature=signature, body=body)
            )
        if reply is None:
            raise Internal(f"no reply from {destination} to {member}")
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise Internal(f"{member} failed: {reply.error_name}: {detail}")
        return list(reply.body)
