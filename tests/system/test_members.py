"""What group quilt grants: a member runs sandboxes, and is not root on the host.

Each test is the attack itself: a non-root member of group quilt calling
quiltd over the sandbox's real system bus, from inside the sandbox, as the
user it is. See docs/security.md, "What group quilt grants".
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import imagebuilders as b
from tests.system.conftest import BUS, BUSYBOX_TARBALL, REPO, run
from tests.system.test_access import AS_MEMBER, member  # noqa: F401  (the fixture)

pytestmark = pytest.mark.system

CONF = "/etc/quilt/quiltd.conf"
ROOT = "/srv/quilt-members"  # the mount root the tests allow members
DENIED = "org.quilt.Quilt1.Error.AccessDenied"
PYTHON = str(REPO / ".venv/bin/python")
QUILTCTL = str(REPO / ".venv/bin/quiltctl")
# The member's script runs `body` with `q`, a client on the system bus, and
# prints a refusal as "<D-Bus error name>: <message>", exiting 1.
PRELUDE = """\
import asyncio, sys
from quiltd import errors
from quiltd.client import QuiltClient

async def body(q):
{body}

async def main():
    q = await QuiltClient.connect()
    try:
        await body(q)
    except errors.QuiltError as e:
        print(e)
        sys.exit(1)
    finally:
        q.close()

asyncio.run(main())
"""

MemberRun = Callable[..., tuple[int, str]]


@pytest.fixture(scope="module")
def as_member(sandbox: Any, member: str) -> Iterator[MemberRun]:  # noqa: F811
    """as_member(body) runs body (Python, awaiting on q) as the member; (exit code, output)."""
    # The checkout's interpreter may live under a private home: open the way
    # to it inside the sandbox only (its root is an overlay on a tmpfs).
    blocked = [d for d in [*Path(sys.executable).resolve().parents, *REPO.parents]
               if d != Path("/") and sandbox.run([*AS_MEMBER, "test", "-x", str(d)], check=False).returncode]
    modes = {d: sandbox.run(["stat", "-c", "%a", str(d)]).stdout.decode().strip() for d in blocked}
    for d in modes:
        sandbox.run(["chmod", "o+x", str(d)])

    def run(body: str) -> tuple[int, str]:
        script = PRELUDE.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "))
        result = sandbox.run([*AS_MEMBER, PYTHON, "-c", script], check=False)
        return result.returncode, (result.stdout + result.stderr).decode()

    try:
        yield run
    finally:
        for d, mode in modes.items():
            sandbox.run(["chmod", mode, str(d)], check=False)


@contextmanager
def settings(sandbox: Any, text: str) -> Iterator[None]:
    """/etc/quilt/quiltd.conf holding text, read by a restarted quiltd; gone again after."""
    sandbox.run(["mkdir", "-p", "/etc/quilt"])
    sandbox.run(["sh", "-c", 'cat > "$1"', "sh", CONF], input=text.encode())
    try:
        restart_quiltd(sandbox)
        yield
    finally:
        sandbox.run(["rm", "-f", CONF])
        restart_quiltd(sandbox)


def restart_quiltd(sandbox: Any) -> None:
    # Tests restart it more often than systemd's start limit allows a unit.
    sandbox.run(["systemctl", "reset-failed", "quiltd"], check=False)
    sandbox.run(["systemctl", "restart", "quiltd"])


@pytest.fixture
def mount_root(sandbox: Any) -> Iterator[str]:
    sandbox.run(["mkdir", "-p", f"{ROOT}/work"])
    sandbox.run(["sh", "-c", f"echo hi > {ROOT}/work/hello"])
    try:
        yield ROOT
    finally:
        sandbox.run(["rm", "-rf", ROOT], check=False)


def on_record(sandbox: Any, name: str) -> bool:
    listed = sandbox.run(["busctl", "call", *BUS, "ListContainers", "a{sv}", "1", "name", "s", name])
    return listed.stdout.decode().strip() != "a(sssso) 0"


def remove(sandbox: Any, name: str) -> None:
    sandbox.run(["busctl", "call", *BUS, "RemoveContainer", "sb", name, "true"], check=False)


def test_a_member_binds_no_host_path(sandbox: Any, as_member: MemberRun, busybox_image: str,
                                     name: str) -> None:
    for source, target in (("/etc", "/mnt/etc"), ("/etc/shadow", "/shadow"), ("/", "/host"),
                           ("/var/lib/quilt", "/q")):
        code, out = as_member(f"""
            await q.create({name!r}, "busybox", ["cat", "/shadow"], start=False,
                           mounts=[[{source!r}, {target!r}, True]])
        """)
        try:
            assert code == 1, out
            assert out.startswith(f"{DENIED}: mount {source} -> {target}: "), out
            assert "only root may bind" in out
            assert not on_record(sandbox, name)  # refused before anything was made
        finally:
            remove(sandbox, name)
    # Root still may: the refusal is about who asks.
    sandbox.run(["busctl", "call", *BUS, "CreateContainer", "ssasa{sv}", name, "busybox", "1", "true", "2",
                 "mounts", "a(ssb)", "1", "/etc", "/mnt/etc", "true", "start", "b", "false"])
    remove(sandbox, name)


def test_a_member_binds_only_under_the_mount_roots(sandbox: Any, as_member: MemberRun, mount_root: str,
                                                   busybox_image: str, name: str) -> None:
    sandbox.run(["ln", "-s", "/etc", f"{mount_root}/out"])
    sandbox.run(["ln", "-s", "work", f"{mount_root}/inside"])
    with settings(sandbox, f"[members]\nmount_roots = {mount_root}\n"):
        code, out = as_member(f"""
            await q.create({name!r}, "busybox", ["sh", "-c", "grep -q hi /a/hello && grep -q hi /b/hello"],
                           mounts=[[{mount_root + "/work"!r}, "/a", True],
                                   [{mount_root + "/inside"!r}, "/b", True]])
            print(await q.wait({name!r}, 30_000_000))
        """)
        remove(sandbox, name)
        assert (code, out.strip()) == (0, "('exited', 0)")
        for source, why in ((f"{mount_root}/out/shadow", "leads out of"),
                            (f"{mount_root}/../../etc", "not under a mount root"),
                            ("/etc", "not under a mount root")):
            code, out = as_member(f"""
                await q.create({name!r}, "busybox", ["true"], start=False, mounts=[[{source!r}, "/x", True]])
            """)
            remove(sandbox, name)
            assert code == 1 and out.startswith(f"{DENIED}: mount {source} -> /x: ") and why in out, out


def test_a_member_may_not_use_the_host_image(sandbox: Any, as_member: MemberRun, name: str) -> None:
    run_true = f"""
        await q.create({name!r}, "host", ["true"])
        print(await q.wait({name!r}, 30_000_000))
    """
    code, out = as_member(run_true)
    remove(sandbox, name)
    assert code == 1 and out.startswith(f"{DENIED}: uid ") and "may not use the image 'host'" in out, out
    assert not on_record(sandbox, name)
    with settings(sandbox, "[members]\nhost_image = yes\n"):
        code, out = as_member(run_true)
        remove(sandbox, name)
        assert (code, out.strip()) == (0, "('exited', 0)")


def test_a_member_imports_only_what_it_can_read(sandbox: Any, as_member: MemberRun, member: str,  # noqa: F811
                                                 busybox_image: str) -> None:
    secret = f"/var/tmp/quilt-secret-{secrets.token_hex(3)}.tar.gz"
    shared = f"/var/tmp/quilt-shared-{secrets.token_hex(3)}.tar.gz"
    sandbox.run(["install", "-m", "0600", BUSYBOX_TARBALL, secret])
    sandbox.run(["install", "-m", "0644", BUSYBOX_TARBALL, shared])
    names = [f"member-{kind}-{secrets.token_hex(3)}" for kind in ("path", "file", "stdin", "pipe", "secret")]
    try:
        code, out = as_member(f"await q.import_image({names[0]!r}, {secret!r})")
        assert code == 1 and out.startswith(f"{DENIED}: uid ") and f"may not read {secret}" in out, out
        # The way quiltctl does it: the file opened as the member, the descriptor passed on.
        for argv in ([QUILTCTL, "images", "import", names[1], shared],
                     ["sh", "-c", f'exec "$0" images import {names[2]} - < {shared}', QUILTCTL],
                     ["sh", "-c", f'cat {shared} | "$0" images import {names[3]} -', QUILTCTL]):
            done = sandbox.run([*AS_MEMBER, *argv], check=False)
            assert done.returncode == 0, done.stderr
        refused = sandbox.run([*AS_MEMBER, QUILTCTL, "images", "import", names[4], secret], check=False)
        assert refused.returncode == 1 and b"Permission denied" in refused.stderr
        listed = sandbox.run(["busctl", "call", *BUS, "ListImages"]).stdout.decode()
        assert [n for n in names if f'"{n}"' in listed] == names[1:4]
        # Root's path form is unchanged: quiltd reads what root can.
        sandbox.run(["busctl", "call", *BUS, "ImportImage", "ssa{sv}", names[0], secret, "0"])
    finally:
        for image in names:
            sandbox.run(["busctl", "call", *BUS, "RemoveImage", "s", image], check=False)
        sandbox.run(["rm", "-f", secret, shared])


def test_a_member_imports_no_layout_file_it_cannot_read(sandbox: Any, as_member: MemberRun,
                                                        busybox_image: str) -> None:
    layers = [sandbox.host_path(BUSYBOX_TARBALL).read_bytes()]
    inside = f"/var/tmp/quilt-layout-{secrets.token_hex(3)}"
    layout = b.write_dir(b.oci_files(layers, {}), sandbox.host_path(inside))
    sandbox.run(["chmod", "-R", "a+rX", inside])
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.stat().st_size == len(layers[0]))
    image = f"member-layout-{secrets.token_hex(3)}"
    roots = f"{image}-root"
    try:
        sandbox.run(["chmod", "0600", inside + "/blobs/sha256/" + blob.name])
        # Root's import stores the layer first: a layer stored already is not read again, and the
        # member must still be refused the file it cannot read.
        sandbox.run([QUILTCTL, "images", "import", roots, inside])
        refused = sandbox.run([*AS_MEMBER, QUILTCTL, "images", "import", image, inside], check=False)
        assert refused.returncode == 1, refused.stderr
        assert b"the caller may not read it" in refused.stderr and b"(AccessDenied)" in refused.stderr
        sandbox.run(["chmod", "0644", inside + "/blobs/sha256/" + blob.name])
        done = sandbox.run([*AS_MEMBER, QUILTCTL, "images", "import", image, inside], check=False)
        assert done.returncode == 0, done.stderr
    finally:
        for made in (image, roots):
            sandbox.run(["busctl", "call", *BUS, "RemoveImage", "s", made], check=False)
        sandbox.run(["rm", "-rf", inside])


@pytest.mark.parametrize("who", ["member", "root"])
def test_a_source_swapped_for_a_symlink_before_start_binds_nothing(
        sandbox: Any, as_member: MemberRun, mount_root: str, busybox_image: str, name: str, who: str) -> None:
    source = f"{mount_root}/swap"
    sandbox.run(["mkdir", source])
    # Exits 0 only if quiltd's state is in the container.
    command = ["sh", "-c", "test -e /data/quilt.db"]
    with settings(sandbox, f"[members]\nmount_roots = {mount_root}\n"):
        try:
            if who == "member":
                code, out = as_member(f"""
                    await q.create({name!r}, "busybox", {command!r}, start=False,
                                   mounts=[[{source!r}, "/data", False]])
                """)
                assert code == 0, out
            else:
                sandbox.run(["busctl", "call", "--", *BUS, "CreateContainer", "ssasa{sv}", name, "busybox",
                             "3", *command, "2", "mounts", "a(ssb)", "1", source, "/data", "false", "start",
                             "b", "false"])
            sandbox.run(["rmdir", source])
            sandbox.run(["ln", "-s", "/var/lib/quilt", source])
            started = sandbox.run(["busctl", "call", *BUS, "StartContainer", "s", name], check=False)
            info = sandbox.run(["busctl", "call", *BUS, "GetContainerInfo", "s", name]).stdout.decode()
            assert started.returncode != 0, info
            why = b"leads out of" if who == "member" else b"quiltd's own state"
            assert why in started.stderr, started.stderr
            assert '"State" s "failed"' in info
        finally:
            remove(sandbox, name)


def test_a_flood_of_creates_does_not_starve_another_caller(sandbox: Any, quilt: Any, as_member: MemberRun,
                                                           name: str) -> None:
    # Root floods 80 starts; the member's one start is served in turn with
    # them, one caller at a time, not behind all of root's.
    flood = [f"{name}-{i}" for i in range(80)]
    mine = f"{name}-member"

    async def create_flood() -> None:
        async with quilt() as q0, quilt() as q1:
            await asyncio.gather(*(q.create(n, "busybox", ["sleep", "600"])
                                   for q, n in zip([q0, q1] * 40, flood, strict=True)))

    async def started(refs: list[str]) -> dict[str, int]:
        async with quilt() as q:
            for ref in refs:
                assert await q.wait_started(ref, 120_000_000) == "running", ref
            return {ref: int((await q.info(ref))["StartedUsec"]) for ref in refs}

    try:
        run(create_flood())
        code, out = as_member(f"""
            await q.create({mine!r}, "busybox", ["sleep", "600"])
        """)
        assert code == 0, out
        times = run(started([*flood, mine]))
        earlier = sum(times[n] < times[mine] for n in flood)
        # 16 run at once; of the waiting ones, root's and the member's alternate.
        assert earlier < 40, f"{earlier} of root's 80 starts went before the member's one"
    finally:
        for ref in [*flood, mine]:
            remove(sandbox, ref)


def test_a_member_pauses_resumes_and_exports_as_it_stops(sandbox: Any, as_member: MemberRun, quilt: Any,
                                                        name: str) -> None:
    """Group quilt is one team: a member pauses and resumes any container, as it may stop any, and
    exports containers and images into descriptors it opened itself."""
    async def root_creates() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "echo mine > /note; sleep 600"])
            assert await q.wait_started(name) == "running"

    run(root_creates())
    out_path = f"/tmp/{name}.tar"  # the sandbox's private /tmp, which the member may write
    try:
        code, out = as_member(f"""
            import os, tarfile
            await asyncio.sleep(0.5)
            await q.pause({name!r})
            print((await q.info({name!r}))["State"])
            fd = os.open({out_path!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            await q.export({name!r}, fd)
            os.close(fd)
            print(tarfile.open({out_path!r}).extractfile("note").read().decode().strip())
            await q.resume({name!r})
            print((await q.info({name!r}))["State"])
            fd = os.open({out_path!r}, os.O_WRONLY | os.O_TRUNC)
            print((await q.export_image("busybox", fd, "docker-archive"))["bytes"] > 0)
            os.close(fd)
        """)
        assert (code, out.split()) == (0, ["paused", "mine", "running", "True"]), out
    finally:
        sandbox.run(["rm", "-f", out_path], check=False)
        remove(sandbox, name)
