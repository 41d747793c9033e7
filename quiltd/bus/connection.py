"""A dbus-next MessageBus that survives a full socket.

dbus-next 0.2.3 (the release Debian and PyPI carry) treats EAGAIN from
send() as a fatal error and drops the connection, so a burst of replies and
signals larger than the socket buffer (fifty containers created at once)
disconnected the daemon. This writer waits for the socket to drain instead.
"""

from __future__ import annotations

import array
import socket
from typing import Any

from dbus_next.aio import message_bus as aio_bus


class _PatientWriter(aio_bus._MessageWriter):  # type: ignore[misc]
    def write_callback(self) -> None:
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.get_nowait()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += self.sock.sendmsg([self.buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(self.buf[self.offset:])
                except BlockingIOError:
                    return  # the loop calls again once the socket is writable
                if self.offset < len(self.buf):
                    return
                self.buf = None
                aio_bus._future_set_result(self.fut, None)
        except Exception as e:
            aio_bus._future_set_exception(self.fut, e)
            self.bus._finalize(e)


class MessageBus(aio_bus.MessageBus):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = _PatientWriter(self)
