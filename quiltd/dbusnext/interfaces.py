"""A ServiceInterface that finds its D-Bus members once per class, not once per object.

dbus-next's ServiceInterface.__init__ walks the whole class with
inspect.getmembers to find its methods, properties and signals. quiltd makes
one object per container, so every CreateContainer paid for that walk. The
lists it builds depend on the class only, and dbus-next never changes them
afterwards: the first object of a class builds them, later ones share them.
If dbus-next does not keep them where 0.2.3 does, every object builds its own,
as before.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dbus_next.service import ServiceInterface

_SHARED = ("_ServiceInterface__methods", "_ServiceInterface__properties", "_ServiceInterface__signals")
_PER_OBJECT = "_ServiceInterface__buses"


class SharedMembersInterface(ServiceInterface):  # type: ignore[misc]
    _members: ClassVar[tuple[Any, ...] | None] = None

    def __init__(self, name: str) -> None:
        cls = type(self)
        members = cls.__dict__.get("_members")
        if members is None:
            super().__init__(name)
            if all(hasattr(self, a) for a in (*_SHARED, _PER_OBJECT)):
                cls._members = tuple(getattr(self, a) for a in _SHARED)
            return
        self.name = name
        for attr, value in zip(_SHARED, members, strict=True):
            setattr(self, attr, value)
        setattr(self, _PER_OBJECT, set())


def properties(iface: ServiceInterface) -> list[Any]:
    """The interface's D-Bus properties (each with name, signature and prop_getter).

    Private: dbus-next lists them only in ServiceInterface._get_properties;
    its public side answers Get and GetAll on the bus, which InterfacesAdded
    cannot wait for.
    """
    found: list[Any] = ServiceInterface._get_properties(iface)
    return found
