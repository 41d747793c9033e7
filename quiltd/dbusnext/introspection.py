"""Live introspection that carries the pinned interface file's annotations.

dbus-next introspects from the code alone: no annotation and no name on
an output argument. Clients read annotations: org.freedesktop.DBus.Property.
EmitsChangedSignal tells whether a cached value can be trusted (a property
read live, such as MemoryCurrent, says "false": Get it each time) and
DocString is the reference documentation. dbus/org.quilt.Quilt1.xml is the
contract and tests/unit/test_interface_xml.py pins its members to the code;
here its annotations and argument names are laid onto what the code
exports, so the two cannot drift apart in what a client sees.
"""

from __future__ import annotations

import copy
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from dbus_next import introspection as intr

log = logging.getLogger("quiltd")

XML_NAME = "org.quilt.Quilt1.xml"
# The checkout's own file first (quiltd run from a source tree or an
# editable install), then where the package installs it.
XML_PATHS = (
    Path(__file__).resolve().parents[2] / "dbus" / XML_NAME,
    Path("/usr/share/dbus-1/interfaces") / XML_NAME,
)
MEMBERS = ("method", "signal", "property")


def load_pinned(paths: Sequence[Path] = XML_PATHS) -> dict[str, ET.Element]:
    """The pinned file's interfaces by name, from the first of paths that exists."""
    for path in paths:
        try:
            root = ET.fromstring(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        return {i.get("name", ""): i for i in root.iter("interface")}
    log.warning("%s not found in %s: introspection is served without its annotations",
                XML_NAME, ", ".join(map(str, paths)))
    return {}


def _copy_annotations(source: ET.Element, dest: ET.Element) -> None:
    annotations = [copy.deepcopy(a) for a in source if a.tag == "annotation"]
    for i, a in enumerate(annotations):
        dest.insert(i, a)


def _args(member: ET.Element) -> dict[str, list[ET.Element]]:
    """A member's arguments by direction, in order (a signal's all count as 'out')."""
    groups: dict[str, list[ET.Element]] = {}
    for arg in member.iter("arg"):
        default = "in" if member.tag == "method" else "out"
        direction = default if member.tag != "method" else arg.get("direction", default)
        groups.setdefault(direction, []).append(arg)
    return groups


def annotate(code: ET.Element, pinned: ET.Element) -> ET.Element:
    """code (an <interface> as dbus-next writes it) with pinned's annotations and argument names.

    Members and arguments are matched by name and by position; one the
    pinned file lacks keeps what the code gives.
    """
    out = copy.deepcopy(code)
    _copy_annotations(pinned, out)
    documented = {(m.tag, m.get("name")): m for m in pinned if m.tag in MEMBERS}
    for member in out:
        source = documented.get((member.tag, member.get("name")))
        if source is None:
            continue
        _copy_annotations(source, member)
        theirs = _args(source)
        for direction, args in _args(member).items():
            for arg, doc in zip(args, theirs.get(direction, []), strict=False):
                if not arg.get("name") and doc.get("name"):
                    arg.set("name", doc.get("name", ""))
                _copy_annotations(doc, arg)
    return out


class AnnotatedInterface(intr.Interface):  # type: ignore[misc]
    """An introspected interface whose XML is given, annotations and all."""

    def __init__(self, element: ET.Element) -> None:
        super().__init__(element.get("name", ""))
        self._element = element

    def to_xml(self) -> ET.Element:
        # A copy: dbus-next indents the tree it is given in place.
        return copy.deepcopy(self._element)


class Introspector:
    """Lays the pinned annotations onto introspected interfaces; built once per interface."""

    def __init__(self, paths: Sequence[Path] = XML_PATHS) -> None:
        self._paths = paths
        self._pinned: dict[str, ET.Element] | None = None
        self._done: dict[str, intr.Interface] = {}

    def interface(self, code: intr.Interface) -> intr.Interface:
        done = self._done.get(code.name)
        if done is not None:
            return done
        if self._pinned is None:
            self._pinned = load_pinned(self._paths)
        pinned = self._pinned.get(code.name)
        if pinned is None:
            return code  # the standard interfaces, which the file does not describe
        done = AnnotatedInterface(annotate(code.to_xml(), pinned))
        self._done[code.name] = done
        return done


INTROSPECTOR = Introspector()
