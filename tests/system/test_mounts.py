"""Host paths and tmpfs mounted into containers, and the ways they must not go wrong."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from tests.system.conftest import records, run
from tests.system.test_security import journal_lines, run_to_end

pytestmark = pytest.mark.system


@pytest.fixture
def host_dir(sandbox: Any, name: str) -> Iterator[str]:
    """A directory in the sandbox (the containers' host) with one file in it."""
    path = f"/var/tmp/quilt-mnt-{name}"
    sandbox.run(["sh", "-c", f"mkdir -p {path} && echo from-host > {path}/marker"])
    try:
        yield path
    finally:
        sandbox.run(["rm", "-rf", path])


def test_read_only_and_read_write_binds(sandbox: Any, quilt: Any, name: str, host_dir: str) -> None:
    script = ("cat /ro/marker; touch /ro/new 2>/dev/null && echo ro-writable || echo ro-refused; "
              "echo from-container > /deep/new/rw/written && echo rw-ok; grep /ro /proc/self/mountinfo | "
              "grep -q nosuid && echo nosuid; echo done 0")
    cid, code = run_to_end(quilt, name, "busybox", ["sh", "-c", script],
                           mounts=[[host_dir, "/ro", True], [host_dir, "/deep/new/rw", False]])
    lines = journal_lines(sandbox, cid)
    assert code == 0, lines
    assert lines == ["from-host", "ro-refused", "rw-ok", "nosuid", "done 0"], lines
    assert sandbox.run(["cat", f"{host_dir}/written"]).stdout == b"from-container\n"
    assert sandbox.run(["test", "-e", f"{host_dir}/new"], check=False).returncode != 0


def test_tmpfs_with_size(sandbox: Any, quilt: Any, name: str) -> None:
    script = ("df -k /scratch | tail -1 | awk '{print $2}'; "
              "dd if=/dev/zero of=/scratch/f bs=1024 count=2048 2>/dev/null && echo filled-past || "
              "echo full; echo done 0")
    cid, code = run_to_end(quilt, name, "busybox", ["sh", "-c", script], tmpfs=[["/scratch", 1 << 20]])
    lines = journal_lines(sandbox, cid)
    assert code == 0, lines
    assert lines == ["1024", "full", "done 0"], lines


def test_symlink_swap_cannot_lead_a_mount_out_of_the_root(sandbox: Any, quilt: Any, name: str,
                                                          host_dir: str) -> None:
    """The first run replaces a parent of the target with a link out of the root; the second
    start must resolve it inside the container's own root, never on the host."""
    script = ("if [ -L /x ]; then cat /etc/data/marker; ls -d /x/data/marker; echo second; "
              "else mv /x /x.old && ln -s ../../../../../../../../etc /x && echo swapped; fi")
    escape = "/etc/data"  # where a naive join of root and the link would mount on the host
    assert sandbox.run(["test", "-e", escape], check=False).returncode != 0

    async def scenario() -> str:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sh", "-c", script],
                                    mounts=[[host_dir, "/x/data", True]])
            try:
                assert await q.wait(name, 30_000_000) == ("exited", 0)
                await q.start(name)
                assert await q.wait(name, 30_000_000) == ("exited", 0)
                return str(cid)
            finally:
                await q.remove(name, force=True)

    cid = run(scenario())
    lines = journal_lines_until(sandbox, cid, "second")
    assert lines == ["swapped", "from-host", "/x/data/marker", "second"], lines
    assert sandbox.run(["test", "-e", escape], check=False).returncode != 0
    assert sandbox.run(["sh", "-c", "grep -c ' /etc/data ' /proc/self/mountinfo"],
                       check=False).stdout.strip() == b"0"


def journal_lines_until(sandbox: Any, cid: str, last: str) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = sandbox.run(["journalctl", f"QUILT_CONTAINER_ID={cid}", "-o", "cat", "--no-pager"]
                            ).stdout.decode().splitlines()
        if last in lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mounts": Variant("a(ssb)", [["/no/such/dir", "/data", True]])}, "unknown mount source"),
        ({"mounts": Variant("a(ssb)", [["relative", "/data", True]])}, "absolute"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "data", True]])}, "absolute"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "/data/../../etc", True]])}, "plain path"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "/", True]])}, "root"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "/proc/sys", False]])}, "under /proc"),
        ({"mounts": Variant("a(ssb)", [["/var/lib/quilt", "/q", True]])}, "quiltd's own state"),
        ({"mounts": Variant("a(ssb)", [["/var", "/q", True]])}, "quiltd's own state"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "/a", True], ["/tmp", "/a", True]])}, "conflicting"),
        ({"mounts": Variant("a(ssb)", [["/var/tmp", "/a", True]]),
          "tmpfs": Variant("a(st)", [["/a", 1 << 20]])}, "conflicting"),
        ({"tmpfs": Variant("a(st)", [["/scratch", 0]])}, "size"),
        ({"tmpfs": Variant("a(st)", [["/dev/x", 4096]])}, "under /dev"),
        ({"mounts": Variant("as", ["/var/tmp:/data"])}, "is not"),
    ],
)
def test_bad_mounts_are_named_and_leave_nothing(quilt: Any, options: dict[str, Variant],
                                                message: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            with pytest.raises(errors.InvalidArgument, match=message):
                await q.call("CreateContainer", "ssasa{sv}", "bad-mount", "busybox", ["true"], options)
            assert await records(q) == before

    run(scenario())
