"""The wire protocol as a running container's init speaks it: bad frames are refused, and nothing ends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.system.conftest import run
from tests.system.test_exec import _running

pytestmark = pytest.mark.system

# Run as root inside the sandbox: a client of the exec channel that is not
# quiltd, sending what quiltd never sends, with the frame format written out
# by hand (kind u16, length u32, JSON body). Prints init's answers.
ROGUE = r"""
import json, socket, struct, sys

path = sys.argv[1]
EXEC, EXITED = 20, 24
answers = []

def ask(datagram):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Root may pass the send buffer's cap: a datagram larger than any frame can be sent.
    s.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE, which Python does not name
    s.connect(path)
    s.send(datagram)
    s.settimeout(10)
    data = s.recv(1 << 20)
    kind, length = struct.unpack("!HI", data[:6])
    answers.append([kind, json.loads(data[6:6 + length]) if length else {}])
    s.close()

def frame(kind, body):
    data = json.dumps(body).encode()
    return struct.pack("!HI", kind, len(data)) + data

ask(frame(4242, {}))                                    # a kind nobody knows
ask(frame(EXITED, {"exit_code": 0, "timed_out": False}))  # a kind init sends, never takes
ask(struct.pack("!HI", EXEC, 1 << 30))                  # a header that claims 1 GiB
ask(frame(EXEC, {"exec_id": "1" * 10}) + b"x" * (600 << 10))  # a datagram over the frame size
ask(frame(EXEC, {"exec_id": "ab"}))                     # an EXEC without its fields
ask(b"\x00\x14")                                        # a header cut off
print(json.dumps(answers))
"""


def test_init_refuses_frames_it_does_not_take_and_the_container_runs_on(sandbox: Any, quilt: Any,
                                                                        name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            cid = await _running(q, name)
            control = f"/run/quilt/containers/{cid}/control"
            out = sandbox.run(["/usr/bin/python3", "-c", ROGUE, control], timeout=60).stdout
            answers = json.loads(out)
            # Each is answered FAILED (99) with the failure record, on its own connection.
            assert [kind for kind, _ in answers] == [99] * 6
            assert all(body["code"] == "internal" for _, body in answers)
            messages = [body["message"] for _, body in answers]
            assert "unknown message kind 4242" in messages[0]
            assert "unexpected message EXITED" in messages[1]
            assert "over" in messages[2]
            assert "over the frame size" in messages[3]
            assert "KeyError" in messages[4]
            assert "cut off in its header" in messages[5]
            # Init is still the container's, and still runs execs.
            assert (await q.info(name))["State"] == "running"
            result = await q.exec(name, ["sh", "-c", "echo still; exit 5"])
            assert (result[0], result[1]) == (5, b"still\n")
            await q.remove(name, force=True)

    run(scenario())
