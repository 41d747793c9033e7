"""Exec as the container's user, as docker exec does: its ids, its HOME, its files, git that trusts them."""

from __future__ import annotations

import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests import imagebuilders as b
from tests.system.conftest import BUSYBOX_TARBALL, eventually, run
from tests.system.test_oci_images import archive_dir, inside  # noqa: F401  (archive_dir is a fixture)

pytestmark = pytest.mark.system

PASSWD = ("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
          "agent:x:1000:1000:agent:/home/agent:/bin/sh\n")
GROUP = "root:x:0:\nnogroup:x:65534:\nagent:x:1000:\n"


def _owned(member: tuple[tarfile.TarInfo, bytes | None], uid: int) -> tuple[tarfile.TarInfo, bytes | None]:
    member[0].uid = member[0].gid = uid
    return member


@pytest.fixture
def agent_image(sandbox: Any, quilt: Any, archive_dir: Path) -> Iterator[str]:  # noqa: F811
    """Busybox with a user `agent` (1000) whose home it owns, and USER agent in its config."""
    base = sandbox.host_path(BUSYBOX_TARBALL).read_bytes()
    upper = b.tar_bytes([b.file("etc/passwd", PASSWD.encode()), b.file("etc/group", GROUP.encode()),
                         b.directory("home"), _owned(b.directory("home/agent", 0o755), 1000)])
    source = b.write_dir(b.oci_files([base, upper], {"User": "agent", "Cmd": ["sleep", "1000"]}),
                         archive_dir / "layout")
    image = f"agent-{secrets.token_hex(3)}"

    async def imported() -> None:
        async with quilt() as q:
            await q.import_image(image, inside(sandbox, source))

    async def removed() -> None:
        async with quilt() as q:
            await q.remove_image(image, force=True)

    run(imported())
    try:
        yield image
    finally:
        run(removed())


async def _running(q: Any, name: str, image: str, command: list[str], **options: Any) -> None:
    await q.create(name, image, command, **options)

    async def up() -> bool:
        return bool((await q.info(name))["State"] == "running")

    await eventually(up)


SHOW = 'echo "$(id -u):$(id -g) $HOME $(pwd)"'


def test_exec_runs_as_the_image_user_and_writes_files_it_owns(quilt: Any, name: str,
                                                              agent_image: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, agent_image, [])
            assert await q.exec(name, ["sh", "-c", SHOW]) == (0, b"1000:1000 /home/agent /\n", b"")
            # A file written in its home belongs to it, whichever exec call wrote it.
            write = "echo hi > $HOME/notes && stat -c %u:%g $HOME/notes"
            code, out, err = await q.exec(name, ["sh", "-c", write])
            assert (code, out, err) == (0, b"1000:1000\n", b"")
            exec_id = await q.exec_start(name, ["sh", "-c", "touch $HOME/from-background"])
            assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 0)
            code, out, _ = await q.exec(name, ["stat", "-c", "%u", "/home/agent/from-background"], user="0")
            assert (code, out) == (0, b"1000\n")

            # The options per exec: another user takes its own HOME, workdir and env apply.
            assert await q.exec(name, ["sh", "-c", SHOW], user="root") == (0, b"0:0 /root /\n", b"")
            assert await q.exec(name, ["sh", "-c", SHOW], user="nobody") == \
                (0, b"65534:65534 /nonexistent /\n", b"")
            assert await q.exec(name, ["sh", "-c", SHOW + "; echo $MODE"], workdir="/home/agent",
                                env=["HOME=/tmp", "MODE=test"]) == \
                (0, b"1000:1000 /tmp /home/agent\ntest\n", b"")
            assert await q.exec(name, ["sh", "-c", SHOW], user="1000:0") == \
                (0, b"1000:0 /home/agent /\n", b"")

            # Bad input names its cause, and the container goes on.
            with pytest.raises(errors.InvalidArgument, match="no user 'ghost'"):
                await q.exec(name, ["true"], user="ghost")
            with pytest.raises(errors.InvalidArgument, match="no group 'ghosts'"):
                await q.exec_start(name, ["true"], user="agent:ghosts")
            with pytest.raises(errors.ExecFailed, match="workdir /nowhere"):
                await q.exec(name, ["true"], workdir="/nowhere")
            with pytest.raises(errors.InvalidArgument, match="workdir must be an absolute path"):
                await q.exec(name, ["true"], workdir="relative")
            with pytest.raises(errors.InvalidArgument, match="invalid env entry '1X=y'"):
                await q.exec(name, ["true"], env=["1X=y"])
            assert (await q.exec(name, ["id", "-un"]))[1] == b"agent\n"
            await q.remove(name, force=True)

    run(scenario())


def test_the_container_user_option_is_the_exec_default(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, "busybox", ["sleep", "1000"], user="nobody")
            assert await q.exec(name, ["sh", "-c", SHOW]) == (0, b"65534:65534 /nonexistent /\n", b"")
            # A container of root: HOME is root's home from /etc/passwd.
            await _running(q, f"{name}-root", "busybox", ["sleep", "1000"])
            assert await q.exec(f"{name}-root", ["sh", "-c", SHOW]) == (0, b"0:0 /root /\n", b"")
            for c in (name, f"{name}-root"):
                await q.remove(c, force=True)

    run(scenario())


def test_git_trusts_what_the_agent_writes_in_its_home(quilt: Any, name: str) -> None:
    """The host image's git, a user the container adds, and a repository made through Exec."""
    async def scenario() -> None:
        async with quilt() as q:
            # A bare uid needs no entry to start; the entry and its home are made next, as root.
            await _running(q, name, "host", ["sleep", "1000"], user="1000")
            setup = ("echo agent:x:1000:1000::/home/agent:/bin/sh >> /etc/passwd && "
                     "mkdir -p /home/agent && chown 1000:1000 /home/agent")
            assert (await q.exec(name, ["sh", "-c", setup], user="0"))[0] == 0
            script = ("cd && git init -q repo && cd repo && echo x > file && git status --porcelain && "
                      "stat -c %u file .git && echo $HOME")
            code, out, err = await q.exec(name, ["sh", "-c", script])
            assert (code, err) == (0, b""), err
            assert out == b"?? file\n1000\n1000\n/home/agent\n"
            # The same repository through root would be another owner's: git refuses it, as it should.
            code, _, err = await q.exec(name, ["git", "-C", "/home/agent/repo", "status"], user="0")
            assert code != 0 and b"dubious ownership" in err
            await q.remove(name, force=True)

    run(scenario())
