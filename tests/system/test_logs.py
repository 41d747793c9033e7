"""GetLogs, GetLogsRaw and FollowLogs: a container's output read back from the journal."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from tests.system.conftest import eventually, run
from tests.system.test_exec import _running

pytestmark = pytest.mark.system

# Ten numbered lines on stdout, three on stderr, then a line that is not
# UTF-8 and one with a NUL byte.
SCRIPT = (
    "i=1; while [ $i -le 10 ]; do echo out$i; i=$((i+1)); done; "
    "echo err1 >&2; echo err2 >&2; echo err3 >&2; "
    r"printf 'bad\377\376\n'; printf 'nul\000byte\n'"
)


async def _lines_ready(q: Any, name: str, count: int, **options: Any) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []

    async def enough() -> bool:
        nonlocal rows
        rows = await q.logs(name, **options)
        return len(rows) >= count

    await eventually(enough)
    return rows


def test_get_logs_keeps_order_stream_and_bytes(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", SCRIPT])
            assert await q.wait(name) == ("exited", 0)
            rows = await q.logs(name)  # complete once the exit is told, as with podman logs after wait
            out = [line for _, stream, line in rows if stream == "stdout"]
            err = [line for _, stream, line in rows if stream == "stderr"]
            assert out == [f"out{i}" for i in range(1, 11)] + ["bad\ufffd\ufffd", "nul\ufffdbyte"]
            assert err == ["err1", "err2", "err3"]
            stamps = [usec for usec, _, _ in rows]
            assert stamps == sorted(stamps) and stamps[0] > 1_600_000_000_000_000

            raw = await q.logs_raw(name, stream="stdout")
            assert [line for _, _, line in raw[-2:]] == [b"bad\xff\xfe", b"nul\0byte"]
            assert [line for _, _, line in await q.logs(name, stream="stderr")] == ["err1", "err2", "err3"]
            tail = await q.logs(name, tail=3, stream="stdout")
            assert [line for _, _, line in tail] == ["out10", "bad\ufffd\ufffd", "nul\ufffdbyte"]
            since = rows[5][0]
            assert await q.logs(name, since_usec=since) == [r for r in rows if r[0] >= since]
            await q.remove(name)

    run(scenario())


def test_exec_lines_are_kept_apart(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", "echo main; exec sleep 1000"])
            exec_id = await q.exec_start(name, ["sh", "-c", "echo from-exec; echo exec-err >&2"])
            assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 0)
            await q.exec(name, ["echo", "foreground-exec"])  # answered, not logged
            both = await _lines_ready(q, name, 3, exec_id="*")
            assert sorted(line for _, _, line in both) == ["exec-err", "from-exec", "main"]
            assert [line for _, _, line in await q.logs(name)] == ["main"]
            assert [(s, line) for _, s, line in await q.logs(name, exec_id=exec_id)] == \
                [("stdout", "from-exec"), ("stderr", "exec-err")]
            other = name[:50] + "-o"
            await _running(q, other)
            with pytest.raises(errors.NoSuchExec):
                await q.logs(other, exec_id=exec_id)
            for n in (name, other):
                await q.remove(n, force=True)

    run(scenario())


def test_follow_logs_streams_until_the_container_exits(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "sleep 1; for i in 1 2 3 4 5; do echo line$i; "
                                             "sleep 0.2; done; echo bye >&2"])
            r, w = os.pipe()
            try:
                await q.follow_logs(name, w)
            finally:
                os.close(w)
            data = await asyncio.get_running_loop().run_in_executor(None, _read_all, r, 20.0)
            lines = [line.split(b" ", 2) for line in data.splitlines()]
            assert [(s, text) for _, s, text in lines] == \
                [(b"stdout", f"line{i}".encode()) for i in range(1, 6)] + [(b"stderr", b"bye")]
            assert all(usec.isdigit() for usec, _, _ in lines)
            assert (await q.info(name))["State"] == "exited"  # end of file came with the exit
            await q.remove(name)

    run(scenario())


def test_output_is_whole_though_journald_lags(sandbox: Any, quilt: Any, name: str) -> None:
    """journald reads its queue seconds late: a follow and a read after the exit still get every line."""
    def journald(signal: str) -> None:
        sandbox.run(["systemctl", "kill", f"--signal={signal}", "systemd-journald.service"])

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "sleep 1; echo one; echo two >&2"])
            r, w = os.pipe()
            try:
                await q.follow_logs(name, w)
            finally:
                os.close(w)
            loop = asyncio.get_running_loop()
            journald("SIGSTOP")
            try:
                assert await q.wait(name) == ("exited", 0)
                followed = loop.run_in_executor(None, _read_all, r, 30.0)
                read = asyncio.ensure_future(q.logs(name))
                await asyncio.sleep(2)  # four times what a follow used to wait for late lines
            finally:
                journald("SIGCONT")
            assert [(s, text) for _, s, text in await read] == [("stdout", "one"), ("stderr", "two")]
            lines = [line.split(b" ", 2) for line in (await followed).splitlines()]
            assert [(s, text) for _, s, text in lines] == [(b"stdout", b"one"), (b"stderr", b"two")]
            await q.remove(name)

    run(scenario())


def _read_all(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while time.monotonic() < deadline:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"no end of file; got {data!r}")
    finally:
        os.close(fd)


def test_follow_ends_when_the_reader_goes_and_bad_input_is_refused(sandbox: Any, quilt: Any,
                                                                    name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", "while true; do echo tick; sleep 0.1; done"])
            pid = int(sandbox.run(["systemctl", "show", "-P", "MainPID", "quiltd"]).stdout.decode())
            r, w = os.pipe()
            await q.follow_logs(name, w, tail=1)
            os.close(w)
            assert os.read(r, 100).split(b" ", 2)[1:] == [b"stdout", b"tick\n"]
            # Counted while the follow runs: the first follow also starts the
            # one thread that watches the journal for all, which stays.
            threads = len(os.listdir(sandbox.host_path(f"/proc/{pid}/task"))) - 1
            os.close(r)

            async def follower_gone() -> bool:
                return len(os.listdir(sandbox.host_path(f"/proc/{pid}/task"))) <= threads

            await eventually(follower_gone)

            r, w = os.pipe()
            try:
                with pytest.raises(errors.InvalidArgument, match="not open for writing"):
                    await q.follow_logs(name, r)
                with pytest.raises(errors.InvalidArgument, match="stream"):
                    await q.follow_logs(name, w, stream="both-and-more")
                with pytest.raises(errors.NoSuchContainer):
                    await q.follow_logs(name + "-nope", w)
            finally:
                os.close(r)
                os.close(w)
            with pytest.raises(errors.InvalidArgument, match="unknown log option"):
                await q.call("GetLogs", "sa{sv}", name, {"colour": _variant("s", "red")})
            with pytest.raises(errors.InvalidArgument, match="tail"):
                await q.call("GetLogs", "sa{sv}", name, {"tail": _variant("s", "10")})
            with pytest.raises(errors.NoSuchExec):
                await q.logs(name, exec_id="0123456789abcdef")
            assert (await q.info(name))["State"] == "running"
            await q.remove(name, force=True)

    run(scenario())


def _variant(signature: str, value: Any) -> Any:
    from dbus_next.signature import Variant

    return Variant(signature, value)


def test_follows_past_the_cap_are_refused_and_none_ends_silently(quilt: Any, name: str) -> None:
    # 128 follows of one container, the documented cap. Each used to wait on
    # an inotify instance of its own, and the kernel allows root 128 of those
    # for every process together: the follows past the first hundred or so
    # ended at once with an empty stream, and freed their places for more.
    async def scenario() -> None:
        async with quilt() as q:
            await _running(q, name, ["sh", "-c", "echo first; while true; do sleep 1; echo tick; done"])
            readers: list[int] = []
            try:
                for _ in range(128):
                    r, w = os.pipe()
                    readers.append(r)
                    try:
                        await q.follow_logs(name, w)
                    finally:
                        os.close(w)
                r, w = os.pipe()
                try:
                    with pytest.raises(errors.InvalidState, match="128 log follows are running already"):
                        await q.follow_logs(name, w)
                finally:
                    os.close(r)
                    os.close(w)
                await asyncio.sleep(2.5)  # a tick or two for every follow
                ended = []
                for i, r in enumerate(readers):
                    os.set_blocking(r, False)
                    data = os.read(r, 1 << 16)
                    if not data.endswith(b"\n") or b"stdout first\n" not in data:
                        ended.append((i, data))
                assert ended == [], f"{len(ended)} follows ended or wrote nothing: {ended[:3]}"
            finally:
                await q.remove(name, force=True)
                for r in readers:
                    os.close(r)

    run(scenario())


def _dropped_notices(rows: list[tuple[int, str, str]]) -> list[str]:
    return [line for _, _, line in rows if line.startswith("quilt: ")]


@pytest.mark.parametrize(("options", "burst"), [({"log_rate_burst": 200}, 200), ({}, 10000)])
def test_a_flood_beyond_the_rate_limit_is_counted_and_told(quilt: Any, name: str, options: dict[str, Any],
                                                            burst: int) -> None:
    """Lines over the limit are dropped, but the logs say where and how many, and so does the info."""
    lines = burst + 5000

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", f"seq 1 {lines}"], **options)
            assert await q.wait(name) == ("exited", 0)
            rows = await _lines_ready(q, name, burst + 1)
            kept = [line for _, stream, line in rows if stream == "stdout"]
            assert kept == [str(i) for i in range(1, burst + 1)]
            assert _dropped_notices(rows) == [
                f"quilt: 5000 lines of output dropped: more than {burst} lines in 30 s (log_rate_burst)"]
            info = await q.info(name)
            got = info["LogLinesDropped"], info["LogRateBurst"], info["LogRateIntervalSec"]
            assert got == (5000, burst, 30)
            await q.remove(name)

    run(scenario())


def test_no_limit_of_quilts_own_drops_nothing_it_can_see(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", "seq 1 3000"], log_rate_burst=0)
            assert await q.wait(name) == ("exited", 0)
            rows = await _lines_ready(q, name, 3000)
            assert [line for _, _, line in rows] == [str(i) for i in range(1, 3001)]
            assert (await q.info(name))["LogLinesDropped"] == 0
            await q.remove(name)

    run(scenario())


def test_the_window_reopens_and_a_quiet_container_still_tells(quilt: Any, name: str) -> None:
    """After the interval, lines pass again; a drop is told when its window ends, with nothing after it."""
    script = "seq 1 20; sleep 2.5; echo after; sleep 3600"

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sh", "-c", script], log_rate_burst=5, log_rate_interval_sec=1)
            rows = await _lines_ready(q, name, 7)
            assert [line for _, _, line in rows] == [
                "1", "2", "3", "4", "5",
                "quilt: 15 lines of output dropped: more than 5 lines in 1 s (log_rate_burst)", "after"]
            assert (await q.info(name))["LogLinesDropped"] == 15
            await q.remove(name, force=True)

    run(scenario())


@pytest.mark.parametrize("options", [{"log_rate_burst": Variant("x", -1)},
                                     {"log_rate_interval_sec": Variant("t", 0)},
                                     {"log_rate_burst": Variant("s", "many")}])
def test_bad_log_rate_options_are_named(quilt: Any, options: dict[str, Variant]) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="log_rate"):
                await q.call("CreateContainer", "ssasa{sv}", "bad-log-rate", "busybox", ["true"], options)

    run(scenario())


# The CPU time of a unit's processes (user + system, theirs and their
# reaped children's), in seconds: systemd's CPUUsageNSec needs CPU
# accounting, which a cgroup v1 host may not have on for these units.
UNIT_CPU = r"""
cg=$(systemctl show -P ControlGroup "$1")
for dir in /sys/fs/cgroup/unified$cg /sys/fs/cgroup$cg /sys/fs/cgroup/systemd$cg; do
    [ -f "$dir/cgroup.procs" ] && break
done
ticks=0
for pid in $(cat "$dir/cgroup.procs"); do
    set -- $(sed 's/.*) //' /proc/$pid/stat 2>/dev/null)
    [ $# -gt 14 ] && ticks=$((ticks + ${12} + ${13} + ${14} + ${15}))
done
echo "$ticks $(getconf CLK_TCK)"
"""


def _cpu_sec(sandbox: Any, unit: str) -> float:
    ticks, per_sec = sandbox.run(["sh", "-c", UNIT_CPU, "cpu", unit]).stdout.split()
    return int(ticks) / int(per_sec)


def test_a_flood_costs_the_daemon_and_journald_nothing_past_the_limit(sandbox: Any, quilt: Any,
                                                                      name: str) -> None:
    """The output is split and limited by the container's init, inside its scope and CPU quota:
    neither quiltd nor journald pays for a container that floods for seconds."""
    async def scenario() -> None:
        async with quilt() as q:
            before = _cpu_sec(sandbox, "quiltd.service"), _cpu_sec(sandbox, "systemd-journald.service")
            await q.create(name, "busybox", ["timeout", "4", "yes", "flood"], cpu_quota=0.2)
            state, _ = await q.wait(name, 30_000_000)
            assert state == "exited"
            after = _cpu_sec(sandbox, "quiltd.service"), _cpu_sec(sandbox, "systemd-journald.service")
            dropped = (await q.info(name))["LogLinesDropped"]
            await q.remove(name)
            assert dropped > 0
            assert after[0] - before[0] < 0.4, (before, after)
            assert after[1] - before[1] < 1.0, (before, after)

    run(scenario())
