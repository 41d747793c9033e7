"""The daemon writes messages itself: byte for byte what dbus-next writes."""

from __future__ import annotations

import io
import struct

import pytest
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.errors import SignatureBodyMismatchError
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd.dbusnext import wireformat

CALL = Message(destination="org.quilt.Quilt1", path="/org/quilt/Quilt1", interface="org.quilt.Quilt1.Manager",
               member="CreateContainer", signature="sasa{sv}",
               body=["busybox", ["sleep", "3600"],
                     {"name": Variant("s", "wörk"), "start": Variant("b", True)}],
               serial=7)

MESSAGES = [
    CALL,
    Message(path="/", member="Ping", serial=1),  # no interface, destination or body
    Message(path="/a", interface="b.c", member="D", flags=MessageFlag.NO_REPLY_EXPECTED, serial=2**32 - 1),
    Message.new_method_return(CALL, "oi", ["/org/quilt/Quilt1/container/ab12", -3]),
    Message.new_method_return(CALL),
    Message.new_error(CALL, "org.quilt.Quilt1.Error.NoSuchContainer", "no container ünknown"),
    Message.new_signal("/org/quilt/Quilt1", "org.quilt.Quilt1.Manager", "ContainerStateChanged", "sssi",
                       ["ab12", "web", "running", -1]),
    Message.new_signal("/org/quilt/Quilt1/container/ab12", "org.freedesktop.DBus.Properties",
                       "PropertiesChanged", "sa{sv}as",
                       ["org.quilt.Quilt1.Container", {"State": Variant("s", "exited")}, []]),
    Message(destination=":1.5", path="/p", interface="i.j", member="WithFds", signature="hh", body=[0, 1],
            unix_fds=[11, 12], serial=9),
    Message(path="/" + "x" * 300, interface="a." + "b" * 200, member="M" * 255, signature="s",
            body=["y" * 70000], serial=3),
]


@pytest.mark.parametrize("negotiate_unix_fd", [True, False])
@pytest.mark.parametrize("index", range(len(MESSAGES)))
def test_same_bytes_as_dbus_next(index: int, negotiate_unix_fd: bool) -> None:
    msg = MESSAGES[index]
    if msg.serial == 0:
        msg.serial = 42
    expected = msg._marshall(negotiate_unix_fd=negotiate_unix_fd)
    assert wireformat.marshall(msg, negotiate_unix_fd) == expected


def test_a_method_return_is_read_back() -> None:
    reply = Message.new_method_return(CALL, "s", ["ok"])
    reply.serial = 8
    data = wireformat.marshall(reply, False)
    unmarshaller = Unmarshaller(io.BytesIO(bytes(data)))
    assert unmarshaller.unmarshall()
    back = unmarshaller.message
    assert (back.message_type, back.reply_serial, back.destination, back.body) == (
        MessageType.METHOD_RETURN, 7, None, ["ok"])


BODIES = [
    ("", []),
    ("ybnqiuxtdh", [255, True, -32768, 65535, -(2**31), 2**32 - 1, -(2**63), 2**64 - 1, -1.5, 3]),
    ("b", [False]),
    ("sog", ["wörk", "/org/quilt/Quilt1", "a{sv}"]),
    ("a(sssso)", [[["ab12", "web", "busybox", "running", "/org/quilt/Quilt1/container/ab12"]] * 3]),
    ("a(sssso)", [[]]),  # empty: still padded to the structs' alignment
    ("ya(ty)", [1, []]),
    ("yat", [1, []]),
    ("yat", [1, [7, 8]]),
    ("a{sv}", [{"Id": Variant("s", "x"), "Pid": Variant("u", 7), "Cpu": Variant("d", 0.5),
                "Labels": Variant("a{ss}", {"k": "v"}), "Mounts": Variant("a(ssb)", [["/a", "/b", True]]),
                "Nested": Variant("v", Variant("as", ["a", "b"])), "Empty": Variant("a{ss}", {})}]),
    ("a{sa{sv}}", [{"org.quilt.Quilt1.Container": {"State": Variant("s", "exited")}}]),
    ("sa{sv}as", ["org.quilt.Quilt1.Container", {"State": Variant("s", "exited")}, ["Pid"]]),
    ("ay", [b"\x00\x01binary\xff" * 100]),
    ("iayay", [0, b"out", b""]),
    ("aay", [[b"a", b"bc"]]),
    ("a(yv)", [[[1, Variant("o", "/p")], [8, Variant("g", "s")]]]),
    ("(s(ii))", [["x", [1, 2]]]),
    ("a{ua(ss)}", [{1: [["a", "b"]], 2: []}]),
]


@pytest.mark.parametrize("index", range(len(BODIES)))
def test_bodies_are_written_as_dbus_next_writes_them(index: int) -> None:
    signature, body = BODIES[index]
    msg = Message(path="/p", member="M", signature=signature, body=body, serial=1)
    assert wireformat.marshall(msg, True) == msg._marshall(negotiate_unix_fd=True)


@pytest.mark.parametrize(("signature", "body"), [
    ("ss", ["only one"]),
    ("(ss)", [["one"]]),
    ("(ss)", ["ab"]),  # a string is not a struct of its characters
    ("as", ["ls"]),  # nor an array of them
    ("a{ss}", [[("k", "v")]]),
    ("b", [1]),
    ("s", [7]),
    ("o", ["not/a/path"]),  # the broker would drop the whole connection for it
    ("o", ["/trailing/"]),
    ("g", ["s" * 256]),
    ("v", ["not a variant"]),
    ("ay", [5]),  # bytes(5) would be five zeros
    ("u", [-1]),
    ("y", [256]),
])
def test_a_wrong_body_is_refused(signature: str, body: list[object]) -> None:
    with pytest.raises((SignatureBodyMismatchError, struct.error)):
        wireformat.marshall_body(signature, body)
