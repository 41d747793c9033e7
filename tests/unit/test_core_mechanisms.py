"""The Processes contract (core/mechanisms.py), checked on the real pidfds and on the fake alike.

The core's unit tests are only as good as their fakes: what the core relies
on here holds for both, or one of them is wrong.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from quiltd.core.mechanisms import Processes
from quiltd.linux import process_starttime
from quiltd.paths import Paths
from quiltd.runtime.inits import Pidfds
from tests.unit.fakes import FakeInit, FakeProcesses


@dataclass(frozen=True)
class Subject:
    processes: Processes
    pid: int
    starttime: int
    end: Callable[[], None]  # the process ends by itself (and, a real one, is reaped)


@pytest.fixture(params=["real", "fake"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    if request.param == "real":
        child = subprocess.Popen(["sleep", "30"])
        try:
            def end() -> None:
                child.terminate()
                child.wait()

            yield Subject(Pidfds(), child.pid, process_starttime(child.pid), end)
        finally:
            child.kill()
            child.wait()
    else:
        fake = FakeProcesses()
        init = FakeInit(4242, Paths(tmp_path, tmp_path).exit_file)
        fake.add(init)
        try:
            yield Subject(fake, init.pid, init.starttime, lambda: init.exit(None))
        finally:
            init.close()


def test_a_pidfd_names_the_process_by_pid_and_start_time(subject: Subject) -> None:
    assert subject.processes.open_pidfd(subject.pid, subject.starttime + 1) is None  # a reused pid
    pidfd = subject.processes.open_pidfd(subject.pid, subject.starttime)
    assert pidfd is not None

    async def main() -> None:
        ended = asyncio.get_running_loop().create_future()
        subject.processes.watch_exit(pidfd, lambda: ended.set_result(None))
        await asyncio.sleep(0.05)
        assert not ended.done()  # it runs
        subject.end()
        await asyncio.wait_for(ended, 5)

    asyncio.run(main())


def test_a_signal_to_a_process_that_has_ended_is_no_error(subject: Subject) -> None:
    pidfd = subject.processes.open_pidfd(subject.pid, subject.starttime)
    assert pidfd is not None
    subject.end()
    subject.processes.send_signal(pidfd, signal.SIGUSR1)
