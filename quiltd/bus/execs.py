# D-Bus signatures are string annotations that dbus-next reads; they are not Python types.
# mypy: disable-error-code="name-defined,valid-type,empty-body"
"""The exec part of org.quilt.Quilt1.Manager: foreground and background commands in containers."""

from functools import partial
from typing import Any

from dbus_next.service import method, signal
from dbus_next.signature import Variant

from quiltd.bus import convert
from quiltd.bus.errors import bus_errors
from quiltd.bus.gate import caller
from quiltd.core import parse
from quiltd.core.execs import ExecResult, Execs
from quiltd.core.parse import ExecKind
from quiltd.errors import OutputTruncated

# Each exec call's options, read as that call takes them.
READ_FOREGROUND = partial(parse.exec_options, kind=ExecKind.FOREGROUND)
READ_WITH_FDS = partial(parse.exec_options, kind=ExecKind.WITH_FDS)
READ_BACKGROUND = partial(parse.exec_options, kind=ExecKind.BACKGROUND)
READ_PTY = partial(parse.exec_options, kind=ExecKind.PTY)


def exec_reply(result: ExecResult) -> list[Any]:
    """What plain Exec returns: never output cut short without saying so."""
    truncated = [s for s, cut in (("stdout", result.stdout_truncated), ("stderr", result.stderr_truncated))
                 if cut]
    if truncated:
        raise OutputTruncated(
            f"the command exited with {result.exit_code} but wrote more than max_output to "
            f"{' and '.join(truncated)} ({result.stdout_bytes} bytes to stdout, {result.stderr_bytes} "
            "to stderr); raise max_output, or use ExecEx to get the output cut with flags"
        )
    return [result.exit_code, result.stdout, result.stderr]


def exec_info(result: ExecResult) -> dict[str, Variant]:
    return {
        "timed_out": Variant("b", result.timed_out),
        "stdout_truncated": Variant("b", result.stdout_truncated),
        "stderr_truncated": Variant("b", result.stderr_truncated),
        "stdout_bytes": Variant("t", result.stdout_bytes),
        "stderr_bytes": Variant("t", result.stderr_bytes),
    }


class ExecMethods:
    """Mixed into ManagerInterface; dbus-next finds these members on the class."""

    _execs: Execs

    @method()
    @bus_errors
    async def Exec(self, ref: "s", command: "as", options: "a{sv}") -> "iayay":
        o = convert.request(READ_FOREGROUND, options)
        return exec_reply(await self._execs.run(ref, command, o, caller=caller()))

    @method()
    @bus_errors
    async def ExecEx(self, ref: "s", command: "as", options: "a{sv}") -> "iayaya{sv}":
        o = convert.request(READ_FOREGROUND, options)
        result = await self._execs.run(ref, command, o, caller=caller())
        return [result.exit_code, result.stdout, result.stderr, exec_info(result)]

    @method()
    @bus_errors
    async def ExecWithFds(self, ref: "s", command: "as", options: "a{sv}", stdin: "h", stdout: "h",
                          stderr: "h") -> "i":
        o = convert.request(READ_WITH_FDS, options, fds=(stdin, stdout, stderr))
        return await self._execs.run_with_fds(ref, command, o, (stdin, stdout, stderr))

    @method()
    @bus_errors
    async def ExecStart(self, ref: "s", command: "as", options: "a{sv}") -> "s":
        o = convert.request(READ_BACKGROUND, options)
        return (await self._execs.start(ref, command, o)).id

    @method()
    @bus_errors
    async def ExecWithPty(self, ref: "s", command: "as", options: "a{sv}") -> "sh":
        # The master is the connection's to close once the reply is sent (see connection).
        o = convert.request(READ_PTY, options)
        e, master = await self._execs.start_on_pty(ref, command, o)
        return [e.id, master]

    @method()
    @bus_errors
    async def ExecWait(self, exec_id: "s", timeout_usec: "t") -> "si":
        e = await self._execs.wait(exec_id, timeout_usec)
        return [e.state.value, e.exit_code]

    @method()
    @bus_errors
    async def ExecKill(self, exec_id: "s", signal: "i") -> None:
        await self._execs.kill(exec_id, signal)

    @method()
    @bus_errors
    async def ListExecs(self, ref: "s") -> "a(ssasit)":
        return [[e.id, e.state.value, list(e.command), e.exit_code, e.created_usec]
                for e in self._execs.list_execs(ref)]

    @signal()
    def ExecExited(self, exec_id: str, container_id: str, exit_code: int) -> "ssi":
        return [exec_id, container_id, exit_code]
