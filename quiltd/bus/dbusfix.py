"""A fix for dbus-next 0.2.3's asyncio writer, which drops the connection when the socket is full.

Its _MessageWriter.write_callback treats EAGAIN from send() as fatal: a burst
of signals and replies (a hundred containers created at once) fills the
socket's buffer and the daemon loses the bus. This is the same method with
EAGAIN meaning "wait until writable", which the registered writer already does.
"""

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
                return  # the writer stays registered: called again once writable
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
