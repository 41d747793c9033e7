"""quiltctl's stats, events and top logic, and the client's call timeouts, without a daemon."""

from __future__ import annotations

import asyncio
import datetime
import io
from typing import Any

import pytest

from quiltd import errors
from quiltd.cli import ctlmonitor, ctloutput
from quiltd.cli.ctlmonitor import Event, Sample
from quiltd.client import CALL_TIMEOUT, QuiltClient

WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)


def sample(cpu: int, at: float, started_usec: int = 0) -> Sample:
    return Sample("c1", "web", "running", cpu, 32 << 20, 64 << 20, 3, 10, 20, at, started_usec)


def test_cpu_percent_between_samples_and_since_the_start() -> None:
    assert ctlmonitor.cpu_percent(sample(3_000_000_000, 12.0), sample(1_000_000_000, 10.0), 0) == 100.0
    # The first sample: the average since the container started, as podman's first frame.
    assert ctlmonitor.cpu_percent(sample(1_000_000_000, 5.0, started_usec=1_000_000), None, 5_000_000) == 25.0
    assert ctlmonitor.cpu_percent(sample(1, 5.0), None, 5_000_000) == 0.0  # start unknown


def test_stats_row_shows_usage_against_the_limit_and_network_both_ways() -> None:
    s = ctlmonitor.stat(sample(0, 1.0), None, 0)
    assert s.memory_percent == 50.0
    assert ctlmonitor.stats_rows([s]) == [["c1", "web", "0.00%", "32.0 MiB / 64.0 MiB", "50.00%",
                                           "10 B / 20 B", "3"]]
    bare = ctlmonitor.Stat("c2", "x", 0.0, 0, 0, 0.0, 1, None, None)
    assert ctlmonitor.stats_rows([bare])[0][5] == "--"


def test_events_from_each_signal() -> None:
    exited = Event("2026-01-02T03:04:05.000006+00:00", "container", "exited", "c1",
                   {"name": "web", "exit_code": 3})
    assert ctlmonitor.event_from_signal("ContainerStateChanged", ["c1", "web", "exited", 3], WHEN) == exited
    removed = ctlmonitor.event_from_signal("ContainerRemoved", ["c1", "web"], WHEN)
    assert removed is not None and removed.action == "removed"
    imported = ctlmonitor.event_from_signal("ImportProgress", ["bb", 5, 10], WHEN)
    assert imported is not None and (imported.type, imported.id) == ("image", "bb")
    ended = ctlmonitor.event_from_signal("ExecExited", ["e1", "c1", 0], WHEN)
    assert ended is not None and ended.attributes == {"container": "c1", "exit_code": 0}
    assert ctlmonitor.event_from_signal("Other", [], WHEN) is None


def test_event_line() -> None:
    e = Event("T", "container", "running", "c1", {"name": "web", "exit_code": -1})
    assert ctlmonitor.event_line(e) == "T container running c1 (name=web, exit_code=-1)"


def test_filters_same_key_any_value_different_keys_all() -> None:
    filters = ctlmonitor.parse_filters(["container=web", "container=db", "event=exited"])
    assert filters == {"container": {"web", "db"}, "event": {"exited"}}
    web_exit = Event("T", "container", "exited", "c1", {"name": "web"})
    assert ctlmonitor.matches(web_exit, filters)
    assert not ctlmonitor.matches(Event("T", "container", "running", "c1", {"name": "web"}), filters)
    assert not ctlmonitor.matches(Event("T", "container", "exited", "c2", {"name": "other"}), filters)
    exec_event = Event("T", "exec", "exited", "e1", {"container": "c1"})
    assert ctlmonitor.matches(exec_event, {"container": {"c1"}, "type": {"exec"}})
    assert not ctlmonitor.matches(exec_event, {"type": {"container"}})
    assert ctlmonitor.matches(Event("T", "image", "import", "bb", {}), {"image": {"bb"}})


@pytest.mark.parametrize("text", ["nope=1", "container", "type="])
def test_bad_filters_are_usage_errors(text: str) -> None:
    with pytest.raises(ctlmonitor.UsageError, match="invalid filter"):
        ctlmonitor.parse_filters([text])


def test_durations_as_podman() -> None:
    assert [ctlmonitor.duration(s) for s in (0.4, 59, 61, 3723)] == ["0s", "59s", "1m1s", "1h2m3s"]


def test_progress_bar_only_on_a_terminal() -> None:
    assert ctloutput.bar("bb", 512 << 10, 1 << 20, 10) == "bb [#####-----]  50%  512.0 KiB / 1.0 MiB"
    assert ctloutput.bar("bb", 2048, 0, 10) == "bb 2.0 KiB"
    piped = io.StringIO()
    progress = ctloutput.Progress("bb", piped)
    progress.update(1, 2)
    progress.finish()
    assert not progress.shown and piped.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = ctloutput.Progress("bb", terminal)
    progress.update(1 << 20, 1 << 20)
    progress.finish()
    assert terminal.getvalue() == "\rbb [" + "#" * 30 + "] 100%  1.0 MiB / 1.0 MiB\n"


class SlowBus:
    """Answers nothing: each call waits forever, to show which timeout applies."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, msg: Any) -> Any:
        self.calls.append(msg.member)
        await asyncio.Event().wait()


def test_quick_calls_time_out_and_long_ones_do_not() -> None:
    async def scenario() -> None:
        q = QuiltClient(SlowBus(), timeout=0.05)  # type: ignore[arg-type]
        with pytest.raises(errors.NoReply, match=r"no answer to GetContainerInfo within 0\.05 s"):
            await q.info("web")
        # An import lasts as long as its archive takes: no timeout of ours cuts it.
        task = asyncio.ensure_future(q.import_image("big", "/var/tmp/big.tar"))
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        # A stop may take its own grace period on top.
        stop = asyncio.ensure_future(q.stop("web", 1))
        await asyncio.sleep(0.3)
        assert not stop.done()
        with pytest.raises(errors.NoReply, match=r"within 1\.05 s"):
            await stop

    asyncio.run(scenario())
    assert CALL_TIMEOUT > 25  # above D-Bus's usual default, which cut off busy but healthy calls
