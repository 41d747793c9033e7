"""Named volumes: made on first use, shared, kept after the container, removable once unused."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from tests.system.conftest import run
from tests.system.test_mounts import journal_lines_until
from tests.system.test_security import journal_lines, run_to_end

pytestmark = pytest.mark.system

STATE_DIR = "/var/lib/quilt"


def volume_name() -> str:
    return f"vol-{secrets.token_hex(4)}"


def test_volume_outlives_its_container_and_is_removed_once_unused(sandbox: Any, quilt: Any,
                                                                  name: str) -> None:
    vol = volume_name()
    path = f"{STATE_DIR}/volumes/{vol}"
    cid, code = run_to_end(quilt, name, "busybox",
                           ["sh", "-c", "echo kept > /data/file && echo done 0"],
                           volumes=[[vol, "/data", False]])
    assert code == 0, journal_lines(sandbox, cid)
    # The container is gone (run_to_end removes it); the volume and its file are not.
    assert sandbox.run(["cat", f"{path}/file"]).stdout == b"kept\n"

    async def scenario() -> None:
        async with quilt() as q:
            listed = {n: (p, size) for n, p, size in await q.volumes()}
            assert listed[vol] == (path, 5)
            reader = f"{name}-r"
            script = "cat /ro/file; touch /ro/x 2>/dev/null || echo refused"
            await q.create(reader, "busybox", ["sh", "-c", script],
                           volumes=[[vol, "/ro", True]], start=False)
            try:
                with pytest.raises(errors.InvalidState, match=reader):
                    await q.remove_volume(vol)
                await q.start(reader)
                assert await q.wait(reader, 30_000_000) == ("exited", 0)
                cid = (await q.info(reader))["Id"]
            finally:
                await q.remove(reader, force=True)
            assert journal_lines_until(sandbox, cid, "refused") == ["kept", "refused"]
            await q.remove_volume(vol)
            assert vol not in [n for n, _, _ in await q.volumes()]
            with pytest.raises(errors.NoSuchVolume):
                await q.remove_volume(vol)

    run(scenario())
    assert sandbox.run(["test", "-e", path], check=False).returncode != 0


def test_create_volume_then_name_taken_and_bad_names(quilt: Any) -> None:
    vol = volume_name()

    async def scenario() -> None:
        async with quilt() as q:
            await q.create_volume(vol)
            try:
                assert (vol, f"{STATE_DIR}/volumes/{vol}", 0) in await q.volumes()
                with pytest.raises(errors.NameTaken):
                    await q.create_volume(vol)
            finally:
                await q.remove_volume(vol)
            for bad in ("-x", "a/b", "..", "", "x" * 64):
                with pytest.raises(errors.InvalidArgument, match="volume name"):
                    await q.create_volume(bad)

    run(scenario())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"volumes": Variant("a(ssb)", [["../etc", "/data", False]])}, "volume name"),
        ({"volumes": Variant("a(ssb)", [["ok", "data", False]])}, "absolute"),
        ({"volumes": Variant("a(ssb)", [["ok", "/proc/x", False]])}, "under /proc"),
        ({"volumes": Variant("a(ssb)", [["ok", "/a", False], ["ok", "/b", False]])}, "more than once"),
        ({"volumes": Variant("a(ssb)", [["ok", "/a", False], ["ok2", "/a", False]])}, "conflicting"),
        ({"volumes": Variant("a(ssb)", [["ok", "/a", False]]),
          "mounts": Variant("a(ssb)", [["/var/tmp", "/a", True]])}, "conflicting"),
        ({"volumes": Variant("a(ssb)", [["ok", "/a", False]]),
          "tmpfs": Variant("a(st)", [["/a", 1 << 20]])}, "conflicting"),
        ({"volumes": Variant("as", ["ok:/a"])}, "is not"),
    ],
)
def test_bad_volumes_are_named_and_make_nothing(sandbox: Any, quilt: Any, options: dict[str, Variant],
                                                message: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = (await q.list_containers(), await q.volumes())
            with pytest.raises(errors.InvalidArgument, match=message):
                await q.call("CreateContainer", "ssasa{sv}", "bad-volume", "busybox", ["true"], options)
            assert (await q.list_containers(), await q.volumes()) == before

    run(scenario())
    assert sandbox.run(["test", "-e", f"{STATE_DIR}/volumes/ok"], check=False).returncode != 0


def test_a_refused_create_makes_no_volume(sandbox: Any, quilt: Any, name: str) -> None:
    vol = volume_name()

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.NoSuchImage):
                await q.create(name, "no-such-image", ["true"], volumes=[[vol, "/data", False]])
            assert vol not in [n for n, _, _ in await q.volumes()]

    run(scenario())
    assert sandbox.run(["test", "-e", f"{STATE_DIR}/volumes/{vol}"], check=False).returncode != 0
