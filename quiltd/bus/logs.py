# D-Bus signatures are string annotations that dbus-next reads; they are not Python types.
# mypy: disable-error-code="name-defined,valid-type,empty-body"
"""The log part of org.quilt.Quilt1.Manager: a container's output from the journal."""

from dbus_next.service import method

from quiltd.bus import convert
from quiltd.bus.errors import bus_errors
from quiltd.core import parse
from quiltd.core.logs import Logs


def text(data: bytes) -> str:
    """A D-Bus string must be UTF-8 without NUL: other bytes become U+FFFD (GetLogsRaw keeps them)."""
    return data.decode("utf-8", errors="replace").replace("\0", "\ufffd")


class LogMethods:
    """Mixed into ManagerInterface; dbus-next finds these members on the class."""

    _logs: Logs

    @method()
    @bus_errors
    async def GetLogs(self, ref: "s", options: "a{sv}") -> "a(tss)":
        return [[line.usec, line.stream, text(line.data)]
                for line in await self._logs.get(ref, convert.request(parse.log_options, options))]

    @method()
    @bus_errors
    async def GetLogsRaw(self, ref: "s", options: "a{sv}") -> "a(tsay)":
        lines = await self._logs.get(ref, convert.request(parse.log_options, options))
        return [[line.usec, line.stream, line.data] for line in lines]

    @method()
    @bus_errors
    async def FollowLogs(self, ref: "s", options: "a{sv}", fd: "h") -> None:
        await self._logs.follow(ref, convert.request(parse.log_options, options, fds=(fd,)), fd)
