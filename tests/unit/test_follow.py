"""FollowLogs when the journal cannot be watched or read: an error, never an empty stream."""

from __future__ import annotations

import asyncio
import errno
import os
import select
from typing import Any

import pytest
from systemd import journal

from quiltd.core.logs import Logs
from quiltd.core.requests import LogOptions
from quiltd.errors import LimitExceeded
from quiltd.host import journalreader
from quiltd.host.journalreader import Follower, JournalError, JournalWatch, Query, Synchronizer
from quiltd.model import State


class _Container:
    id = "0123456789abcdef"
    name = "c"
    state = State.RUNNING


class _Core:
    """What Logs asks of the manager and of execs."""

    def add_listener(self, listener: object) -> None:
        pass

    def get(self, ref: str) -> _Container:
        return _Container()


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_a_follow_that_cannot_watch_the_journal_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the kernel answers once root's inotify instances are all taken.
    def no_inotify(self: Any) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(journal.Reader, "fileno", no_inotify)
    core: Any = _Core()
    logs = Logs(core, core)
    r, w = os.pipe()
    try:
        with pytest.raises(LimitExceeded, match="cannot follow the journal: Too many open files"):
            asyncio.run(logs.follow("c", LogOptions(), w))
        assert _closed(w)  # the call took it over, and closed it
    finally:
        os.close(r)


class _BrokenWatch(JournalWatch):
    def wait(self, seen: tuple[int, int], timeout: float) -> tuple[int, int]:
        raise JournalError("watching the journal failed: [Errno 5] Input/output error")


def test_a_follow_whose_journal_fails_says_why_before_its_end() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    query = Query("0123456789abcdef")
    follower = Follower(query, w, journalreader.open_reader(query), _BrokenWatch(),
                        Synchronizer("/nonexistent"), lambda _: None)
    follower.start()
    follower.join(10)
    assert not follower.is_alive()
    with os.fdopen(r, "rb") as reader:
        data = reader.read()
    usec, stream, text = data.split(b" ", 2)
    assert usec.isdigit() and stream == b"error"
    assert text == b"quiltd: the follow ended: watching the journal failed: [Errno 5] Input/output error\n"


class _Ending(_Core):
    """A container that exits while its follow's reader is being opened."""

    def __init__(self) -> None:
        self.asked = 0

    def get(self, ref: str) -> _Container:
        self.asked += 1
        c = _Container()
        if self.asked > 1:
            c.state = State.EXITED
        return c


def test_a_follow_of_a_container_that_ends_while_it_is_set_up_ends_too() -> None:
    core: Any = _Ending()
    logs = Logs(core, core)
    r, w = os.pipe()
    asyncio.run(logs.follow("c", LogOptions(), w))
    ready, _, _ = select.select([r], [], [], 10)
    assert ready and os.read(r, 100) == b"", "the follow went on after its container had ended"
    os.close(r)
