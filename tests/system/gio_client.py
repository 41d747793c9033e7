"""A client written with GLib's Gio (python3-gi), run inside the sandbox by the system's python3.

    gio_client.py objects NAME   a Gio.DBusObjectManagerClient on /org/quilt/Quilt1
                                 while container NAME is created, runs and is removed
    gio_client.py memory NAME    a Gio.DBusProxy of container NAME's object reading
                                 MemoryCurrent before and after the container uses 64 MiB

Prints one JSON object: what the client saw. Kept free of the project's
own code and of anything but the Debian python3-gi, as a user's client is.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.quilt.Quilt1"
MANAGER_PATH = "/org/quilt/Quilt1"
MANAGER = "org.quilt.Quilt1.Manager"
CONTAINER = "org.quilt.Quilt1.Container"
EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
MIB = 1 << 20


def spin_until(done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Runs the main loop, which delivers the signals, until done() or the timeout."""
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting")
        ctx.iteration(False) or time.sleep(0.01)


def call(bus: Gio.DBusConnection, member: str, signature: str, *args: Any, path: str = MANAGER_PATH,
         interface: str = MANAGER) -> Any:
    body = GLib.Variant(signature, args) if signature else None
    flags = Gio.DBusCallFlags.NONE
    reply = bus.call_sync(BUS_NAME, path, interface, member, body, None, flags, 120_000, None)
    return reply.unpack()


def objects(name: str) -> dict[str, Any]:
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    manager = Gio.DBusObjectManagerClient.new_sync(
        bus, Gio.DBusObjectManagerClientFlags.NONE, BUS_NAME, MANAGER_PATH, None, None, None)
    added: list[dict[str, Any]] = []
    removed: list[str] = []

    def on_added(_: Any, obj: Gio.DBusObject) -> None:
        proxy = obj.get_interface(CONTAINER)
        state = proxy.get_cached_property("State") if proxy is not None else None
        added.append({"path": obj.get_object_path(), "state": state.unpack() if state else None})

    manager.connect("object-added", on_added)
    manager.connect("object-removed", lambda _, obj: removed.append(obj.get_object_path()))
    before = sorted(o.get_object_path() for o in manager.get_objects())

    _, path = call(bus, "CreateContainer", "(ssasa{sv})", name, "busybox", ["sh", "-c", "exit 0"], {})
    spin_until(lambda: any(a["path"] == path for a in added))
    call(bus, "WaitContainer", "(st)", name, 0)
    listed = sorted(o.get_object_path() for o in manager.get_objects())
    proxy = manager.get_interface(path, CONTAINER)
    state = proxy.get_cached_property("State").unpack() if proxy is not None else None
    spin_until(lambda: proxy is None or proxy.get_cached_property("State").unpack() == "exited")
    if proxy is not None:
        state = proxy.get_cached_property("State").unpack()
    call(bus, "RemoveContainer", "(sb)", name, False)
    spin_until(lambda: path in removed)
    after = sorted(o.get_object_path() for o in manager.get_objects())
    return {"path": path, "before": before, "added": added, "listed": listed, "state": state,
            "removed": removed, "after": after}


def memory(name: str) -> dict[str, Any]:
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    _, path = call(bus, "CreateContainer", "(ssasa{sv})", name, "busybox", ["sleep", "600"],
                   {"tmpfs": GLib.Variant("a(st)", [("/scratch", 256 * MIB)])})
    call(bus, "WaitContainerStarted", "(st)", name, 0)
    (xml,) = call(bus, "Introspect", "", path=path, interface="org.freedesktop.DBus.Introspectable")
    info = Gio.DBusNodeInfo.new_for_xml(xml).lookup_interface(CONTAINER)
    proxy = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, info, BUS_NAME, path, CONTAINER, None)
    emits = Gio.DBusAnnotationInfo.lookup(info.lookup_property("MemoryCurrent").annotations, EMITS)

    def read() -> int:
        # As a GLib client should: the cache only for a property that says
        # it announces its changes (the default), else a Get each time.
        if emits in ("false", "invalidates"):
            (value,) = call(bus, "Get", "(ss)", CONTAINER, "MemoryCurrent", path=path,
                            interface="org.freedesktop.DBus.Properties")
            return int(value)
        return int(proxy.get_cached_property("MemoryCurrent").unpack())

    before = read()
    code, _, err = call(bus, "Exec", "(sasa{sv})", name,
                        ["dd", "if=/dev/zero", "of=/scratch/fill", "bs=1M", "count=64"], {})
    after = read()
    call(bus, "RemoveContainer", "(sb)", name, True)
    return {"emits": emits, "before": before, "after": after, "exec": code,
            "exec_stderr": bytes(err).decode(errors="replace")}


def main() -> None:
    verb, name = sys.argv[1], sys.argv[2]
    print(json.dumps({"objects": objects, "memory": memory}[verb](name)))


if __name__ == "__main__":
    main()
