# D-Bus signatures are string annotations that dbus-next reads; they are not Python types.
# mypy: disable-error-code="name-defined,valid-type"
"""org.quilt.Quilt1.Container: one object per container, its properties and verbs."""

from dbus_next.constants import PropertyAccess
from dbus_next.service import dbus_property, method
from dbus_next.signature import Variant

from quiltd.bus import convert
from quiltd.bus.errors import bus_errors
from quiltd.bus.execs import READ_FOREGROUND, exec_reply
from quiltd.bus.gate import caller
from quiltd.core.execs import Execs
from quiltd.core.manager import Manager
from quiltd.dbusnext.interfaces import SharedMembersInterface, properties
from quiltd.model import Container, Usage
from quiltd.names import CONTAINER_INTERFACE

READ = PropertyAccess.READ

# Read live from the container's cgroup (a read that may wait on systemd),
# never cached here and never announced by PropertiesChanged.
LIVE = frozenset({"MemoryCurrent", "CPUUsageNSec", "TasksCurrent"})


class ContainerInterface(SharedMembersInterface):
    def __init__(self, manager: Manager, container: Container, execs: Execs) -> None:
        super().__init__(CONTAINER_INTERFACE)
        self._m = manager
        self._execs = execs
        self._id = container.id
        # The latest record, kept current by announce_change: property reads
        # cost no query and cannot fail on a container being removed.
        self._record = container
        self._ip = manager.ip_address(container.id) if manager is not None else ""

    def _c(self) -> Container:
        return self._record

    async def _usage(self) -> Usage | None:
        try:
            return await self._m.usage(self._record)
        except Exception:
            return None  # a property read must not fail on a scope going away

    def announced(self) -> dict[str, Variant]:
        """Every property as InterfacesAdded carries it: read now, without waiting.

        The live ones are left out while a process may exist (a reader Gets
        them, as their EmitsChangedSignal "false" says); otherwise they are
        0, which is what a Get answers then.
        """
        values: dict[str, Variant] = {}
        for prop in properties(self):
            if prop.name in LIVE:
                if not self._record.state.is_active:
                    values[prop.name] = Variant(prop.signature, 0)
                continue
            values[prop.name] = Variant(prop.signature, prop.prop_getter(self))
        return values

    def announce_change(self, new: Container, old: Container) -> None:
        self._record = new
        changed: dict[str, object] = {}
        # The address is leased by the first start and kept until removal:
        # it changes once, from "", and a client's cached copy must follow.
        # Once it is known there is nothing to look up.
        if not self._ip:
            ip = self._m.ip_address(self._id)
            if ip:
                self._ip = ip
                changed["IPAddress"] = ip
        if new.state != old.state:
            changed["State"] = new.state.value
        if new.pid != old.pid:
            changed["Pid"] = new.pid
        if new.exit_code != old.exit_code:
            changed["ExitCode"] = new.exit_code
        if new.started_usec != old.started_usec:
            changed["StartedUsec"] = new.started_usec
        if new.finished_usec != old.finished_usec:
            changed["FinishedUsec"] = new.finished_usec
        if changed:
            self.emit_properties_changed(changed)

    @dbus_property(access=READ)
    def Id(self) -> "s":
        return self._id

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self._c().name

    @dbus_property(access=READ)
    def Image(self) -> "s":
        return self._c().image

    @dbus_property(access=READ)
    def State(self) -> "s":
        return self._c().state.value

    @dbus_property(access=READ)
    def Pid(self) -> "u":
        return self._c().pid

    @dbus_property(access=READ)
    def ExitCode(self) -> "i":
        return self._c().exit_code

    @dbus_property(access=READ)
    def Command(self) -> "as":
        return list(self._c().command)

    @dbus_property(access=READ)
    def CreatedUsec(self) -> "t":
        return self._c().created_usec

    @dbus_property(access=READ)
    def StartedUsec(self) -> "t":
        return self._c().started_usec

    @dbus_property(access=READ)
    def FinishedUsec(self) -> "t":
        return self._c().finished_usec

    @dbus_property(access=READ)
    def Unit(self) -> "s":
        return self._c().unit

    @dbus_property(access=READ)
    def IPAddress(self) -> "s":
        return self._m.ip_address(self._id)

    @dbus_property(access=READ)
    def Labels(self) -> "a{ss}":
        return dict(self._c().spec.labels)

    @dbus_property(access=READ)
    async def MemoryCurrent(self) -> "t":
        usage = await self._usage()
        return usage.memory_current if usage else 0

    @dbus_property(access=READ)
    async def CPUUsageNSec(self) -> "t":
        usage = await self._usage()
        return usage.cpu_usage_nsec if usage else 0

    @dbus_property(access=READ)
    async def TasksCurrent(self) -> "t":
        usage = await self._usage()
        return usage.tasks_current if usage else 0

    @method()
    @bus_errors
    async def Start(self) -> None:
        await self._m.start(self._id)

    @method()
    @bus_errors
    async def Stop(self, timeout_sec: "u") -> None:
        await self._m.stop(self._id, timeout_sec)

    @method()
    @bus_errors
    async def Kill(self, signal: "i") -> None:
        await self._m.kill(self._id, signal)

    @method()
    @bus_errors
    async def Pause(self) -> None:
        await self._m.pause(self._id)

    @method()
    @bus_errors
    async def Resume(self) -> None:
        await self._m.resume(self._id)

    @method()
    @bus_errors
    async def Remove(self, force: "b") -> None:
        await self._m.remove(self._id, force)

    @method()
    @bus_errors
    async def Exec(self, command: "as", options: "a{sv}") -> "iayay":
        o = convert.request(READ_FOREGROUND, options)
        return exec_reply(await self._execs.run(self._id, command, o, caller=caller()))
