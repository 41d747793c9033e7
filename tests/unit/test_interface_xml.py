"""Pins the exported D-Bus interfaces to dbus/org.quilt.Quilt1.xml.

The XML is the published contract (with its documentation), the classes in
quiltd/bus/ are what a client really gets: any method, signal or property
added, removed or retyped on one side only fails here. Argument names of
outputs are not compared, since dbus-next does not name them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from dbus_next.introspection import Interface, Node
from dbus_next.service import ServiceInterface

from quiltd.bus.container import ContainerInterface
from quiltd.bus.manager import ManagerInterface
from quiltd.dbusnext.introspection import Introspector
from quiltd.model import Container, ContainerSpec, State
from quiltd.names import CONTAINER_INTERFACE, MANAGER_INTERFACE

XML_PATH = Path(__file__).resolve().parents[2] / "dbus" / "org.quilt.Quilt1.xml"
DOC = "org.freedesktop.DBus.DocString"


def exported() -> dict[str, ServiceInterface]:
    # Introspection never touches the manager, so no core is needed.
    return {
        MANAGER_INTERFACE: ManagerInterface(None, None, None, None, None, None),  # type: ignore[arg-type]
        CONTAINER_INTERFACE: ContainerInterface(
            None, Container("0", "c", "img", "0", ("true",), ContainerSpec()), None  # type: ignore[arg-type]
        ),
    }


def pinned() -> dict[str, Interface]:
    node = Node.parse(XML_PATH.read_text(encoding="utf-8"))
    return {i.name: i for i in node.interfaces}


def shape(interface: Interface) -> dict[str, dict[str, object]]:
    """Everything a client depends on, without names of arguments."""
    return {
        "methods": {m.name: (m.in_signature, m.out_signature) for m in interface.methods},
        "signals": {s.name: s.signature for s in interface.signals},
        "properties": {p.name: (p.signature, p.access.value) for p in interface.properties},
    }


def test_the_xml_holds_exactly_the_exported_interfaces() -> None:
    assert sorted(pinned()) == sorted(exported())


@pytest.mark.parametrize("name", [MANAGER_INTERFACE, CONTAINER_INTERFACE])
@pytest.mark.parametrize("kind", ["methods", "signals", "properties"])
def test_members_match_the_code(name: str, kind: str) -> None:
    code = shape(exported()[name].introspect())[kind]
    xml = shape(pinned()[name])[kind]
    assert xml == code, (
        f"{name} {kind} differ between quiltd/bus/ and {XML_PATH.name}: "
        f"only in code {sorted(set(code) - set(xml))}, only in XML {sorted(set(xml) - set(code))}, "
        f"changed {sorted(k for k in set(code) & set(xml) if code[k] != xml[k])}"
    )


@pytest.mark.parametrize("name", [MANAGER_INTERFACE, CONTAINER_INTERFACE])
def test_input_argument_names_match_the_code(name: str) -> None:
    # In-arg names come from the Python parameters and show in busctl
    # introspect; the XML must not document them under other names.
    code = {m.name: [a.name for a in m.in_args] for m in exported()[name].introspect().methods}
    xml = {m.name: [a.name for a in m.in_args] for m in pinned()[name].methods}
    assert xml == code


def test_every_element_is_documented_and_every_argument_named() -> None:
    root = ET.fromstring(XML_PATH.read_text(encoding="utf-8"))
    undocumented = []
    unnamed = []
    for interface in root.iter("interface"):
        elements = [interface]
        for member in interface:
            if member.tag in ("method", "signal", "property"):
                elements.append(member)
                elements.extend(member.iter("arg"))
        for element in elements:
            where = f"{interface.get('name')} {element.tag} {element.get('name')}"
            if not element.get("name"):
                unnamed.append(where)
            docs = [a.get("value", "") for a in element.findall("annotation") if a.get("name") == DOC]
            if len(docs) != 1 or not docs[0].strip():
                undocumented.append(where)
    assert not unnamed, f"arguments without a name: {unnamed}"
    assert not undocumented, f"missing or empty {DOC}: {undocumented}"


def test_live_introspection_carries_the_pinned_annotations_and_output_names() -> None:
    # What the daemon answers to Introspect: the code's members with the file's annotations.
    introspector = Introspector((XML_PATH,))
    live = Node.default("/")
    live.interfaces = [introspector.interface(i.introspect()) for i in exported().values()]
    served = ET.fromstring(live.tostring())
    pinned_root = ET.fromstring(XML_PATH.read_text(encoding="utf-8"))

    def annotations(root: ET.Element) -> list[tuple[str | None, str | None]]:
        return sorted((a.get("name"), a.get("value")) for i in root.iter("interface")
                      if i.get("name", "").startswith("org.quilt.") for a in i.iter("annotation"))

    assert annotations(served) == annotations(pinned_root)
    wait = next(m for m in served.iter("method") if m.get("name") == "WaitContainer")
    assert [a.get("name") for a in wait.iter("arg")] == ["ref", "timeout_usec", "state", "exit_code"]
    memory = next(p for p in served.iter("property") if p.get("name") == "MemoryCurrent")
    assert [a.get("value") for a in memory.iter("annotation")
            if a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"] == ["false"]


def test_without_the_file_introspection_is_the_code_alone(tmp_path: Path) -> None:
    code = exported()[CONTAINER_INTERFACE].introspect()
    assert Introspector((tmp_path / "missing.xml",)).interface(code) is code


def test_a_property_without_a_changed_signal_says_so() -> None:
    # A proxy caches what InterfacesAdded or GetAll gave until PropertiesChanged
    # says otherwise: a property that changes unannounced must be marked
    # 'false' (or 'invalidates'), one that never changes may be 'const'.
    class Addresses:
        address = ""

        def ip_address(self, _: str) -> str:
            return self.address

    manager = Addresses()
    old = Container("0", "c", "img", "0", ("true",), ContainerSpec())
    obj = ContainerInterface(manager, old, None)  # type: ignore[arg-type]
    sent: set[str] = set()
    obj.emit_properties_changed = lambda changed, invalidated=(): sent.update(changed, invalidated)
    manager.address = "10.88.0.2"
    obj.announce_change(replace(old, state=State.EXITED, pid=7, exit_code=3, started_usec=1, finished_usec=2,
                                reason="r", pid_starttime=1, started_boot_usec=1), old)
    root = ET.fromstring(XML_PATH.read_text(encoding="utf-8"))
    emits = {}
    for interface in root.iter("interface"):
        if interface.get("name") == CONTAINER_INTERFACE:
            for prop in interface.iter("property"):
                marks = [a.get("value") for a in prop.iter("annotation")
                         if a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"]
                emits[prop.get("name")] = marks[0] if marks else "true"  # the specification's default
    assert {name for name, value in emits.items() if value == "true"} == sent
