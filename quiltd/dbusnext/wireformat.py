"""A message's bytes, written and read by functions compiled once per signature.

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

Reading is the same in reverse. dbus-next's Unmarshaller looked up a method
for every value, built and verified a Variant per header field, checked
every name with regular expressions and kept every signature it ever saw
(a peer could grow that cache without end). A call's header and body took
75-250 µs, a list of a thousand containers 13 ms. Here each signature is
turned once into a function that reads a value of it, with a bound on the
cache; header names are checked through a small cache. What dbus-next
accepted in a well-formed message reads the same (the unit tests compare
both on every kind of message and on damaged ones); what the specification
forbids and dbus-next let through (a boolean of 2, a string without its
NUL, an array running past its length, bytes after the body) is refused, so
the connection that sent it is dropped.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dbus_next.constants import MessageFlag, MessageType
from dbus_next.errors import InvalidMessageError, SignatureBodyMismatchError
from dbus_next.message import Message
from dbus_next.signature import SignatureTree, SignatureType, Variant
from dbus_next.validators import (
    is_bus_name_valid,
    is_interface_name_valid,
    is_member_name_valid,
    is_object_path_valid,
)

_FIXED = struct.Struct("<BBBBIII")  # endianness, type, flags, version, body length, serial, fields' length
_FIXED_BIG = struct.Struct(">BBBBIII")  # what a big-endian peer sends
_UINT32 = struct.Struct("<I")
_LITTLE_ENDIAN = ord("l")
_BIG_ENDIAN = ord("B")
_PROTOCOL_VERSION = 1

# Header field codes (SENDER, 7, is the bus's to write).
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION = 1, 2, 3, 4, 5, 6
_SENDER, _SIGNATURE, _UNIX_FDS = 7, 8, 9


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
# An object path as the specification has it: "/", or elements of
# [A-Za-z0-9_] each after one "/". One match, where dbus-next's check splits
# the path and matches each element: a listing writes a thousand of them.
_OBJECT_PATH = re.compile(r"/|(?:/[A-Za-z0-9_]+)+")

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
            if not isinstance(value, str) or (path and not _OBJECT_PATH.fullmatch(value)):
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
    if code == "(" and all(child.token in "so" for child in t.children):
        return _strings_writer(t)
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


def _strings_writer(t: Any) -> _Writer:
    """A struct of strings and object paths (a listing's row): one loop, not a call per field."""
    paths = tuple(child.token == "o" for child in t.children)

    def write_strings(out: bytearray, value: Sequence[Any]) -> None:
        if not isinstance(value, list | tuple) or len(value) != len(paths):
            raise SignatureBodyMismatchError(f"{value!r} is not a struct {t.signature}")
        out += _ZEROS[-len(out) % 8]
        for path, field in zip(paths, value, strict=True):
            if not isinstance(field, str) or (path and not _OBJECT_PATH.fullmatch(field)):
                kind = "an object path" if path else "a string"
                raise SignatureBodyMismatchError(f"{field!r} is not {kind}")
            # write_string's bytes, written here: a call per field cost as much as the rest.
            encoded = field.encode()
            out += _ZEROS[-len(out) % 4]
            out += _UINT32.pack(len(encoded))
            out += encoded
            out.append(0)
    return write_strings


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


# ---------------------------------------------------------------- reading

_Reader = Callable[[bytearray, int], tuple[Any, int]]

FIXED_LENGTH = _FIXED.size  # what to read of a message to learn its whole length
_MAX_ARRAY_BYTES = 1 << 26  # the specification's limit (64 MiB)
_FIELD_TYPES = {_PATH: "o", _INTERFACE: "s", _MEMBER: "s", _ERROR_NAME: "s", _REPLY_SERIAL: "u",
                _DESTINATION: "s", _SENDER: "s", _SIGNATURE: "g", _UNIX_FDS: "u"}
_REQUIRED = {
    MessageType.METHOD_CALL: ("path", "member"),
    MessageType.SIGNAL: ("path", "member", "interface"),
    MessageType.ERROR: ("error_name", "reply_serial"),
    MessageType.METHOD_RETURN: ("reply_serial",),
}


def message_length(fixed: bytes | bytearray) -> int:
    """The whole length of the message whose first FIXED_LENGTH bytes these are."""
    _, body_length, fields_length = _fixed_part(fixed)[:3]
    end_of_fields = FIXED_LENGTH + fields_length
    return end_of_fields + (-end_of_fields & 7) + body_length


def unmarshall(buf: bytearray, unix_fds: list[int]) -> Message:
    """The message that buf holds, whole and nothing more; InvalidMessageError if it is not one."""
    big, body_length, fields_length, type_code, flags, serial = _fixed_part(buf)
    try:
        message_type = MessageType(type_code)
    except ValueError:
        raise InvalidMessageError(f"unknown message type {type_code}") from None
    readers = _BIG if big else _LITTLE
    end_of_fields = FIXED_LENGTH + fields_length
    fields: dict[int, Any] = {}
    o = FIXED_LENGTH
    while o < end_of_fields:
        o += -o & 7
        code = buf[o]
        if code == 0:
            raise InvalidMessageError("header field 0 (INVALID)")
        signature, o = readers["g"](buf, o + 1)
        expected = _FIELD_TYPES.get(code)
        if expected is None:  # a field this version does not know: skipped, as the specification says
            _, o = _variant_reader(signature, big)[1](buf, o)
            continue
        if signature != expected:
            raise InvalidMessageError(f"header field {code} is of type {signature!r}, not {expected!r}")
        fields[code], o = readers[expected](buf, o)
    if o != end_of_fields:
        raise InvalidMessageError("a header field runs past the header")
    o += -o & 7
    if o + body_length != len(buf):
        raise InvalidMessageError("the message is not as long as its header says")
    signature = fields.get(_SIGNATURE, "")
    tree, body_readers = _body_readers(signature, big)
    body = []
    for read in body_readers:
        value, o = read(buf, o)
        body.append(value)
    if o != len(buf):
        raise InvalidMessageError(f"the body is not as long as its signature {signature!r} says")
    # Made as dbus-next's Message() makes it, without its checks of every
    # name by regular expression: the same checks, through a cache.
    msg: Any = Message.__new__(Message)  # its fields typed as dbus-next typed them, None allowed
    msg.destination = _checked(fields.get(_DESTINATION), _bus_name_valid, "bus name")
    msg.path = _checked(fields.get(_PATH), _object_path_valid, "object path")
    msg.interface = _checked(fields.get(_INTERFACE), _interface_name_valid, "interface name")
    msg.member = _checked(fields.get(_MEMBER), _member_name_valid, "member name")
    msg.message_type = message_type
    msg.flags = MessageFlag(flags)
    msg.error_name = _checked(fields.get(_ERROR_NAME), _interface_name_valid, "error name")
    msg.reply_serial = fields.get(_REPLY_SERIAL)
    msg.sender = fields.get(_SENDER)
    msg.unix_fds = unix_fds
    msg.signature = signature
    msg.signature_tree = tree
    msg.body = body
    msg.serial = serial
    for name in _REQUIRED[message_type]:
        if not getattr(msg, name):
            raise InvalidMessageError(f"missing required field: {name}")
    made: Message = msg
    return made


def _fixed_part(buf: bytes | bytearray) -> tuple[bool, int, int, int, int, int]:
    """(big endian, body length, fields' length, type, flags, serial) from the first 16 bytes."""
    endianness = buf[0]
    if endianness not in (_LITTLE_ENDIAN, _BIG_ENDIAN):
        raise InvalidMessageError("Expecting endianness as the first byte")
    big = endianness == _BIG_ENDIAN
    fixed = _FIXED_BIG if big else _FIXED
    _, type_code, flags, version, body_length, serial, fields_length = fixed.unpack_from(buf, 0)
    if version != _PROTOCOL_VERSION:
        raise InvalidMessageError(f"got unknown protocol version: {version}")
    return big, body_length, fields_length, type_code, flags, serial


def _checked(name: str | None, valid: Callable[[str], bool], kind: str) -> str | None:
    if name is not None and not valid(name):
        raise InvalidMessageError(f"invalid {kind}: {name!r}")
    return name


# Names recur (a few interfaces, members, paths and peers): each is checked once.
_bus_name_valid = functools.lru_cache(maxsize=1024)(is_bus_name_valid)
_object_path_valid = functools.lru_cache(maxsize=4096)(is_object_path_valid)
_interface_name_valid = functools.lru_cache(maxsize=256)(is_interface_name_valid)
_member_name_valid = functools.lru_cache(maxsize=256)(is_member_name_valid)


@functools.lru_cache(maxsize=512)
def _body_readers(signature: str, big: bool) -> tuple[SignatureTree, tuple[_Reader, ...]]:
    # The tree is made here, not taken from dbus-next's cache of every signature ever seen.
    tree = SignatureTree(signature)
    return tree, tuple(_reader(t, big) for t in tree.types)


@functools.lru_cache(maxsize=512)
def _variant_reader(signature: str, big: bool) -> tuple[SignatureType, _Reader]:
    types = SignatureTree(signature).types
    if len(types) != 1:
        raise InvalidMessageError(f"a variant's signature {signature!r} is not one complete type")
    return types[0], _reader(types[0], big)


def _past_end() -> InvalidMessageError:
    return InvalidMessageError("a value runs past the end of its message")


def _reader(t: SignatureType, big: bool) -> _Reader:
    code = t.token
    order = ">" if big else "<"
    if code in _FIXED_TYPES:
        unpack = struct.Struct(order + _FIXED_TYPES[code]).unpack_from
        size = struct.calcsize(_FIXED_TYPES[code])
        mask = size - 1
        if code == "b":
            def read_boolean(buf: bytearray, o: int) -> tuple[bool, int]:
                o += -o & 3
                (value,) = unpack(buf, o)
                if value > 1:
                    raise InvalidMessageError(f"a boolean of {value}")
                return value == 1, o + 4
            return read_boolean
        if code == "y":
            def read_byte(buf: bytearray, o: int) -> tuple[int, int]:
                if o >= len(buf):
                    raise _past_end()
                return buf[o], o + 1
            return read_byte

        def read_fixed(buf: bytearray, o: int) -> tuple[Any, int]:
            o += -o & mask
            return unpack(buf, o)[0], o + size  # struct.error past the end
        return read_fixed
    if code in ("s", "o"):
        length = struct.Struct(order + "I").unpack_from

        def read_string(buf: bytearray, o: int) -> tuple[str, int]:
            o += -o & 3
            (n,) = length(buf, o)
            start = o + 4
            end = start + n
            if end >= len(buf) or buf[end]:
                raise InvalidMessageError("a string runs past its message or lacks its NUL")
            return buf[start:end].decode(), end + 1
        return read_string
    if code == "g":
        def read_signature(buf: bytearray, o: int) -> tuple[str, int]:
            if o >= len(buf):
                raise _past_end()
            end = o + 1 + buf[o]
            if end >= len(buf) or buf[end]:
                raise InvalidMessageError("a signature runs past its message or lacks its NUL")
            return buf[o + 1:end].decode(), end + 1
        return read_signature
    if code == "v":
        read_signature_of = _reader(SignatureTree("g").types[0], big)

        def read_variant(buf: bytearray, o: int) -> tuple[Variant, int]:
            signature, o = read_signature_of(buf, o)
            value_type, read_value = _variant_reader(signature, big)
            value, o = read_value(buf, o)
            # Made without Variant()'s check of the value: it was read as that type.
            variant: Variant = Variant.__new__(Variant)
            variant.type, variant.signature, variant.value = value_type, signature, value
            return variant, o
        return read_variant
    if code == "a":
        (element,) = t.children
        length = struct.Struct(order + "I").unpack_from
        padded = _alignment(element) == 8  # the padding before the first element is not in the length
        kind = element.token
        if kind == "{":  # a dict: each entry's key and value read straight into it
            read_key, read_element = (_reader(child, big) for child in element.children)
        else:
            read_element = _reader(element, big)

        def read_array(buf: bytearray, o: int) -> tuple[Any, int]:
            o += -o & 3
            (n,) = length(buf, o)
            o += 4
            if n > _MAX_ARRAY_BYTES:
                raise InvalidMessageError(f"an array of {n} bytes")
            if padded:
                o += -o & 7
            end = o + n
            if end > len(buf):
                raise _past_end()
            result: Any
            if kind == "y":
                return bytes(buf[o:end]), end
            if kind == "{":
                result = {}
                while o < end:
                    o += -o & 7
                    key, o = read_key(buf, o)
                    result[key], o = read_element(buf, o)
            else:
                result = []
                while o < end:
                    value, o = read_element(buf, o)
                    result.append(value)
            if o != end:
                raise InvalidMessageError("an array's last element runs past its length")
            return result, o
        return read_array
    if code == "(":
        fields = tuple(_reader(child, big) for child in t.children)

        def read_struct(buf: bytearray, o: int) -> tuple[list[Any], int]:
            o += -o & 7
            values = []
            for read in fields:
                value, o = read(buf, o)
                values.append(value)
            return values, o
        return read_struct
    raise InvalidMessageError(f"cannot read type {t.signature!r}")


def _header_readers(big: bool) -> dict[str, _Reader]:
    return {code: _reader(SignatureTree(code).types[0], big) for code in ("s", "o", "g", "u")}


_LITTLE = _header_readers(False)
_BIG = _header_readers(True)
