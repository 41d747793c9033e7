"""A dbus-next MessageBus that survives a full socket.

dbus-next 0.2.3 (the release Debian and PyPI carry) treats EAGAIN from
send() as a fatal error and drops the connection, so a burst of replies and
signals larger than the socket buffer (fifty containers created at once)
disconnected the daemon. This writer waits for the socket to drain instead,
and sends what is queued in one write rather than one write per message.
"""

from __future__ import annotations

import array
import socket
from collections import deque
from typing import Any

from dbus_next.aio import message_bus as aio_bus

_BATCH_BYTES = 256 << 10


class _PatientWriter(aio_bus._MessageWriter):  # type: ignore[misc]
    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.pending: deque[tuple[bytes, list[int], Any]] = deque()
        self.futs: list[Any] = []  # one per message in buf

    def _next_batch(self) -> memoryview | None:
        """Takes the queued messages into one buffer: one send for all of them, not one each.

        A method's reply and the signals it caused are queued in the same
        turn of the loop; one write wakes the bus daemon once. A message
        with descriptors goes alone, so they stay attached to it.
        """
        while self.messages.qsize() > 0:
            self.pending.append(self.messages.get_nowait())
        if not self.pending:
            return None
        data, unix_fds, fut = self.pending.popleft()
        self.unix_fds, self.futs, parts = unix_fds, [fut], [data]
        size = len(data)
        while not unix_fds and self.pending and not self.pending[0][1] and size < _BATCH_BYTES:
            data, _, fut = self.pending.popleft()
            parts.append(data)
            self.futs.append(fut)
            size += len(data)
        self.buf = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
        self.offset = 0
        return self.buf

    def write_callback(self) -> None:
        try:
            while True:
                buf = self.buf if self.buf is not None else self._next_batch()
                if buf is None:
                    self.loop.remove_writer(self.fd)
                    return
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += self.sock.sendmsg([buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(buf[self.offset:])
                except BlockingIOError:
                    return  # the loop calls again once the socket is writable
                if self.offset < len(buf):
                    return
                self.buf = None
                for fut in self.futs:
                    aio_bus._future_set_result(fut, None)
        except Exception as e:
            for fut in self.futs:
                aio_bus._future_set_exception(fut, e)
            self.bus._finalize(e)


class MessageBus(aio_bus.MessageBus):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = _PatientWriter(self)
