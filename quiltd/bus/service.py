"""Exports the manager and one object per container, and relays core events as signals.

The manager's path is the containers' org.freedesktop.DBus.ObjectManager:
InterfacesAdded and InterfacesRemoved come from it, as the specification
says (GLib's ObjectManagerClient listens for them there and nowhere else),
and are sent here rather than by dbus-next, in the same turn as the export,
so that a new container is announced before anything else about it and
gone only after the last signal about it.
"""

from dbus_next.aio.message_bus import MessageBus
from dbus_next.message import Message

from quiltd.bus.container import ContainerInterface
from quiltd.bus.manager import ManagerInterface
from quiltd.core.checkpoints import Checkpoints
from quiltd.core.copies import Copies
from quiltd.core.execs import Execs
from quiltd.core.logs import Logs
from quiltd.core.manager import Manager
from quiltd.core.snapshots import Snapshots
from quiltd.model import Container, Exec
from quiltd.names import CONTAINER_INTERFACE, MANAGER_PATH, container_path

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class BusService:
    """The manager's Listener: keeps the exported objects in step with the store."""

    def __init__(self, bus: MessageBus, manager: Manager, execs: Execs, logs: Logs, copies: Copies,
                 snapshots: Snapshots, checkpoints: Checkpoints) -> None:
        self._bus = bus
        self._manager = manager
        self._execs = execs
        self._interface = ManagerInterface(manager, execs, logs, copies, snapshots, checkpoints)
        self._containers: dict[str, ContainerInterface] = {}
        bus.export(MANAGER_PATH, self._interface)
        manager.add_listener(self)
        manager.add_import_progress_listener(self._interface.ImportProgress)
        execs.add_listener(self)

    @property
    def signal_sources(self) -> list[ManagerInterface]:
        """The interfaces whose signals direct connections receive too."""
        return [self._interface]

    def export_existing(self) -> None:
        # Before the name is taken: an object manager client learns of
        # these from GetManagedObjects once quiltd owns the name.
        for c in self._manager.containers():
            self._export(c)

    def container_added(self, c: Container) -> None:
        self._export(c)
        self._announce("InterfacesAdded", "oa{sa{sv}}",
                       [container_path(c.id), {CONTAINER_INTERFACE: self._containers[c.id].announced()}])
        self._interface.ContainerStateChanged(c.id, c.name, c.state.value, c.exit_code)

    def _export(self, c: Container) -> None:
        obj = ContainerInterface(self._manager, c, self._execs)
        self._containers[c.id] = obj
        self._bus.export(container_path(c.id), obj)

    def _announce(self, member: str, signature: str, body: list[object]) -> None:
        if self._bus.connected:
            self._bus.send(Message.new_signal(MANAGER_PATH, OBJECT_MANAGER, member, signature, body))

    def container_changed(self, c: Container, old: Container) -> None:
        if c.state != old.state:
            self._interface.ContainerStateChanged(c.id, c.name, c.state.value, c.exit_code)
        obj = self._containers.get(c.id)
        if obj is not None:
            obj.announce_change(c, old)

    def container_removed(self, c: Container) -> None:
        obj = self._containers.pop(c.id, None)
        if obj is not None:
            self._bus.unexport(container_path(c.id), obj)
        self._interface.ContainerRemoved(c.id, c.name)
        if obj is not None:
            self._announce("InterfacesRemoved", "oas", [container_path(c.id), [CONTAINER_INTERFACE]])

    def exec_exited(self, e: Exec) -> None:
        self._interface.ExecExited(e.id, e.container_id, e.exit_code)
