"""A message's bytes, its header written directly.

dbus-next marshals a header as a generic 'yyyyuua(yv)' value: a Variant
built and verified for each field, then the whole walked by signature. For
the daemon's small replies and signals that was more than half the cost of
sending them. The layout is fixed by the D-Bus specification (little
endian here): 12 bytes, the fields as an array of 8-aligned (code, variant)
structs, padding to 8, then the body, which dbus-next's marshaller writes.
"""

from __future__ import annotations

import struct
from typing import Any

from dbus_next._private.marshaller import Marshaller

_FIXED = struct.Struct("<BBBBIII")  # endianness, type, flags, version, body length, serial, fields' length
_UINT32 = struct.Struct("<I")
_LITTLE_ENDIAN = ord("l")
_PROTOCOL_VERSION = 1

# Header field codes (SENDER, 7, is the bus's to write).
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION = 1, 2, 3, 4, 5, 6
_SIGNATURE, _UNIX_FDS = 8, 9


def marshall(msg: Any, body_marshaller: type[Marshaller], negotiate_unix_fd: bool) -> bytearray:
    """The message's bytes, as dbus-next's Message._marshall writes them."""
    body = body_marshaller(msg.signature, msg.body)
    body.marshall()
    out = bytearray(_FIXED.pack(_LITTLE_ENDIAN, msg.message_type.value, msg.flags.value, _PROTOCOL_VERSION,
                                len(body.buffer), msg.serial, 0))
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
    out += body.buffer
    return out


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
