"""ExecWithPty: a command on a pseudo-terminal of the container, its master in the client's hands."""

from __future__ import annotations

import os
import select
import time
from typing import Any

import pytest

from quiltd import errors, linux
from tests.system.conftest import eventually, run
from tests.system.test_daemon_faults import fd_count, main_pid
from tests.system.test_quiltctl import QUILTCTL, ctl

pytestmark = pytest.mark.system


def read_until(fd: int, want: bytes, timeout: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while want not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} in {data!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the terminal has no process any more
                break
            if not chunk:
                break
            data += chunk
    return data


async def _running(q: Any, name: str, **options: Any) -> None:
    await q.create(name, "busybox", ["sleep", "1000"], **options)

    async def up() -> bool:
        return bool((await q.info(name))["State"] == "running")

    await eventually(up)


def test_a_shell_on_a_pty_of_the_container(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, user="nobody")
            exec_id, master = await q.exec_with_pty(name, ["sh"], rows=24, cols=80)
            try:
                # The terminal is the container's: its devpts, not the host's.
                devpts = (await q.exec(name, ["stat", "-c", "%d", "/dev/pts/ptmx"]))[1]
                assert os.fstat(master).st_dev == int(devpts)
                assert os.fstat(master).st_dev != os.stat("/dev/ptmx", follow_symlinks=True).st_dev
                # Each marker is made by the shell, so the echo of what we typed cannot match it.
                os.write(master, b"tty; stty size; id -u; test -t 0 && echo is-a-$((1+1))tty\n")
                out = read_until(master, b"is-a-2tty")
                assert b"/dev/pts/0" in out and b"24 80" in out and b"65534" in out, out
                # Resized from our side: the command sees it.
                linux.set_size(master, 30, 100)
                os.write(master, b"stty size | tr ' ' x\n")
                assert b"30x100" in read_until(master, b"30x100")
                # Ctrl-C reaches its foreground job through the terminal's line discipline.
                os.write(master, b"sleep 100\n")
                time.sleep(0.3)
                os.write(master, b"\x03")
                os.write(master, b"echo after-$?-$((1))\n")
                assert b"after-130-1" in read_until(master, b"after-130-1")
                assert [e[0] for e in await q.list_execs(name) if e[1] == "running"] == [exec_id]
                os.write(master, b"exit 3\n")
                assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 3)
            finally:
                os.close(master)
            # Closing the master hangs the terminal up: a command left on it ends.
            exec_id, master = await q.exec_with_pty(name, ["sleep", "1000"])
            os.close(master)
            state, code = await q.exec_wait(exec_id, 10_000_000)
            assert state == "exited" and code == 128 + 1  # SIGHUP
            await q.remove(name, force=True)

    run(scenario())


def test_pty_bad_input_gets_named_errors_and_the_daemon_keeps_no_terminal(sandbox: Any, quilt: Any,
                                                                          name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            pid = main_pid(sandbox)
            before = fd_count(sandbox, pid)
            # Ended every way: exited, hung up by our close, killed with the container below.
            for _ in range(10):
                exec_id, master = await q.exec_with_pty(name, ["true"])
                assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 0)
                os.close(master)
                exec_id, master = await q.exec_with_pty(name, ["sleep", "100"])
                os.close(master)
                assert (await q.exec_wait(exec_id, 10_000_000))[1] == 129
            with pytest.raises(errors.InvalidArgument, match="no user 'ghost'"):
                await q.exec_with_pty(name, ["sh"], user="ghost")
            with pytest.raises(errors.ExecFailed, match="no-such-program"):
                await q.exec_with_pty(name, ["no-such-program"])
            with pytest.raises(errors.InvalidArgument, match="unknown exec option"):
                await q.exec_with_pty(name, ["sh"], stdin=b"x")
            with pytest.raises(errors.InvalidArgument, match="empty"):
                await q.exec_with_pty(name, [])
            # Nothing was left behind, and the daemon holds no terminal.
            assert all(e[1] == "exited" for e in await q.list_execs(name))
            assert fd_count(sandbox, pid) == before
            kept = await q.exec_with_pty(name, ["sleep", "100"])
            await q.stop(name, 0)
            assert await q.exec_wait(kept[0], 10_000_000) == ("exited", 137)
            os.close(kept[1])
            with pytest.raises(errors.InvalidState):
                await q.exec_with_pty(name, ["sh"])
            await q.remove(name)

    run(scenario())


def test_quiltctl_exec_t_gives_the_command_a_terminal(sandbox: Any, busybox_image: str, name: str) -> None:
    ctl(sandbox, "run", "-d", "--name", name, "busybox", "sleep", "1000")
    try:
        deadline = time.monotonic() + 10
        while ctl(sandbox, "exec", name, "true", check=False).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # script(1) gives quiltctl a terminal of 40x120, as a person's would be.
        inner = f"stty rows 40 cols 120; {QUILTCTL} exec -it {name} sh -c 'tty; stty size; exit 5'"
        result = sandbox.run(["script", "-qec", inner, "/dev/null"], check=False)
        out = result.stdout.replace(b"\r", b"")
        # (script echoes what it reads from its own stdin, at a moment of its choosing: lines, not a block.)
        assert b"/dev/pts/0\n" in out and b"40 120\n" in out, out
        assert result.returncode == 5
        # Typed input reaches an interactive shell, and its exit code comes back.
        inner = f"{QUILTCTL} exec -it -u nobody {name} sh -c 'read x; echo got-$x-$(id -u); exit 4'"
        typed = sandbox.run(["script", "-qec", inner, "/dev/null"], check=False, input=b"typed\n")
        assert b"got-typed-65534" in typed.stdout and typed.returncode == 4, typed
        # Without a terminal of ours, -t still gives the command one.
        result = ctl(sandbox, "exec", "-t", name, "sh", "-c", "test -t 1 && echo tty-out")
        assert result.stdout.replace(b"\r", b"") == b"tty-out\n"
    finally:
        ctl(sandbox, "rm", "-f", name, check=False)


def test_a_pty_in_a_user_namespace_container(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, userns=True)
            exec_id, master = await q.exec_with_pty(name, ["sh", "-c", "tty; stat -c %u:%g $(tty); id -u"],
                                                    user="nobody")
            try:
                out = read_until(master, b"65534\r\n65534")
                assert b"/dev/pts/0\r\n65534:5\r\n65534" in out, out  # the user's, group tty
                assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 0)
            finally:
                os.close(master)
            await q.remove(name, force=True)

    run(scenario())
