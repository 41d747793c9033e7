"""The fast writer gives dbus-next's bytes exactly, for every kind of value."""

from __future__ import annotations

import io
from typing import Any

import pytest
from dbus_next import Message, MessageType
from dbus_next._private.marshaller import Marshaller
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.errors import SignatureBodyMismatchError
from dbus_next.signature import Variant

from quiltd.bus import convert, wire
from quiltd.manager import ContainerInfo, SystemInfo
from quiltd.model import Container, ContainerSpec, State
from quiltd.scopes import Usage

CASES: list[tuple[str, list[Any]]] = [
    ("", []),
    ("y", [7]),
    ("b", [True]),
    ("yb", [1, False]),
    ("ynqiuxtdh", [1, -2, 3, -4, 5, -6, 7, 0.5, 3]),
    ("yt", [1, 1 << 63]),
    ("ys", [1, "héllo"]),
    ("so", ["", "/org/quilt/Quilt1"]),
    ("g", ["a{sv}"]),
    ("ay", [b"\x00\x01binary"]),
    ("yay", [1, b""]),
    ("as", [["a", "bc", ""]]),
    ("yas", [2, []]),
    ("at", [[1, 2]]),
    ("yat", [3, []]),
    ("a(ssb)", [[["/src", "/dst", True], ["a", "b", False]]]),
    ("ya(st)", [9, []]),
    ("a{ss}", [{"team": "agents", "x": ""}]),
    ("ya{su}", [1, {}]),
    ("(yv)", [[1, Variant("s", "x")]]),
    ("v", [Variant("v", Variant("at", [1, 2]))]),
    ("a{sv}", [{"a": Variant("y", 1), "b": Variant("t", 2), "c": Variant("as", ["q"]),
                "d": Variant("a{ss}", {"k": "v"}), "e": Variant("(sb)", ["s", True]),
                "f": Variant("d", 1.5), "g": Variant("a(ssb)", [])}]),
    ("ssasa{sv}", ["name", "busybox", ["sh", "-c", "true"], {"start": Variant("b", False)}]),
    ("a(sa(sv))", [[["x", [["k", Variant("u", 1)]]]]]),
    ("yyyyuua(yv)", [108, 1, 0, 1, 5, 9, [[1, Variant("o", "/x")], [3, Variant("s", "M")],
                                          [8, Variant("g", "s")]]]),
]


@pytest.mark.parametrize(("signature", "body"), CASES, ids=[c[0] or "empty" for c in CASES])
def test_same_bytes_as_dbus_next(signature: str, body: list[Any]) -> None:
    theirs = Marshaller(signature, body)
    theirs.marshall()
    ours = wire.FastMarshaller(signature, body)
    ours.marshall()
    assert bytes(ours.buffer) == bytes(theirs.buffer)


def _container(state: State) -> Container:
    spec = ContainerSpec(env=("A=1",), labels=(("team", "agents"),), mounts=(("/s", "/t", True),),
                         tmpfs=(("/tmp", 1 << 20),), memory_max=64 << 20, cpu_quota=0.5)
    return Container(id="0123456789abcdef", name="web", image="busybox", image_id="i" * 64,
                     command=("sleep", "100"), spec=spec, created_usec=1, state=state)


def test_the_replies_quiltd_sends_round_trip() -> None:
    wire.install()
    bodies = [
        ("a{sv}", [convert.container_info(ContainerInfo(_container(State.RUNNING), Usage(1, 2, 3)))]),
        ("a{sv}", [convert.system_info(SystemInfo("0.1.0", {"running": 2}, 1, "/s", "/r", "6.1"))]),
        ("a(sssso)", [[convert.container_row(_container(State.CREATED))]]),
    ]
    for signature, body in bodies:
        msg = Message(destination=":1.5", message_type=MessageType.METHOD_RETURN, reply_serial=5,
                      signature=signature, body=body, serial=3)
        data = bytes(msg._marshall())
        theirs = Marshaller(signature, body)
        theirs.marshall()
        assert data.endswith(bytes(theirs.buffer))
        back = Unmarshaller(io.BytesIO(data)).unmarshall()
        assert back is not None and back.body == body


def test_a_wrong_value_still_fails_before_writing() -> None:
    with pytest.raises(SignatureBodyMismatchError):
        wire.FastMarshaller("u", ["not a number"])
