"""CopyIn and CopyOut: tar streams into and out of running and stopped containers, never out of them."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import eventually, run

pytestmark = pytest.mark.system


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass  # the daemon stopped reading: its answer says why
    finally:
        os.close(fd)


def _read_all(fd: int, into: list[bytes]) -> None:
    try:
        while chunk := os.read(fd, 1 << 20):
            into.append(chunk)
    finally:
        os.close(fd)


async def copy_in(q: Any, ref: str, path: str, data: bytes, **options: Any) -> dict[str, Any]:
    r, w = os.pipe()
    writer = threading.Thread(target=_write_all, args=(w, data))
    writer.start()
    try:
        info: dict[str, Any] = await q.copy_in(ref, path, r, **options)
        return info
    finally:
        os.close(r)
        writer.join(30)


async def copy_out(q: Any, ref: str, path: str, into: list[bytes] | None = None, **options: Any) -> bytes:
    """The stream of path; into gets it too, also when the copy fails."""
    r, w = os.pipe()
    chunks: list[bytes] = [] if into is None else into
    reader = threading.Thread(target=_read_all, args=(r, chunks))
    reader.start()
    try:
        await q.copy_out(ref, path, w, **options)
    finally:
        os.close(w)  # the daemon's copy is closed once it answered: the reader sees the end
        reader.join(30)
        assert not reader.is_alive()
    return b"".join(chunks)


def make_tar(files: dict[str, bytes], mode: int = 0o644, uid: int = 0, mtime: int = 1_600_000_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, uid, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members(data: bytes) -> dict[str, bytes | str]:
    """name -> content for files, '-> target' for symlinks, 'dir' for directories."""
    found: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                found[m.name] = f.read()
            else:
                found[m.name] = f"-> {m.linkname}" if m.issym() else "dir" if m.isdir() else m.type.decode()
    return found


async def _running(q: Any, name: str, command: list[str]) -> None:
    await q.create(name, "busybox", command)

    async def up() -> bool:
        return bool((await q.info(name))["State"] == "running")

    await eventually(up)


def test_copy_in_and_out_of_a_running_container(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sleep", "1000"])
            data = make_tar({"d/a.txt": b"alpha\n", "d/sub/b.bin": bytes(range(256)) * 4000}, mode=0o751,
                            uid=1234)
            info = await copy_in(q, name, "/tmp", data)
            assert info == {"bytes": len(data), "entries": 2}
            code, out, _ = await q.exec(name, ["sh", "-c", "cat /tmp/d/a.txt; stat -c '%a %u %g %Y' "
                                               "/tmp/d/a.txt; md5sum < /tmp/d/sub/b.bin"])
            lines = out.decode().splitlines()
            assert code == 0 and lines[:2] == ["alpha", "751 1234 1234 1600000000"]
            back = members(await copy_out(q, name, "/tmp/d"))
            assert back["d/a.txt"] == b"alpha\n" and back["d/sub/b.bin"] == bytes(range(256)) * 4000
            assert back["d/sub"] == "dir"
            await q.exec(name, ["ln", "-s", "/etc/passwd", "/tmp/link"])
            assert members(await copy_out(q, name, "/tmp/link")) == {"link": "-> /etc/passwd"}
            await q.remove(name, force=True)

    run(scenario())


def test_copy_in_and_out_of_stopped_containers(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["cat", "/etc/greeting"], start=False)
            await copy_in(q, name, "/etc", make_tar({"greeting": b"copied before the start\n"}))
            got = members(await copy_out(q, name, "/etc/greeting"))
            assert got == {"greeting": b"copied before the start\n"}
            await q.start(name)
            assert await q.wait(name, 10_000_000) == ("exited", 0)
            logs = [line for _, _, line in await q.logs(name)]
            assert logs == ["copied before the start"]
            # Exited now: the upper layer keeps what the command and CopyIn wrote.
            await copy_in(q, name, "/", make_tar({"later/x": b"after\n"}))
            assert members(await copy_out(q, name, "/later")) == {"later": "dir", "later/x": b"after\n"}
            await q.remove(name)

    run(scenario())


def test_copy_bad_input_gets_named_errors(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sleep", "1000"])
            with pytest.raises(errors.InvalidArgument, match="not a tar"):
                await copy_in(q, name, "/tmp", b"this is no tar stream, just text\n" * 100)
            with pytest.raises(errors.InvalidArgument, match="not a tar"):
                await copy_in(q, name, "/tmp", b"")
            with pytest.raises(errors.NoSuchPath):
                await copy_in(q, name, "/no/such/dir", make_tar({"f": b"x"}))
            with pytest.raises(errors.NoSuchPath):
                await copy_out(q, name, "/no/such/file")
            with pytest.raises(errors.InvalidArgument, match="not a directory"):
                await copy_in(q, name, "/etc/passwd", make_tar({"f": b"x"}))
            with pytest.raises(errors.InvalidArgument, match="absolute"):
                await copy_out(q, name, "etc")
            with pytest.raises(errors.InvalidArgument, match=r"'\.\.'"):
                await copy_in(q, name, "/tmp", make_tar({"../../etc/x": b"x"}))
            with pytest.raises(errors.LimitExceeded, match="max_bytes"):
                await copy_in(q, name, "/tmp", make_tar({"big": bytes(200_000)}), max_bytes=100_000)
            with pytest.raises(errors.InvalidArgument, match="proc or sysfs"):
                await copy_in(q, name, "/proc/sys/kernel", make_tar({"core_pattern": b"|/bin/sh"}))
            with pytest.raises(errors.NoSuchContainer):
                await copy_out(q, "no-such-container", "/")
            # Bad descriptors: a terminal-like device, the wrong direction.
            null = os.open("/dev/null", os.O_RDWR)
            r, w = os.pipe()
            try:
                with pytest.raises(errors.InvalidArgument, match="pipe, a socket or a regular file"):
                    await q.copy_out(name, "/etc", null)
                with pytest.raises(errors.InvalidArgument, match="not open for writing"):
                    await q.copy_out(name, "/etc", r)
                with pytest.raises(errors.InvalidArgument, match="not open for reading"):
                    await q.copy_in(name, "/tmp", w)
            finally:
                for fd in (null, r, w):
                    os.close(fd)
            code, out, _ = await q.exec(name, ["ls", "/tmp"])
            assert code == 0 and b"big" not in out.split()
            assert (await q.info(name))["State"] == "running"
            await q.remove(name, force=True)

    run(scenario())


def test_copy_in_refuses_corrupt_and_truncated_streams(quilt: Any, name: str) -> None:
    good = make_tar({"a": b"A" * 1000, "b": b"B" * 1000})  # headers at 0 and 1536, the end marker at 3072

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sleep", "1000"])
            await q.exec(name, ["mkdir", "/cut", "/cutfile", "/junk", "/whole", "/bare"])
            with pytest.raises(errors.InvalidArgument,
                               match=r"ends inside the data of member 'b' \(its header at offset 1536"):
                await copy_in(q, name, "/cut", good[:1536 + 512 + 300])
            # From a regular file, the whole archive is checked before anything is written.
            with tempfile.TemporaryFile() as f:
                f.write(good[:1536 + 512 + 300])
                f.seek(0)
                with pytest.raises(errors.InvalidArgument, match="ends inside the data of member 'b'"):
                    await q.copy_in(name, "/cutfile", f.fileno())
            with pytest.raises(errors.InvalidArgument, match=r"bad tar header at offset 3072 .*member 'b'"):
                await copy_in(q, name, "/junk", good[:3072] + b"garbage!" * 1000)
            # The daemon keeps answering, and normal streams still go in: with
            # the end marker and padding, or ending right after the last member.
            assert await copy_in(q, name, "/whole", good) == {"bytes": len(good), "entries": 2}
            assert await copy_in(q, name, "/bare", good[:3072]) == {"bytes": 3072, "entries": 2}
            listing = "cd / && ls -A cut cutfile junk whole bare | xargs"
            code, out, _ = await q.exec(name, ["sh", "-c", listing])
            # A failed copy from a pipe leaves the members before the error, and no part of the one it
            # was writing; from a file, nothing.
            assert code == 0 and out.decode().split() == [
                "bare:", "a", "b", "cut:", "a", "cutfile:", "junk:", "a", "b", "whole:", "a", "b"], out
            files = ["/whole/a", "/whole/b", "/bare/a", "/bare/b"]
            code, out, _ = await q.exec(name, ["stat", "-c", "%n %s", *files])
            assert code == 0 and out.decode().splitlines() == [
                "/whole/a 1000", "/whole/b 1000", "/bare/a 1000", "/bare/b 1000"], out
            await q.remove(name, force=True)

    run(scenario())


def test_copy_out_max_bytes(quilt: Any, name: str) -> None:
    # A sparse file of 1 GiB costs the container nothing, and would be 1 GiB of stream.
    setup = "mkdir /d && echo small > /d/a && dd if=/dev/zero of=/d/big bs=1 count=0 seek=1G && sleep 1000"

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", setup])

            async def ready() -> bool:
                return (await q.exec(name, ["test", "-e", "/d/big"]))[0] == 0

            await eventually(ready)
            stream: list[bytes] = []
            with pytest.raises(errors.LimitExceeded, match=r"pass max_bytes \(1048576 bytes\) at 'd/big'"):
                await copy_out(q, name, "/d", into=stream, max_bytes=1 << 20)
            # The reader saw the end of the stream: whole members before the big one, and no end marker.
            data = b"".join(stream)
            assert 0 < len(data) < 1 << 20 and data[-1024:] != bytes(1024)
            assert list(members(data)) == ["d", "d/a"]
            # Under the cap, CopyOutEx says what it wrote; the daemon answers as before.
            with tempfile.TemporaryFile() as f:
                info = await q.copy_out(name, "/d/a", f.fileno(), max_bytes=1 << 20)
                f.seek(0)
                one = f.read()
            assert info == {"bytes": len(one), "entries": 1} and members(one) == {"a": b"small\n"}
            with pytest.raises(errors.InvalidArgument, match="max_bytes"):
                await copy_out(q, name, "/d/a", max_bytes=0)
            assert (await q.info(name))["State"] == "running"
            await q.remove(name, force=True)

    run(scenario())


def test_symlink_swap_during_copies_never_reaches_the_host(sandbox: Any, quilt: Any, name: str) -> None:
    """A process in the container flips /work/x between a directory and a symlink to / while we copy."""
    tag = secrets.token_hex(4)
    canary = Path(f"/var/tmp/quilt-canary-{tag}")
    written = Path(f"/etc/quilt-written-{tag}")
    host_canary = sandbox.host_path(canary)
    host_canary.write_bytes(b"host secret\n")
    before = host_canary.stat()
    flip = ("mkdir -p /work; while true; do rm -rf /work/x; mkdir -p /work/x/etc; "
            "echo inside > /work/x/file; rm -rf /work/x; ln -s / /work/x; done")
    seen: dict[str, int] = {}

    def count(what: str) -> None:
        seen[what] = seen.get(what, 0) + 1

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", flip])
            payload = make_tar({str(canary).lstrip("/"): b"pwned\n", f"etc/quilt-written-{tag}": b"pwned\n"})
            deadline = time.monotonic() + 60
            for i in range(300):
                try:
                    out = await copy_out(q, name, f"/work/x/{str(canary).lstrip('/')}")
                    count("out-file")
                    assert b"host secret" not in out
                except (errors.NoSuchPath, errors.CopyFailed):
                    count("out-file-missing")
                try:
                    found = members(await copy_out(q, name, "/work/x/etc"))
                    count("out-etc")
                    # The container's /etc when x is the link: busybox's, not the host's.
                    assert not any(n.endswith(("os-release", "machine-id")) for n in found), found
                    assert not any(isinstance(v, bytes) and b"host secret" in v for v in found.values())
                except (errors.NoSuchPath, errors.CopyFailed):
                    count("out-etc-missing")
                try:
                    await copy_in(q, name, "/work/x", payload)
                    count("in")
                except (errors.NoSuchPath, errors.CopyFailed, errors.InvalidArgument):
                    count("in-failed")
                assert host_canary.read_bytes() == b"host secret\n"
                assert not sandbox.host_path(written).exists()
                both = seen.get("out-etc", 0) and seen.get("out-etc-missing", 0)
                if (both and i >= 30) or time.monotonic() > deadline:
                    break
            await q.remove(name, force=True)

    try:
        run(scenario())
        after = host_canary.stat()
        assert host_canary.read_bytes() == b"host secret\n"
        assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
        assert not sandbox.host_path(written).exists()
        # The race was live: the same path was a directory for some copies and the symlink for others.
        print("copy outcomes under the swap:", seen)
        assert seen.get("out-etc") and seen.get("out-etc-missing"), seen
    finally:
        host_canary.unlink(missing_ok=True)
        sandbox.host_path(written).unlink(missing_ok=True)


def test_symlink_to_the_root_in_a_stopped_container(sandbox: Any, quilt: Any, name: str) -> None:
    tag = secrets.token_hex(4)
    host_canary = sandbox.host_path(f"/var/tmp/quilt-canary-{tag}")
    host_canary.write_bytes(b"host secret\n")

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "mkdir /work && ln -s / /work/evil"])
            assert await q.wait(name, 10_000_000) == ("exited", 0)
            with pytest.raises(errors.NoSuchPath):
                await copy_out(q, name, f"/work/evil/var/tmp/quilt-canary-{tag}")
            await copy_in(q, name, "/work/evil", make_tar({f"var/tmp/quilt-canary-{tag}": b"pwned\n"}))
            # It went to the container's own /var/tmp, through the link resolved in its root.
            got = members(await copy_out(q, name, f"/var/tmp/quilt-canary-{tag}"))
            assert got == {f"quilt-canary-{tag}": b"pwned\n"}
            await q.remove(name)

    try:
        run(scenario())
        assert host_canary.read_bytes() == b"host secret\n"
    finally:
        host_canary.unlink(missing_ok=True)


def test_a_flood_of_copies_runs_a_bounded_number_at_once_and_all_finish(quilt: Any, name: str) -> None:
    """Each copy is a process in the container's scope: 40 at once run 32 at a time, the rest wait."""
    count = 40
    go = threading.Event()

    def held_writer(fd: int, data: bytes) -> None:
        go.wait(60)
        _write_all(fd, data)

    async def one(q: Any, i: int, writers: list[threading.Thread]) -> dict[str, Any]:
        r, w = os.pipe()
        writer = threading.Thread(target=held_writer, args=(w, make_tar({f"f{i}": b"%d\n" % i})))
        writer.start()
        writers.append(writer)
        try:
            info: dict[str, Any] = await q.copy_in(name, "/tmp", r)
            return info
        finally:
            os.close(r)

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sleep", "1000"])
            writers: list[threading.Thread] = []
            copies = [asyncio.ensure_future(one(q, i, writers)) for i in range(count)]

            async def all_waiting() -> bool:
                return bool((await q.info(name))["TasksCurrent"] >= 2 + 32)

            await eventually(all_waiting)
            await asyncio.sleep(1)  # time for any copy past the bound to show up too
            assert (await q.info(name))["TasksCurrent"] == 2 + 32
            go.set()
            results = await asyncio.gather(*copies)
            for writer in writers:
                writer.join(30)
            assert all(r["entries"] == 1 for r in results)
            code, out, _ = await q.exec(name, ["sh", "-c", "cat /tmp/f* | sort -n | tr '\\n' ' '"])
            assert code == 0
            assert out.decode().split() == [str(i) for i in range(count)]
            await q.remove(name, force=True)

    run(scenario())
