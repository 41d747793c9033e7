"""Writes container output to journald with Quilt's own fields.

journald's stream sockets (what systemd gives a service's stdout) cannot
carry extra fields, so the container's init reads the command's output and
sends each line as a native-protocol datagram. The socket is connected
before the container's root is switched, so it keeps working inside.

The container's own rate limit (LogLimit) is kept here, not left to
journald: journald drops a flood's lines without a trace a reader of this
container's logs would see. Here every gap is told in the logs themselves,
where it happened, and counted in a file the daemon reads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass

JOURNAL_SOCKET = "/run/systemd/journal/socket"

PRIORITY_INFO = 6
PRIORITY_WARNING = 4
PRIORITY_ERR = 3
DROPPED_FIELD = "QUILT_LOG_DROPPED"  # on the entry that tells of dropped lines: how many
LOG_DROPPED_FILE = "log-dropped"  # in the container's run dir: lines dropped since it started
COUNT_WIDTH = 20  # digits of the dropped-lines file, rewritten in place


@dataclass(frozen=True)
class LogLimit:
    """At most burst lines per interval_sec; burst 0 means no limit of Quilt's own."""

    burst: int = 0
    interval_sec: int = 30


def _field(name: str, value: bytes) -> bytes:
    # The length-prefixed form is binary safe: newlines and invalid UTF-8 in
    # a line reach the journal unchanged (journalctl shows them as a blob).
    return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


class JournalStream:
    """One connected datagram socket, the fields every entry carries, and the rate limit.

    dropped_fd, if given, is a file that always holds the number of lines
    dropped so far (by the limit, or because journald would not take them).
    """

    def __init__(self, fields: dict[str, str], path: str = JOURNAL_SOCKET, limit: LogLimit = LogLimit(),
                 dropped_fd: int = -1) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.connect(path)
        self.retitle(fields)
        self._limit = limit
        self._dropped_fd = dropped_fd
        self._window_start = time.monotonic()
        self._in_window = 0
        self._pending = 0  # dropped and not told yet
        self._dropped = 0  # in all

    def retitle(self, fields: dict[str, str], limit: LogLimit | None = None) -> None:
        """Sets the fields every entry carries from now on, and the limit if given (a warm pool's
        container is named, and learns its limit, when claimed)."""
        self._common = b"".join(_field(k, v.encode()) for k, v in fields.items())
        if limit is not None:
            self._limit = limit

    def send(self, line: bytes, extra: dict[str, str], priority: int) -> None:
        if self._limit.burst:
            now = time.monotonic()
            if now - self._window_start >= self._limit.interval_sec:
                self._window_start, self._in_window = now, 0
                self.tell_dropped()
            if self._in_window >= self._limit.burst:
                self._count_dropped()
                return
            self._in_window += 1
        elif self._pending:
            self.tell_dropped()
        if not self._send(line, extra, priority):
            self._count_dropped()

    def tell_due(self) -> float | None:
        """When (monotonic) dropped lines are to be told if no line comes first; None if none are."""
        if not self._pending:
            return None
        return self._window_start + self._limit.interval_sec if self._limit.burst else time.monotonic()

    def tick(self) -> None:
        """Tells of dropped lines once their window is over, though the container went quiet."""
        due = self.tell_due()
        if due is not None and time.monotonic() >= due:
            self._window_start, self._in_window = time.monotonic(), 0
            self.tell_dropped()

    def tell_dropped(self) -> None:
        """Logs one entry saying how many lines were dropped since the last such entry, if any."""
        if not self._pending:
            return
        n, self._pending = self._pending, 0
        reason = (f"more than {self._limit.burst} lines in {self._limit.interval_sec} s (log_rate_burst)"
                  if self._limit.burst else "the journal did not take them")
        if not self._send(f"quilt: {n} lines of output dropped: {reason}".encode(),
                          {"QUILT_STREAM": "stderr", DROPPED_FIELD: str(n)}, PRIORITY_WARNING):
            self._pending = n  # told with the next one

    def _count_dropped(self) -> None:
        self._pending += 1
        self._dropped += 1
        if self._dropped_fd >= 0:
            # One pwrite of a fixed width: the daemon never reads half a number.
            with contextlib.suppress(OSError):
                os.pwrite(self._dropped_fd, str(self._dropped).rjust(COUNT_WIDTH).encode(), 0)

    def _send(self, line: bytes, extra: dict[str, str], priority: int) -> bool:
        payload = (
            self._common
            + _field("PRIORITY", str(priority).encode())
            + b"".join(_field(k, v.encode()) for k, v in extra.items())
            + _field("MESSAGE", line)
        )
        # journald restarting or a line larger than a datagram: losing a
        # line (and counting it) is better than stalling the container.
        try:
            self._sock.send(payload)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
