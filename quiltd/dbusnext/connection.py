"""A dbus-next MessageBus that survives a full socket, a peer that does not read, and stray descriptors.

dbus-next 0.2.3 (the release Debian and PyPI carry) treats EAGAIN from
send() as a fatal error and drops the connection, so a burst of replies and
signals larger than the socket buffer (fifty containers created at once)
disconnected the daemon. This writer waits for the socket to drain instead,
and sends what is queued in one write rather than one write per message.
Waiting has a bound where one is set (max_queued, on direct connections): a
peer that lets more pile up is dropped.

dbus-next hands the descriptors a call carries to the method as plain
numbers and never closes any. Here the connection owns them: a method with
'h' arguments gets its own duplicates (which it takes over and closes), after
a check that every index names a descriptor; the received ones are closed
once the call is dispatched, whether or not anything used them. A reply's
descriptors (the master of ExecWithPty) are the connection's too: closed
once the reply is sent, or when it cannot be.

dbus-next made reference cycles of every message, so each message's body
and buffer stayed in memory until a full garbage collection, which comes
rarely (a few large Exec outputs held hundreds of MiB): its Marshaller and
Unmarshaller keep a dict of their own bound methods, and every method call
got a class of its own (SendReply) whose methods hold the call. Here
messages are written and read by wireformat, which keeps nothing per
message (dbus-next's Unmarshaller only brings the bytes and descriptors in),
and one class answers every call, so a message is freed as soon as its last
user lets go.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import copy
import io
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next._private.util import _replace_fds
from dbus_next.aio import message_bus as aio_bus
from dbus_next.constants import ErrorType, MessageFlag, MessageType
from dbus_next.errors import DBusError, SignatureBodyMismatchError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface
from dbus_next.signature import Variant

from quiltd.dbusnext import wireformat
from quiltd.dbusnext.introspection import INTROSPECTOR
from quiltd.errors import InvalidArgument

log = logging.getLogger("quiltd")

MESSAGES_PER_TURN = 64  # read from one connection before the event loop turns again

_BATCH_BYTES = 256 << 10


class _SendReply:
    """How a method handler answers one call (what dbus-next made a new class for, per call)."""

    def __init__(self, bus: Any, call: Message) -> None:
        self._bus = bus
        self._call = call

    def __enter__(self) -> _SendReply:
        return self

    def __call__(self, reply: Message) -> None:
        if not self._call.flags & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._answer_error(exc_type, exc)

    def send_error(self, exc: BaseException) -> None:
        self._answer_error(type(exc), exc)

    def _answer_error(self, exc_type: Any, exc: Any) -> None:
        if exc_type is None:
            return
        if issubclass(exc_type, DBusError):
            self(exc._as_message(self._call))
        elif issubclass(exc_type, Exception):
            self(Message.new_error(self._call, ErrorType.SERVICE_ERROR.value,
                                   f"The service interface raised an error: {exc}."))


class _PatientWriter(aio_bus._MessageWriter):  # type: ignore[misc]
    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.pending: deque[tuple[bytes, list[int], Any]] = deque()
        self.futs: list[Any] = []  # one per message in buf
        self.max_queued: int | None = None  # bytes waiting for the peer; None: no bound
        self.queued = 0
        self.batch_bytes = 0
        self.overflowed = False
        self.owned_fds: set[int] = set()  # a reply's descriptors, closed once sent

    def buffer_message(self, msg: Any, future: Any = None) -> None:
        owned = msg.message_type == MessageType.METHOD_RETURN and bool(msg.unix_fds)
        if owned and (self.overflowed or not self.negotiate_unix_fd):
            # Nobody could get them: a peer that does not take descriptors
            # gets the reply without them (dbus-next marshals it so).
            _close(msg.unix_fds)
        if self.overflowed:
            aio_bus._future_set_exception(future, ConnectionError("dropped: replies were not read"))
            return
        if owned and self.negotiate_unix_fd:
            self.owned_fds.update(msg.unix_fds)
        try:
            data = wireformat.marshall(msg, self.negotiate_unix_fd)
        except BaseException:
            self.close_owned(msg.unix_fds)
            raise
        if self.max_queued is not None and self.queued and self.queued + len(data) > self.max_queued:
            # Dropped on the next turn: a send can come from inside a loop
            # over this bus's interfaces, which finalizing would change.
            self.overflowed = True
            self.close_owned(msg.unix_fds)
            log.info("dropped direct connection %s: %d bytes of replies and signals unread",
                     self.bus.unique_name, self.queued)
            aio_bus._future_set_exception(future, ConnectionError("dropped: replies were not read"))
            self.loop.call_soon(self.bus._finalize, ConnectionError("the peer does not read its replies"))
            return
        self.queued += len(data)
        self.messages.put_nowait((data, copy.copy(msg.unix_fds), future))

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
        self.batch_bytes = size
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
                        self.close_owned(self.unix_fds)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(buf[self.offset:])
                except BlockingIOError:
                    return  # the loop calls again once the socket is writable
                if self.offset < len(buf):
                    return
                self.buf = None
                self.queued -= self.batch_bytes
                for fut in self.futs:
                    aio_bus._future_set_result(fut, None)
        except Exception as e:
            for fut in self.futs:
                aio_bus._future_set_exception(fut, e)
            self.bus._finalize(e)


    def close_owned(self, fds: list[int] | None) -> None:
        for fd in fds or []:
            if fd in self.owned_fds:
                self.owned_fds.discard(fd)
                _close([fd])


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _carries_fd(value: Any) -> bool:
    """Whether a variant anywhere in value holds a descriptor ('h')."""
    if isinstance(value, Variant):
        return "h" in value.signature or _carries_fd(value.value)
    if isinstance(value, list | tuple):
        return any(_carries_fd(v) for v in value)
    if isinstance(value, dict):
        return any(_carries_fd(k) or _carries_fd(v) for k, v in value.items())
    return False


def refuse_fds_in_variants(msg: Message) -> None:
    """A descriptor may only be a method's own 'h' argument, never inside a variant (options).

    dbus-next puts a variant's descriptor into the options as a bare number:
    the received one (closed after dispatch, so the number may name another
    file by the time it is used), or the copy made for the call, which no
    one would close.
    """
    if _carries_fd(msg.body):
        raise InvalidArgument("a descriptor (h) may only be passed as a method's own argument, "
                              "not inside a variant or the options")


def handed_over(msg: Message) -> list[int]:
    """The call's descriptor list for a method: a duplicate for each one an 'h' argument names.

    Raises InvalidArgument for an index with no descriptor behind it (none
    sent, or unix fds not negotiated) or one that is not open.
    """
    received = msg.unix_fds
    named: set[int] = set()

    def note(index: Any) -> Any:
        if not isinstance(index, int) or not 0 <= index < len(received):
            raise InvalidArgument(
                f"a descriptor argument names index {index}, but the call carries {len(received)} "
                "descriptor(s): send the descriptor with the call (over a connection that "
                "negotiated unix fd passing)")
        named.add(index)
        return index

    _replace_fds(copy.deepcopy(msg.body), msg.signature_tree.types, note)
    out = [-1] * len(received)
    try:
        for index in sorted(named):
            try:
                out[index] = os.dup(received[index])
            except OSError as e:
                raise InvalidArgument(f"descriptor {index} of the call cannot be used: "
                                      f"{e.strerror}") from None
    except BaseException:
        _close(out)
        raise
    return out


PEER_INTERFACE = "org.freedesktop.DBus.Peer"
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def machine_id() -> str | None:
    for path in MACHINE_ID_FILES:
        with contextlib.suppress(OSError):
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
    return None


def _answer_peer(msg: Message, send_reply: Any) -> None:
    """org.freedesktop.DBus.Peer on every path, on the bus and on a direct connection.

    dbus-next asks the bus driver for the machine id, which a direct
    connection does not have, so GetMachineId was never answered there.
    """
    if msg.member == "Ping" and not msg.signature:
        send_reply(Message.new_method_return(msg))
    elif msg.member == "GetMachineId" and not msg.signature:
        value = machine_id()
        if value is None:
            send_reply(Message.new_error(msg, "org.freedesktop.DBus.Error.FileNotFound",
                                         "this host has no machine id"))
        else:
            send_reply(Message.new_method_return(msg, "s", [value]))
    else:
        send_reply(Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                     f"{PEER_INTERFACE} has no method {msg.member} with signature "
                                     f"{msg.signature!r}"))


class WireUnmarshaller(Unmarshaller):  # type: ignore[misc]
    """dbus-next's reading of a message off the socket, with its parsing done by wireformat."""

    def __init__(self, stream: Any, sock: socket.socket | None) -> None:
        super().__init__(stream, sock)
        # dbus-next's table of its own bound methods (a reference cycle per
        # message): unused, since wireformat parses.
        self.readers = {}

    # Private: dbus-next's parse of one message; read() (the socket, the
    # descriptors, resuming a message cut off by EAGAIN) stays its own.
    def _unmarshall(self) -> None:
        self.offset = 0
        self.read(wireformat.FIXED_LENGTH, prefetch=True)
        self.read(wireformat.message_length(self.buf), prefetch=True)
        self.message = wireformat.unmarshall(self.buf, self.unix_fds)


class MessageBus(aio_bus.MessageBus):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer: _PatientWriter = _PatientWriter(self)
        self._held_calls: set[int] = set()  # ids of calls a handler holds, with their descriptors
        self._export_paths: dict[int, str] = {}  # id of an exported interface -> its path

    def export(self, path: str, interface: Any) -> None:
        super().export(path, interface)
        self._export_paths[id(interface)] = path

    def unexport(self, path: str, interface: Any = None) -> None:
        before = list(self._path_exports.get(path, ()))
        super().unexport(path, interface)
        remaining = {id(i) for i in self._path_exports.get(path, ())}
        for gone in before:
            if id(gone) not in remaining:
                self._export_paths.pop(id(gone), None)

    def _interface_signal_notify(self, interface: Any, interface_name: str, member: str, signature: str,
                                 body: list[Any], unix_fds: list[int] | None = None) -> None:
        # dbus-next looked for the emitting interface's path in every export,
        # on every signal: with hundreds of containers, each signal walked them all.
        path = self._export_paths.get(id(interface))
        if path is None:
            raise RuntimeError(f"{interface_name}.{member} sent from an interface that is not exported")
        self.send(Message.new_signal(path=path, interface=interface_name, member=member, signature=signature,
                                     body=body, unix_fds=unix_fds or []))

    def _finalize(self, err: Exception | None = None) -> None:
        try:
            super()._finalize(err)
        finally:
            # Replies never sent: their descriptors go with the connection.
            self._writer.close_owned(list(self._writer.owned_fds))

    def hold_call(self, msg: Message) -> None:
        """A message handler keeps msg to dispatch it later: its descriptors stay open until then."""
        self._held_calls.add(id(msg))

    def resume_call(self, msg: Message) -> None:
        """Dispatches a held call; its descriptors are closed after."""
        self._held_calls.discard(id(msg))
        self._on_message(msg)

    def drop_call(self, msg: Message) -> None:
        """A held call answered without dispatch: its descriptors go."""
        self._held_calls.discard(id(msg))
        _close(msg.unix_fds)

    def _send_reply(self, msg: Message) -> _SendReply:
        return _SendReply(self, msg)

    def _process_message(self, msg: Message) -> None:
        received = list(msg.unix_fds) if msg.message_type == MessageType.METHOD_CALL else []
        try:
            super()._process_message(msg)
        finally:
            if received and id(msg) not in self._held_calls:
                _close(received)

    def _message_reader(self) -> None:
        # dbus-next reads until the socket is empty, so one client's stream of
        # pipelined calls held the event loop (and the watchdog's pings) for
        # as long as it kept sending. A turn now takes at most
        # MESSAGES_PER_TURN; the socket stays readable for the next one.
        # Bounded only where no buffered reader could hold the rest unseen.
        bounded = self._unmarshaller.sock is not None or not isinstance(self._stream, io.BufferedIOBase)
        try:
            for _ in range(MESSAGES_PER_TURN if bounded else sys.maxsize):
                if self._writer.overflowed:
                    return  # being dropped: nothing more is read
                if not self._unmarshaller.unmarshall():
                    return
                self._on_message(self._unmarshaller.message)
                self._unmarshaller = self._create_unmarshaller()
        except Exception as e:
            self._finalize(e)

    # Private: dbus-next makes its own Unmarshaller here, with no parameter for another.
    def _create_unmarshaller(self) -> Unmarshaller:
        return WireUnmarshaller(self._stream, self._sock if self._negotiate_unix_fd else None)

    def _introspect_export_path(self, path: str) -> Any:
        node = super()._introspect_export_path(path)
        node.interfaces = [INTROSPECTOR.interface(i) for i in node.interfaces]
        return node

    # InterfacesAdded and InterfacesRemoved are sent by the object manager
    # (bus/service.py): dbus-next sent them from the object's own path, where
    # no ObjectManager client listens, and InterfacesAdded only once every
    # property was read, after signals sent meanwhile.
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        pass

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        pass

    def _find_message_handler(self, msg: Message) -> Any:
        if msg.interface == PEER_INTERFACE:
            return _answer_peer
        # dbus-next compared the call with every method of every interface
        # on the path, on every call; the method is found by a dict here.
        # Anything else (the standard interfaces, unknown methods and their
        # errors) is dbus-next's.
        if msg.interface not in _STANDARD_INTERFACES:
            for interface in self._path_exports.get(msg.path, ()):
                if interface.name == msg.interface:
                    method = _methods(interface).get((msg.member, msg.signature))
                    if method is not None and not method.disabled:
                        return self._make_method_handler(interface, method)
        return super()._find_message_handler(msg)

    def _make_method_handler(self, interface: Any, method: Any) -> Callable[[Message, Any], None]:
        if "h" not in method.in_signature + method.out_signature and asyncio.iscoroutinefunction(method.fn):
            return _plain_handler(interface, method)
        inner: Callable[[Message, Any], None] = super()._make_method_handler(interface, method)
        if "h" not in method.in_signature and "v" not in method.in_signature:
            return inner

        def handler(msg: Message, send_reply: Any) -> None:
            try:
                refuse_fds_in_variants(msg)
                fds = handed_over(msg) if "h" in method.in_signature else None
            except InvalidArgument as e:
                raise DBusError(e.dbus_name, e.message) from None
            if fds is None:
                inner(msg, send_reply)
                return
            # Only this dispatch sees the duplicates; the received list is closed by _process_message.
            call = copy.copy(msg)
            call.unix_fds = fds
            inner(call, send_reply)

        return handler


_STANDARD_INTERFACES = frozenset({
    None, PEER_INTERFACE, "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties",
    "org.freedesktop.DBus.ObjectManager",
})
_method_index: dict[type, dict[tuple[str, str], Any]] = {}


def _methods(interface: Any) -> dict[tuple[str, str], Any]:
    """An interface class's methods by (member, signature): they are the class's, fixed at definition."""
    cls = type(interface)
    index = _method_index.get(cls)
    if index is None:
        index = _method_index[cls] = {(m.name, m.in_signature): m
                                      for m in reversed(ServiceInterface._get_methods(interface))}
    return index


def _plain_handler(interface: Any, method: Any) -> Callable[[Message, Any], None]:
    """dbus-next's handler for an async method that takes and returns no descriptor, less its fd walks.

    dbus-next looked through every argument and every result, variants
    included, for descriptors to swap with their indexes, on every call: a
    fifth of GetContainerInfo. With no 'h' in the signatures only a variant
    could hold one: refused on the way in, and quiltd's results have none.
    """
    takes_variants = "v" in method.in_signature
    out_signature = method.out_signature
    out_count = len(method.out_signature_tree.types)

    def handler(msg: Message, send_reply: Any) -> None:
        if takes_variants:
            try:
                refuse_fds_in_variants(msg)
            except InvalidArgument as e:
                raise DBusError(e.dbus_name, e.message) from None

        def done(fut: asyncio.Future[Any]) -> None:
            with send_reply:
                send_reply(Message.new_method_return(msg, out_signature, _body(fut.result(), out_count)))

        asyncio.ensure_future(method.fn(interface, *msg.body)).add_done_callback(done)

    return handler


def _body(result: Any, count: int) -> list[Any]:
    """A method's result as a message body, as dbus-next's ServiceInterface._fn_result_to_body makes it."""
    if result is None:
        body = []
    elif count == 1:
        body = [result]
    elif type(result) is list:
        body = result
    else:
        raise SignatureBodyMismatchError("Expected signal to return a list of arguments")
    if len(body) != count:
        raise SignatureBodyMismatchError(
            f"Signature and function return mismatch, expected {count} arguments but got {len(body)}")
    return body
