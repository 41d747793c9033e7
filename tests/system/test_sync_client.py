"""The agent loop of the README through the plain (non-asyncio) client."""

from __future__ import annotations

import os
from typing import Any

import pytest

from quiltd import errors
from quiltd.client import ExecResult, Quilt

pytestmark = pytest.mark.system


def test_agent_loop_with_the_sync_client(sandbox: Any, busybox_image: str, name: str) -> None:
    with Quilt(sandbox.bus_address) as quilt:
        container_id = quilt.create(name, "busybox", ["sleep", "3600"], memory_max=256 << 20)
        assert quilt.wait_started(name, 10_000_000) == "running"
        assert quilt.info(name)["State"] == "running"
        result = quilt.exec(name, ["sh", "-c", "echo $((6*7)); echo oops >&2"])
        assert result == ExecResult(0, b"42\n", b"oops\n")
        quilt.exec(name, ["sh", "-c", "echo report > /tmp/out.txt"])
        assert quilt.exec(name, ["cat", "/tmp/out.txt"]).stdout == b"report\n"
        background = quilt.exec_start(name, ["sh", "-c", "echo from-background; exit 3"])
        assert quilt.exec_wait(background, 10_000_000) == ("exited", 3)
        assert [c.name for c in quilt.containers(name=name)] == [name]
        assert [c.id for c in quilt.containers(name=name)] == [container_id]
        assert "busybox" in [i.name for i in quilt.images()]
        with pytest.raises(errors.InvalidState):
            quilt.remove(name)
        quilt.remove(name, force=True)
        with pytest.raises(errors.NoSuchContainer):
            quilt.info(name)


def test_wait_started_settles_every_way(sandbox: Any, busybox_image: str, name: str) -> None:
    with Quilt(sandbox.bus_address) as quilt:
        quilt.create(name, "busybox", ["no-such-program"])
        assert quilt.wait_started(name, 10_000_000) == "failed"
        assert "No such file" in quilt.info(name)["Reason"]
        quilt.remove(name)
        quilt.create(name, "busybox", ["true"], start=False)
        with pytest.raises(errors.InvalidState):
            quilt.wait_started(name)
        quilt.remove(name)
        with pytest.raises(errors.NoSuchContainer):
            quilt.wait_started(name)


def test_struct_options_as_tuples_and_the_new_exec_calls(sandbox: Any, busybox_image: str, name: str) -> None:
    with Quilt(sandbox.bus_address) as quilt:
        quilt.create(name, "busybox", ("sleep", "3600"), tmpfs=[("/scratch", 1 << 20)],
                     volumes=((f"{name}-v", "/data", False),), publish=((18181, 80, "tcp"),))
        try:
            assert quilt.wait_started(name, 10_000_000) == "running"
            info = quilt.info(name)
            assert info["Publish"] == [[18181, 80, "tcp"]]
            out = quilt.exec(name, ("sh", "-c", "mount | grep -c -e ' /scratch ' -e ' /data '")).stdout
            assert out == b"2\n"
            exec_id, master = quilt.exec_with_pty(name, ["sleep", "100"], rows=10, cols=20)
            try:
                assert [(e.id, e.state, e.command) for e in quilt.list_execs(name)] == \
                    [(exec_id, "running", ["sleep", "100"])]
                quilt.exec_kill(exec_id, 15)
                assert quilt.exec_wait(exec_id, 10_000_000) == ("exited", 143)
            finally:
                os.close(master)
        finally:
            quilt.remove(name, force=True)
            quilt.remove_volume(f"{name}-v")
