"""journald's Synchronize as quiltd calls it: the answer read right, and calls shared under a flood."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiltd.host.journalreader import Synchronizer


class _Journald:
    """journald's varlink end: answers each Synchronize after `delay`, counting the calls."""

    def __init__(self, path: Path, reply: bytes, delay: float = 0.0) -> None:
        self.calls = 0
        self._reply, self._delay = reply, delay
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while not request.endswith(b"\0"):
                    request += conn.recv(4096)
                assert b'"io.systemd.Journal.Synchronize"' in request
                self.calls += 1
                time.sleep(self._delay)
                conn.sendall(self._reply)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "io.systemd.journal"


def test_a_synchronize_journald_answers_is_true(socket_path: Path) -> None:
    journald = _Journald(socket_path, b'{"parameters":{}}\0')
    try:
        assert Synchronizer(str(socket_path)).sync()
        assert journald.calls == 1
    finally:
        journald.close()


def test_an_error_or_no_journald_is_false(socket_path: Path) -> None:
    assert not Synchronizer(str(socket_path)).sync()  # nothing listens: an older journald
    journald = _Journald(socket_path, b'{"error":"io.systemd.Journal.NotSupportedByNamespaces"}\0')
    try:
        assert not Synchronizer(str(socket_path)).sync()
    finally:
        journald.close()


def test_callers_that_come_during_a_call_share_the_next_one(socket_path: Path) -> None:
    journald = _Journald(socket_path, b'{"parameters":{}}\0', delay=0.2)
    try:
        synchronizer = Synchronizer(str(socket_path))
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(synchronizer.sync())) for _ in range(50)]
        for t in threads:
            t.start()
            time.sleep(0.002)
        for t in threads:
            t.join(10)
        assert results == [True] * 50
        # The first call, then at most one more for everyone who came while it
        # ran, and so on: far fewer than 50, and never one per caller.
        assert 2 <= journald.calls <= 5
    finally:
        journald.close()
