"""Writes container output to journald with Quilt's own fields.

journald's stream sockets (what systemd gives a service's stdout) cannot
carry extra fields, so the container's init reads the command's output and
sends each line as a native-protocol datagram. The socket is connected
before the container's root is switched, so it keeps working inside.
"""

from __future__ import annotations

import contextlib
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"

PRIORITY_INFO = 6
PRIORITY_ERR = 3


def _field(name: str, value: bytes) -> bytes:
    # The length-prefixed form is binary safe: newlines and invalid UTF-8 in
    # a line reach the journal unchanged (journalctl shows them as a blob).
    return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


class JournalStream:
    """One connected datagram socket and the fields every entry carries."""

    def __init__(self, fields: dict[str, str], path: str = JOURNAL_SOCKET) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.connect(path)
        self.retitle(fields)

    def retitle(self, fields: dict[str, str]) -> None:
        """Sets the fields every entry carries from now on (a warm pool's container is named when claimed)."""
        self._common = b"".join(_field(k, v.encode()) for k, v in fields.items())

    def send(self, line: bytes, extra: dict[str, str], priority: int) -> None:
        payload = (
            self._common
            + _field("PRIORITY", str(priority).encode())
            + b"".join(_field(k, v.encode()) for k, v in extra.items())
            + _field("MESSAGE", line)
        )
        # journald restarting or a line larger than a datagram: losing a
        # line is better than stalling the container on its output.
        with contextlib.suppress(OSError):
            self._sock.send(payload)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
