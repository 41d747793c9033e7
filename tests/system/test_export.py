"""ExportContainer and quiltctl export: a container's filesystem as a tar archive, as docker export."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import threading
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import REPO, records, run

pytestmark = pytest.mark.system

QUILTCTL = str(REPO / ".venv/bin/quiltctl")
WRITE = "echo agent > /work.txt; mkdir -p /srv/data; echo kept > /srv/data/f; rm /etc/hostname; " \
        "echo scratch > /scratch/s"


async def export(q: Any, ref: str) -> tuple[tarfile.TarFile, dict[str, Any]]:
    """The archive ExportContainer writes, read from a pipe while it is written."""
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        with os.fdopen(r, "rb") as f:
            chunks.append(f.read())

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        info = await q.export(ref, w)
    finally:
        os.close(w)
        await asyncio.get_running_loop().run_in_executor(None, reader.join)
    return tarfile.open(fileobj=io.BytesIO(b"".join(chunks))), info


def members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    return {m.name.removeprefix("./").rstrip("/"): m for m in archive.getmembers()}


def read(archive: tarfile.TarFile, name: str) -> bytes:
    member = members(archive)[name]
    f = archive.extractfile(member)
    assert f is not None
    return f.read()


def test_export_holds_image_and_writes_but_not_mounts(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", f"{WRITE}; sleep 600"],
                           tmpfs=[("/scratch", 1 << 20)])
            assert await q.wait_started(name) == "running"
            await asyncio.sleep(0.5)  # the writes are done
            for state in ("running", "paused", "exited"):
                if state == "paused":
                    await q.pause(name)
                if state == "exited":
                    await q.stop(name, 0)
                assert (await q.info(name))["State"] == state
                archive, info = await export(q, name)
                found = members(archive)
                assert read(archive, "work.txt") == b"agent\n", state
                assert read(archive, "srv/data/f") == b"kept\n", state
                assert found["bin/busybox"].isfile(), state  # from the image
                assert "etc/hostname" not in found, state  # deleted by the container
                assert "etc/passwd" in found, state
                # Mounts are not its filesystem: no /proc or /dev contents, no tmpfs files.
                assert not [n for n in found if n.startswith(("proc/", "sys/", "dev/", "scratch/"))], state
                assert info["entries"] == len(archive.getmembers()) and info["bytes"] > 0
            await q.remove(name)

    run(scenario())


def test_export_shows_owners_as_the_container_sees_them_with_userns(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "touch /mine; chown 1000:1000 /mine; sleep 600"],
                           userns=True)
            assert await q.wait_started(name) == "running"
            await asyncio.sleep(0.5)
            await q.pause(name)
            archive, _ = await export(q, name)
            found = members(archive)
            assert (found["mine"].uid, found["mine"].gid) == (1000, 1000)
            assert (found["bin/busybox"].uid, found["etc/passwd"].uid) == (0, 0)
            await q.remove(name, force=True)

    run(scenario())


def test_export_of_a_never_started_container_is_its_image(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["true"], start=False)
            archive, _ = await export(q, name)
            assert members(archive)["bin/busybox"].isfile()
            await q.remove(name)

    run(scenario())


def test_export_refuses_bad_input(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            r, w = os.pipe()
            try:
                with pytest.raises(errors.NoSuchContainer):
                    await q.export(f"{name}-none", w)
                await q.create(name, "busybox", ["sleep", "600"], disk_max=8 << 20)
                assert await q.wait_started(name) == "running"
                with pytest.raises(errors.InvalidArgument, match="writ"):
                    await q.export(name, r)  # the read end
                with pytest.raises(errors.InvalidState, match="disk_max"):
                    await q.export(name, w)
                await q.stop(name, 0)
                with pytest.raises(errors.InvalidState, match="ExportImage"):
                    await q.export(name, w)  # stopped: its writes are gone with it
            finally:
                os.close(r)
                os.close(w)
            await q.remove(name, force=True)
            assert await records(q) == before

    run(scenario())


def test_quiltctl_export(sandbox: Any, busybox_image: str, name: str) -> None:
    out = f"/var/tmp/{name}.tar"
    sandbox.run([QUILTCTL, "run", "-d", "--name", name, "busybox", "sh", "-c", "echo hi > /hi; sleep 600"])
    try:
        sandbox.run(["sh", "-c", f"sleep 0.5; {QUILTCTL} export -o {out} {name}"])
        listing = sandbox.run(["tar", "-tvf", out]).stdout.decode()
        assert any(line.endswith((" ./hi", " hi")) for line in listing.splitlines()), listing
        piped = sandbox.run(["sh", "-c", f"{QUILTCTL} export {name} | tar -tf -"]).stdout.decode()
        assert {n.removeprefix("./") for n in piped.split()} >= {"hi", "bin/busybox", "etc/passwd"}
        missing = sandbox.run([QUILTCTL, "export", "-o", f"{out}.2", f"{name}-none"], check=False)
        assert missing.returncode != 0 and b"NoSuchContainer" in missing.stderr
        assert sandbox.run(["test", "-e", f"{out}.2"], check=False).returncode != 0  # no half archive
    finally:
        sandbox.run(["rm", "-f", out])
        sandbox.run([QUILTCTL, "rm", "-f", name])
