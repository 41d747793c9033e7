"""The daemon's own wall: every method call is checked against its sender's credentials.

The bus policy is the first wall; this one holds on the direct socket too, and
if the policy is ever loosened. dbus-next hands method handlers no message, so
the check is a message handler that runs before dbus-next dispatches a call to
an exported object: it lets the call through, answers AccessDenied itself, or
(for a sender not seen yet) holds the call, asks the bus who sent it and then
dispatches it again.

A call it lets through carries its sender's credentials to the method:
dbus-next dispatches the call synchronously from here and runs an async
method as a task, which takes a copy of the context variables as they are
at that moment. So `caller()` in a method is the credentials of the call it
serves, whatever else arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import pwd
from collections.abc import Callable

from dbus_next.constants import MessageType
from dbus_next.message import Message

from quiltd import access
from quiltd.access import Credentials
from quiltd.dbusnext.connection import MessageBus
from quiltd.errors import AccessDenied

log = logging.getLogger("quiltd")

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
# What anyone may do, as in the bus policy: look, and ping.
OPEN_INTERFACES = frozenset({"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer"})
# Only disconnections: a unique name is never reused, so its decision can go.
GONE_MATCH = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',arg2=''"
)

Handler = Callable[[Message], "Message | bool"]

_caller: contextvars.ContextVar[Credentials | None] = contextvars.ContextVar("quiltd_caller", default=None)


def caller() -> Credentials:
    """The credentials of the call being served; refuses when there is none (fails closed)."""
    creds = _caller.get()
    if creds is None:
        raise AccessDenied("the caller's credentials are unknown")
    return creds


def _let_through(msg: Message, creds: Credentials) -> bool:
    # Set for every call let through, so a value never outlives the dispatch it was set for.
    _caller.set(creds)
    return False


def checked(msg: Message) -> bool:
    return msg.message_type == MessageType.METHOD_CALL and msg.interface not in OPEN_INTERFACES


def denial(msg: Message, creds: Credentials | None) -> Message:
    who = str(creds) if creds else "an unknown caller"
    return Message.new_error(
        msg, AccessDenied.dbus_name,
        f"{who} may not call {msg.member}: quiltd serves root and members of group {access.GROUP}",
    )


def _log_denied(msg: Message, creds: Credentials | None) -> None:
    log.info("denied %s.%s to %s", msg.interface, msg.member, creds or "an unknown caller")


class PeerGate:
    """For a direct connection: one caller, known from SO_PEERCRED at accept."""

    def __init__(self, creds: Credentials) -> None:
        self._creds = creds
        self._allowed = access.allowed(creds)

    def on_message(self, msg: Message) -> Message | bool:
        if not checked(msg):
            _caller.set(None)
            return False
        if self._allowed:
            return _let_through(msg, self._creds)
        _log_denied(msg, self._creds)
        return denial(msg, self._creds)


class BusGate:
    """For the bus: one decision per unique name, asked of the bus once."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._decisions: dict[str, tuple[bool, Credentials]] = {}
        self._held: dict[str, list[Message]] = {}  # calls waiting for their sender's lookup
        self._gone: set[str] = set()  # senders that left while being looked up
        self._passed: dict[int, Credentials] = {}  # held calls being dispatched again, by id
        self._tasks: set[asyncio.Task[None]] = set()

    async def install(self) -> None:
        self._bus.add_message_handler(self.on_message)
        reply = await self._bus.call(Message(
            destination=DBUS[0], path=DBUS[1], interface=DBUS[2], member="AddMatch", signature="s",
            body=[GONE_MATCH],
        ))
        if reply is None or reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"AddMatch for NameOwnerChanged failed: {reply and reply.body}")

    def on_message(self, msg: Message) -> Message | bool:
        if msg.message_type == MessageType.SIGNAL:
            self._on_signal(msg)
            return False
        if not checked(msg):
            _caller.set(None)
            return False
        passed = self._passed.get(id(msg))
        if passed is not None:
            return _let_through(msg, passed)
        sender = msg.sender or ""
        decision = self._decisions.get(sender)
        if decision is not None:
            ok, creds = decision
            if ok:
                return _let_through(msg, creds)
            _log_denied(msg, creds)
            return denial(msg, creds)
        self._bus.hold_call(msg)  # its descriptors stay open until it is dispatched or denied
        held = self._held.get(sender)
        if held is not None:
            held.append(msg)  # keeps a sender's calls in order
            return True
        self._held[sender] = [msg]
        task = asyncio.get_running_loop().create_task(self._decide(sender))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True  # handled for now; answered once the sender is known

    def _on_signal(self, msg: Message) -> None:
        if msg.member != "NameOwnerChanged" or msg.sender != DBUS[0] or msg.interface != DBUS[2]:
            return
        name, _, new_owner = msg.body
        if new_owner or not name.startswith(":"):
            return
        self._decisions.pop(name, None)
        if name in self._held:
            self._gone.add(name)

    async def _decide(self, sender: str) -> None:
        creds: Credentials | None = None
        try:
            creds = await self._credentials(sender)
        except Exception as e:
            log.warning("could not look up the credentials of %s: %s", sender, e)
        ok = creds is not None and access.allowed(creds)
        if creds is not None and sender not in self._gone:
            self._decisions[sender] = (ok, creds)
        self._gone.discard(sender)
        for msg in self._held.pop(sender, []):
            if not ok:
                _log_denied(msg, creds)
                self._bus.send(denial(msg, creds))
                self._bus.drop_call(msg)
                continue
            assert creds is not None  # ok implies it
            self._passed[id(msg)] = creds
            try:
                self._bus.resume_call(msg)
            finally:
                self._passed.pop(id(msg), None)

    async def _credentials(self, sender: str) -> Credentials:
        reply = await self._bus.call(Message(
            destination=DBUS[0], path=DBUS[1], interface=DBUS[2], member="GetConnectionCredentials",
            signature="s", body=[sender],
        ))
        if reply is None or reply.message_type == MessageType.ERROR:
            raise LookupError(reply.body[0] if reply and reply.body else "no reply")
        values = {k: v.value for k, v in reply.body[0].items()}
        uid = int(values["UnixUserID"])
        gids = values.get("UnixGroupIDs")
        if gids is None:  # bus daemons that do not report groups: the user's groups from NSS
            gids = groups_of(uid)
        return Credentials(uid, frozenset(int(g) for g in gids))


def groups_of(uid: int) -> list[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(user.pw_name, user.pw_gid)
