"""The daemon writes a message's header itself: byte for byte what dbus-next writes."""

from __future__ import annotations

import io

import pytest
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd.dbusnext import connection, wireformat

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
    assert wireformat.marshall(msg, connection._AcyclicMarshaller, negotiate_unix_fd) == expected


def test_a_method_return_is_read_back() -> None:
    reply = Message.new_method_return(CALL, "s", ["ok"])
    reply.serial = 8
    data = wireformat.marshall(reply, connection._AcyclicMarshaller, False)
    unmarshaller = Unmarshaller(io.BytesIO(bytes(data)))
    assert unmarshaller.unmarshall()
    back = unmarshaller.message
    assert (back.message_type, back.reply_serial, back.destination, back.body) == (
        MessageType.METHOD_RETURN, 7, None, ["ok"])
