"""A typed asyncio client of the Quilt D-Bus API.

Errors come back as the same QuiltError classes the daemon raised, found by
their D-Bus names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd import dbuscompat, errors
from quiltd.bus.names import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH

# The D-Bus type of each CreateContainer option.
OPTION_TYPES = {
    "env": "as", "workdir": "s", "hostname": "s", "memory_max": "t", "cpu_quota": "d",
    "tasks_max": "t", "network": "s", "labels": "a{ss}", "ttl_sec": "t", "auto_remove": "b",
    "start": "b", "publish": "a(qqs)",
}

_ERRORS: dict[str, type[errors.QuiltError]] = {
    cls.dbus_name: cls for cls in errors.QuiltError.__subclasses__()
}


@dataclass(frozen=True)
class StateChange:
    id: str
    name: str
    state: str
    exit_code: int


class QuiltClient:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, address: str | None = None) -> QuiltClient:
        dbuscompat.apply()
        if address:
            bus = MessageBus(bus_address=address, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        return cls(await bus.connect())

    def close(self) -> None:
        self.bus.disconnect()

    async def call(self, member: str, signature: str = "", *args: Any, path: str = MANAGER_PATH,
                   interface: str = MANAGER_INTERFACE, destination: str = BUS_NAME) -> list[Any]:
        reply = await self.bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=list(args),
        ))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise _ERRORS.get(reply.error_name, errors.QuiltError)(f"{reply.error_name}: {text}")
        return list(reply.body)

    async def create(self, name: str, image: str, command: list[str], **options: Any) -> tuple[str, str]:
        variants = {k: Variant(OPTION_TYPES[k], v) for k, v in options.items()}
        cid, path = await self.call("CreateContainer", "ssasa{sv}", name, image, command, variants)
        return cid, path

    async def start(self, ref: str) -> None:
        await self.call("StartContainer", "s", ref)

    async def stop(self, ref: str, timeout_sec: int = 10) -> None:
        await self.call("StopContainer", "su", ref, timeout_sec)

    async def kill(self, ref: str, signal: int) -> None:
        await self.call("KillContainer", "si", ref, signal)

    async def remove(self, ref: str, force: bool = False) -> None:
        await self.call("RemoveContainer", "sb", ref, force)

    async def wait(self, ref: str, timeout_usec: int = 0) -> tuple[str, int]:
        state, code = await self.call("WaitContainer", "st", ref, timeout_usec)
        return state, code

    async def info(self, ref: str) -> dict[str, Any]:
        (info,) = await self.call("GetContainerInfo", "s", ref)
        return {k: v.value for k, v in info.items()}

    async def list_containers(self, **filters: Any) -> list[tuple[str, str, str, str, str]]:
        variants = {k: Variant("a{ss}" if k == "labels" else "s", v) for k, v in filters.items()}
        (rows,) = await self.call("ListContainers", "a{sv}", variants)
        return [tuple(r) for r in rows]

    async def import_image(self, name: str, source: str) -> str:
        (image_id,) = await self.call("ImportImage", "ssa{sv}", name, source, {})
        return str(image_id)

    async def images(self) -> list[tuple[str, str, int, int]]:
        (rows,) = await self.call("ListImages")
        return [tuple(r) for r in rows]

    async def remove_image(self, name: str) -> None:
        await self.call("RemoveImage", "s", name)

    async def create_network(self, name: str, **options: Any) -> str:
        variants = {k: Variant("as" if isinstance(v, list) else "s", v) for k, v in options.items()}
        (subnet,) = await self.call("CreateNetwork", "sa{sv}", name, variants)
        return str(subnet)

    async def remove_network(self, name: str) -> None:
        await self.call("RemoveNetwork", "s", name)

    async def networks(self) -> list[tuple[str, str, str, str, str]]:
        (rows,) = await self.call("ListNetworks")
        return [tuple(r) for r in rows]

    async def system_info(self) -> dict[str, Any]:
        (info,) = await self.call("GetSystemInfo")
        return {k: v.value for k, v in info.items()}

    async def watch_states(self, callback: Callable[[StateChange], None]) -> None:
        """Calls back for every ContainerStateChanged signal from now on."""
        await self.call("AddMatch", "s",
                        f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}',"
                        "member='ContainerStateChanged'",
                        path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                        destination="org.freedesktop.DBus")

        def handler(msg: Message) -> bool:
            if msg.message_type == MessageType.SIGNAL and msg.member == "ContainerStateChanged":
                callback(StateChange(*msg.body))
            return False

        self.bus.add_message_handler(handler)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls a condition a client observes through signals; for tests and tools."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)
