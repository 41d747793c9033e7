"""A message's bytes, written by writers compiled once per signature.

dbus-next marshals a header as a generic 'yyyyuua(yv)' value: a Variant
built and verified for each field, then the whole walked by signature; and
a body by looking up a method for every value it writes. For the daemon's
small replies and signals the header was more than half the cost of
sending them, and a list of a thousand containers took 8 ms. The layout is
fixed by the D-Bus specification (little endian here): 12 bytes, the fields
as an array of 8-aligned (code, variant) structs, padding to 8, then the
body. Each signature is turned once into a function that writes a value of
it; the body is aligned as the message is, since it starts at a multiple of 8.
A value of the wrong kind is refused as dbus-next refused it (an invalid
object path would make the bus broker drop the whole connection).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dbus_next.errors import SignatureBodyMismatchError
from dbus_next.signature import SignatureTree, Variant
from dbus_next.validators import is_object_path_valid

_FIXED = struct.Struct("<BBBBIII")  # endianness, type, flags, version, body length, serial, fields' length
_UINT32 = struct.Struct("<I")
_LITTLE_ENDIAN = ord("l")
_PROTOCOL_VERSION = 1

# Header field codes (SENDER, 7, is the bus's to write).
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION = 1, 2, 3, 4, 5, 6
_SIGNATURE, _UNIX_FDS = 8, 9


def marshall(msg: Any, negotiate_unix_fd: bool) -> bytearray:
    """The message's bytes, as dbus-next's Message._marshall writes them."""
    body = marshall_body(msg.signature, msg.body)
    out = bytearray(_FIXED.pack(_LITTLE_ENDIAN, msg.message_type.value, msg.flags.value, _PROTOCOL_VERSION,
                                len(body), msg.serial, 0))
    if msg.path:
        _string_field(out, _PATH, b"o", msg.path)
    if msg.interface:
        _string_field(out, _INTERFACE, b"s", msg.interface)
    if msg.member:
        _string_field(out, _MEMBER, b"s", msg.member)
    if msg.error_name:
        _string_field(out, _ERROR_NAME, b"s", msg.error_name)
    if msg.reply_serial:
        _uint32_field(out, _REPLY_SERIAL, msg.reply_serial)
    if msg.destination:
        _string_field(out, _DESTINATION, b"s", msg.destination)
    if msg.signature:
        _start_field(out, _SIGNATURE, b"g")
        encoded = msg.signature.encode()
        out.append(len(encoded))
        out += encoded
        out.append(0)
    if msg.unix_fds and negotiate_unix_fd:
        _uint32_field(out, _UNIX_FDS, len(msg.unix_fds))
    _UINT32.pack_into(out, 12, len(out) - _FIXED.size)
    _pad(out, 8)
    out += body
    return out


def marshall_body(signature: str, body: Sequence[Any]) -> bytearray:
    """A body of that signature, as dbus-next's Marshaller writes it."""
    out = bytearray()
    writers = _body_writers(signature)
    if len(body) != len(writers):
        raise SignatureBodyMismatchError(f"a body of {len(body)} values for signature {signature!r}")
    for write, value in zip(writers, body, strict=True):
        write(out, value)
    return out


_Writer = Callable[[bytearray, Any], None]
_ZEROS = tuple(bytes(n) for n in range(8))  # padding, by its length

# Basic fixed-size types: struct format and alignment. A boolean is a uint32,
# a descriptor ('h') its index in the message's list.
_FIXED_TYPES = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "d": "d",
                "h": "I"}


@functools.lru_cache(maxsize=512)
def _body_writers(signature: str) -> tuple[_Writer, ...]:
    return tuple(_writer(t) for t in SignatureTree(signature).types)


@functools.lru_cache(maxsize=512)
def _variant_writer(signature: str) -> _Writer:
    (t,) = SignatureTree(signature).types
    return _writer(t)


def _alignment(t: Any) -> int:
    code = t.token
    if code in _FIXED_TYPES:
        return struct.calcsize(_FIXED_TYPES[code])
    return {"s": 4, "o": 4, "a": 4, "g": 1, "v": 1, "(": 8, "{": 8}[code]


def _writer(t: Any) -> _Writer:
    code = t.token
    if code in _FIXED_TYPES:
        packer = struct.Struct("<" + _FIXED_TYPES[code])
        size = packer.size
        boolean = code == "b"

        def write_fixed(out: bytearray, value: Any) -> None:
            if boolean and type(value) is not bool:
                raise SignatureBodyMismatchError(f"a boolean (b) must be a bool, not {type(value).__name__}")
            out += _ZEROS[-len(out) % size]
            out += packer.pack(value)
        return write_fixed
    if code in ("s", "o"):
        path = code == "o"
        kind = "an object path" if path else "a string"

        def write_string(out: bytearray, value: str) -> None:
            if not isinstance(value, str) or (path and not is_object_path_valid(value)):
                raise SignatureBodyMismatchError(f"{value!r} is not {kind}")
            encoded = value.encode()
            out += _ZEROS[-len(out) % 4]
            out += _UINT32.pack(len(encoded))
            out += encoded
            out.append(0)
        return write_string
    if code == "g":
        def write_signature(out: bytearray, value: str) -> None:
            if not isinstance(value, str) or len(value.encode()) > 255:
                raise SignatureBodyMismatchError(f"{value!r} is not a signature")
            encoded = value.encode()
            out.append(len(encoded))
            out += encoded
            out.append(0)
        return write_signature
    if code == "v":
        def write_variant(out: bytearray, value: Variant) -> None:
            if not isinstance(value, Variant):
                raise SignatureBodyMismatchError(f"{value!r} is not a Variant")
            encoded = value.signature.encode()
            out.append(len(encoded))
            out += encoded
            out.append(0)
            _variant_writer(value.signature)(out, value.value)
        return write_variant
    if code == "a":
        (element,) = t.children
        element_alignment = _alignment(element)
        write_element = _writer(element)
        entries = element.token == "{"
        if element.token == "y":
            def write_bytes(out: bytearray, value: Any) -> None:  # an Exec's output: megabytes at once
                if not isinstance(value, bytes | bytearray | memoryview | list | tuple):
                    raise SignatureBodyMismatchError(f"bytes (ay) must be bytes, not {type(value).__name__}")
                out += _ZEROS[-len(out) % 4]
                data = bytes(value)
                out += _UINT32.pack(len(data))
                out += data
            return write_bytes

        def write_array(out: bytearray, value: Any) -> None:
            items: Iterable[Any]
            if entries and isinstance(value, dict):
                items = value.items()
            elif not entries and isinstance(value, list | tuple):
                items = value
            else:
                raise SignatureBodyMismatchError(f"{type(value).__name__} is not an array {t.signature}")
            out += _ZEROS[-len(out) % 4]
            at = len(out)
            out += _ZEROS[4]
            out += _ZEROS[-len(out) % element_alignment]
            start = len(out)
            for item in items:
                write_element(out, item)
            _UINT32.pack_into(out, at, len(out) - start)
        return write_array
    if code in ("(", "{"):
        fields = tuple(_writer(child) for child in t.children)

        def write_struct(out: bytearray, value: Sequence[Any]) -> None:
            if not isinstance(value, list | tuple) or len(value) != len(fields):
                raise SignatureBodyMismatchError(f"{value!r} is not a struct {t.signature}")
            out += _ZEROS[-len(out) % 8]
            for write, field in zip(fields, value, strict=True):
                write(out, field)
        return write_struct
    raise ValueError(f"cannot marshall type {t.signature!r}")


def _pad(out: bytearray, alignment: int) -> None:
    out += bytes(-len(out) % alignment)


def _start_field(out: bytearray, code: int, signature: bytes) -> None:
    _pad(out, 8)
    out.append(code)
    out.append(1)  # the variant's signature: one type
    out += signature
    out.append(0)


def _string_field(out: bytearray, code: int, signature: bytes, text: str) -> None:
    _start_field(out, code, signature)  # 4 bytes from 8-aligned: the length is aligned already
    encoded = text.encode()
    out += _UINT32.pack(len(encoded))
    out += encoded
    out.append(0)


def _uint32_field(out: bytearray, code: int, value: int) -> None:
    _start_field(out, code, b"u")
    out += _UINT32.pack(value)
