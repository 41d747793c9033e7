"""A call let through by the gate carries its sender's credentials to the method it runs."""

from __future__ import annotations

import asyncio

import pytest
from dbus_next.constants import MessageType
from dbus_next.message import Message

from quiltd import access
from quiltd.access import Credentials
from quiltd.bus import gate
from quiltd.errors import AccessDenied

QUILT_GID = 4242


def call(member: str = "CreateContainer") -> Message:
    return Message(destination="org.quilt.Quilt1", path="/org/quilt/Quilt1",
                   interface="org.quilt.Quilt1.Manager", member=member, serial=1)


def test_each_method_sees_the_caller_of_its_own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "group_id", lambda name=access.GROUP: QUILT_GID)
    alice = Credentials(1000, frozenset({1000, QUILT_GID}))
    root = Credentials(0, frozenset({0}))

    async def method() -> Credentials:
        return gate.caller()

    async def scenario() -> list[Credentials]:
        tasks = []
        # As dbus-next does: the gate's handler, then the method started as a task.
        for who in (alice, root, alice):
            assert gate.PeerGate(who).on_message(call()) is False
            tasks.append(asyncio.ensure_future(method()))
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(scenario()) == [alice, root, alice]


def test_no_caller_is_refused() -> None:
    async def scenario() -> None:
        assert gate.PeerGate(Credentials(0, frozenset())).on_message(
            Message(path="/", interface="org.freedesktop.DBus.Peer", member="Ping", serial=1)) is False
        gate.caller()  # an unchecked call carries no credentials

    with pytest.raises(AccessDenied, match="credentials are unknown"):
        asyncio.run(scenario())


def test_a_denied_caller_gets_an_error_not_a_method() -> None:
    reply = gate.PeerGate(Credentials(65534, frozenset({65534}))).on_message(call())
    assert isinstance(reply, Message) and reply.message_type == MessageType.ERROR
