"""A fix for dbus-next's asyncio writer, applied by the daemon and the client.

dbus-next (0.2.3, the current and Debian 12's release) treats EAGAIN from its
non-blocking socket as a broken connection: a burst of replies and signals
that fills the socket's buffer (a few hundred containers created at once
does) makes it drop the bus, and quiltd exits. Upstream issue
altdesktop/python-dbus-next#153, still open. The writer stays registered
with the event loop until its queue is empty, so on EAGAIN the right thing
is to return and be called again once the socket is writable.
"""

from __future__ import annotations

import array
import socket
from typing import Any

from dbus_next.aio import message_bus


def _write_callback(self: Any) -> None:
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
                return  # full: the loop calls again once the socket is writable
            if self.offset >= len(self.buf):
                self.buf = None
                message_bus._future_set_result(self.fut, None)
            else:
                return
    except Exception as e:
        message_bus._future_set_exception(self.fut, e)
        self.bus._finalize(e)


def apply() -> None:
    message_bus._MessageWriter.write_callback = _write_callback  # type: ignore[method-assign]
