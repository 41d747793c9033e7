# D-Bus signatures are string annotations that dbus-next reads; they are not Python types.
# mypy: disable-error-code="name-defined,valid-type,empty-body"
"""org.quilt.Quilt1.Manager at /org/quilt/Quilt1."""

import os

from dbus_next.service import ServiceInterface, method, signal
from dbus_next.signature import Variant

from quiltd.bus import convert
from quiltd.bus.copies import CopyMethods
from quiltd.bus.errors import bus_errors
from quiltd.bus.execs import ExecMethods
from quiltd.bus.gate import caller
from quiltd.bus.logs import LogMethods
from quiltd.core import parse
from quiltd.core.checkpoints import Checkpoints
from quiltd.core.copies import Copies
from quiltd.core.execs import Execs
from quiltd.core.logs import Logs
from quiltd.core.manager import ImportResult, Manager
from quiltd.core.snapshots import Snapshots
from quiltd.names import MANAGER_INTERFACE, container_path


class ManagerInterface(ExecMethods, LogMethods, CopyMethods, ServiceInterface):
    def __init__(self, manager: Manager, execs: Execs, logs: Logs, copies: Copies, snapshots: Snapshots,
                 checkpoints: Checkpoints) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._m = manager
        self._execs = execs
        self._logs = logs
        self._copies = copies
        self._snapshots = snapshots
        self._checkpoints = checkpoints

    @method()
    @bus_errors
    async def CreateContainer(self, name: "s", image: "s", command: "as", options: "a{sv}") -> "so":
        c = await self._m.create(name, image, command, convert.request(parse.create_options, options),
                                 caller=caller())
        return [c.id, container_path(c.id)]

    @method()
    @bus_errors
    async def StartContainer(self, ref: "s") -> None:
        await self._m.start(ref)

    @method()
    @bus_errors
    async def StopContainer(self, ref: "s", timeout_sec: "u") -> None:
        await self._m.stop(ref, timeout_sec)

    @method()
    @bus_errors
    async def KillContainer(self, ref: "s", signal: "i") -> None:
        await self._m.kill(ref, signal)

    @method()
    @bus_errors
    async def PauseContainer(self, ref: "s") -> None:
        await self._m.pause(ref)

    @method()
    @bus_errors
    async def ResumeContainer(self, ref: "s") -> None:
        await self._m.resume(ref)

    @method()
    @bus_errors
    async def RemoveContainer(self, ref: "s", force: "b") -> None:
        await self._m.remove(ref, force)

    @method()
    @bus_errors
    async def WaitContainer(self, ref: "s", timeout_usec: "t") -> "si":
        c = await self._m.wait(ref, timeout_usec)
        return [c.state.value, c.exit_code]

    @method()
    @bus_errors
    async def WaitContainerStarted(self, ref: "s", timeout_usec: "t") -> "s":
        return (await self._m.wait_started(ref, timeout_usec)).state.value

    @method()
    @bus_errors
    async def GetContainer(self, ref: "s") -> "o":
        return container_path(self._m.get(ref).id)

    @method()
    @bus_errors
    async def GetContainerInfo(self, ref: "s") -> "a{sv}":
        return convert.container_info(await self._m.info(ref))

    @method()
    @bus_errors
    async def ListContainers(self, filter: "a{sv}") -> "a(sssso)":
        wanted = convert.request(parse.container_filter, filter)
        return [convert.container_row(c) for c in self._m.list_containers(wanted)]

    @method()
    @bus_errors
    async def ImportImage(self, name: "s", source: "s", options: "a{sv}") -> "s":
        result = await self._m.import_image(name, source, convert.request(parse.import_options, options),
                                            caller=caller())
        return result.image.id

    @method()
    @bus_errors
    async def ImportImageEx(self, name: "s", source: "s", options: "a{sv}") -> "a{sv}":
        result = await self._m.import_image(name, source, convert.request(parse.import_options, options),
                                            caller=caller())
        return convert.import_result(result)

    @method()
    @bus_errors
    async def ImportImageFd(self, name: "s", fd: "h", options: "a{sv}") -> "s":
        return (await self._import_fd(name, fd, options)).image.id

    @method()
    @bus_errors
    async def ImportImageFdEx(self, name: "s", fd: "h", options: "a{sv}") -> "a{sv}":
        return convert.import_result(await self._import_fd(name, fd, options))

    async def _import_fd(self, name: str, fd: int, options: dict[str, Variant]) -> ImportResult:
        try:
            who, opts = caller(), convert.request(parse.import_options, options)
        except BaseException:
            os.close(fd)  # the core takes it over only once called
            raise
        return await self._m.import_image_fd(name, fd, opts, caller=who)

    @method()
    @bus_errors
    async def ListImages(self) -> "a(sstt)":
        return [[i.name, i.id, i.size_bytes, i.created_usec] for i in self._m.list_images()]

    @method()
    @bus_errors
    async def RemoveImage(self, name: "s") -> None:
        await self._m.remove_image(name)

    @method()
    @bus_errors
    async def CreateNetwork(self, name: "s", options: "a{sv}") -> "s":
        network = await self._m.create_network(name, convert.request(parse.network_options, options))
        return network.subnet

    @method()
    @bus_errors
    async def RemoveNetwork(self, name: "s") -> None:
        await self._m.remove_network(name)

    @method()
    @bus_errors
    async def ListNetworks(self) -> "a(sssss)":
        return [[n.name, n.subnet, n.gateway, n.bridge, n.egress] for n in self._m.list_networks()]

    @method()
    @bus_errors
    async def RemoveImageEx(self, name: "s", options: "a{sv}") -> None:
        await self._m.remove_image(name, convert.request(parse.remove_image_options, options))

    @method()
    @bus_errors
    async def CreateVolume(self, name: "s") -> None:
        self._m.volumes.create(name)

    @method()
    @bus_errors
    async def RemoveVolume(self, name: "s") -> None:
        await self._m.volumes.remove(name)

    @method()
    @bus_errors
    async def ListVolumes(self) -> "a(sst)":
        return [[v.name, v.path, size] for v, size in await self._m.volumes.list()]

    @method()
    @bus_errors
    async def SetWarmPool(self, image: "s", size: "u", options: "a{sv}") -> None:
        wanted = convert.request(parse.pool_options, options)
        await self._m.set_warm_pool(image, size, wanted, caller=caller())

    @method()
    @bus_errors
    async def ListWarmPools(self) -> "a(sa{sv}uu)":
        return [convert.warm_pool(state) for state in self._m.warm_pools()]

    @method()
    @bus_errors
    async def ExportImage(self, name: "s", fd: "h", format: "s") -> "a{sv}":
        exported = await self._m.export_image(name, fd, format)
        return {"bytes": Variant("t", exported.bytes), "id": Variant("s", exported.config_digest)}

    @method()
    @bus_errors
    async def GetSystemInfo(self) -> "a{sv}":
        return convert.system_info(self._m.system_info())

    @method()
    @bus_errors
    async def GetCleanupStatus(self) -> "a(ssuts)":
        return [[t.kind.value, t.target, t.attempts, t.next_usec, t.last_error]
                for t in self._m.cleanup_status()]

    @method()
    @bus_errors
    async def CommitContainer(self, ref: "s", image: "s", options: "a{sv}") -> "s":
        made = await self._snapshots.commit(ref, image, convert.request(parse.commit_options, options),
                                              caller=caller())
        return made.id

    @method()
    @bus_errors
    async def ForkContainer(self, ref: "s", names: "as", options: "a{sv}") -> "a(so)":
        forks = await self._snapshots.fork(ref, names, convert.request(parse.fork_options, options),
                                            caller=caller())
        return [[c.id, container_path(c.id)] for c in forks]

    @method()
    @bus_errors
    async def CheckpointContainer(self, ref: "s", options: "a{sv}") -> None:
        convert.request(parse.no_options, options)
        await self._checkpoints.checkpoint(ref)

    @method()
    @bus_errors
    async def RestoreContainer(self, ref: "s", options: "a{sv}") -> None:
        convert.request(parse.no_options, options)
        await self._checkpoints.restore(ref)

    @signal()
    def ContainerStateChanged(self, id: str, name: str, state: str, exit_code: int) -> "sssi":
        return [id, name, state, exit_code]

    @signal()
    def ImportProgress(self, name: str, bytes_read: int, bytes_total: int) -> "stt":
        return [name, bytes_read, bytes_total]

    @signal()
    def ContainerRemoved(self, id: str, name: str) -> "ss":
        return [id, name]

