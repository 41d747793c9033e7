"""Checks on the names and commands clients send.

Options (a{sv}) are read once, by quiltd.core.parse; these are the plain
arguments of the calls, checked where the core takes them.
"""

from __future__ import annotations

from quiltd.errors import InvalidArgument
from quiltd.grammar import IMAGE_NAME_RE, NAME_RE

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: use 1-63 letters, digits or '-', not starting with '-'"
        )
    return name


def check_image_name(name: object) -> str:
    if not isinstance(name, str) or not IMAGE_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid image name {name!r}: use 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return name


def check_command(command: object) -> tuple[str, ...]:
    if not isinstance(command, list | tuple) or not command:
        raise InvalidArgument("the command is empty: give at least the program to run")
    if not all(isinstance(a, str) for a in command) or not command[0]:
        raise InvalidArgument("the command must be a list of strings with a non-empty program")
    if any("\0" in a for a in command):
        raise InvalidArgument("the command must not contain NUL characters")
    return tuple(command)
