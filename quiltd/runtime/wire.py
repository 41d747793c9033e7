"""The one wire protocol between the daemon, the fork server and what it forks.

Every message on every channel between these processes is a frame:

    kind   u16, network order   what the message is (Kind)
    length u32, network order   of the body, at most MAX_BODY
    body   JSON object, UTF-8   the message's fields ("" for none)

The same frames travel on SOCK_SEQPACKET sockets (one frame per datagram,
descriptors beside it with SCM_RIGHTS) and on pipes (a stream: the header
says where a frame ends, so a reader copes with partial reads). A receiver
checks the kind before it reads a field, so a request is never told from
another by its first bytes.

The channels and what each carries (init = the container's init, copy = a
copy helper; both are children of the fork server):

    channel                          direction            kinds
    fork server socket pair          daemon -> server     LAUNCH | COPY (+ go, data, result fds)
                                     server -> daemon     LAUNCHED (+ pidfd, spec, error fds)
                                                          | FORKED (+ pidfd) | FAILED
    namespace report pipe            init -> server       READY | FAILED
    spec pipe                        daemon -> init       SPEC, then [IN], then GO (with a claim)
    error pipe (close-on-exec)       init -> daemon       nothing (the command was executed) | FAILED
    exec channel (see execproto)     daemon -> init       EXEC (+ 3 fds or none) | WAIT | KILL
                                     init -> daemon       STARTED (+ a pty master) | FAILED, then EXITED;
                                                          UNKNOWN | OK
    copy go pipe                     daemon -> copy       GO
    copy result pipe                 copy -> daemon       COPIED | FAILED

A failure, wherever it happens, is one record (Failure: a Code and a
message), and error() is the one place that turns it into the QuiltError a
caller sees.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quiltd.errors import (
    CopyFailed,
    ExecFailed,
    Internal,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NoSuchPath,
    QuiltError,
    Timeout,
)

HEADER = struct.Struct("!HI")
# A CopySpec or an exec's command and environment are the largest bodies;
# the daemon refuses requests that would come near this.
MAX_BODY = 512 << 10
MAX_FRAME = HEADER.size + MAX_BODY
# What an answer to the daemon can be at most (a failure's frame is the
# largest); the daemon reads answers into a buffer of this size.
MAX_ANSWER = 64 << 10
MAX_MESSAGE_CHARS = 4096  # of a failure's message: its frame is one write, far below a pipe's capacity


class Kind(enum.IntEnum):
    # the fork server
    LAUNCH = 1
    COPY = 2
    LAUNCHED = 3
    FORKED = 4
    READY = 5
    # a container's init, on its spec pipe
    SPEC = 10
    IN = 11
    GO = 12
    # the exec channel
    EXEC = 20
    WAIT = 21
    KILL = 22
    STARTED = 23
    EXITED = 24
    UNKNOWN = 25
    OK = 26
    # a copy's result
    COPIED = 30
    # any channel: a Failure
    FAILED = 99


class WireError(ValueError):
    """Bytes that are not a frame: an unknown kind, an oversize or cut-off frame, a body not an object."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(self.kind, self.body)


def encode(kind: Kind, body: Mapping[str, Any] | None = None) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode() if body else b""
    if len(data) > MAX_BODY:
        raise WireError(f"a {kind.name} frame's body is {len(data)} bytes, over {MAX_BODY}")
    return HEADER.pack(kind, len(data)) + data


def _header(data: bytes) -> tuple[Kind, int]:
    number, length = HEADER.unpack_from(data)
    try:
        kind = Kind(number)
    except ValueError:
        raise WireError(f"unknown message kind {number}") from None
    if length > MAX_BODY:
        raise WireError(f"a {kind.name} frame of {length} bytes, over {MAX_BODY}")
    return kind, length


def _body(kind: Kind, data: bytes) -> Frame:
    if not data:
        return Frame(kind)
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"a {kind.name} frame's body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise WireError(f"a {kind.name} frame's body is not an object")
    return Frame(kind, body)


def decode(data: bytes) -> Frame:
    """The one frame data holds, all of it (a datagram, or a pipe read to its end)."""
    if len(data) < HEADER.size:
        raise WireError(f"a frame cut off in its header ({len(data)} bytes)")
    kind, length = _header(data)
    if len(data) != HEADER.size + length:
        raise WireError(f"a {kind.name} frame of {length} bytes came with {len(data) - HEADER.size}")
    return _body(kind, data[HEADER.size:])


class Reader:
    """Frames out of a stream that arrives in pieces of any size (a non-blocking pipe)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames data completes; what is left waits for the next piece."""
        self._buffer.extend(data)
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = _header(bytes(self._buffer[:HEADER.size]))
            if len(self._buffer) < HEADER.size + length:
                break
            frames.append(_body(kind, bytes(self._buffer[HEADER.size:HEADER.size + length])))
            del self._buffer[:HEADER.size + length]
        return frames

    def end(self) -> None:
        """At end of file: WireError if a frame was cut off."""
        if self._buffer:
            raise WireError(f"end of file inside a frame ({len(self._buffer)} bytes of it)")


def read_frame(fd: int) -> Frame | None:
    """The next frame from a blocking stream, or None at end of file between frames."""
    header = _read_exactly(fd, HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise WireError("end of file inside a frame's header")
    kind, length = _header(header)
    body = _read_exactly(fd, length)
    if len(body) < length:
        raise WireError(f"end of file inside a {kind.name} frame")
    return _body(kind, body)


def _read_exactly(fd: int, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data.extend(chunk)
    return bytes(data)


def write_frame(fd: int, kind: Kind, body: Mapping[str, Any] | None = None) -> None:
    """Writes one frame to a blocking stream, all of it."""
    view = memoryview(encode(kind, body))
    while view:
        view = view[os.write(fd, view):]


def send(sock: socket.socket, kind: Kind, body: Mapping[str, Any] | None = None,
         fds: Sequence[int] = ()) -> None:
    """One frame as one datagram, with fds beside it."""
    socket.send_fds(sock, [encode(kind, body)], list(fds))


def receive(sock: socket.socket, max_fds: int, flags: int = 0,
            limit: int = MAX_FRAME) -> tuple[Frame | None, list[int]]:
    """One datagram's frame (None at end of file) and the descriptors that came with it (the caller's).

    A datagram over limit bytes is cut by the kernel; that is a WireError
    here, after its descriptors are closed.
    """
    data, fds, msg_flags, _ = socket.recv_fds(sock, limit, max_fds, flags)
    if not data and not fds:
        return None, []
    try:
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise WireError("a datagram over the frame size, or with too many descriptors")
        return decode(data), fds
    except WireError:
        for fd in fds:
            os.close(fd)
        raise


class Code(str, enum.Enum):
    """What kind of failure a child reports, so the daemon can name the error."""

    USER = "user"  # an exec's user option names no user of the container
    EXEC = "exec"  # the program or workdir could not be used
    GONE = "gone"  # the container's init is not there any more
    INVALID = "invalid"  # a copy's tar stream or path is not acceptable
    NO_PATH = "no-path"  # the path does not exist in the container
    LIMIT = "limit"  # over a copy's max_bytes
    TIMEOUT = "timeout"  # nothing moved for a copy's idle timeout
    IO = "io"  # reading or writing in the container failed (read-only, full, permissions)
    INTERNAL = "internal"  # anything else: a bug, or the host refused


@dataclass(frozen=True)
class Failure:
    """The one error record: every child reports a failure as this, in a FAILED frame."""

    code: Code
    message: str

    @classmethod
    def of(cls, e: BaseException) -> Failure:
        """An unexpected exception, named by its type."""
        return cls(Code.INTERNAL, f"{type(e).__name__}: {e}")

    def body(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message[:MAX_MESSAGE_CHARS]}

    def encode(self) -> bytes:
        return encode(Kind.FAILED, self.body())

    @classmethod
    def from_frame(cls, frame: Frame) -> Failure:
        if frame.kind != Kind.FAILED:
            raise WireError(f"a {frame.kind.name} frame where a failure was expected")
        code, message = frame.body.get("code"), frame.body.get("message")
        if not isinstance(message, str):
            raise WireError("a failure without a message")
        try:
            return cls(Code(code), message)
        except ValueError:
            return cls(Code.INTERNAL, message)  # a code this daemon does not know: still reported

    def __str__(self) -> str:
        return self.message


ERRORS: dict[Code, type[QuiltError]] = {
    Code.USER: InvalidArgument,
    Code.EXEC: ExecFailed,
    Code.GONE: InvalidState,
    Code.INVALID: InvalidArgument,
    Code.NO_PATH: NoSuchPath,
    Code.LIMIT: LimitExceeded,
    Code.TIMEOUT: Timeout,
    Code.IO: CopyFailed,
    Code.INTERNAL: Internal,
}


def error(failure: Failure, where: str) -> QuiltError:
    """The QuiltError a caller sees for a failure a child reported; where says what failed."""
    return ERRORS[failure.code](f"{where}: {failure.message}")
