"""The host agent: one Ray actor per host, the only way the cluster reaches a host's quiltd.

It runs on its host's Ray node and talks to the local quiltd over the
system bus with quiltd's own client, so nothing on the host is exposed but
what Ray already carries. It is an async actor: calls from many drivers
run together on one event loop and one D-Bus connection, and the batched
calls (exec_many, create_many) cost one Ray round trip for many sandboxes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from quiltd import errors
from quiltd.client import ExecResult, LogLine, QuiltClient
from quiltd.cluster.records import CLUSTER_LABEL, HostInfo, SandboxRecord, SandboxSummary

# Bounds the execs one batch runs at once on a host, so one driver's batch
# does not queue hundreds of execs on quiltd's turns at a time.
BATCH_CONCURRENCY = 32
_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"


class HostAgent:
    def __init__(self, bus_address: str | None = None) -> None:
        self._bus_address = bus_address
        self._client: QuiltClient | None = None
        self.name = socket.gethostname()

    async def _quilt(self) -> QuiltClient:
        if self._client is None or not self._client.bus.connected:
            self._client = await QuiltClient.connect(self._bus_address)
        return self._client

    async def host_info(self, node_id: str) -> HostInfo:
        """What placement needs; raises when quiltd does not answer, and then nothing is placed here."""
        q = await self._quilt()
        info = await q.system_info()
        if "CPUs" not in info:
            raise errors.NotSupported(f"{errors.NotSupported.dbus_name}: quiltd on {self.name} "
                                      "reports no capacity (GetSystemInfo has no CPUs): upgrade it")
        counts: Mapping[str, int] = info["Containers"]
        images = frozenset(row[0] for row in await q.images())
        return HostInfo(
            self.name, node_id, float(info["CPUs"]), int(info["MemoryBytes"]), float(info["CPUReserved"]),
            int(info["MemoryReserved"]),
            sum(counts.get(s, 0) for s in ("created", "starting", "running", "stopping")), images,
        )

    async def create(self, name: str, image: str, command: Sequence[str], options: Mapping[str, Any],
                     pull: str | None = None) -> str:
        q = await self._quilt()
        if pull is not None and image not in {row[0] for row in await q.images()}:
            await q.pull(image, pull)
        labels = {**options.get("labels", {}), CLUSTER_LABEL: "1"}
        cid, _ = await q.create(name, image, command, **{**options, "labels": labels})
        return cid

    async def exec(self, ref: str, command: Sequence[str], options: Mapping[str, Any]) -> ExecResult:
        return ExecResult(*await (await self._quilt()).exec(ref, command, **options))

    async def exec_many(self, refs: Sequence[str], command: Sequence[str],
                        options: Mapping[str, Any]) -> list[ExecResult | errors.QuiltError]:
        """One exec per ref, run together; each answer is its result or the QuiltError it met."""
        q = await self._quilt()
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(ref: str) -> ExecResult | errors.QuiltError:
            async with gate:
                try:
                    return ExecResult(*await q.exec(ref, command, **options))
                except errors.QuiltError as e:
                    return e

        return list(await asyncio.gather(*(one(r) for r in refs)))

    async def hostname(self) -> str:
        return self.name

    async def wait_started(self, ref: str) -> str:
        return await (await self._quilt()).wait_started(ref)

    async def wait_started_many(self, refs: Sequence[str]) -> list[str | errors.QuiltError]:
        q = await self._quilt()

        async def one(ref: str) -> str | errors.QuiltError:
            try:
                return await q.wait_started(ref)
            except errors.QuiltError as e:
                return e

        return list(await asyncio.gather(*(one(r) for r in refs)))

    async def exec_start(self, ref: str, command: Sequence[str], options: Mapping[str, Any]) -> str:
        return await (await self._quilt()).exec_start(ref, command, **options)

    async def exec_wait(self, ref: str, exec_id: str, timeout_usec: int) -> tuple[str, int]:
        # ref: the sandbox the exec runs in, which routed the call here.
        return await (await self._quilt()).exec_wait(exec_id, timeout_usec)

    async def copy_in(self, ref: str, path: str, tar: bytes) -> dict[str, Any]:
        # A memfd, not a pipe: the whole stream is here already, and quiltd
        # reads a file descriptor as well as a pipe.
        fd = os.memfd_create("quilt-copy-in")
        try:
            os.write(fd, tar)
            os.lseek(fd, 0, os.SEEK_SET)
            return await (await self._quilt()).copy_in(ref, path, fd)
        finally:
            os.close(fd)

    async def copy_out(self, ref: str, path: str, max_bytes: int) -> bytes:
        fd = os.memfd_create("quilt-copy-out")
        try:
            await (await self._quilt()).copy_out(ref, path, fd, max_bytes=max_bytes)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    async def logs(self, ref: str, options: Mapping[str, Any]) -> list[LogLine]:
        return [LogLine(*row) for row in await (await self._quilt()).logs(ref, **options)]

    async def info(self, ref: str) -> dict[str, Any]:
        return await (await self._quilt()).info(ref)

    async def remove(self, ref: str, force: bool) -> None:
        await (await self._quilt()).remove(ref, force)

    async def pause(self, ref: str) -> None:
        await self._optional("PauseContainer", ref)

    async def resume(self, ref: str) -> None:
        await self._optional("ResumeContainer", ref)

    async def _optional(self, member: str, ref: str) -> None:
        try:
            await (await self._quilt()).call(member, "s", ref)
        except errors.QuiltError as e:
            if _UNKNOWN_METHOD in str(e):
                raise errors.NotSupported(f"{errors.NotSupported.dbus_name}: quiltd on {self.name} "
                                          f"has no {member}") from None
            raise

    async def sandboxes(self) -> list[SandboxSummary]:
        """The containers the cluster made on this host (those with its label)."""
        q = await self._quilt()
        rows = await q.list_containers(labels={CLUSTER_LABEL: "1"})
        return [SandboxSummary(name, self.name, cid, image, state) for cid, name, image, state, _ in rows]

    async def records(self) -> list[SandboxRecord]:
        """The cluster's containers here as registry records: what a registry that lost them takes back."""
        q = await self._quilt()
        found = await self.sandboxes()
        infos = await asyncio.gather(*(q.info(s.id) for s in found), return_exceptions=True)
        return [SandboxRecord(s.name, self.name, s.id, s.image,
                              tuple(i.get("Command", ())) if isinstance(i, dict) else ())
                for s, i in zip(found, infos, strict=True)]
