"""A message is freed when its last user lets go, not at the next full garbage collection."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from dbus_next.message import Message

from quiltd.dbusnext import wireformat


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_marshalling_a_message_leaves_no_cycle(no_automatic_collection: None) -> None:
    message = Message(destination="org.quilt.Quilt1", path="/org/quilt/Quilt1", interface="org.quilt.Test",
                      member="Big", signature="aysa{sv}", body=[b"x" * (1 << 20), "text", {}])
    data = wireformat.marshall(message, True)  # what every connection of quiltd's sends with
    assert len(data) > 1 << 20
    del message, data
    assert gc.collect() == 0
