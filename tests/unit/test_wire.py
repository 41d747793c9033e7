"""The wire protocol between the daemon, the fork server, inits and copies: frames, kinds, failures."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from quiltd import errors
from quiltd.runtime import wire
from quiltd.runtime.copyspec import CopyResult
from quiltd.runtime.execproto import ExecRequest, ExecStatus
from quiltd.runtime.launchspec import LaunchSpec, claim
from quiltd.runtime.wire import Code, Failure, Frame, Kind, WireError


def test_a_frame_is_a_header_with_its_kind_and_length_then_a_json_body() -> None:
    data = wire.encode(Kind.EXITED, {"exit_code": 3, "timed_out": False})
    kind, length = struct.unpack("!HI", data[:6])
    assert (kind, length) == (Kind.EXITED.value, len(data) - 6)
    assert wire.decode(data) == Frame(Kind.EXITED, {"exit_code": 3, "timed_out": False})


def test_a_frame_without_fields_has_an_empty_body() -> None:
    assert wire.encode(Kind.GO) == struct.pack("!HI", Kind.GO.value, 0)
    assert wire.decode(wire.encode(Kind.GO)) == Frame(Kind.GO, {})


def test_an_unknown_kind_is_refused_before_its_body_is_read() -> None:
    with pytest.raises(WireError, match="unknown message kind 7"):
        wire.decode(struct.pack("!HI", 7, 2) + b"{}")
    with pytest.raises(WireError, match="unknown message kind"):
        wire.Reader().feed(struct.pack("!HI", 4242, 1 << 30))


def test_an_oversize_frame_is_refused_from_its_header_alone() -> None:
    header = struct.pack("!HI", Kind.SPEC.value, wire.MAX_BODY + 1)
    with pytest.raises(WireError, match="over"):
        wire.decode(header)
    with pytest.raises(WireError, match="over"):
        wire.Reader().feed(header)
    with pytest.raises(WireError, match="over"):
        wire.encode(Kind.SPEC, {"x": "a" * wire.MAX_BODY})


@pytest.mark.parametrize("data", [
    b"\x00",  # a header cut off
    struct.pack("!HI", Kind.OK.value, 5) + b"{}",  # a body shorter than its header says
    struct.pack("!HI", Kind.OK.value, 2) + b"{}{}",  # trailing bytes
    struct.pack("!HI", Kind.OK.value, 2) + b"[]",  # not an object
    struct.pack("!HI", Kind.OK.value, 2) + b"\xff\xfe",  # not UTF-8
])
def test_what_is_not_exactly_one_frame_is_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        wire.decode(data)


def test_a_stream_reader_puts_frames_together_from_pieces_of_any_size() -> None:
    frames = [Frame(Kind.SPEC, {"name": "a" * 300}), Frame(Kind.IN), Frame(Kind.GO, {"user": "x"})]
    data = b"".join(f.encode() for f in frames)
    for size in (1, 2, 5, 6, 7, 100, len(data)):
        reader, got = wire.Reader(), []
        for i in range(0, len(data), size):
            got += reader.feed(data[i:i + size])
        reader.end()
        assert got == frames


def test_end_of_file_inside_a_frame_is_an_error_between_frames_it_is_not() -> None:
    reader = wire.Reader()
    assert reader.feed(wire.encode(Kind.OK)[:3]) == []
    with pytest.raises(WireError, match="end of file inside a frame"):
        reader.end()
    wire.Reader().end()


def test_read_frame_reads_a_pipe_written_in_pieces_then_sees_end_of_file() -> None:
    r, w = os.pipe()
    data = wire.encode(Kind.SPEC, {"command": ["sh", "-c", "x" * 100_000]}) + wire.encode(Kind.GO)

    def writer() -> None:
        # Pieces smaller than the header, and a pipe fuller than its capacity:
        # the reader sees short reads.
        for i in range(0, len(data), 4093):
            os.write(w, data[i:i + 4093])
        os.close(w)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        first = wire.read_frame(r)
        assert first is not None and first.kind == Kind.SPEC
        assert first.body["command"][2] == "x" * 100_000
        assert wire.read_frame(r) == Frame(Kind.GO)
        assert wire.read_frame(r) is None
    finally:
        thread.join()
        os.close(r)


def test_read_frame_refuses_a_frame_cut_off_by_end_of_file() -> None:
    r, w = os.pipe()
    os.write(w, wire.encode(Kind.SPEC, {"a": 1})[:-1])
    os.close(w)
    with pytest.raises(WireError, match="end of file inside a SPEC frame"):
        wire.read_frame(r)
    os.close(r)


def test_a_datagram_carries_one_frame_and_its_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        wire.send(a, Kind.STARTED, fds=[r])
        frame, fds = wire.receive(b, 1)
        assert frame == Frame(Kind.STARTED) and len(fds) == 1
        os.write(w, b"through")
        assert os.read(fds[0], 7) == b"through"
        for fd in (r, w, *fds):
            os.close(fd)
        a.shutdown(socket.SHUT_WR)
        assert wire.receive(b, 1) == (None, [])


def test_a_datagram_with_more_descriptors_than_expected_is_refused_and_none_leaks() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        wire.send(a, Kind.EXEC, {"exec_id": "1"}, fds=[r, w])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(WireError, match="descriptors"):
            wire.receive(b, 1)
        assert len(os.listdir("/proc/self/fd")) == before
    os.close(r)
    os.close(w)


def test_a_datagram_with_an_unknown_kind_closes_the_descriptors_it_brought() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        socket.send_fds(a, [struct.pack("!HI", 999, 0)], [r])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(WireError, match="unknown message kind 999"):
            wire.receive(b, 1)
        assert len(os.listdir("/proc/self/fd")) == before
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(("code", "error"), [
    (Code.USER, errors.InvalidArgument),
    (Code.EXEC, errors.ExecFailed),
    (Code.GONE, errors.InvalidState),
    (Code.INVALID, errors.InvalidArgument),
    (Code.NO_PATH, errors.NoSuchPath),
    (Code.LIMIT, errors.LimitExceeded),
    (Code.TIMEOUT, errors.Timeout),
    (Code.IO, errors.CopyFailed),
    (Code.INTERNAL, errors.Internal),
])
def test_a_failure_crosses_the_wire_and_becomes_its_named_error(code: Code,
                                                                 error: type[errors.QuiltError]) -> None:
    sent = Failure(code, "sh: No such file or directory")
    received = Failure.from_frame(wire.decode(sent.encode()))
    assert received == sent
    raised = wire.error(received, "exec in container web")
    assert type(raised) is error
    assert raised.message == "exec in container web: sh: No such file or directory"


def test_every_failure_code_has_its_error() -> None:
    assert set(wire.ERRORS) == set(Code)


def test_an_unexpected_exception_is_an_internal_failure_named_by_its_type() -> None:
    failure = Failure.of(FileNotFoundError(2, "No such file or directory"))
    assert failure == Failure(Code.INTERNAL, "FileNotFoundError: [Errno 2] No such file or directory")


def test_a_failure_code_this_daemon_does_not_know_is_still_reported_as_internal() -> None:
    frame = wire.decode(wire.encode(Kind.FAILED, {"code": "martian", "message": "odd"}))
    assert Failure.from_frame(frame) == Failure(Code.INTERNAL, "odd")
    with pytest.raises(WireError):
        Failure.from_frame(Frame(Kind.OK))
    with pytest.raises(WireError):
        Failure.from_frame(Frame(Kind.FAILED, {"code": "io"}))


def test_a_long_failure_message_is_cut_so_its_frame_fits_what_the_daemon_reads() -> None:
    # Control characters take JSON's longest escape, six bytes each.
    for text in ("x" * 100_000, "\x01" * 100_000):
        data = Failure(Code.INTERNAL, text).encode()
        assert len(data) <= wire.MAX_ANSWER
        assert Failure.from_frame(wire.decode(data)).message == text[:wire.MAX_MESSAGE_CHARS]


def test_the_records_of_each_channel_round_trip_through_frames() -> None:
    request = ExecRequest("ab12", ("sh", "-c", "echo é\n"), ("A=b",), "/", "1000:5", 3, False, True, 24, 80)
    frame = wire.decode(request.frame().encode())
    assert frame.kind == Kind.EXEC and ExecRequest.decode(frame.body) == request
    status = ExecStatus(124, True)
    assert ExecStatus.from_message(wire.decode(wire.encode(Kind.EXITED, status.body())).body) == status
    result = CopyResult(size=10240, entries=3)
    assert CopyResult.from_body(wire.decode(wire.encode(Kind.COPIED, result.body())).body) == result
    spec = LaunchSpec("c1", "web", "web", ("sleep", "1"), ("PATH=/bin",), "/", "/l", "/u", "/w", "/r",
                      "/run/exit", "/run/journal", binds=(("/a", "/b", True),), tmpfs=(("/t", 4096),))
    assert LaunchSpec.from_body(wire.decode(wire.encode(Kind.SPEC, spec.body())).body) == spec
    go = wire.decode(wire.encode(Kind.GO, claim("n", "h", ("true",), (), "/", "", 0, 30)))
    assert spec.claimed(go.body).command == ("true",)
