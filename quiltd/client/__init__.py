"""Typed clients of the Quilt D-Bus API: QuiltClient (asyncio) and Quilt (plain calls).

Errors come back as the same QuiltError classes the daemon raised, found by
their D-Bus names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd import errors
from quiltd.dbusnext.connection import MessageBus
from quiltd.names import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH

T = TypeVar("T")

# The D-Bus type of each CreateContainer option.
OPTION_TYPES = {
    "env": "as", "workdir": "s", "hostname": "s", "memory_max": "t", "cpu_quota": "d",
    "tasks_max": "t", "network": "s", "labels": "a{ss}", "ttl_sec": "t", "auto_remove": "b",
    "start": "b", "mounts": "a(ssb)", "tmpfs": "a(st)", "volumes": "a(ssb)",
    "publish": "a(qqs)",
    "disk_max": "t", "user": "s", "userns": "b", "log_rate_burst": "t", "log_rate_interval_sec": "t",
    "nested_userns": "b", "entrypoint": "as",
}

# The D-Bus type of each Exec / ExecStart option.
EXEC_OPTION_TYPES = {
    "env": "as", "workdir": "s", "user": "s", "timeout_sec": "u", "stdin": "ay", "max_output": "t",
    "rows": "q", "cols": "q",
}

# How long a call may go unanswered before the client gives up (NoReply):
# long enough for a create or start on a loaded host, where D-Bus's usual
# 25 s would cut off a busy but healthy quiltd.
CALL_TIMEOUT = 120.0
# Calls that last as long as their work, which the client cannot bound: an
# import of several GiB, a copy, an exec, a wait for a container or a log to
# end. These get no timeout unless the caller gives one; ImportProgress
# shows that an import is moving.
UNBOUNDED = frozenset({
    "ImportImage", "ImportImageFd", "CopyIn", "CopyInEx", "CopyOut", "CopyOutEx", "ExportContainer",
    "ExportImage",
    "Exec", "ExecEx", "ExecWithFds", "WaitContainer", "WaitContainerStarted", "ExecWait",
    # A commit copies the writable layer; a fork of a running container
    # waits for it to stop, up to the stop timeout the caller gives.
    "CommitContainer", "ForkContainer",
})

# The D-Bus type of each CommitContainer option.
COMMIT_OPTION_TYPES = {
    "env": "as", "workdir": "s", "user": "s", "entrypoint": "as", "cmd": "as", "labels": "a{ss}",
}

# The D-Bus type of each ForkContainer option.
FORK_OPTION_TYPES = {"command": "as", "start": "b", "stop_timeout_sec": "u"}
_DEFAULT = -1.0  # call(): the timeout that fits the member

_ERRORS: dict[str, type[errors.QuiltError]] = {
    cls.dbus_name: cls for cls in errors.QuiltError.__subclasses__()
}


@dataclass(frozen=True)
class StateChange:
    id: str
    name: str
    state: str
    exit_code: int


class QuiltClient:
    def __init__(self, bus: MessageBus, timeout: float = CALL_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout  # seconds, for every call not in UNBOUNDED

    @classmethod
    async def connect(cls, address: str | None = None, timeout: float = CALL_TIMEOUT) -> QuiltClient:
        if address:
            bus = MessageBus(bus_address=address, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await bus.connect()
        return cls(bus, timeout)

    def close(self) -> None:
        self.bus.disconnect()

    async def call(self, member: str, signature: str = "", *args: Any, path: str = MANAGER_PATH,
                   interface: str = MANAGER_INTERFACE, destination: str = BUS_NAME,
                   unix_fds: list[int] | None = None, timeout: float | None = _DEFAULT) -> list[Any]:
        """One method call; timeout in seconds, None for none, default: what fits the member."""
        reply = await self.call_reply(member, signature, *args, path=path, interface=interface,
                                      destination=destination, unix_fds=unix_fds, timeout=timeout)
        return list(reply.body)

    async def call_reply(self, member: str, signature: str = "", *args: Any, path: str = MANAGER_PATH,
                         interface: str = MANAGER_INTERFACE, destination: str = BUS_NAME,
                         unix_fds: list[int] | None = None, timeout: float | None = _DEFAULT) -> Message:
        """The reply itself: its unix_fds are the descriptors it brought, which the caller then owns."""
        if timeout == _DEFAULT:
            timeout = None if member in UNBOUNDED else self.timeout
        pending = self.bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=list(args), unix_fds=unix_fds or [],
        ))
        try:
            if timeout is None:
                reply = await pending
            elif hasattr(asyncio, "timeout"):
                # Python 3.11: a deadline on this task, not a task of its own
                # (as wait_for makes), so the call goes out at once, as without one.
                async with asyncio.timeout(timeout):
                    reply = await pending
            else:
                reply = await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            raise errors.NoReply(f"{errors.NoReply.dbus_name}: no answer to {member} within {timeout:g} s") \
                from None
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            _close_all(reply.unix_fds)
            text = reply.body[0] if reply.body else reply.error_name
            raise _ERRORS.get(reply.error_name, errors.QuiltError)(f"{reply.error_name}: {text}")
        return reply

    async def create(self, name: str, image: str, command: Sequence[str], **options: Any) -> tuple[str, str]:
        """Creates a container; a struct option (publish, mounts, tmpfs, volumes) takes tuples or lists."""
        variants = {k: variant(OPTION_TYPES[k], v) for k, v in options.items()}
        cid, path = await self.call("CreateContainer", "ssasa{sv}", name, image, list(command), variants)
        return cid, path

    async def start(self, ref: str) -> None:
        await self.call("StartContainer", "s", ref)

    async def commit(self, ref: str, image: str, **options: Any) -> str:
        """Makes image from the container's filesystem as it is now; returns the image's id."""
        variants = {k: variant(COMMIT_OPTION_TYPES[k], v) for k, v in options.items()}
        (image_id,) = await self.call("CommitContainer", "ssa{sv}", ref, image, variants)
        return str(image_id)

    async def fork(self, ref: str, names: Sequence[str], **options: Any) -> list[tuple[str, str]]:
        """Makes containers that start from the container's filesystem; (id, object path) of each."""
        variants = {k: variant(FORK_OPTION_TYPES[k], v) for k, v in options.items()}
        (forks,) = await self.call("ForkContainer", "sasa{sv}", ref, list(names), variants)
        return [(str(cid), str(path)) for cid, path in forks]

    async def checkpoint(self, ref: str) -> None:
        await self.call("CheckpointContainer", "sa{sv}", ref, {})

    async def restore(self, ref: str) -> None:
        await self.call("RestoreContainer", "sa{sv}", ref, {})

    async def stop(self, ref: str, timeout_sec: int = 10) -> None:
        await self.call("StopContainer", "su", ref, timeout_sec, timeout=timeout_sec + self.timeout)

    async def kill(self, ref: str, signal: int) -> None:
        await self.call("KillContainer", "si", ref, signal)

    async def pause(self, ref: str) -> None:
        """Freezes every process of a running container (state 'paused')."""
        await self.call("PauseContainer", "s", ref)

    async def resume(self, ref: str) -> None:
        """Thaws a paused container (state 'running' again)."""
        await self.call("ResumeContainer", "s", ref)

    async def remove(self, ref: str, force: bool = False) -> None:
        await self.call("RemoveContainer", "sb", ref, force)

    async def wait(self, ref: str, timeout_usec: int = 0) -> tuple[str, int]:
        state, code = await self.call("WaitContainer", "st", ref, timeout_usec)
        return state, code

    async def wait_started(self, ref: str, timeout_usec: int = 0) -> str:
        """The container's state once its start has settled: 'running', or 'failed' and why in info()."""
        (state,) = await self.call("WaitContainerStarted", "st", ref, timeout_usec)
        return str(state)

    async def info(self, ref: str) -> dict[str, Any]:
        (info,) = await self.call("GetContainerInfo", "s", ref)
        return {k: v.value for k, v in info.items()}

    async def list_containers(self, **filters: Any) -> list[tuple[str, str, str, str, str]]:
        variants = {k: Variant("a{ss}" if k == "labels" else "s", v) for k, v in filters.items()}
        (rows,) = await self.call("ListContainers", "a{sv}", variants)
        return [tuple(r) for r in rows]

    async def import_image(self, name: str, source: str, max_bytes: int | None = None,
                           ref: str | None = None) -> str:
        options = {} if max_bytes is None else {"max_bytes": Variant("t", max_bytes)}
        if ref is not None:
            options["ref"] = Variant("s", ref)
        (image_id,) = await self.call("ImportImage", "ssa{sv}", name, source, options)
        return str(image_id)

    async def pull(self, name: str, source: str, timeout_sec: int | None = None,
                   max_bytes: int | None = None) -> str:
        """Imports from a registry (docker://HOST/REPO:TAG or @sha256:DIGEST) or an archive
        (oci-archive:PATH[:REF], docker-archive:PATH[:REF]); returns the image id."""
        options: dict[str, Variant] = {}
        if timeout_sec is not None:
            options["timeout_sec"] = Variant("u", timeout_sec)
        if max_bytes is not None:
            options["max_bytes"] = Variant("t", max_bytes)
        (image_id,) = await self.call("ImportImage", "ssa{sv}", name, source, options)
        return str(image_id)

    async def import_image_fd(self, name: str, fd: int, max_bytes: int | None = None,
                              ref: str | None = None) -> str:
        """Imports the archive (or OCI layout directory) open as fd; yours to close after."""
        options = {} if max_bytes is None else {"max_bytes": Variant("t", max_bytes)}
        if ref is not None:
            options["ref"] = Variant("s", ref)
        (image_id,) = await self.call("ImportImageFd", "sha{sv}", name, 0, options, unix_fds=[fd])
        return str(image_id)

    async def import_image_ex(self, name: str, source: str, max_bytes: int | None = None,
                              ref: str | None = None) -> dict[str, Any]:
        """ImportImage answering Name, Id, SizeBytes, Format and SkippedDevices."""
        (result,) = await self.call("ImportImageEx", "ssa{sv}", name, source, _import_options(max_bytes, ref))
        return {k: v.value for k, v in result.items()}

    async def import_image_fd_ex(self, name: str, fd: int, max_bytes: int | None = None,
                                 ref: str | None = None) -> dict[str, Any]:
        """import_image_fd answering as import_image_ex; fd is yours to close after."""
        (result,) = await self.call("ImportImageFdEx", "sha{sv}", name, 0, _import_options(max_bytes, ref),
                                    unix_fds=[fd])
        return {k: v.value for k, v in result.items()}

    async def export_image(self, name: str, fd: int, fmt: str = "oci-archive") -> dict[str, Any]:
        """The daemon writes the image as an 'oci-archive' or a 'docker-archive' to fd."""
        (info,) = await self.call("ExportImage", "shs", name, 0, fmt, unix_fds=[fd])
        return {k: v.value for k, v in info.items()}

    async def images(self) -> list[tuple[str, str, int, int]]:
        (rows,) = await self.call("ListImages")
        return [tuple(r) for r in rows]

    async def remove_image(self, name: str, force: bool | None = None) -> None:
        if force is None:
            await self.call("RemoveImage", "s", name)
        else:
            await self.call("RemoveImageEx", "sa{sv}", name, {"force": Variant("b", force)})

    async def create_volume(self, name: str) -> None:
        await self.call("CreateVolume", "s", name)

    async def remove_volume(self, name: str) -> None:
        await self.call("RemoveVolume", "s", name)

    async def volumes(self) -> list[tuple[str, str, int]]:
        (rows,) = await self.call("ListVolumes")
        return [tuple(r) for r in rows]

    async def create_network(self, name: str, **options: Any) -> str:
        variants = {k: Variant("as" if isinstance(v, list) else "s", v) for k, v in options.items()}
        (subnet,) = await self.call("CreateNetwork", "sa{sv}", name, variants)
        return str(subnet)

    async def remove_network(self, name: str) -> None:
        await self.call("RemoveNetwork", "s", name)

    async def networks(self) -> list[tuple[str, str, str, str, str]]:
        (rows,) = await self.call("ListNetworks")
        return [tuple(r) for r in rows]

    async def set_warm_pool(self, image: str, size: int, **options: Any) -> None:
        variants = {k: Variant(OPTION_TYPES[k], v) for k, v in options.items()}
        await self.call("SetWarmPool", "sua{sv}", image, size, variants)

    async def warm_pools(self) -> list[tuple[str, dict[str, Any], int, int]]:
        """(image, options, size, ready) per warm pool."""
        (pools,) = await self.call("ListWarmPools")
        return [(image, {k: v.value for k, v in opts.items()}, size, ready)
                for image, opts, size, ready in pools]

    async def system_info(self) -> dict[str, Any]:
        (info,) = await self.call("GetSystemInfo")
        return {k: v.value for k, v in info.items()}

    async def exec(self, ref: str, command: Sequence[str], **options: Any) -> tuple[int, bytes, bytes]:
        code, out, err = await self.call("Exec", "sasa{sv}", ref, list(command), _exec_options(options))
        return code, bytes(out), bytes(err)

    async def exec_ex(
        self, ref: str, command: Sequence[str], **options: Any
    ) -> tuple[int, bytes, bytes, dict[str, Any]]:
        code, out, err, info = await self.call("ExecEx", "sasa{sv}", ref, list(command),
                                               _exec_options(options))
        return code, bytes(out), bytes(err), {k: v.value for k, v in info.items()}

    async def exec_with_fds(self, ref: str, command: Sequence[str], stdin: int, stdout: int, stderr: int,
                            **options: Any) -> int:
        """Runs command on (the daemon's copies of) these descriptors; returns its exit code."""
        (code,) = await self.call("ExecWithFds", "sasa{sv}hhh", ref, list(command), _exec_options(options),
                                  0, 1, 2, unix_fds=[stdin, stdout, stderr])
        return int(code)

    async def exec_start(self, ref: str, command: Sequence[str], **options: Any) -> str:
        (exec_id,) = await self.call("ExecStart", "sasa{sv}", ref, list(command), _exec_options(options))
        return str(exec_id)

    async def exec_with_pty(self, ref: str, command: Sequence[str], **options: Any) -> tuple[str, int]:
        """Starts command on a pseudo-terminal of the container: (exec id, the terminal's master).

        The master is yours to close: read the command's output from it,
        write its input, set its size with TIOCSWINSZ (linux.set_size). Options
        are ExecStart's and rows, cols: its first size. Its end: exec_wait.
        """
        reply = await self.call_reply("ExecWithPty", "sasa{sv}", ref, list(command), _exec_options(options))
        fds = list(reply.unix_fds)
        exec_id, index = reply.body
        if not 0 <= index < len(fds):
            _close_all(fds)
            raise errors.QuiltError("ExecWithPty answered without the terminal (does the connection pass "
                                    "descriptors?)")
        _close_all([fd for i, fd in enumerate(fds) if i != index])
        return str(exec_id), fds[index]

    async def exec_wait(self, exec_id: str, timeout_usec: int = 0) -> tuple[str, int]:
        state, code = await self.call("ExecWait", "st", exec_id, timeout_usec)
        return state, code

    async def exec_kill(self, exec_id: str, signal: int) -> None:
        await self.call("ExecKill", "si", exec_id, signal)

    async def list_execs(self, ref: str) -> list[tuple[str, str, list[str], int, int]]:
        (rows,) = await self.call("ListExecs", "s", ref)
        return [tuple(r) for r in rows]

    async def logs(self, ref: str, **options: Any) -> list[tuple[int, str, str]]:
        (rows,) = await self.call("GetLogs", "sa{sv}", ref, _log_options(options))
        return [tuple(r) for r in rows]

    async def logs_raw(self, ref: str, **options: Any) -> list[tuple[int, str, bytes]]:
        (rows,) = await self.call("GetLogsRaw", "sa{sv}", ref, _log_options(options))
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    async def follow_logs(self, ref: str, fd: int, **options: Any) -> None:
        """The daemon writes `<usec> <stream> <line>\\n` to (its copy of) fd; close yours of the write end."""
        await self.call("FollowLogs", "sa{sv}h", ref, _log_options(options), 0, unix_fds=[fd])

    async def copy_in(self, ref: str, path: str, fd: int, **options: Any) -> dict[str, Any]:
        """Extracts the tar stream the daemon reads from (its copy of) fd at path; close your write end."""
        variants = {k: Variant("t", v) for k, v in options.items()}
        (info,) = await self.call("CopyInEx", "ssha{sv}", ref, path, 0, variants, unix_fds=[fd])
        return {k: v.value for k, v in info.items()}

    async def copy_out(self, ref: str, path: str, fd: int, **options: Any) -> dict[str, Any]:
        """The daemon writes path as a tar stream to (its copy of) fd; close your copy of the write end.

        max_bytes=N caps the stream: over it, LimitExceeded, and the stream ends early.
        """
        variants = {k: Variant("t", v) for k, v in options.items()}
        (info,) = await self.call("CopyOutEx", "ssha{sv}", ref, path, 0, variants, unix_fds=[fd])
        return {k: v.value for k, v in info.items()}

    async def export(self, ref: str, fd: int) -> dict[str, Any]:
        """The daemon writes the container's root filesystem (as docker export) as a tar stream to fd."""
        (info,) = await self.call("ExportContainer", "sh", ref, 0, unix_fds=[fd])
        return {k: v.value for k, v in info.items()}

    async def watch_states(self, callback: Callable[[StateChange], None]) -> None:
        """Calls back for every ContainerStateChanged signal from now on."""
        await self.watch_signal("ContainerStateChanged", lambda body: callback(StateChange(*body)))

    async def watch_signal(self, member: str, callback: Callable[[list[Any]], None], *,
                           interface: str = MANAGER_INTERFACE, path_namespace: str = "") -> None:
        """Calls back with the body of every signal `member` of the manager from now on.

        `interface` names another interface than the manager's. With
        `path_namespace`, only signals of the objects at or below that path
        count, and the callback gets the object's path before the body.
        """
        rule = f"type='signal',sender='{BUS_NAME}',interface='{interface}',member='{member}'"
        if path_namespace:
            rule += f",path_namespace='{path_namespace}'"
        await self.call("AddMatch", "s", rule,
                        path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                        destination="org.freedesktop.DBus")

        def handler(msg: Message) -> bool:
            if msg.message_type != MessageType.SIGNAL or msg.member != member or msg.interface != interface:
                return False
            if not path_namespace:
                callback(list(msg.body))
            elif msg.path == path_namespace or msg.path.startswith(path_namespace + "/"):
                callback([msg.path, *msg.body])
            return False

        self.bus.add_message_handler(handler)


LOG_OPTION_TYPES = {"since_usec": "t", "tail": "u", "stream": "s", "exec_id": "s"}


def _plain(value: Any) -> Any:
    """value as dbus-next marshals it: every tuple or list a list, every bytes-like bytes, at any depth."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def variant(signature: str, value: Any) -> Variant:
    """A Variant of value, whose structs and arrays may be tuples or lists (dbus-next wants lists)."""
    return Variant(signature, _plain(value))


def _import_options(max_bytes: int | None, ref: str | None) -> dict[str, Variant]:
    options = {} if max_bytes is None else {"max_bytes": Variant("t", max_bytes)}
    if ref is not None:
        options["ref"] = Variant("s", ref)
    return options


def _log_options(options: dict[str, Any]) -> dict[str, Variant]:
    return {k: variant(LOG_OPTION_TYPES[k], v) for k, v in options.items()}


def _exec_options(options: dict[str, Any]) -> dict[str, Variant]:
    return {k: variant(EXEC_OPTION_TYPES[k], v) for k, v in options.items()}


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls a condition a client observes through signals; for tests and tools."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class ContainerSummary:
    id: str
    name: str
    image: str
    state: str
    path: str


@dataclass(frozen=True)
class ImageSummary:
    name: str
    id: str
    size_bytes: int
    created_usec: int


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class ExecSummary:
    id: str
    state: str
    command: list[str]
    exit_code: int
    created_usec: int


@dataclass(frozen=True)
class LogLine:
    usec: int
    stream: str
    line: str


class Quilt:
    """The API without asyncio, for scripts and platforms that are not async.

    Each call runs the asyncio client on a private event loop; use one Quilt
    per thread. Errors are the same QuiltError classes.
    """

    def __init__(self, address: str | None = None, timeout: float = CALL_TIMEOUT) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(QuiltClient.connect(address, timeout))

    def close(self) -> None:
        self._client.close()
        self._loop.close()

    def __enter__(self) -> Quilt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def create(self, name: str, image: str, command: Sequence[str], **options: Any) -> str:
        """Creates (and, unless start=False, starts) a container; returns its id."""
        container_id, _ = self._run(self._client.create(name, image, command, **options))
        return container_id

    def start(self, ref: str) -> None:
        self._run(self._client.start(ref))

    def commit(self, ref: str, image: str, **options: Any) -> str:
        """Makes image from the container's filesystem as it is now; returns the image's id."""
        return self._run(self._client.commit(ref, image, **options))

    def fork(self, ref: str, names: Sequence[str], **options: Any) -> list[str]:
        """Makes containers that start from the container's filesystem; returns their ids."""
        return [cid for cid, _ in self._run(self._client.fork(ref, names, **options))]

    def checkpoint(self, ref: str) -> None:
        self._run(self._client.checkpoint(ref))

    def restore(self, ref: str) -> None:
        self._run(self._client.restore(ref))

    def stop(self, ref: str, timeout_sec: int = 10) -> None:
        self._run(self._client.stop(ref, timeout_sec))

    def kill(self, ref: str, signal: int) -> None:
        self._run(self._client.kill(ref, signal))

    def pause(self, ref: str) -> None:
        self._run(self._client.pause(ref))

    def resume(self, ref: str) -> None:
        self._run(self._client.resume(ref))

    def remove(self, ref: str, force: bool = False) -> None:
        self._run(self._client.remove(ref, force))

    def wait(self, ref: str, timeout_usec: int = 0) -> tuple[str, int]:
        return self._run(self._client.wait(ref, timeout_usec))

    def wait_started(self, ref: str, timeout_usec: int = 0) -> str:
        return self._run(self._client.wait_started(ref, timeout_usec))

    def info(self, ref: str) -> dict[str, Any]:
        return self._run(self._client.info(ref))

    def containers(self, **filters: Any) -> list[ContainerSummary]:
        return [ContainerSummary(*row) for row in self._run(self._client.list_containers(**filters))]

    def exec(self, ref: str, command: Sequence[str], **options: Any) -> ExecResult:
        return ExecResult(*self._run(self._client.exec(ref, command, **options)))

    def exec_start(self, ref: str, command: Sequence[str], **options: Any) -> str:
        return self._run(self._client.exec_start(ref, command, **options))

    def exec_wait(self, exec_id: str, timeout_usec: int = 0) -> tuple[str, int]:
        return self._run(self._client.exec_wait(exec_id, timeout_usec))

    def exec_with_pty(self, ref: str, command: Sequence[str], **options: Any) -> tuple[str, int]:
        """(exec id, master of its terminal): see QuiltClient.exec_with_pty."""
        return self._run(self._client.exec_with_pty(ref, command, **options))

    def exec_kill(self, exec_id: str, signal: int) -> None:
        self._run(self._client.exec_kill(exec_id, signal))

    def list_execs(self, ref: str) -> list[ExecSummary]:
        return [ExecSummary(row[0], row[1], list(row[2]), row[3], row[4])
                for row in self._run(self._client.list_execs(ref))]

    def exec_with_fds(self, ref: str, command: Sequence[str], stdin: int, stdout: int, stderr: int,
                      **options: Any) -> int:
        return self._run(self._client.exec_with_fds(ref, command, stdin, stdout, stderr, **options))

    def logs(self, ref: str, **options: Any) -> list[LogLine]:
        return [LogLine(*row) for row in self._run(self._client.logs(ref, **options))]

    def copy_in(self, ref: str, path: str, fd: int, **options: Any) -> dict[str, Any]:
        """Extracts the tar stream in fd (a file, or a pipe another thread writes) at path."""
        return self._run(self._client.copy_in(ref, path, fd, **options))

    def copy_out(self, ref: str, path: str, fd: int, **options: Any) -> dict[str, Any]:
        """Writes path as a tar stream to fd (a file, or a pipe another thread reads); max_bytes=N caps it."""
        return self._run(self._client.copy_out(ref, path, fd, **options))

    def import_image(self, name: str, source: str, ref: str | None = None) -> str:
        return self._run(self._client.import_image(name, source, ref=ref))

    def pull(self, name: str, source: str, timeout_sec: int | None = None) -> str:
        """Imports from a registry or an archive transport; see QuiltClient.pull."""
        return self._run(self._client.pull(name, source, timeout_sec=timeout_sec))

    def import_image_fd(self, name: str, fd: int, ref: str | None = None) -> str:
        """Imports the archive or OCI layout directory you opened as fd (read with your permissions)."""
        return self._run(self._client.import_image_fd(name, fd, ref=ref))

    def import_image_ex(self, name: str, source: str, ref: str | None = None) -> dict[str, Any]:
        """import_image answering Name, Id, SizeBytes, Format and SkippedDevices (device nodes left out)."""
        return self._run(self._client.import_image_ex(name, source, ref=ref))

    def import_image_fd_ex(self, name: str, fd: int, ref: str | None = None) -> dict[str, Any]:
        """import_image_fd answering as import_image_ex."""
        return self._run(self._client.import_image_fd_ex(name, fd, ref=ref))

    def images(self) -> list[ImageSummary]:
        return [ImageSummary(*row) for row in self._run(self._client.images())]

    def remove_image(self, name: str) -> None:
        self._run(self._client.remove_image(name))

    def create_volume(self, name: str) -> None:
        self._run(self._client.create_volume(name))

    def remove_volume(self, name: str) -> None:
        self._run(self._client.remove_volume(name))
