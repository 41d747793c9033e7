"""disk_max: an agent that fills its writable layer hits the cap, not the host's disk."""

from __future__ import annotations

from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import run

pytestmark = pytest.mark.system

STATE_DIR = "/var/lib/quilt"
CAP = 8 << 20


def test_filling_the_writable_layer_stops_at_disk_max(sandbox: Any, quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"], disk_max=CAP, start=False)
            try:
                await q.start(name)
                assert (await q.info(name))["DiskMax"] == CAP
                code, out, err = await q.exec(name, ["sh", "-c",
                                                     "dd if=/dev/zero of=/big bs=1M count=32; echo rc=$?"])
                assert b"No space left on device" in err, err
                assert out.strip().endswith(b"rc=1"), out
                # At most the cap was written, and the container still answers.
                code, out, _ = await q.exec(name, ["sh", "-c", "ls -l /big | awk '{print $5}'"])
                assert code == 0 and 0 < int(out) <= CAP, out
                code, out, _ = await q.exec(name, ["sh", "-c", "rm /big && echo x > /small && cat /small"])
                assert (code, out) == (0, b"x\n")
                # Nothing of the layer is on the host: its directories there stay empty.
                listing = sandbox.run(["find", f"{STATE_DIR}/containers/{cid}", "-mindepth", "1"]).stdout
                assert sorted(listing.decode().split()) == sorted(
                    f"{STATE_DIR}/containers/{cid}/{d}" for d in ("disk", "rootfs")), listing
                await q.stop(name, 5)
                state, _ = await q.wait(name, 10_000_000)
                assert state == "exited"
                # A new start gets a new, empty layer: the old one went with the namespace.
                await q.start(name)
                code, out, _ = await q.exec(name, ["sh", "-c", "test -e /small && echo kept || echo gone"])
                assert out == b"gone\n"
            finally:
                await q.remove(name, force=True)

    run(scenario())


@pytest.mark.parametrize("value", [0, 1 << 19, 1 << 41])
def test_disk_max_out_of_range_is_refused(quilt: Any, name: str, value: int) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="disk_max"):
                await q.create(name, "busybox", ["true"], disk_max=value)
            assert name not in [row[1] for row in await q.list_containers()]

    run(scenario())
