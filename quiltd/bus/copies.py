# D-Bus signatures are string annotations that dbus-next reads; they are not Python types.
# mypy: disable-error-code="name-defined,valid-type,empty-body"
"""The copy part of org.quilt.Quilt1.Manager: tar streams into and out of containers."""

from dbus_next.service import method
from dbus_next.signature import Variant

from quiltd.bus import convert
from quiltd.bus.errors import bus_errors
from quiltd.bus.gate import caller
from quiltd.core import parse
from quiltd.core.copies import Copies
from quiltd.core.requests import CopyOptions


class CopyMethods:
    """Mixed into ManagerInterface; dbus-next finds these members on the class."""

    _copies: Copies

    @method()
    @bus_errors
    async def CopyIn(self, ref: "s", path: "s", tar_fd: "h") -> None:
        await self._copies.copy_in(ref, path, tar_fd, CopyOptions(), caller=caller())

    @method()
    @bus_errors
    async def CopyInEx(self, ref: "s", path: "s", tar_fd: "h", options: "a{sv}") -> "a{sv}":
        o = convert.request(parse.copy_options, options, fds=(tar_fd,))
        result = await self._copies.copy_in(ref, path, tar_fd, o, caller=caller())
        return {"bytes": Variant("t", result.size), "entries": Variant("t", result.entries)}

    @method()
    @bus_errors
    async def CopyOut(self, ref: "s", path: "s", fd: "h") -> None:
        await self._copies.copy_out(ref, path, fd, CopyOptions(), caller=caller())

    @method()
    @bus_errors
    async def CopyOutEx(self, ref: "s", path: "s", fd: "h", options: "a{sv}") -> "a{sv}":
        o = convert.request(parse.copy_options, options, fds=(fd,))
        result = await self._copies.copy_out(ref, path, fd, o, caller=caller())
        return {"bytes": Variant("t", result.size), "entries": Variant("t", result.entries)}

    @method()
    @bus_errors
    async def ExportContainer(self, ref: "s", fd: "h") -> "a{sv}":
        result = await self._copies.export(ref, fd, caller=caller())
        return {"bytes": Variant("t", result.size), "entries": Variant("t", result.entries)}
