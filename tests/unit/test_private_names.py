"""dbus-next's private names are used in quiltd/dbusnext/ only, python-systemd's in quiltd/host/ only.

So an upgrade of either library is checked in one place: the first tests
fail if a module elsewhere starts to use one; the last ones fail, naming the
name, when the installed release no longer has one quiltd relies on.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterator
from pathlib import Path

import dbus_next
import pytest
from systemd import journal

import quiltd

ROOT = Path(quiltd.__file__).parent
DBUS_NEXT_ROOT = Path(dbus_next.__file__).parent
VERSION = importlib.metadata.version("dbus-next")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def dbus_next_privates() -> set[str]:
    """Every private name dbus-next defines: modules, functions, classes, attributes, instance fields."""
    names: set[str] = set()
    for path in DBUS_NEXT_ROOT.rglob("*.py"):
        names.update(p for p in path.relative_to(DBUS_NEXT_ROOT).with_suffix("").parts if _private(p))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
                    and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and _private(node.attr) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
                names.add(node.id)
    return names


def systemd_privates() -> set[str]:
    return {n for n in dir(journal.Reader) if _private(n)} | {n for n in dir(journal) if _private(n)}


DBUS_NEXT_PRIVATES = dbus_next_privates()
SYSTEMD_PRIVATES = systemd_privates()


def _extends_library(module: str, name: str, library: str) -> bool:
    """Whether quiltd's module.name is a class built on one of library's (other than ServiceInterface)."""
    found = getattr(importlib.import_module(module), name, None)
    return isinstance(found, type) and any(
        k.__module__.split(".")[0] == library and k.__name__ != "ServiceInterface" for k in found.__mro__)


def _library_names(tree: ast.Module, library: str) -> set[str]:
    """The names a module binds to what it imports from library, or to quiltd's classes built on it."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == library:
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quiltd."):
            names.update(a.asname or a.name for a in node.names
                         if _extends_library(node.module, a.name, library))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] == library)
    return names


def uses(path: Path, library: str, privates: set[str]) -> Iterator[str]:
    """Where the module uses a private name of library: imported, read off an object, or overridden."""
    tree = ast.parse(path.read_text(), str(path))
    bound = _library_names(tree, library)
    if not bound:
        return
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == library:
            for part in (*node.module.split("."), *(a.name for a in node.names)):
                if _private(part):
                    yield f"{where}:{node.lineno} imports {part}"
        elif isinstance(node, ast.ClassDef):
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)} | {
                b.value.id for b in node.bases
                if isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name)}
            if bases & bound - {"ServiceInterface"}:
                # A subclass of the library's class reaches its privates through self.
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Attribute) and inner.attr in privates:
                        yield f"{where}:{inner.lineno} {node.name} uses {inner.attr}"
                    elif isinstance(inner, ast.FunctionDef) and inner.name in privates:
                        yield f"{where}:{inner.lineno} {node.name} overrides {inner.name}"
        if isinstance(node, ast.Attribute) and node.attr in privates and \
                not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os")):
            yield f"{where}:{node.lineno} uses {ast.unparse(node)}"


def modules(outside: str) -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] != outside)


def test_dbus_next_privates_are_used_in_quiltd_dbusnext_only() -> None:
    found = [hit for path in modules("dbusnext") for hit in uses(path, "dbus_next", DBUS_NEXT_PRIVATES)]
    assert not found, "move these into quiltd/dbusnext/: " + "; ".join(found)


def test_systemd_privates_are_used_in_quiltd_host_only() -> None:
    found = [hit for path in modules("host") for hit in uses(path, "systemd", SYSTEMD_PRIVATES)]
    assert not found, "move these into quiltd/host/: " + "; ".join(found)


def test_the_scan_sees_a_private_use(tmp_path: Path) -> None:
    """The scans above are only worth something if they find what they look for."""
    module = tmp_path / "probe.py"
    module.write_text("from dbus_next.service import ServiceInterface\n"
                      "from dbus_next.aio import MessageBus\n"
                      "from systemd import journal\n"
                      "def f(i, r):\n"
                      "    r._get_cursor()\n"
                      "    return ServiceInterface._get_properties(i)\n"
                      "class Bus(MessageBus):\n"
                      "    def _finalize(self, err):\n"
                      "        self._path_exports = {}\n")
    assert sorted(uses(module, "dbus_next", DBUS_NEXT_PRIVATES)) == [
        "probe.py:6 uses ServiceInterface._get_properties", "probe.py:8 Bus overrides _finalize",
        "probe.py:9 Bus uses _path_exports"]
    assert list(uses(module, "systemd", SYSTEMD_PRIVATES)) == ["probe.py:5 uses r._get_cursor"]


# What quiltd relies on, by where the library defines it: a release that
# moves or drops one fails here, by name, before anything runs.
DBUS_NEXT_RELIED_ON = {
    "dbus_next._private.marshaller": ["Marshaller"],
    "dbus_next._private.unmarshaller": ["Unmarshaller"],
    "dbus_next._private.unmarshaller:Unmarshaller": ["_unmarshall"],
    "dbus_next._private.util": ["_replace_fds"],
    "dbus_next.aio.message_bus": ["_MessageWriter", "_future_set_exception", "_future_set_result"],
    "dbus_next.aio.message_bus:MessageBus": [
        "_finalize", "_process_message", "_introspect_export_path", "_find_message_handler",
        "_make_method_handler", "_setup_socket", "_create_unmarshaller", "_message_reader",
        "_emit_interface_added", "_emit_interface_removed", "_send_reply", "_on_message",
        "_interface_signal_notify",
    ],
    "dbus_next.message:Message": ["_marshall"],
    "dbus_next.errors:DBusError": ["_as_message"],
    "dbus_next.service:ServiceInterface": ["_get_properties", "_get_methods", "_add_bus", "_remove_bus"],
}
# Set in the library's __init__ and read or replaced by quiltd.
DBUS_NEXT_FIELDS = {
    "dbus_next.message_bus:BaseMessageBus": ["_path_exports", "_disconnected", "_sock", "_stream", "_fd"],
    "dbus_next.aio.message_bus:MessageBus": ["_writer", "_unmarshaller", "_loop", "_negotiate_unix_fd"],
    "dbus_next.service:ServiceInterface": ["__methods", "__properties", "__signals", "__buses"],
}
SYSTEMD_RELIED_ON = ["_next", "_previous", "_get", "_get_realtime", "_get_cursor"]


def _resolve(where: str) -> object:
    module, _, cls = where.partition(":")
    found: object = importlib.import_module(module)
    return getattr(found, cls) if cls else found


@pytest.mark.parametrize("where", sorted(DBUS_NEXT_RELIED_ON))
def test_the_dbus_next_privates_quiltd_relies_on_are_there(where: str) -> None:
    missing = [n for n in DBUS_NEXT_RELIED_ON[where] if not hasattr(_resolve(where), n)]
    assert not missing, f"dbus-next {VERSION} has no {where} {missing}: see quiltd/dbusnext/"


@pytest.mark.parametrize("where", sorted(DBUS_NEXT_FIELDS))
def test_the_dbus_next_fields_quiltd_relies_on_are_set_by_it(where: str) -> None:
    cls = _resolve(where)
    assert isinstance(cls, type)
    source = "".join(inspect.getsource(k) for k in cls.__mro__ if k.__module__.startswith("dbus_next"))
    missing = [n for n in DBUS_NEXT_FIELDS[where] if f"self.{n}" not in source]
    assert not missing, f"dbus-next {VERSION} no longer sets {where} {missing}"


def test_the_systemd_privates_quiltd_relies_on_are_there() -> None:
    missing = [n for n in SYSTEMD_RELIED_ON if not hasattr(journal.Reader, n)]
    assert not missing, f"python-systemd's journal.Reader has no {missing}: see quiltd/host/journalreader.py"


def test_every_private_the_adapters_use_is_listed_above() -> None:
    """A new private use in the adapters must be added to the lists, so an upgrade checks it too."""
    listed = {n for names in (*DBUS_NEXT_RELIED_ON.values(), *DBUS_NEXT_FIELDS.values()) for n in names}
    used: set[str] = set()
    for path in sorted((ROOT / "dbusnext").rglob("*.py")):
        for hit in uses(path, "dbus_next", DBUS_NEXT_PRIVATES):
            used.add(hit.rsplit(" ", 1)[1].rsplit(".", 1)[-1])
    used.discard("_private")  # the package of the modules listed by name above
    assert used <= listed, sorted(used - listed)
    in_host = {hit.rsplit(".", 1)[-1] for path in sorted((ROOT / "host").rglob("*.py"))
               for hit in uses(path, "systemd", SYSTEMD_PRIVATES)}
    assert {n.removesuffix("()") for n in in_host} <= set(SYSTEMD_RELIED_ON), in_host
