"""Trees a container controls are removed whole, however deep, and nothing outside them goes."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import eventually, run
from tests.system.test_copy import _running, copy_in, copy_out, make_tar, members

pytestmark = pytest.mark.system

DEPTH = 100_000


def _deep_chain(top: Path, depth: int, link_to: str) -> None:
    """top/d/d/.../d, depth levels, a symlink to link_to and a file every 10,000 levels.

    Made through directory descriptors, as a process inside the container
    would: the path of the bottom is far past PATH_MAX.
    """
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if level % 10_000 == 0:
                os.symlink(link_to, "out", dir_fd=fd)
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_tree_100000_levels_deep_is_replaced_by_copy_in_and_removed_with_its_container(
        sandbox: Any, quilt: Any, name: str) -> None:
    tag = secrets.token_hex(4)
    canary = f"/var/tmp/quilt-canary-{tag}"
    host_canary = sandbox.host_path(canary)
    host_canary.mkdir()
    (host_canary / "precious").write_bytes(b"host secret\n")

    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["true"])
            assert await q.wait(name, 20_000_000) == ("exited", 0)
            layer = sandbox.host_path(f"/var/lib/quilt/containers/{cid}")
            # What a container can leave in its writable layer: a tree far deeper
            # than any recursion or descriptor limit, with links to the host's files.
            _deep_chain(layer / "upper" / "deep", DEPTH, canary)
            # CopyIn of a file where the tree is: the tree goes first.
            started = time.monotonic()
            payload = make_tar({"deep": b"a file now\n"})
            assert await copy_in(q, name, "/", payload) == {"bytes": len(payload), "entries": 1}
            print(f"CopyIn replaced a tree {DEPTH} levels deep in {time.monotonic() - started:.1f} s")
            assert members(await copy_out(q, name, "/deep")) == {"deep": b"a file now\n"}
            # Removing the container removes its layer, deep tree and all.
            (layer / "upper" / "deep").unlink()
            _deep_chain(layer / "upper" / "deep", DEPTH, canary)
            await q.remove(name)

            async def gone() -> bool:
                return not layer.exists()

            await eventually(gone, timeout=300)
            assert (await q.system_info())["Version"]  # the daemon is unharmed

    try:
        run(scenario())
        assert sorted(os.listdir(host_canary)) == ["precious"]
        assert (host_canary / "precious").read_bytes() == b"host secret\n"
    finally:
        (host_canary / "precious").unlink(missing_ok=True)
        host_canary.rmdir()


def test_copy_in_replaces_a_tree_the_container_keeps_swapping_for_links(
        sandbox: Any, quilt: Any, name: str) -> None:
    """While CopyIn removes /work/x to put a file there, the container rebuilds x and swaps its
    directories for links to / and to the host's path of a canary."""
    tag = secrets.token_hex(4)
    canary = f"/var/tmp/quilt-canary-{tag}"
    host_canary = sandbox.host_path(canary)
    host_canary.mkdir()
    (host_canary / "precious").write_bytes(b"host secret\n")
    swap = ("mkdir -p /work; echo mine > /keep; while true; do "
            "[ -d /work/x ] || { rm -f /work/x; mkdir /work/x; }; "
            "mkdir -p /work/x/a/b/c /work/x/e && echo x > /work/x/a/b/c/f; "
            f"ln -s / /work/x/a/b/root; ln -s {canary} /work/x/a/b/c/canary; "
            "mv /work/x/a /work/x/moved && ln -s / /work/x/a; "
            f"mv /work/x/e /work/x/e2 && ln -s {canary} /work/x/e; "
            "rm -rf /work/x/moved /work/x/e2 /work/x/a /work/x/e; done 2>/dev/null")
    seen: dict[str, int] = {}

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", swap])
            payload = make_tar({"x": b"a file\n"})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and seen.get("in", 0) < 50:
                try:
                    await copy_in(q, name, "/work", payload)
                    seen["in"] = seen.get("in", 0) + 1
                except (errors.CopyFailed, errors.InvalidArgument) as exc:
                    seen[type(exc).__name__] = seen.get(type(exc).__name__, 0) + 1
                assert (host_canary / "precious").read_bytes() == b"host secret\n"
            # The container's own root is whole too: nothing followed its links to /.
            code, out, _ = await q.exec(name, ["cat", "/keep"])
            assert (code, out) == (0, b"mine\n")
            code, _, _ = await q.exec(name, ["test", "-x", "/bin/busybox"])
            assert code == 0
            await q.remove(name, force=True)

    try:
        run(scenario())
        print("CopyIn outcomes under the swap:", seen)
        assert seen.get("in", 0) >= 10, seen  # the copies did replace the tree, again and again
        assert sorted(os.listdir(host_canary)) == ["precious"]
        assert (host_canary / "precious").read_bytes() == b"host secret\n"
    finally:
        (host_canary / "precious").unlink(missing_ok=True)
        host_canary.rmdir()
