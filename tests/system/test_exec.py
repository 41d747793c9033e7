"""Exec: commands run inside a running container, from a user's seat."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import BUS, eventually, run

pytestmark = pytest.mark.system

NAMESPACES = ("mnt", "uts", "ipc", "net", "pid", "cgroup")


async def _running(q: Any, name: str, command: list[str] | None = None, **options: Any) -> str:
    cid, _ = await q.create(name, "busybox", command or ["sleep", "1000"], **options)

    async def up() -> bool:
        return bool((await q.info(name))["State"] == "running")

    await eventually(up)
    return str(cid)


def test_exec_joins_every_namespace_the_root_and_the_scope(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid = await _running(q, name)
            init = (await q.info(name))["Pid"]
            script = "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done; " \
                "hostname; cat /proc/self/cgroup; grep NoNewPrivs /proc/self/status; ls /; echo $$"
            code, out, err = await q.exec(name, ["sh", "-c", script])
            assert (code, err) == (0, b"")
            lines = out.decode().splitlines()
            host_view = [sandbox.run(["readlink", f"/proc/{init}/ns/{n}"]).stdout.decode().strip()
                         for n in NAMESPACES]
            assert lines[:6] == host_view
            assert lines[6] == name  # the container's hostname
            cgroups = [line for line in lines if line.count(":") >= 2 and line[0].isdigit()]
            # In the container's cgroup namespace, whose root is its scope:
            # a process anywhere else would see a path like /../..
            assert cgroups and all(line.endswith(":/") for line in cgroups), cgroups
            assert "NoNewPrivs:\t1" in lines
            assert {"bin", "etc", "proc"} <= set(lines) and "work" not in lines  # the busybox root
            assert 1 < int(lines[-1]) < 1000  # a pid of the container's namespace

            # Seen from systemd: a background exec sits in the container's scope.
            exec_id = await q.exec_start(name, ["sleep", "777"])
            status = sandbox.run(["systemctl", "status", f"quilt-{cid}.scope", "--no-pager"]).stdout.decode()
            assert "sleep 777" in status
            await q.exec_kill(exec_id, 9)
            assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 137)
            await q.remove(name, force=True)

    run(scenario())


def test_exec_options_user_env_workdir_stdin(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, env=["FROM_CONTAINER=1", "SHARED=container"])
            code, out, _ = await q.exec(name, ["sh", "-c", "id -u; id -g; pwd; echo $FROM_CONTAINER $SHARED"],
                                        env=["SHARED=exec"], workdir="/tmp", user="nobody")
            assert (code, out.decode().split()) == (0, ["65534", "65534", "/tmp", "1", "exec"])
            code, out, _ = await q.exec(name, ["id", "-u"], user="1234:5")
            assert (code, out) == (0, b"1234\n")
            data = bytes(range(256)) * 1000  # binary, more than a pipe holds
            code, out, _ = await q.exec(name, ["cat"], stdin=data)
            assert (code, out) == (0, data)
            code, out, err = await q.exec(name, ["sh", "-c", "echo out; echo err >&2; exit 7"])
            assert (code, out, err) == (7, b"out\n", b"err\n")
            await q.remove(name, force=True)

    run(scenario())


def test_exec_timeout_and_output_cap_are_reported(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            began = time.monotonic()
            code, out, _, info = await q.exec_ex(name, ["sh", "-c", "echo started; sleep 100"], timeout_sec=1)
            assert time.monotonic() - began < 8
            assert (code, out, info["timed_out"]) == (124, b"started\n", True)
            code, _, _ = await q.exec(name, ["sleep", "100"], timeout_sec=1)
            assert code == 124

            cmd = ["sh", "-c", "head -c 3000 /dev/zero; head -c 10 /dev/zero >&2"]
            with pytest.raises(errors.OutputTruncated, match="3000 bytes to stdout"):
                await q.exec(name, cmd, max_output=1000)
            code, out, err, info = await q.exec_ex(name, cmd, max_output=1000)
            assert (code, out, err) == (0, b"\0" * 1000, b"\0" * 10)
            assert info == {"timed_out": False, "stdout_truncated": True, "stderr_truncated": False,
                            "stdout_bytes": 3000, "stderr_bytes": 10}
            await q.remove(name, force=True)

    run(scenario())


def test_exec_bad_input_gets_named_errors(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"], start=False)
            with pytest.raises(errors.InvalidState, match="not running"):
                await q.exec(name, ["true"])
            await q.start(name)
            with pytest.raises(errors.NoSuchContainer):
                await q.exec(name + "-nope", ["true"])
            with pytest.raises(errors.InvalidArgument, match="empty"):
                await q.exec(name, [])
            with pytest.raises(errors.ExecFailed, match="no-such-program"):
                await q.exec(name, ["no-such-program"])
            with pytest.raises(errors.ExecFailed, match="workdir /nowhere"):
                await q.exec(name, ["true"], workdir="/nowhere")
            with pytest.raises(errors.InvalidArgument, match="no user 'ghost'"):
                await q.exec(name, ["true"], user="ghost")
            with pytest.raises(errors.InvalidArgument, match="unknown exec option"):
                await q.call("Exec", "sasa{sv}", name, ["true"], {"color": _variant("s", "red")})
            with pytest.raises(errors.InvalidArgument, match="max_output"):
                await q.exec(name, ["true"], max_output=1 << 40)
            for stdin in (_variant("as", ["x"]), _variant("at", [256]), _variant("ab", [True])):
                with pytest.raises(errors.InvalidArgument, match="stdin"):
                    await q.call("ExecEx", "sasa{sv}", name, ["cat"], {"stdin": stdin})
            with pytest.raises(errors.NoSuchExec):
                await q.exec_wait("0123456789abcdef")
            with pytest.raises(errors.NoSuchExec):
                await q.exec_kill("not-an-id", 15)
            # The container and the daemon are fine.
            assert await q.exec(name, ["echo", "still", "here"]) == (0, b"still here\n", b"")
            await q.stop(name, 0)
            with pytest.raises(errors.InvalidState):
                await q.exec(name, ["true"])
            await q.remove(name)

    run(scenario())


def _variant(signature: str, value: Any) -> Any:
    from dbus_next.signature import Variant

    return Variant(signature, value)


def test_exec_on_the_container_object_with_busctl(sandbox: Any, quilt: Any, name: str) -> None:
    async def create() -> str:
        async with quilt() as q:
            return await _running(q, name)

    cid = run(create())
    out = sandbox.run(["busctl", "call", "--", "org.quilt.Quilt1", f"/org/quilt/Quilt1/container/{cid}",
                       "org.quilt.Quilt1.Container", "Exec", "asa{sv}", "3", "sh", "-c", "printf AB; exit 2",
                       "0"]).stdout.decode()
    assert out.strip() == "iayay 2 2 65 66 0"
    sandbox.run(["busctl", "call", *BUS, "RemoveContainer", "sb", name, "true"])


def test_fifty_long_execs_do_not_slow_the_daemon(quilt: Any, name: str) -> None:
    async def timed_info(q: Any) -> float:
        began = time.monotonic()
        await q.info(name)
        return time.monotonic() - began

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            usual = [await timed_info(q) for _ in range(20)]
            execs = [asyncio.ensure_future(q.exec(name, ["sh", "-c", f"sleep 4; echo {i}"]))
                     for i in range(50)]
            await asyncio.sleep(0.5)
            during = []
            while not all(e.done() for e in execs):
                during.append(await timed_info(q))
                await asyncio.sleep(0.05)
            results = [await e for e in execs]
            assert [r[1] for r in results] == [f"{i}\n".encode() for i in range(50)]
            assert all(r[0] == 0 for r in results)
            assert len(during) >= 10
            # The loop never waits on an exec: answers stay in the usual range
            # (generous bounds, the machine is shared).
            assert statistics.median(during) < max(0.05, 10 * statistics.median(usual)), (usual, during)
            assert max(during) < 1.0, during
            await q.remove(name, force=True)

    run(scenario())


def test_exec_with_fds_streams_live_and_returns_the_code(quilt: Any, name: str) -> None:
    """The caller's own descriptors: output arrives while the command still runs."""

    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            script = "echo first; read line; echo got $line; echo oops >&2; exit 5"
            call = asyncio.ensure_future(q.exec_with_fds(name, ["sh", "-c", script], in_r, out_w, err_w,
                                                         env=["X=1"]))
            loop = asyncio.get_running_loop()
            # "first" comes before we write a byte: the command is blocked on read meanwhile.
            first = await loop.run_in_executor(None, os.read, out_r, 100)
            assert first == b"first\n" and not call.done()
            os.write(in_w, b"hello\n")
            assert await asyncio.wait_for(call, 30) == 5
            for fd in (in_r, in_w, out_w, err_w):
                os.close(fd)
            assert os.read(out_r, 100) == b"got hello\n" and os.read(out_r, 100) == b""
            assert os.read(err_r, 100) == b"oops\n"
            os.close(out_r)
            os.close(err_r)

            # Bad descriptors: a device (as a terminal would be), the wrong direction.
            null = os.open("/dev/null", os.O_RDWR)
            r, w = os.pipe()
            try:
                with pytest.raises(errors.InvalidArgument, match="pipe, a socket or a regular file"):
                    await q.exec_with_fds(name, ["true"], null, w, w)
                with pytest.raises(errors.InvalidArgument, match="stdout is not open for writing"):
                    await q.exec_with_fds(name, ["true"], r, r, w)
                with pytest.raises(errors.InvalidArgument, match="unknown exec option"):
                    await q.exec_with_fds(name, ["true"], r, w, w, max_output=5)
                await q.stop(name, 1)
                with pytest.raises(errors.InvalidState):
                    await q.exec_with_fds(name, ["true"], r, w, w)
            finally:
                for fd in (null, r, w):
                    os.close(fd)
            await q.remove(name, force=True)

    run(scenario())


def test_exec_racing_a_kill_answers_a_result_or_invalid_state(quilt: Any, name: str) -> None:
    # An exec that meets a container on its way out must get a named answer,
    # never Internal: the container either ran it or was no longer there.
    async def scenario() -> list[str]:
        outcomes = []
        async with quilt() as q:
            for round_ in range(20):
                ref = f"{name}-{round_}"
                await _running(q, ref)

                async def exec_once(ref: str = ref) -> str:
                    try:
                        code, _, _ = await q.exec(ref, ["sh", "-c", "sleep 0.2"])
                        return f"exit {code}"
                    except errors.InvalidState:
                        return "InvalidState"

                execs = [asyncio.create_task(exec_once()) for _ in range(3)]
                await asyncio.sleep(0.005 * (round_ % 4))
                await q.kill(ref, 9)
                outcomes += await asyncio.gather(*execs)
                await q.remove(ref, force=True)
        return outcomes

    outcomes = run(scenario())
    assert set(outcomes) <= {"exit 0", "exit 137", "InvalidState"}, outcomes


def test_execs_holding_output_are_capped_per_caller(quilt: Any, name: str) -> None:
    # Each Exec's output is held in quiltd until it ends: six at 8 MiB took
    # quiltd from 55 to 379 MiB. One caller may have 128 MiB of max_output
    # (both streams) running at once: eight at the largest.
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            held = [asyncio.ensure_future(q.exec(name, ["sh", "-c", f"sleep 3; echo done{i}"],
                                                 max_output=8 << 20))
                    for i in range(8)]
            await asyncio.sleep(1)
            try:
                with pytest.raises(errors.LimitExceeded, match="capped at 134217728 bytes per user"):
                    await q.exec(name, ["echo", "ninth"])
                # Output that goes to the caller's own descriptors is not held: not counted.
                r, w = os.pipe()
                try:
                    code = await q.exec_with_fds(name, ["echo", "direct"], r, w, w)
                finally:
                    os.close(w)
                assert code == 0 and os.read(r, 100) == b"direct\n"
                os.close(r)
            finally:
                results = await asyncio.gather(*held)
            assert results == [(0, f"done{i}\n".encode(), b"") for i in range(8)]
            assert await q.exec(name, ["echo", "again"]) == (0, b"again\n", b"")  # the places are free again
            await q.remove(name, force=True)

    run(scenario())


def test_the_memory_of_large_outputs_is_given_back(sandbox: Any, quilt: Any, name: str) -> None:
    # Six Execs of 8 MiB took quiltd from 55 to 379 MiB, never returned.
    def rss_kib() -> int:
        pid = sandbox.run(["systemctl", "show", "-P", "MainPID", "quiltd"]).stdout.decode().strip()
        status = sandbox.host_path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    both = ["sh", "-c", "head -c 8388608 /dev/zero; head -c 8388608 /dev/zero >&2"]
    baseline = 0

    async def scenario() -> None:
        nonlocal baseline
        async with quilt() as q:
            await _running(q, name)
            baseline = rss_kib()
            for _ in range(4):
                results = await asyncio.gather(*(q.exec(name, both, max_output=8 << 20) for _ in range(8)))
                assert all(len(out) == len(err) == 8 << 20 for _, out, err in results)
            del results
            peak = rss_kib()
            # 192 MiB of output at once at most (8 of 2 x 8 MiB here), plus
            # quiltd's own: the cap holds quiltd well under this.
            assert peak < 512 << 10, f"{peak} KiB: quiltd holds more than the output cap allows"
            await q.remove(name, force=True)

        async def given_back() -> bool:
            return rss_kib() < baseline + (48 << 10)

        await eventually(given_back)

    try:
        run(scenario())
    except AssertionError as e:
        raise AssertionError(f"quiltd holds {rss_kib()} KiB, {baseline} KiB before: {e}") from None


def test_exec_in_a_stopped_container_answers_instead_of_hanging(quilt: Any, name: str) -> None:
    """SIGSTOP holds the container's init, which runs every exec: the call says so at once."""
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name)
            await q.kill(name, signal.SIGSTOP)
            with pytest.raises(errors.InvalidState, match="SIGSTOP"):
                await asyncio.wait_for(q.exec(name, ["true"]), 10)
            await q.kill(name, signal.SIGCONT)
            assert (await q.exec(name, ["echo", "back"]))[:2] == (0, b"back\n")
            await q.remove(name, force=True)

    run(scenario())
