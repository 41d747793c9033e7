"""quiltd as clients written elsewhere expect a D-Bus service to behave.

GLib's object manager client, GLib proxies, gdbus and a plain match rule:
the object manager's signals come from its path and in order, and the live
introspection says which properties announce their changes.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from quiltd.names import CONTAINER_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH, container_path
from tests.system.conftest import run

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
GIO_CLIENT = REPO / "tests/system/gio_client.py"
PINNED = REPO / "dbus/org.quilt.Quilt1.xml"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
MIB = 1 << 20


def gio(sandbox: Any, verb: str, name: str) -> dict[str, Any]:
    # The system's python3 with Debian's python3-gi, as a user's GLib client runs.
    r = sandbox.run(["/usr/bin/python3", str(GIO_CLIENT), verb, name], timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def test_gio_object_manager_client_sees_a_container_appear_and_go(sandbox: Any, busybox_image: str,
                                                                  name: str) -> None:
    seen = gio(sandbox, "objects", name)
    path = seen["path"]
    assert path not in seen["before"]
    # object-added comes from InterfacesAdded, with the properties it carried.
    assert [a for a in seen["added"] if a["path"] == path] == [{"path": path, "state": "created"}]
    assert path in seen["listed"]
    assert seen["state"] == "exited"  # PropertiesChanged reached the object's proxy
    assert seen["removed"] == [path]
    assert path not in seen["after"]


def test_object_manager_signals_come_first_and_last_from_the_manager_path(quilt: Any, sandbox: Any,
                                                                          name: str) -> None:
    async def scenario() -> list[Message]:
        bus = await MessageBus(bus_address=sandbox.bus_address).connect()
        got: list[Message] = []

        def handler(msg: Message) -> bool:
            if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
                got.append(msg)
            return False

        bus.add_message_handler(handler)
        # A raw match rule: every signal quiltd sends, in the order the bus delivers them.
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=["type='signal',sender='org.quilt.Quilt1'"]))
        try:
            async with quilt() as q:
                cid, _ = await q.create(name, "busybox", ["sh", "-c", "exit 4"])
                assert await q.wait(name) == ("exited", 4)
                await q.remove(name)
                await asyncio.sleep(0.5)  # the last signals are on their way
        finally:
            bus.disconnect()
        return [m for m in got if about(m, cid)]

    def about(m: Message, cid: str) -> bool:
        return m.path == container_path(cid) or (bool(m.body) and m.body[0] in (cid, container_path(cid)))

    signals = run(scenario())
    kinds = [(m.path, m.interface, m.member) for m in signals]
    cid = signals[0].body[0].rsplit("/", 1)[-1]
    path = container_path(cid)
    assert kinds[0] == (MANAGER_PATH, OBJECT_MANAGER, "InterfacesAdded"), kinds
    assert kinds[-1] == (MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved"), kinds
    assert [k for k in kinds if k[1] == OBJECT_MANAGER] == [
        (MANAGER_PATH, OBJECT_MANAGER, "InterfacesAdded"), (MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved")
    ]
    added_path, interfaces = signals[0].body
    assert added_path == path
    props = interfaces[CONTAINER_INTERFACE]
    assert props["Name"].value == name and props["State"].value == "created"
    assert signals[-1].body == [path, [CONTAINER_INTERFACE]]
    # Between them: the container's own PropertiesChanged and the manager's signals about it.
    assert (path, "org.freedesktop.DBus.Properties", "PropertiesChanged") in kinds
    assert (MANAGER_PATH, MANAGER_INTERFACE, "ContainerRemoved") in kinds


def annotations(xml: str) -> set[tuple[str, ...]]:
    """Every annotation of the Quilt interfaces: (interface, member, arg, name, value), where it sits."""
    found: set[tuple[str, ...]] = set()

    def walk(element: ET.Element, where: tuple[str, ...]) -> None:
        counts: dict[str, int] = {}
        for child in element:
            if child.tag == "annotation":
                found.add((*where, child.get("name", ""), child.get("value", "")))
            elif child.tag == "arg":
                direction = child.get("direction", "in" if element.tag == "method" else "out")
                index = counts.get(direction, 0)
                counts[direction] = index + 1
                walk(child, (*where, f"{direction}{index}"))
            else:
                walk(child, (*where, f"{child.tag}:{child.get('name', '')}"))

    for interface in ET.fromstring(xml).iter("interface"):
        if interface.get("name", "").startswith("org.quilt."):
            walk(interface, (interface.get("name", ""),))
    return found


def test_live_introspection_carries_every_annotation_of_the_pinned_file(quilt: Any, sandbox: Any,
                                                                        name: str) -> None:
    async def make() -> str:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["true"], start=False)
            return str(cid)

    cid = run(make())
    live: set[tuple[str, ...]] = set()
    for path in (MANAGER_PATH, container_path(cid)):
        out = sandbox.run(["gdbus", "introspect", "--system", "--dest", "org.quilt.Quilt1",
                           "--object-path", path, "--xml"]).stdout.decode()
        live |= annotations(out)
    pinned = annotations(PINNED.read_text(encoding="utf-8"))
    emits = {a for a in pinned if a[-2] == "org.freedesktop.DBus.Property.EmitsChangedSignal"}
    assert len(emits) >= 10
    assert pinned - live == set()
    assert live == pinned
    sandbox.run(["busctl", "call", "org.quilt.Quilt1", MANAGER_PATH, MANAGER_INTERFACE,
                 "RemoveContainer", "sb", name, "false"])


def test_glib_proxy_reads_memory_current_as_it_grows(sandbox: Any, busybox_image: str, name: str) -> None:
    seen = gio(sandbox, "memory", name)
    assert seen["exec"] == 0, seen["exec_stderr"]
    assert seen["emits"] == "false"
    # 64 MiB written to a tmpfs stay charged to the container while the file exists.
    assert seen["after"] - seen["before"] >= 48 * MIB, seen


def test_ttl_stop_says_ttl_expired_and_a_client_stop_does_not(quilt: Any, name: str) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "600"], ttl_sec=2)
            await q.create(f"{name}-s", "busybox", ["sleep", "600"], ttl_sec=600)
            assert await q.wait_started(f"{name}-s") == "running"
            await q.stop(f"{name}-s", 10)
            state, _ = await q.wait(name, 60_000_000)
            assert state == "exited"
            ttl, stopped = await q.info(name), await q.info(f"{name}-s")
            await q.remove(name)
            await q.remove(f"{name}-s")
            return ttl, stopped

    ttl, stopped = run(scenario())
    assert ttl["Reason"] == "ttl expired"
    # systemd counts from the scope's start, a little before StartedUsec is recorded.
    assert ttl["FinishedUsec"] - ttl["CreatedUsec"] >= 2_000_000
    assert stopped["Reason"] != "ttl expired"
