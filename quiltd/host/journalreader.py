"""Reads containers' output back from journald: a query, or a follow that writes to a descriptor.

Every call here blocks (sd_journal reads files and waits on inotify), so the
core runs queries in an executor and each follow in a thread of its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

from systemd import journal

POLL_SEC = 0.5  # how often a follow looks at its stop flag and its descriptor
SETTLE_SEC = 0.5  # after its end, how long a follow waits for lines journald has not written yet,
# when journald cannot say it wrote them (see Synchronizer)
JOURNAL_VARLINK = "/run/systemd/journal/io.systemd.journal"
SYNC_TIMEOUT_SEC = 10.0


@dataclass(frozen=True)
class Query:
    container_id: str
    since_usec: int = 0
    tail: int = 0  # 0: all
    stream: str = ""  # "" both, else stdout or stderr
    exec_id: str = ""  # "": the container's own command; "*": everything; else one exec


@dataclass(frozen=True)
class Line:
    usec: int
    stream: str
    data: bytes


def _reader(q: Query) -> journal.Reader:
    r = journal.Reader()
    r.add_match(QUILT_CONTAINER_ID=q.container_id)
    if q.stream:
        r.add_match(QUILT_STREAM=q.stream)
    if q.exec_id not in ("", "*"):
        r.add_match(QUILT_EXEC_ID=q.exec_id)
    return r


# python-systemd's private names, each used here only. The entry under the
# reader is read a field at a time, through the reader's own calls
# (sd_journal_next, sd_journal_get_data and friends): the public
# get_next(), get_previous() and get() build a dict of every field of every
# entry, with conversions, which made reading a thousand lines four times
# slower. tests/unit/test_private_names.py fails when a release drops one.


def _next(r: journal.Reader) -> bool:
    """Moves to the next entry; public next() would also read the whole entry into a dict."""
    return bool(r._next())


def _previous(r: journal.Reader) -> bool:
    """Moves to the previous entry; public get_previous() would also read the whole entry."""
    return bool(r._previous())


def _get(r: journal.Reader, name: str) -> bytes:
    """One field's raw bytes; the public API has only the converted dict of every field."""
    value: bytes = r._get(name)
    return value


def _realtime(r: journal.Reader) -> int:
    """The entry's wall-clock µs as an int; public get_realtime() converts it to a datetime."""
    usec: int = r._get_realtime()
    return usec


def _cursor(r: journal.Reader) -> str:
    """The entry's cursor; the public API has it only in the dict of every field (__CURSOR)."""
    cursor: str = r._get_cursor()
    return cursor


def _field(r: journal.Reader, name: str) -> bytes | None:
    try:
        value = _get(r, name)
    except KeyError:
        return None
    return value


def _line(r: journal.Reader, q: Query) -> Line | None:
    """The entry under the reader, if it is one of the query's lines."""
    # journald cannot match on a field being absent: the container's own
    # lines are those without QUILT_EXEC_ID.
    if q.exec_id == "" and _field(r, "QUILT_EXEC_ID") is not None:
        return None
    stream = _field(r, "QUILT_STREAM") or b""
    return Line(_realtime(r), stream.decode(errors="replace"), _field(r, "MESSAGE") or b"")


def read(q: Query, limit: int) -> tuple[list[Line], bool]:
    """The matching lines in journal order, at most `limit`; True if there were more."""
    r = _reader(q)
    try:
        if q.tail:
            return _read_tail(r, q, limit)
        if q.since_usec:
            r.seek_realtime(q.since_usec)
        lines: list[Line] = []
        for line in _forward(r, q):
            if len(lines) == limit:
                return lines, True
            lines.append(line)
        return lines, False
    finally:
        r.close()


def _forward(r: journal.Reader, q: Query) -> Iterator[Line]:
    while _next(r):
        line = _line(r, q)
        if line is not None and line.usec >= q.since_usec:
            yield line


def _read_tail(r: journal.Reader, q: Query, limit: int) -> tuple[list[Line], bool]:
    lines, more, _ = _read_tail_and_cursor(r, q, limit)
    return lines, more


def _read_tail_and_cursor(r: journal.Reader, q: Query, limit: int) -> tuple[list[Line], bool, str]:
    """The last lines, and the cursor of the last entry that matched the journal's filter."""
    r.seek_tail()
    lines: list[Line] = []
    cursor = ""
    while len(lines) < q.tail:
        if not _previous(r):
            break
        if not cursor:
            cursor = _cursor(r)
        line = _line(r, q)
        if line is None:
            continue
        if line.usec < q.since_usec:
            break
        if len(lines) == limit:
            return lines[::-1], True, cursor
        lines.append(line)
    return lines[::-1], False, cursor


class JournalError(Exception):
    """The journal could not be read or watched; the message says why."""


class Synchronizer:
    """journald's Synchronize call: returns once every entry sent to journald before it is written.

    A container's init sends its last lines before it exits, so once its end
    is seen, a synchronize makes its output complete in the journal files:
    a follow or a read of an ended container misses nothing, however far
    behind journald is. A wait of fixed length cannot promise that.

    One call runs at a time; the callers that come meanwhile share the next
    one, so a flood of log reads cannot become a flood of journal syncs.
    """

    def __init__(self, path: str = JOURNAL_VARLINK) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._started = 0  # calls made
        self._done = 0  # of those, the last one answered
        self._running = False
        self._ok = False  # how the last one went

    def sync(self) -> bool:
        """True once journald has written what it was sent before now; False if it could not say so."""
        with self._cond:
            wanted = self._started + 1  # a call that starts after this point
            while self._done < wanted and self._running:
                self._cond.wait()
            if self._done >= wanted:
                return self._ok
            self._running = True
            self._started += 1
            number = self._started
        ok = False
        try:
            ok = _synchronize(self._path)
        finally:
            with self._cond:
                self._running = False
                self._done, self._ok = number, ok
                self._cond.notify_all()
        return ok


def _synchronize(path: str) -> bool:
    """One io.systemd.Journal.Synchronize over journald's varlink socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SYNC_TIMEOUT_SEC)
            s.connect(path)
            s.sendall(b'{"method":"io.systemd.Journal.Synchronize","parameters":{}}\0')
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = s.recv(4096)
                if not chunk:
                    return False
                reply += chunk
        answer = json.loads(reply[:-1])
    except (OSError, ValueError):
        return False  # no such socket (an older journald), or it did not answer in time
    return isinstance(answer, dict) and "error" not in answer


class JournalWatch:
    """One inotify watch of the journal, shared by every follow.

    An sd_journal that is waited on makes an inotify instance of its own, and
    the kernel allows 128 (fs.inotify.max_user_instances) to all of root's
    processes together. With one per follow, the follows past the first
    hundred or so could not wait and ended at once, without a word. Here one
    thread waits and counts the journal's changes; a follow only reads. An
    open journal sees what is appended to its files without inotify, and when
    files come or go (rotation) each follow opens its reader again at its
    cursor.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._changes = 0
        self._invalidations = 0
        self._error: str | None = None
        self._running = False

    def start(self) -> None:
        """Starts the watch unless it runs; raises OSError when the journal cannot be watched."""
        with self._cond:
            if self._running:
                return
            r = journal.Reader()
            try:
                # Makes the inotify instance and its watches now, so that a
                # failure is the caller's error rather than a follow's silent end.
                r.fileno()
            except BaseException:
                r.close()
                raise
            self._error = None
            self._running = True
            threading.Thread(target=self._run, args=(r,), name="journal-watch", daemon=True).start()

    def _run(self, r: journal.Reader) -> None:
        try:
            while True:
                event = r.wait(None)
                with self._cond:
                    self._changes += 1
                    if event == journal.INVALIDATE:
                        self._invalidations += 1
                    self._cond.notify_all()
        except Exception as exc:  # the follows are told, and say so to their readers
            with self._cond:
                self._error = f"watching the journal failed: {exc}"
                self._running = False
                self._cond.notify_all()
        finally:
            r.close()

    def seen(self) -> tuple[int, int]:
        with self._cond:
            return self._changes, self._invalidations

    def wait(self, seen: tuple[int, int], timeout: float) -> tuple[int, int]:
        """(changes, invalidations) once they differ from `seen`, or after timeout.

        Raises JournalError once the watch has failed.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._error is not None or (self._changes, self._invalidations) != seen, timeout)
            if self._error is not None:
                raise JournalError(self._error)
            return self._changes, self._invalidations


Reader: TypeAlias = journal.Reader


def open_reader(q: Query) -> Reader:
    """A reader for the query; OSError if the journal cannot be opened."""
    r: Reader = _reader(q)
    return r


class Follower(threading.Thread):
    """Writes the matching lines to fd, then new ones as they come, until stopped or fd is closed.

    Each line goes out as `<usec> <stream> <bytes of the line>\\n`: lines never
    hold a newline, so this is binary safe and needs no escaping.
    """

    def __init__(self, q: Query, fd: int, reader: journal.Reader, watch: JournalWatch,
                 synchronizer: Synchronizer, on_end: Callable[[Follower], None]) -> None:
        super().__init__(name=f"follow-{q.container_id}", daemon=True)
        self.query = q
        self.stop = threading.Event()
        self._fd = fd
        self._reader = reader  # opened by the caller, so that failing to open it is the call's error
        self._watch = watch
        self._synchronizer = synchronizer
        self._on_end = on_end
        self._cursor = ""  # of the last entry read, to open the reader again after rotation

    def run(self) -> None:
        try:
            self._follow()
        except Exception as exc:
            # One follow ends, and never silently: its reader is told why,
            # in the line format, with "error" where the stream would be.
            self._say_error(str(exc) or type(exc).__name__)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._on_end(self)

    def _say_error(self, reason: str) -> None:
        line = Line(time.time_ns() // 1000, "error", f"quiltd: the follow ended: {reason}".encode())
        with contextlib.suppress(Exception):
            self._write([line])

    def _follow(self) -> None:
        r = self._reader
        try:
            if self.query.tail:
                lines, _, cursor = _read_tail_and_cursor(r, self.query, self.query.tail)
                self._cursor = cursor
                if not self._write(lines):
                    return
                if cursor:
                    # From the last entry already seen, so nothing that came
                    # meanwhile is missed.
                    r.seek_cursor(cursor)
                    _next(r)
                else:
                    r.seek_head()
            elif self.query.since_usec:
                r.seek_realtime(self.query.since_usec)
            stopping_since: float | None = None
            seen = self._watch.seen()
            while True:
                lines = list(self._forward(r))
                if not self._write(lines) or self._closed():
                    return
                if self.stop.is_set():
                    # The last lines may still be on their way to journald.
                    if stopping_since is None:
                        stopping_since = time.monotonic()
                        if self._synchronizer.sync():
                            self._write(list(self._forward(r)))  # now all there
                            return
                    elif not lines and time.monotonic() - stopping_since >= SETTLE_SEC:
                        return
                now = self._watch.wait(seen, POLL_SEC if stopping_since is None else SETTLE_SEC / 5)
                if now[1] != seen[1]:
                    r = self._reopen(r)
                seen = now
        finally:
            r.close()

    def _forward(self, r: journal.Reader) -> Iterator[Line]:
        moved = False
        try:
            while _next(r):
                moved = True
                line = _line(r, self.query)
                if line is not None and line.usec >= self.query.since_usec:
                    yield line
        finally:
            if moved:
                self._cursor = _cursor(r)

    def _reopen(self, old: journal.Reader) -> journal.Reader:
        """A new reader where the old one was: journal files were added or removed."""
        r = _reader(self.query)
        old.close()
        self._reader = r
        if self._cursor:
            r.seek_cursor(self._cursor)
            _next(r)  # the entry of the cursor was read already
        elif self.query.since_usec:
            r.seek_realtime(self.query.since_usec)
        return r

    def _write(self, lines: list[Line]) -> bool:
        for line in lines:
            data = memoryview(f"{line.usec} {line.stream} ".encode() + line.data + b"\n")
            while data:
                try:
                    n = os.write(self._fd, data)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                        return False
                    raise
                data = data[n:]
                if data and not self._wait_writable():
                    return False
        return True

    def _wait_writable(self) -> bool:
        p = select.poll()
        p.register(self._fd, select.POLLOUT)
        while True:
            events = p.poll(POLL_SEC * 1000)
            if events:
                return not events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
            if self._closed():
                return False

    def _closed(self) -> bool:
        p = select.poll()
        p.register(self._fd, 0)  # POLLERR and POLLHUP are reported whatever is asked
        events = p.poll(0)
        return bool(events and events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL))

