"""Container objects share their member lists, and nothing else."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from dbus_next.service import ServiceInterface

from quiltd.bus.container import ContainerInterface
from quiltd.model import Container, ContainerSpec


def _container(cid: str) -> Container:
    return Container(id=cid, name=f"n{cid}", image="busybox", image_id="i", command=("true",),
                     spec=ContainerSpec(), created_usec=1)


def _names(items: list[Any]) -> list[str]:
    return sorted(item.name for item in items)


def test_later_objects_see_the_members_the_first_found() -> None:
    first = ContainerInterface(None, _container("a" * 16), None)  # type: ignore[arg-type]
    second = ContainerInterface(None, _container("b" * 16), None)  # type: ignore[arg-type]
    for get in (ServiceInterface._get_methods, ServiceInterface._get_properties,
                ServiceInterface._get_signals):
        assert _names(get(second)) == _names(get(first))
    assert "Remove" in _names(ServiceInterface._get_methods(second))
    assert "MemoryCurrent" in _names(ServiceInterface._get_properties(second))
    assert second.name == first.name == "org.quilt.Quilt1.Container"
    assert ET.tostring(second.introspect().to_xml()) == ET.tostring(first.introspect().to_xml())
    # Each object is exported on its own buses.
    ServiceInterface._add_bus(first, object())
    assert ServiceInterface._get_buses(second) == set()
    assert second.Id == "b" * 16 and first.Id == "a" * 16
