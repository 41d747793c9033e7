"""Peer-to-peer D-Bus on quiltd's own socket (quiltd.socket): the same objects, no broker.

dbus-next only has a client side, so this module adds what a server needs:
an accept loop, the server half of SASL EXTERNAL (the caller's uid comes from
SO_PEERCRED, never from what it says), and per connection a dbus-next
MessageBus that shares the exports of the bus connection. That bus object
does the marshalling, dispatch, properties and introspection exactly as on
the system bus. Calls meant for the bus driver (Hello, AddMatch) are answered
here, so clients written for a bus work unchanged.

The socket is open to every local user (0666), so nothing a caller sends may
cost quiltd more than a bounded amount before it is known to be a member:

- a caller who is neither root nor in group quilt is refused at accept, from
  SO_PEERCRED alone: quiltd reads nothing of it and keeps no descriptor;
- connections are capped per uid, in total, and while still authenticating
  (the caps below); one over a cap is refused the same way;
- a member's message is at most MAX_MESSAGE_BYTES, and a member that does not
  read its replies is dropped once MAX_QUEUED_BYTES wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.service import ServiceInterface

from quiltd import access
from quiltd.access import Credentials
from quiltd.bus.gate import PeerGate, groups_of
from quiltd.dbusnext.connection import MessageBus
from quiltd.dbusnext.peerbus import PeerBus

log = logging.getLogger("quiltd")

AUTH_TIMEOUT = 10.0
MAX_AUTH_LINE = 1024
MAX_AUTH_LINES = 16
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
DRIVER = "org.freedesktop.DBus"

# The caps of the direct socket (documented in docs/api.md, "Direct connection").
MAX_CONNECTIONS = 1024  # served and authenticating, all users together
MAX_PER_UID = 256  # of one uid, root included
MAX_AUTHENTICATING = 64  # accepted, SASL not finished yet (each for AUTH_TIMEOUT at most)
MAX_AUTHENTICATING_PER_UID = 8  # so one uid cannot hold all of them and lock out the others
# The bus daemon's own default for the system bus: no call of the API needs more.
MAX_MESSAGE_BYTES = 32 << 20
# Replies and signals waiting for a peer that does not read. One message
# larger than this still goes out alone (an ExecEx of 2 x 8 MiB of output).
MAX_QUEUED_BYTES = 16 << 20
REFUSAL_LOG_INTERVAL = 10.0  # seconds: one line per reason, with a count, not one per connection


class AuthFailed(Exception):
    pass


def peer_credentials(sock: socket.socket) -> Credentials:
    """The uid and groups of the process that connected, as the kernel recorded them."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    gids = {gid}
    try:
        # 1024 bytes is the most Python lets getsockopt read: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) - len(raw) % 4]))
    except OSError:
        # More groups than that, or a kernel before 4.13: the user's groups from NSS.
        gids.update(groups_of(uid))
    return Credentials(uid, frozenset(gids))


class _Lines:
    """Reads SASL lines without reading past BEGIN: what follows is D-Bus messages."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    async def _readable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def nul(self) -> None:
        await self._readable()
        if self._sock.recv(1) != b"\0":
            raise AuthFailed("no leading NUL byte")

    async def line(self) -> str:
        buf = b""
        while True:
            await self._readable()
            peek = self._sock.recv(MAX_AUTH_LINE, socket.MSG_PEEK)
            if not peek:
                raise AuthFailed("connection closed during authentication")
            end = peek.find(b"\n")
            # Consume up to the end of the line only; peek again for a longer one.
            buf += self._sock.recv(len(peek) if end < 0 else end + 1)
            if len(buf) > MAX_AUTH_LINE:
                raise AuthFailed("authentication line too long")
            if end >= 0:
                return buf.rstrip(b"\r\n").decode("ascii", errors="replace")


async def authenticate(sock: socket.socket, uid: int, guid: str) -> bool:
    """The server half of SASL EXTERNAL. Returns whether unix fds were negotiated."""
    lines = _Lines(sock)
    loop = asyncio.get_running_loop()

    async def send(text: str) -> None:
        await loop.sock_sendall(sock, text.encode() + b"\r\n")

    await lines.nul()
    authed = unix_fds = False
    for _ in range(MAX_AUTH_LINES):
        command, _, arg = (await lines.line()).partition(" ")
        if command == "AUTH":
            mechanism, _, data = arg.partition(" ")
            if mechanism != "EXTERNAL":
                await send("REJECTED EXTERNAL")
                continue
            if not data:
                await send("DATA")  # the empty challenge; the client answers "DATA [hex uid]"
                answer, _, data = (await lines.line()).partition(" ")
                if answer != "DATA":
                    await send("REJECTED EXTERNAL")
                    continue
            if _claims(data, uid):
                authed = True
                await send(f"OK {guid}")
            else:
                await send("REJECTED EXTERNAL")
        elif command == "NEGOTIATE_UNIX_FD" and authed:
            unix_fds = True
            await send("AGREE_UNIX_FD")
        elif command == "BEGIN" and authed:
            return unix_fds
        elif command in ("CANCEL", "ERROR"):
            authed = False
            await send("REJECTED EXTERNAL")
        else:
            await send(f"ERROR unexpected {command or 'empty line'}")
    raise AuthFailed("too many authentication lines")


def _claims(data: str, uid: int) -> bool:
    """An empty claim means "whoever I am"; any other must be the uid the kernel saw."""
    if not data:
        return True
    try:
        return bytes.fromhex(data).decode("ascii") == str(uid)
    except ValueError:
        return False


def _driver(msg: Message, name: str) -> Message | bool:
    """Answers what a client expects from a bus driver; there is none on a direct connection."""
    if msg.message_type != MessageType.METHOD_CALL or msg.destination != DRIVER:
        return False
    if msg.member == "Hello":
        reply = Message.new_method_return(msg, "s", [name])
    elif msg.member in ("AddMatch", "RemoveMatch"):
        reply = Message.new_method_return(msg)  # a peer gets every signal anyway
    else:
        reply = Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                  f"{msg.member} is not available on a direct connection to quiltd")
    reply.sender = DRIVER  # type: ignore[assignment]  # typed None by its default
    return reply


class PeerServer:
    """Accepts on the sockets systemd passed and serves each connection, within the caps."""

    def __init__(self, listeners: list[socket.socket], exports: MessageBus,
                 signal_sources: Sequence[ServiceInterface]) -> None:
        self._listeners = listeners
        self._exports = exports
        self._signal_sources = signal_sources
        self._guid = uuid.uuid4().hex
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: set[PeerBus] = set()
        self._count = 0
        self._connections = 0
        self._authenticating = 0
        self._per_uid: dict[int, int] = {}
        self._authenticating_per_uid: dict[int, int] = {}
        self._refusals: dict[str, tuple[float, int]] = {}  # reason: (last logged, refused since)

    def start(self) -> None:
        for listener in self._listeners:
            listener.setblocking(False)
            self._spawn(self._accept(listener))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("accept on quiltd's socket failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                creds = peer_credentials(conn)
            except OSError as e:
                log.info("direct connection refused: no peer credentials: %s", e)
                conn.close()
                continue
            reason = self._refusal(creds)
            if reason is not None:
                self._refuse(conn, reason)
                continue
            self._connections += 1
            self._authenticating += 1
            _count(self._per_uid, creds.uid, 1)
            _count(self._authenticating_per_uid, creds.uid, 1)
            self._spawn(self._serve(conn, creds))

    def _refusal(self, creds: Credentials) -> str | None:
        """Why a new connection of creds may not be served, or None."""
        if not access.allowed(creds):
            return (f"{creds} is neither root nor in group {access.GROUP} (the socket serves only "
                    "them; anyone may introspect on the system bus)")
        if self._per_uid.get(creds.uid, 0) >= MAX_PER_UID:
            return f"{creds} has {MAX_PER_UID} connections already"
        if self._connections >= MAX_CONNECTIONS:
            return f"{MAX_CONNECTIONS} connections are open already"
        if self._authenticating_per_uid.get(creds.uid, 0) >= MAX_AUTHENTICATING_PER_UID:
            return f"{creds} has {MAX_AUTHENTICATING_PER_UID} connections authenticating already"
        if self._authenticating >= MAX_AUTHENTICATING:
            return f"{MAX_AUTHENTICATING} connections are authenticating already"
        return None

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        """Answers REJECTED (a client's SASL attempt fails at once) and closes, all in this turn."""
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            # What the client sent already: closing with unread data would
            # reset the connection before it reads the answer.
            conn.recv(MAX_AUTH_LINE * 4)
        with contextlib.suppress(OSError):
            conn.send(b"REJECTED EXTERNAL\r\n")
        conn.close()
        now = time.monotonic()
        last, count = self._refusals.get(reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last >= REFUSAL_LOG_INTERVAL:
            more = f" ({count} more since the last such line)" if count else ""
            log.info("direct connection refused: %s%s", reason, more)
            self._refusals[reason] = (now, 0)
        else:
            self._refusals[reason] = (last, count + 1)

    async def _serve(self, conn: socket.socket, creds: Credentials) -> None:
        authenticating = True
        try:
            conn.setblocking(False)
            try:
                unix_fds = await asyncio.wait_for(authenticate(conn, creds.uid, self._guid), AUTH_TIMEOUT)
            except (AuthFailed, OSError, asyncio.TimeoutError) as e:
                log.info("direct connection refused: %s", e or type(e).__name__)
                conn.close()
                return
            except asyncio.CancelledError:
                conn.close()  # quiltd is stopping
                raise
            self._authenticating -= 1
            _count(self._authenticating_per_uid, creds.uid, -1)
            authenticating = False
            self._count += 1
            name = f":1.{self._count}"
            bus = PeerBus(conn, unix_fds, self._exports, name, MAX_MESSAGE_BYTES, MAX_QUEUED_BYTES)
            bus.add_message_handler(lambda msg: _driver(msg, name))
            bus.add_message_handler(PeerGate(creds).on_message)
            self._peers.add(bus)
            bus.begin(self._signal_sources)
            try:
                await bus.wait_for_disconnect()
            except Exception:
                pass  # the peer went away; nothing to clean but our set
            finally:
                self._peers.discard(bus)
        finally:
            if authenticating:
                self._authenticating -= 1
                _count(self._authenticating_per_uid, creds.uid, -1)
            self._connections -= 1
            _count(self._per_uid, creds.uid, -1)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for bus in list(self._peers):
            bus.disconnect()
        for listener in self._listeners:
            listener.close()


def _count(counts: dict[int, int], uid: int, step: int) -> None:
    """Adds step to uid's count; a count back at 0 leaves the dict, so it never grows with uids gone."""
    n = counts.get(uid, 0) + step
    if n > 0:
        counts[uid] = n
    else:
        counts.pop(uid, None)


def listeners_from_fds(fds: list[int]) -> list[socket.socket]:
    """Adopts systemd's sockets; only stream unix sockets can carry D-Bus here."""
    out = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            log.warning("ignoring passed fd %d: not a unix stream socket", fd)
            sock.detach()
            continue
        out.append(sock)
    return out
