"""The client's marshalling: what a Python caller naturally writes goes on the wire."""

from __future__ import annotations

from dbus_next.message import Message

from quiltd.client import OPTION_TYPES, variant


def test_struct_options_take_tuples_and_lists() -> None:
    options = {
        "publish": [(8080, 80, "tcp")],
        "mounts": (("/srv", "/srv", True),),
        "tmpfs": [["/scratch", 1 << 20]],
        "volumes": (("cache", "/cache", False),),
        "entrypoint": ("python3",),
        "labels": {"k": "v"},
    }
    body = {k: variant(OPTION_TYPES[k], v) for k, v in options.items()}
    message = Message(destination="org.quilt.Quilt1", path="/org/quilt/Quilt1",
                      interface="org.quilt.Quilt1.Manager", member="CreateContainer",
                      signature="ssasa{sv}", body=["c", "img", ["true"], body])
    assert message._marshall()  # dbus-next refuses a tuple in place of a struct or an array
    assert body["publish"].value == [[8080, 80, "tcp"]]
    assert body["mounts"].value == [["/srv", "/srv", True]]
