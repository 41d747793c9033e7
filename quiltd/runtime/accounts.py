"""Users and groups as a container's own /etc/passwd and /etc/group name them.

Read from inside the container (its root already switched to), by the
process about to take that user: the container's command and every exec.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

MAX_ACCOUNT_FILE = 4 << 20  # the files are the container's: read no more


class UnknownUser(Exception):
    """The user or group names nothing in the container's files."""


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, the primary group included
    home: str  # "" when the user has no entry


def resolve(user: str) -> Account:
    """The ids and home of 'user' or 'user:group'; a bare number needs no entry, as in docker."""
    name, _, group = user.partition(":")
    uid = gid = -1
    home = login = ""
    for fields in _read("/etc/passwd"):
        if len(fields) >= 6 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            login, home = fields[0], fields[5]
            uid, gid = _number(fields[2], user), _number(fields[3], user)
            break
    else:
        if not name.isdigit():
            raise UnknownUser(f"no user {name!r} in the container's /etc/passwd")
        uid = gid = int(name)
    groups = _read("/etc/group")
    if group:
        for fields in groups:
            if len(fields) >= 3 and (fields[0] == group or (group.isdigit() and fields[2] == group)):
                gid = _number(fields[2], user)
                break
        else:
            if not group.isdigit():
                raise UnknownUser(f"no group {group!r} in the container's /etc/group")
            gid = int(group)
    extra = {int(f[2]) for f in groups
             if len(f) >= 4 and login and login in f[3].split(",") and f[2].isdigit()}
    if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
        raise UnknownUser(f"user {user!r} has an invalid id")
    return Account(uid, gid, tuple(sorted(extra | {gid})), home)


def _number(text: str, user: str) -> int:
    if not text.isdigit():
        raise UnknownUser(f"user {user!r} has an invalid id")
    return int(text)


# Init resolves a user for every exec: a file is split again only when it
# changed (another inode, size, or change time), not on every exec.
_parsed: dict[str, tuple[tuple[int, int, int, int], list[list[str]]]] = {}


def _read(path: str) -> list[list[str]]:
    """The lines of a passwd-like file, split on ':'; none if it is missing or odd."""
    # A FIFO must not block, a device or a huge file must not be read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return []
        key = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        cached = _parsed.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = os.read(fd, MAX_ACCOUNT_FILE)
    finally:
        os.close(fd)
    lines = [line.split(":") for line in data.decode(errors="replace").splitlines()
             if line and not line.startswith("#")]
    _parsed[path] = (key, lines)
    return lines
