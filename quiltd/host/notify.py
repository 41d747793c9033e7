"""sd_notify over one socket opened at start.

libsystemd's sd_notify (which python-systemd calls) opens a new socket for
every message. A daemon whose descriptors have run out then cannot ping its
watchdog, and systemd kills it with SIGABRT: a flood of connections becomes a
crash. This notifier opens its socket once, before any peer can connect, and
sends every message on it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("quiltd")


def notify_address(value: str) -> str | None:
    """NOTIFY_SOCKET as a unix address: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and others: not used by the systemd versions quiltd targets


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self._address = notify_address(value) if value else None
        self._sock: socket.socket | None = None
        if value and self._address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket address; not notifying systemd", value)
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, state: str) -> bool:
        """Sends state (e.g. "WATCHDOG=1"); False if it could not be sent, or there is no systemd."""
        if self._sock is None or self._address is None:
            return False
        try:
            # Never blocks the loop: a full queue at PID 1 drops this one message.
            self._sock.sendto(state.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as e:
            log.warning("could not notify systemd (%s): %s", state.split("=", 1)[0], e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
