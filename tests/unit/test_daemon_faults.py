"""The pieces that keep quiltd up under faults: notify, store errors, the commit queue, descriptors."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

from quiltd.bus.errors import bus_errors
from quiltd.bus.peer import MAX_AUTHENTICATING_PER_UID, PeerServer
from quiltd.core.retries import CommitQueue
from quiltd.dbusnext.connection import handed_over, refuse_fds_in_variants
from quiltd.errors import Busy, InvalidArgument, NoSpace
from quiltd.host.notify import Notifier, notify_address
from quiltd.model import Volume
from quiltd.store.database import Store, unavailable


def test_notify_addresses() -> None:
    assert notify_address("@abstract/name") == "\0abstract/name"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("vsock:2:1234") is None


def test_notify_uses_one_socket_for_every_message() -> None:
    name = f"quilt-test-notify-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            assert notifier.notify("WATCHDOG=1")
            assert receiver.recv(64) == b"WATCHDOG=1"
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        notifier.close()
        receiver.close()
    assert not Notifier({}).notify("READY=1")


def test_a_locked_database_is_busy_and_a_full_one_no_space(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    other = sqlite3.connect(tmp_path / "quilt.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Busy, match="database is locked"), store.transaction():
            pass
        assert store.schema_version > 0  # reads go on
    finally:
        other.execute("ROLLBACK")
        other.close()
    with store.transaction():
        pass
    store.close()
    assert isinstance(unavailable(sqlite3.OperationalError("database or disk is full")), NoSpace)


def test_a_full_database_is_no_space_and_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "disk full"
    with pytest.raises(NoSpace, match="full"), store.transaction():
        for i in range(2000):
            store.insert_volume(Volume(name=f"v{i}", path="/x" * 50, created_usec=i))
    assert store.list_volumes() == []
    store.close()
    assert unavailable(sqlite3.OperationalError("no such table: x")) is None


def test_the_commit_queue_retries_in_order_until_it_commits() -> None:
    async def scenario() -> None:
        queue = CommitQueue(first_sec=0.01, last_sec=0.02)
        failures = {"a": 3}
        done: list[str] = []

        def commit(what: str) -> None:
            if failures.get(what, 0) > 0:
                failures[what] -= 1
                raise Busy("locked")
            done.append(what)

        queue.run("a", lambda: commit("a"))
        queue.run("b", lambda: commit("b"))  # queued behind a, though it would commit now
        assert done == [] and len(queue) == 2
        for _ in range(100):
            if not len(queue):
                break
            await asyncio.sleep(0.01)
        assert done == ["a", "b"]
        queue.run("c", lambda: commit("c"))  # an empty queue commits at once
        assert done == ["a", "b", "c"]

    asyncio.run(scenario())


def test_descriptor_arguments_are_checked_and_copied() -> None:
    r, w = os.pipe()
    try:
        msg = Message(path="/x", interface="a.b", member="M", signature="shh", body=["x", 1, 1],
                      unix_fds=[r, w, r])
        copies = handed_over(msg)
        assert copies[0] == -1 and copies[2] == -1  # not named: left to be closed with the call
        assert copies[1] not in (r, w) and os.fstat(copies[1]).st_ino == os.fstat(w).st_ino
        os.close(copies[1])
        bad = Message(path="/x", interface="a.b", member="M", signature="h", body=[3], unix_fds=[r])
        with pytest.raises(InvalidArgument, match="index 3"):
            handed_over(bad)
        in_options = Message(path="/x", interface="a.b", member="M", signature="ha{sv}",
                             body=[0, {"k": Variant("av", [Variant("h", 1)])}], unix_fds=[r, w])
        with pytest.raises(InvalidArgument, match="inside a variant"):
            refuse_fds_in_variants(in_options)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="the socket serves root and group quilt; run as root")
def test_connections_over_a_cap_are_refused_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = str(tmp_path / "quiltd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        server = PeerServer([listener], cast(Any, None), [])  # nobody authenticates: no exports needed
        server.start()
        clients = []
        try:
            for _ in range(MAX_AUTHENTICATING_PER_UID + 4):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                await asyncio.get_running_loop().sock_connect(client, path)
                clients.append(client)
            await asyncio.sleep(0.2)
            answers = []
            for client in clients:
                try:
                    answers.append(client.recv(64))
                except BlockingIOError:
                    answers.append(None)  # held: still authenticating
            assert answers[:MAX_AUTHENTICATING_PER_UID] == [None] * MAX_AUTHENTICATING_PER_UID
            assert answers[MAX_AUTHENTICATING_PER_UID:] == [b"REJECTED EXTERNAL\r\n"] * 4
        finally:
            for client in clients:
                client.close()
            server.close()

    asyncio.run(scenario())


def test_an_error_quoting_a_huge_value_is_cut() -> None:
    @bus_errors
    async def refuse(name: str) -> None:
        raise InvalidArgument(f"invalid container name {name!r}")

    with pytest.raises(DBusError) as caught:
        asyncio.run(refuse("y" * (4 << 20)))
    assert caught.value.type == InvalidArgument.dbus_name
    assert len(caught.value.text) < 5000 and caught.value.text.endswith("characters cut)")
