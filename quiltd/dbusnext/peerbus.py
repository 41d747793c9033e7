"""A dbus-next MessageBus for one accepted peer-to-peer connection (quiltd.socket).

dbus-next only has a client side: it connects to an address and says Hello.
This bus adopts a socket someone else accepted and serves the objects the
bus connection exports, with a cap on each message and on what waits for a
peer that does not read. It leans on dbus-next's private names; each use
says why the public API does not do. tests/unit/test_private_names.py
fails when a dbus-next release no longer has one of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.errors import InvalidMessageError
from dbus_next.service import ServiceInterface

from quiltd.dbusnext.connection import MessageBus, WireUnmarshaller


class _BoundedUnmarshaller(WireUnmarshaller):
    """Refuses a message over max_bytes before reading (or allocating) its body."""

    # dbus-next's Unmarshaller reads the whole message its header announces;
    # its read() is the one place a size can be refused before the body is
    # allocated, and it is a private class with no public hook for that.
    def __init__(self, stream: Any, sock: socket.socket | None, max_bytes: int) -> None:
        super().__init__(stream, sock)
        self._max_bytes = max_bytes

    def read(self, n: int, prefetch: bool = False) -> int:
        if self.offset + n > self._max_bytes:
            raise InvalidMessageError(f"a message over {self._max_bytes} bytes")
        offset: int = super().read(n, prefetch)
        return offset


class PeerBus(MessageBus):  # type: ignore[misc]
    """One accepted connection, serving the objects exported on `exports`."""

    def __init__(self, sock: socket.socket, unix_fds: bool, exports: MessageBus, name: str,
                 max_message_bytes: int, max_queued_bytes: int) -> None:
        self._peer_sock = sock
        self._max_message_bytes = max_message_bytes
        # The address is never used: _setup_socket below adopts the accepted socket.
        super().__init__(bus_address="unix:path=/", negotiate_unix_fd=unix_fds)
        # Private: dbus-next keeps its exported objects in _path_exports and
        # has no API to serve another bus's objects. The same dict: new
        # containers appear here too.
        self._path_exports = exports._path_exports
        self._export_paths = exports._export_paths  # (connection.py's) where a signal comes from
        self._peer_name = name
        self._signal_sources: list[ServiceInterface] = []
        # Private: dbus-next keeps the writer (ours, see connection.py) in _writer.
        self._writer.max_queued = max_queued_bytes

    # Private: dbus-next makes its unmarshaller here, with no parameter for a size limit.
    def _create_unmarshaller(self) -> Unmarshaller:
        sock = self._sock if self._negotiate_unix_fd else None
        return _BoundedUnmarshaller(self._stream, sock, self._max_message_bytes)

    # Private: dbus-next connects to an address here; an accepted socket has no public way in.
    def _setup_socket(self) -> None:
        self._sock = self._peer_sock
        # Unbuffered: a buffered reader could hold messages the loop is never told about.
        self._stream = self._sock.makefile("rwb", buffering=0)  # type: ignore[assignment]
        self._fd = self._sock.fileno()

    def begin(self, signal_sources: Sequence[ServiceInterface]) -> None:
        # The writer sends only once the connection has a name, as after Hello on a bus.
        self.unique_name = self._peer_name  # type: ignore[assignment]
        # Private: export() would register the object and its path on this
        # connection too; _add_bus only makes its signals go out here.
        for iface in signal_sources:
            ServiceInterface._add_bus(iface, self)
        self._signal_sources = list(signal_sources)
        # Private: connect() would start reading after Hello, which a peer never sends.
        self._loop.add_reader(self._fd, self._message_reader)

    # Private: dbus-next's one hook that runs however the connection ends.
    def _finalize(self, err: Any = None) -> None:
        if self._disconnected:
            return
        # The exports belong to the bus connection; this one only borrowed them.
        self._path_exports = {}
        self._export_paths = {}
        for iface in self._signal_sources:
            with contextlib.suppress(KeyError):
                ServiceInterface._remove_bus(iface, self)
        super()._finalize(err)
        # Descriptors of a message cut off half-way: no call will take them.
        for fd in self._unmarshaller.unix_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._unmarshaller.unix_fds = []
        # The stream first: while it is open, closing the socket would not
        # close the descriptor, and the peer would never see the end.
        self._stream.close()
        self._sock.close()
