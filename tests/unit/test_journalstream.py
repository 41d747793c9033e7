"""The container's log rate limit: what passes, what is dropped, and how a drop is told."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiltd.runtime.journalstream import COUNT_WIDTH, DROPPED_FIELD, JournalStream, LogLimit


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """The MESSAGE of each datagram, with the dropped count if the entry has one."""
    out = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        fields = {}
        while data:
            name, _, data = data.partition(b"\n")
            size = int.from_bytes(data[:8], "little")
            fields[name.decode()] = data[8:8 + size]
            data = data[8 + size + 1:]
        extra = b" [" + fields[DROPPED_FIELD] + b"]" if DROPPED_FIELD in fields else b""
        out.append(fields["MESSAGE"] + extra)


def test_over_the_burst_is_dropped_counted_and_told_when_the_window_ends(
        journal_socket: tuple[str, socket.socket], tmp_path: Path) -> None:
    path, sock = journal_socket
    count = os.open(tmp_path / "dropped", os.O_RDWR | os.O_CREAT)
    stream = JournalStream({}, path, LogLimit(burst=3, interval_sec=1), count)
    for i in range(10):
        stream.send(str(i).encode(), {}, 6)
    assert received(sock) == [b"0", b"1", b"2"]
    assert os.pread(count, COUNT_WIDTH, 0).strip() == b"7"
    due = stream.tell_due()
    assert due is not None and due > time.monotonic()
    stream.tick()  # too early: nothing yet
    assert received(sock) == []
    time.sleep(due - time.monotonic() + 0.01)
    stream.tick()
    told = b"quilt: 7 lines of output dropped: more than 3 lines in 1 s (log_rate_burst) [7]"
    assert received(sock) == [told]
    assert stream.tell_due() is None
    stream.send(b"again", {}, 6)
    assert received(sock) == [b"again"]
    os.close(count)


def test_without_a_limit_everything_passes(journal_socket: tuple[str, socket.socket]) -> None:
    path, sock = journal_socket
    stream = JournalStream({}, path)
    for i in range(8):  # a datagram socket queues 10 by default: the test reads after
        stream.send(str(i).encode(), {}, 6)
    assert received(sock) == [str(i).encode() for i in range(8)]
    assert stream.tell_due() is None


def test_a_line_the_journal_refuses_is_counted_and_told_with_the_next(
        journal_socket: tuple[str, socket.socket]) -> None:
    path, sock = journal_socket
    stream = JournalStream({}, path)
    stream.send(b"x" * (1 << 22), {}, 6)  # larger than any datagram the socket takes
    stream.send(b"next", {}, 6)
    assert received(sock) == [b"quilt: 1 lines of output dropped: the journal did not take them [1]", b"next"]
