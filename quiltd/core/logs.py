"""Containers' output, read back from the journal: GetLogs and FollowLogs.

Core code on the event loop. Journal reads block, so a query runs in the
default executor and each follow in a thread of its own, which the core
stops when the container (or the followed exec) ends.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading

from quiltd.core import fdcheck
from quiltd.core.execs import Execs
from quiltd.core.manager import Manager
from quiltd.core.requests import LogOptions, Stream
from quiltd.errors import (
    Internal,
    InvalidState,
    LimitExceeded,
    NoSuchContainer,
    NoSuchExec,
    OutputTruncated,
)
from quiltd.host import journalreader
from quiltd.host.journalreader import Follower, JournalWatch, Line, Query, Synchronizer
from quiltd.model import Container, Exec

MAX_LINES = 100_000
MAX_FOLLOWERS = 128  # each is a thread


class Logs:
    def __init__(self, manager: Manager, execs: Execs) -> None:
        self._manager = manager
        self._execs = execs
        self._followers: set[Follower] = set()
        self._reserved = 0  # follows being set up
        self._watch = JournalWatch()  # one for every follow: see JournalWatch
        self._synchronizer = Synchronizer()
        self._lock = threading.Lock()  # followers end in their own threads
        manager.add_listener(self)
        execs.add_listener(self)

    def _query(self, ref: str, o: LogOptions) -> tuple[Container, Query]:
        c = self._manager.get(ref)
        if o.exec_id not in ("", "*"):
            e = self._execs.get(o.exec_id)
            if e.container_id != c.id:
                raise NoSuchExec(f"no exec {o.exec_id!r} in container {c.name}")
        stream = "" if o.stream is Stream.BOTH else o.stream.value
        return c, Query(c.id, o.since_usec, o.tail, stream, o.exec_id)

    def _ended(self, c: Container, q: Query) -> bool:
        """Whether what the query reads has ended: its output is all sent to journald then."""
        try:
            ended = not self._manager.get(c.id).state.is_active
            if q.exec_id not in ("", "*"):
                ended = ended or self._execs.get(q.exec_id).state.is_final
        except (NoSuchContainer, NoSuchExec):
            ended = True
        return ended

    async def get(self, ref: str, o: LogOptions) -> list[Line]:
        c, q = self._query(ref, o)
        loop = asyncio.get_running_loop()
        if self._ended(c, q):
            # Its last lines may still be in journald's queue: a read after
            # the end (podman logs after wait) must have them all.
            await loop.run_in_executor(None, self._synchronizer.sync)
        lines, more = await loop.run_in_executor(None, journalreader.read, q, MAX_LINES)
        if more:
            raise OutputTruncated(f"more than {MAX_LINES} lines match; narrow with since_usec or tail")
        return lines

    async def follow(self, ref: str, o: LogOptions, fd: int) -> None:
        """Starts writing lines to fd; takes fd over (closes it) whatever happens.

        Everything a follow needs is set up before this returns, so a follow
        that cannot be served is this call's error, not an empty stream.
        """
        reserved = False
        try:
            c, q = self._query(ref, o)
            fdcheck.check(fd, writable=True, what="the log lines")
            with self._lock:
                # A slot is taken before the first await, so follows asked
                # for at the same time cannot pass the cap together.
                if len(self._followers) + self._reserved >= MAX_FOLLOWERS:
                    raise InvalidState(f"{MAX_FOLLOWERS} log follows are running already")
                self._reserved += 1
                reserved = True
            reader = await asyncio.get_running_loop().run_in_executor(None, self._open, q)
            try:
                with self._lock:
                    self._reserved -= 1
                    reserved = False
                    # The follower must never block on a reader that does not read.
                    os.set_blocking(fd, False)
                    follower = Follower(q, fd, reader, self._watch, self._synchronizer, self._follow_ended)
                    self._followers.add(follower)
            except BaseException:
                reader.close()  # the follower, which closes it, never came to be
                raise
        except BaseException:
            if reserved:
                with self._lock:
                    self._reserved -= 1
            os.close(fd)
            raise
        # Looked at again: the container or exec may have ended while the
        # reader was opened, before this follower was there to be stopped.
        if self._ended(c, q):
            follower.stop.set()  # what is there, then the end
        follower.start()

    def _open(self, q: Query) -> journalreader.Reader:  # in a worker thread
        try:
            self._watch.start()
            return journalreader.open_reader(q)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM):
                raise LimitExceeded(f"cannot follow the journal: {exc.strerror} (the system's limits on "
                                    "inotify instances or descriptors are reached)") from None
            raise Internal(f"cannot follow the journal: {exc.strerror or exc}") from None

    def _follow_ended(self, follower: Follower) -> None:
        with self._lock:
            self._followers.discard(follower)

    def _stop(self, container_id: str, exec_id: str | None = None) -> None:
        with self._lock:
            for f in self._followers:
                if f.query.container_id == container_id and (exec_id is None or f.query.exec_id == exec_id):
                    f.stop.set()

    # Listener of the manager and of execs

    def container_added(self, c: Container) -> None:
        pass

    def container_changed(self, c: Container, old: Container) -> None:
        if c.state.is_final and not old.state.is_final:
            self._stop(c.id)

    def container_removed(self, c: Container) -> None:
        self._stop(c.id)

    def exec_exited(self, e: Exec) -> None:
        self._stop(e.container_id, e.id)

