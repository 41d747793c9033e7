"""A seeded generator of hostile calls to every method quiltd serves, and the loop that sends them.

Shared by the system test (tests/system/test_fuzz.py: a fixed seed, a bounded
count) and tools/fuzz (a long run with a seed argument). The methods come
from the pinned interface file, so a method added there is fuzzed without
anyone remembering to: dbus/org.quilt.Quilt1.xml, plus the standard
Properties, Introspectable and Peer interfaces.

Each call is a raw dbus-next Message: the signature is right (or, for a few,
deliberately wrong) while the values are hostile: wrong variant types in
a{sv} options, unknown keys, out-of-range and NaN numbers, empty, huge,
newline and unicode strings, paths with '..', names of things that do not
exist, and descriptors that are of the wrong kind or direction, a directory,
/dev/null, a socket, an O_PATH, an index with nothing behind it, and extra
ones no argument names. Strings with NUL go only over quiltd's own socket:
the bus daemon would drop a client that sends one, so they never reach
quiltd that way.

What the loop checks is what a client is owed whatever it sends: an answer
in time, and one that names the fault (never Internal, never dbus-next's
ServiceError that carries a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import random
import re
import socket
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import SignatureTree, SignatureType, Variant

# quiltd's own MessageBus: dbus-next's drops the connection when the socket is full (EAGAIN),
# which calls in flight together with megabyte strings do.
from quiltd.dbusnext.connection import MessageBus

REPO = Path(__file__).resolve().parent.parent
INTERFACE_XML = REPO / "dbus" / "org.quilt.Quilt1.xml"
BUS_NAME = "org.quilt.Quilt1"
MANAGER_PATH = "/org/quilt/Quilt1"
MANAGER = "org.quilt.Quilt1.Manager"
CONTAINER = "org.quilt.Quilt1.Container"
CONTAINER_PREFIX = "/org/quilt/Quilt1/container/"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"
QUILT_ERROR = "org.quilt.Quilt1.Error."
INTERNAL = QUILT_ERROR + "Internal"
BUSYBOX_SOURCE = "/var/tmp/quilt-test-busybox.tar.gz"  # inside the sandbox
FIFO = "/var/tmp/quilt-fuzz-fifo"  # inside the sandbox: an open for reading of it waits for a writer
# Paths a call may name in the container or on the host.
PATHS = ("/", "/tmp", "/tmp/", "/etc/passwd", "/etc/../../..", "/proc", "/proc/self/mem", "/proc/1/root",
         "/sys", "/sys/kernel", "/dev", "/dev/null", "/nonexistent", "/bin/sh", "/tmp/../../etc", "relative",
         "", ".", "/\n", "//tmp//", "/" + "a" * 255, "/" + "a/" * 2100, FIFO, BUSYBOX_SOURCE, "/var/tmp",
         "/run/quilt/quiltd.sock", "/var/lib/quilt/quilt.db", "/dev/zero", "/etc")

# What the bus itself and dbus-next answer to a call no method takes: each names the fault.
FREEDESKTOP_OK = frozenset(f"org.freedesktop.DBus.Error.{n}" for n in (
    "UnknownMethod", "UnknownObject", "UnknownInterface", "UnknownProperty", "InvalidArgs",
    "PropertyReadOnly", "AccessDenied", "FileNotFound", "InvalidSignature", "LimitsExceeded", "NotSupported",
))

# Names the fuzzer makes things under, so cleaning up after it removes only its own.
FUZZ_PREFIX = "fz-"
CREATE_NAMES = ("fz-a", "fz-b", "fz-c")  # few: at most this many containers of its own at once
IMAGE_NAMES = ("fz-img", "host", "busybox:latest", "nope")
NETWORK_NAMES = ("fz-net", "bridge", "none", "nope")
VOLUME_NAMES = ("fz-vol", "fz-vol2", "nope")

# Methods that wait as long as they are told to on a live target: their
# timeouts stay short there (a long one is a wait the caller asked for, not a
# hang); a target that does not exist still gets every hostile timeout.
WAITS = frozenset({"WaitContainer", "WaitContainerStarted", "ExecWait", "StopContainer", "Stop"})
SHORT_USEC = (1, 1000, 200_000)
SHORT_SEC = (0, 1)

# Commands a container may run: each ends by itself in well under a second
# and changes nothing outside the container.
COMMANDS: tuple[list[str], ...] = (
    ["true"], ["false"], ["sh", "-c", "exit 3"], ["cat"], ["echo", "x" * 5000], ["/nonexistent"], [""],
    [], ["-"], ["sh", "-c", "echo out; echo err >&2"], ["ls", "/proc/self/fd"], ["\n"], ["true", ""],
    ["./relative"], ["/bin"], ["id"], ["head", "-c", "100000", "/dev/zero"], ["x" * 70000],
)


class Transport(enum.Enum):
    BUS = "bus"
    SOCKET = "socket"


class FdKind(enum.Enum):
    """The descriptors a call may carry; the sender closes the far end of each pair first."""

    PIPE_READ = "pipe read end, writer gone, garbage inside"
    PIPE_WRITE = "pipe write end, reader gone"
    FILE_RW = "regular file, read-write"
    FILE_RO = "regular file, read-only"
    FILE_WO = "regular file, write-only"
    TAR_FILE = "regular file holding a small tar"
    EVIL_TAR = "regular file holding a tar of escapes: '..', absolute names, links out, devices"
    DIRECTORY = "a directory"
    O_PATH = "an O_PATH descriptor"
    DEV_NULL = "/dev/null"
    DEV_ZERO = "/dev/zero, read-only"
    SOCKET = "a socket, peer gone"
    EVENTFD = "an eventfd"


# Out-of-range descriptor indexes: nothing is ever behind these.
BAD_INDEXES = (7, 255, 2**31 - 1, 2**32 - 1)


@dataclass(frozen=True)
class Method:
    interface: str
    name: str
    in_signature: str
    arg_names: tuple[str, ...]
    on_container: bool  # served on container objects, not the manager


@dataclass(frozen=True)
class Call:
    method: Method
    path: str
    signature: str
    body: list[Any]
    fds: tuple[FdKind, ...]  # what Message.unix_fds holds, in order
    note: str  # what makes it hostile, for the report
    abandon: bool = False  # the caller hangs up right after sending: quiltd must let go of the call


@dataclass
class World:
    """Real things for a call to name, so hostile values reach past the lookups."""

    running: tuple[str, str] = ("", "")  # (id, name)
    stopped: tuple[str, str] = ("", "")
    exec_ids: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)  # ids of every container the fuzz has seen

    def refs(self) -> tuple[str, ...]:
        return tuple(r for r in (*self.running, *self.stopped) if r)


def methods() -> tuple[Method, ...]:
    """Every method of the pinned API, then the standard interfaces quiltd also answers."""
    found: list[Method] = []
    for iface in ET.parse(INTERFACE_XML).getroot().iter("interface"):
        for m in iface.iter("method"):
            ins = [a for a in m.iter("arg") if a.get("direction", "in") == "in"]
            signature = "".join(a.get("type", "") for a in ins)
            found.append(Method(iface.get("name", ""), m.get("name", ""), signature,
                                tuple(a.get("name", "") for a in ins), iface.get("name") == CONTAINER))
    for on_container in (False, True):
        found += [
            Method(PROPERTIES, "Get", "ss", ("interface", "property"), on_container),
            Method(PROPERTIES, "GetAll", "s", ("interface",), on_container),
            Method(PROPERTIES, "Set", "ssv", ("interface", "property", "value"), on_container),
            Method(INTROSPECTABLE, "Introspect", "", (), on_container),
            Method(PEER, "Ping", "", (), on_container),
            Method(PEER, "GetMachineId", "", (), on_container),
        ]
    return tuple(found)


OPTION_KEYS = {
    "CreateContainer": ("env", "workdir", "user", "hostname", "memory_max", "cpu_quota", "tasks_max",
                        "network", "publish", "labels", "ttl_sec", "auto_remove", "start", "mounts", "tmpfs",
                        "volumes", "disk_max", "userns", "nested_userns"),
    "Exec": ("env", "workdir", "user", "timeout_sec", "max_output", "stdin"),
    "GetLogs": ("since_usec", "tail", "stream", "exec_id"),
    "CopyInEx": ("max_bytes",),
    "ImportImage": ("max_bytes", "ref"),
    "CreateNetwork": ("subnet", "egress"),
    "ListContainers": ("state", "name", "image", "labels"),
    "RemoveImageEx": ("force",),
}
OPTION_KEYS.update({
    "ExecEx": OPTION_KEYS["Exec"], "ExecWithFds": OPTION_KEYS["Exec"], "ExecStart": OPTION_KEYS["Exec"],
    "GetLogsRaw": OPTION_KEYS["GetLogs"], "FollowLogs": OPTION_KEYS["GetLogs"],
    "CopyOutEx": OPTION_KEYS["CopyInEx"], "ImportImageFd": OPTION_KEYS["ImportImage"],
})
# The type each key is documented with, so a right type with a hostile value is tried too.
KEY_TYPES = {
    "env": "as", "workdir": "s", "user": "s", "hostname": "s", "memory_max": "t", "cpu_quota": "d",
    "tasks_max": "t", "network": "s", "publish": "a(qqs)", "labels": "a{ss}", "ttl_sec": "t",
    "auto_remove": "b", "start": "b", "mounts": "a(ssb)", "tmpfs": "a(st)", "volumes": "a(ssb)",
    "disk_max": "t", "userns": "b", "nested_userns": "b", "timeout_sec": "t", "max_output": "t",
    "stdin": "ay",
    "since_usec": "t", "tail": "t", "stream": "s", "exec_id": "s", "max_bytes": "t", "ref": "s",
    "subnet": "s", "egress": "s", "state": "s", "name": "s", "image": "s", "force": "b",
}
VARIANT_TYPES = ("s", "t", "x", "i", "u", "q", "y", "n", "d", "b", "as", "ay", "a{ss}", "a{sv}", "a(qqs)",
                 "a(ssb)", "a(st)", "v", "o", "g", "h", "(ss)", "av", "at", "ah")
PROPERTY_NAMES = ("Id", "Name", "State", "Pid", "ExitCode", "Labels", "MemoryCurrent", "CPUUsageNSec",
                  "TasksCurrent", "IPAddress", "Nope", "", "state")
INTERFACE_NAMES = (MANAGER, CONTAINER, PROPERTIES, PEER, "", "org.nope.Nope", "x" * 300)

INTS = {
    "y": (0, 1, 255), "n": (-(2**15), -1, 0, 2**15 - 1), "q": (0, 1, 22, 80, 65535),
    "i": (-(2**31), -1, 0, 1, 9, 15, 19, 64, 65, 2**31 - 1), "u": (0, 1, 2**31, 2**32 - 1),
    "x": (-(2**63), -1, 0, 2**62, 2**63 - 1),
    "t": (0, 1, 4 << 20, 2**40, 2**40 + 1, 2**62 + 1, 2**63, 2**64 - 1),
}
FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 0.001, 0.5, 4097.0, 1e308, 5e-324, -1.0)


class Generator:
    """Hostile calls from one seed: the same seed and world give the same calls."""

    def __init__(self, seed: int, world: World, transport: Transport) -> None:
        self.rng = random.Random(seed)
        self.world = world
        self.transport = transport
        self.methods = methods()
        # The system bus drops a sender of more than 16 descriptors in one message (its
        # max_message_unix_fds); quiltd's own socket is tried past that.
        self.max_fds = 16 if transport is Transport.BUS else 24
        self.depth = 0  # how deep inside containers the value being made is: huge sizes only at the top

    # -- strings ---------------------------------------------------------------------------------------

    def text(self) -> str:
        r = self.rng
        pool = [
            "", " ", "-", ".", "..", "-x", "a" * 63, "a" * 64, "A", "name\n", "\nname", "a b", "\t", "ü",
            "\u202eevil", "\U0001f600", "\ufeff", "\x7f", "\x01\x02", "%s%n%x", "$(reboot)", "*", "?", "[",
            "0" * 16, "f" * 16, "0123456789abcdeF", "host", "bridge", "none", "busybox", "latest", "/",
            "//", "/..", "../../../etc/passwd", "/proc/self/mem", "/sys/kernel", "/dev/zero", "/dev/null",
            "/run/quilt/quiltd.sock", "/var/lib/quilt/quilt.db", "/var/lib/quilt", "/tmp/../../",
            "relative/path", "/etc/passwd", "/etc", "~root", "10.88.0.0/16", "0.0.0.0/0", "::/0",
            "10.99.0.0/24", "10.99.0.1/33", "300.1.1.1/8", "all", "tcp", "udp", "sctp", "stdout", "stderr",
            "both", "running", "exited", "root", "nobody", "0:0", "65535:65535", "4294967296", "-1", ":",
            "a:b:c", "PATH=/x", "=x", "1NAME=x", BUSYBOX_SOURCE, *CREATE_NAMES, *VOLUME_NAMES, *NETWORK_NAMES,
            "x" * r.choice((255, 256, 4096, 4097, 65536)),
        ]
        if self.transport is Transport.SOCKET:
            pool += ["\0", "a\0b", "/tmp\0/x", "name\0"]
        if self.depth == 0 and r.random() < 0.02:
            return "y" * r.choice((1 << 20, HUGE))
        if self.world.refs() and r.random() < 0.15:
            return r.choice(self.world.refs())
        if self.world.exec_ids and r.random() < 0.05:
            return r.choice(self.world.exec_ids)
        return r.choice(pool)

    def ref(self) -> str:
        r = self.rng
        if self.world.refs() and r.random() < 0.6:
            return r.choice(self.world.refs())
        return r.choice((self.text(), *CREATE_NAMES, "0" * 16))

    def object_path(self) -> str:
        return self.rng.choice(("/", MANAGER_PATH, CONTAINER_PREFIX[:-1], CONTAINER_PREFIX + "0" * 16,
                                CONTAINER_PREFIX + "x", "/org/quilt/Quilt1/_", "/a/b/c" * 50))

    def signature_string(self) -> str:
        return self.rng.choice(("", "s", "a{sv}", "h", "v", "aaaaaaaai", "(((((((((((((((y)))))))))))))))"))

    # -- values by signature -------------------------------------------------------------------------

    def value(self, t: SignatureType, fds: list[FdKind], key: str = "") -> Any:
        r, token = self.rng, t.token
        if token in INTS:
            return r.choice(INTS[token])
        if token == "d":
            return r.choice(FLOATS)
        if token == "b":
            return r.random() < 0.5
        if token == "s":
            return self.text()
        if token == "o":
            return self.object_path()
        if token == "g":
            return self.signature_string()
        if token == "h":
            return self.fd_index(fds)
        if token == "v":
            return self.variant(fds, key)
        if token not in "(a":
            raise ValueError(f"no generator for {t.signature}")
        self.depth += 1
        try:
            if token == "(":
                return [self.value(c, fds) for c in t.children]
            child = t.children[0]
            big = self.depth == 1 and r.random() < 0.05
            n = r.choice((0, 1, 1, 2, 3, 1000 if big else 20 if self.depth == 1 else 2))
            if child.token == "{":
                return {self.value(child.children[0], fds): self.value(child.children[1], fds)
                        for _ in range(n)}
            if child.token == "y":
                return bytes(r.getrandbits(8) for _ in range(min(n, 64))) * max(1, n // 64)
            return [self.value(child, fds) for _ in range(n)]
        finally:
            self.depth -= 1

    def variant(self, fds: list[FdKind], key: str = "") -> Variant:
        r = self.rng
        sig = KEY_TYPES[key] if key in KEY_TYPES and r.random() < 0.5 else r.choice(VARIANT_TYPES)
        self.depth += 1
        try:
            if sig == "v":
                return Variant("v", self.variant(fds))
            if sig == "av":
                return Variant("av", [self.variant(fds) for _ in range(r.randint(0, 3))])
            return Variant(sig, self.value(SignatureTree(sig).types[0], fds, key))
        finally:
            self.depth -= 1

    def options(self, method: str, fds: list[FdKind]) -> dict[str, Variant]:
        r = self.rng
        keys = OPTION_KEYS.get(method, ())
        out: dict[str, Variant] = {}
        for _ in range(r.choice((0, 1, 1, 2, 3, 6))):
            key = r.choice(keys) if keys and r.random() < 0.8 else r.choice((*KEY_TYPES, self.text()))
            out[key] = self.variant(fds, key)
        return out

    def fd_index(self, fds: list[FdKind]) -> int:
        """Mostly a descriptor the call carries; sometimes an index with nothing behind it."""
        r = self.rng
        if r.random() < 0.12 or len(fds) >= self.max_fds:
            return r.choice((len(fds) + 1, *BAD_INDEXES))
        fds.append(r.choice(list(FdKind)))
        return len(fds) - 1

    # -- arguments that mean something ---------------------------------------------------------------

    def argument(self, m: Method, name: str, t: SignatureType, live: bool, fds: list[FdKind]) -> Any:
        r = self.rng
        if t.signature == "a{sv}" and r.random() < 0.9:
            return self.options(m.name, fds)
        if name in ("timeout_usec", "timeout_sec") and live and m.name in WAITS:
            return r.choice(SHORT_USEC if name == "timeout_usec" else SHORT_SEC)
        if name == "ref":
            return self.ref()
        if name in ("path", "source") and r.random() < 0.7:
            return r.choice(PATHS)
        if name == "command" and r.random() < 0.8:
            return list(r.choice(COMMANDS))
        if name == "image" and r.random() < 0.7:
            return r.choice(("busybox", "host", "nope", "busybox "))
        if name == "name" and m.name == "CreateContainer" and r.random() < 0.5:
            return r.choice(CREATE_NAMES)
        if name == "name" and "Image" in m.name and r.random() < 0.7:
            return r.choice(IMAGE_NAMES)
        if name == "name" and "Network" in m.name and r.random() < 0.7:
            return r.choice(NETWORK_NAMES)
        if name == "name" and "Volume" in m.name and r.random() < 0.7:
            return r.choice(VOLUME_NAMES)
        if name == "interface" and r.random() < 0.8:
            return r.choice(INTERFACE_NAMES)
        if name == "property" and r.random() < 0.8:
            return r.choice(PROPERTY_NAMES)
        if name == "signal":
            # No stop signal to a live target: a container or exec stopped by SIGSTOP (sent to the
            # whole scope) makes every later exec in it wait until it is continued, as asked.
            return r.choice((0, -1, 65, 2**31 - 1, 15, 1, 10)) if live else r.choice(INTS["i"])
        return self.value(t, fds, name)

    def path_for(self, m: Method) -> tuple[str, bool]:
        """(object path, whether it names a live container) for a call of m."""
        r = self.rng
        if not m.on_container:
            return (MANAGER_PATH if r.random() < 0.95 else r.choice(("/", CONTAINER_PREFIX[:-1]))), True
        ids = [i for i in (self.world.running[0], self.world.stopped[0]) if i]
        if ids and r.random() < 0.7:
            return CONTAINER_PREFIX + r.choice(ids), True
        return r.choice((CONTAINER_PREFIX + "0" * 16, CONTAINER_PREFIX + "x", MANAGER_PATH, "/")), False

    def call(self) -> Call:
        r = self.rng
        m = r.choice(self.methods)
        path, live = self.path_for(m)
        fds: list[FdKind] = []
        types = SignatureTree(m.in_signature).types
        live_ref = live
        body: list[Any] = []
        for name, t in zip(m.arg_names, types, strict=True):
            arg = self.argument(m, name, t, live_ref, fds)
            if name == "ref":
                live_ref = arg in self.world.refs()
            elif name == "exec_id":
                live_ref = arg in self.world.exec_ids
            body.append(arg)
        signature, note = m.in_signature, "hostile values"
        if r.random() < 0.04:
            # A signature no method takes: the bus layer must still answer.
            signature = r.choice(("", "s", "ss", "a{sv}", m.in_signature + "s", "h"))
            body = [self.value(t, fds) for t in SignatureTree(signature).types]
            note = "wrong signature"
        if r.random() < 0.1:
            # Descriptors nothing names.
            extra = min(r.choice((1, 2, 4, 20)), self.max_fds - len(fds))
            fds += [r.choice(list(FdKind)) for _ in range(extra)]
            note += ", extra descriptors"
        abandon = r.random() < 0.01
        return Call(m, path, signature, body, tuple(fds), note + (", caller hangs up" if abandon else ""),
                    abandon)


# -- descriptors ---------------------------------------------------------------------------------------

TAR_BYTES = b""


def _tar_bytes() -> bytes:
    global TAR_BYTES
    if not TAR_BYTES:
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("fz-file")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"hi\n"))
        TAR_BYTES = buf.getvalue()
    return TAR_BYTES


def _evil_tar_bytes() -> bytes:
    """Members that try to leave the target directory or reach the host's files and devices."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", link: str = "", **more: int) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), link
            for key, value in more.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data))
        add("../../../fz-escape", tarfile.REGTYPE, b"x")
        add("/fz-absolute", tarfile.REGTYPE, b"x")
        add("fz-link", tarfile.SYMTYPE, link="/etc")
        add("fz-link/fz-through-link", tarfile.REGTYPE, b"x")
        add("fz-hard", tarfile.LNKTYPE, link="/etc/shadow")
        add("fz-null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("fz-disk", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("fz-fifo", tarfile.FIFOTYPE)
        add("fz-suid", tarfile.REGTYPE, b"x", mode=0o6777, uid=0)
        add("fz-dir/" + "d/" * 200 + "deep", tarfile.REGTYPE, b"x")
        add("fz-big", tarfile.REGTYPE, b"x" * 10, mtime=-(2**40))
    return buf.getvalue()


def open_fd(kind: FdKind, scratch: Path) -> int:
    """A descriptor of the kind, with nothing of ours left holding its other end."""
    if kind is FdKind.PIPE_READ:
        r, w = os.pipe()
        os.write(w, b"garbage, not a tar\n" * 10)
        os.close(w)
        return r
    if kind is FdKind.PIPE_WRITE:
        r, w = os.pipe()
        os.close(r)
        return w
    if kind in (FdKind.FILE_RW, FdKind.FILE_RO, FdKind.FILE_WO, FdKind.TAR_FILE, FdKind.EVIL_TAR):
        fd, name = tempfile.mkstemp(dir=scratch)
        content = {FdKind.TAR_FILE: _tar_bytes(), FdKind.EVIL_TAR: _evil_tar_bytes()}
        os.write(fd, content.get(kind, b"\0" * 1024))
        os.close(fd)
        flags = {FdKind.FILE_RO: os.O_RDONLY, FdKind.TAR_FILE: os.O_RDONLY, FdKind.EVIL_TAR: os.O_RDONLY,
                 FdKind.FILE_WO: os.O_WRONLY}
        out = os.open(name, flags.get(kind, os.O_RDWR))
        os.unlink(name)
        return out
    if kind is FdKind.DIRECTORY:
        return os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    if kind is FdKind.O_PATH:
        return os.open(scratch, os.O_PATH)
    if kind is FdKind.DEV_NULL:
        return os.open("/dev/null", os.O_RDWR)
    if kind is FdKind.DEV_ZERO:
        return os.open("/dev/zero", os.O_RDONLY)
    if kind is FdKind.SOCKET:
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind is FdKind.EVENTFD:
        return os.eventfd(0)
    raise ValueError(kind)


@contextlib.contextmanager
def opened(kinds: tuple[FdKind, ...], scratch: Path) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for kind in kinds:
            fds.append(open_fd(kind, scratch))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


# -- sending and judging -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    method: str
    note: str
    args: str
    answer: str
    message: str


@dataclass
class Summary:
    seed: int
    calls: Counter[str] = field(default_factory=Counter)  # by Interface.Method
    answers: Counter[str] = field(default_factory=Counter)  # by error name, or "ok"
    bad: list[Finding] = field(default_factory=list)  # Internal, ServiceError, any unexpected name
    hangs: list[Finding] = field(default_factory=list)
    disconnects: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def internal(self) -> int:
        return self.answers[INTERNAL]

    def render(self) -> str:
        lines = [f"seed {self.seed}: {self.total} calls in {self.seconds:.0f} s", "", "calls per method:"]
        lines += [f"  {n:6d}  {k}" for k, n in sorted(self.calls.items())]
        lines += ["", "answers:"] + [f"  {n:6d}  {k}" for k, n in self.answers.most_common()]
        lines += ["", f"Internal: {self.internal()}   other bad answers: {len(self.bad) - self.internal()}   "
                  f"hangs: {len(self.hangs)}   dropped connections: {len(self.disconnects)}"]
        for title, items in (("bad answers", self.bad), ("hangs", self.hangs), ("drops", self.disconnects)):
            seen: set[tuple[str, str]] = set()
            for f in items:
                if (f.method, f.answer) in seen:
                    continue  # one example of each kind
                seen.add((f.method, f.answer))
                lines.append(f"{title}: {f.method} [{f.note}] -> {f.answer}: {f.message[:300]}\n"
                             f"    {f.args[:400]}")
        return "\n".join(lines)


def is_bad(name: str) -> bool:
    """An answer to bad input that does not name the fault: Internal, a traceback, a library's name."""
    if name == INTERNAL:
        return True
    if name.startswith(QUILT_ERROR):
        return False
    return name not in FREEDESKTOP_OK


def short(body: list[Any]) -> str:
    text = repr(body)
    return text if len(text) < 600 else text[:600] + "..."


async def connect(address: str) -> Any:
    bus = MessageBus(bus_address=address, negotiate_unix_fd=True)
    await bus.connect()
    return bus


@dataclass
class Fuzzer:
    """Sends the generator's calls, `parallel` at a time on one connection, and judges each answer.

    Calls in flight together meet each other in quiltd (two creates of one
    name, a remove during an exec), which one at a time never do.
    """

    address: str
    transport: Transport
    world: World
    scratch: Path
    timeout: float = 25.0
    # Called every `refresh_every` calls with a fresh bus: puts the world back (a call may stop or remove it).
    refresh: Callable[[Any, World], Any] | None = None
    refresh_every: int = 50
    parallel: int = 1

    async def run(self, calls: int, seed: int) -> Summary:
        summary = Summary(seed)
        gen = Generator(seed, self.world, self.transport)
        bus = await connect(self.address)
        start = time.monotonic()
        try:
            next_refresh = 0
            for i in range(0, calls, self.parallel):
                if self.refresh is not None and i >= next_refresh:
                    await self.refresh(bus, self.world)
                    next_refresh = i + self.refresh_every
                batch = [gen.call() for _ in range(min(self.parallel, calls - i))]
                lost = await asyncio.gather(*(self._one(bus, call, summary) for call in batch))
                if any(lost):
                    # A call that hung or a dropped connection: go on with a new one.
                    bus.disconnect()
                    bus = await connect(self.address)
        finally:
            bus.disconnect()
            summary.seconds = time.monotonic() - start
        return summary

    async def _one(self, bus: Any, call: Call, summary: Summary) -> bool:
        """Sends one call and judges its answer; True if the connection is no longer to be used."""
        label = f"{call.method.interface.rsplit('.', 1)[-1]}.{call.method.name}"
        summary.calls[label] += 1
        with opened(call.fds, self.scratch) as fds:
            msg = Message(destination=BUS_NAME, path=call.path, interface=call.method.interface,
                          member=call.method.name, signature=call.signature, body=call.body, unix_fds=fds)
            if call.abandon and self.parallel == 1:
                # Only alone: hanging up would cut off the other calls in flight.
                await asyncio.wait_for(bus.send(msg), self.timeout)
                summary.answers["(caller hung up)"] += 1
                return True
            try:
                reply = await asyncio.wait_for(bus.call(msg), self.timeout)
            except asyncio.TimeoutError:
                summary.answers["(no reply)"] += 1
                summary.hangs.append(Finding(label, call.note, short(call.body), "no reply",
                                             f"none within {self.timeout} s"))
                return True
            except Exception as e:  # the connection went: quiltd or the bus dropped us
                summary.answers["(connection dropped)"] += 1
                summary.disconnects.append(Finding(label, call.note, short(call.body), type(e).__name__,
                                                   str(e)))
                return True
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "(unnamed error)"
            summary.answers[name] += 1
            if is_bad(name):
                message = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
                summary.bad.append(Finding(label, call.note, short(call.body), name, message))
        else:
            summary.answers["ok"] += 1
            self._learn(call, reply)
        return False

    def _learn(self, call: Call, reply: Message) -> None:
        """A call that succeeded may have made something later calls should name."""
        if call.method.name == "ExecStart" and reply.body and len(self.world.exec_ids) < 20:
            self.world.exec_ids.append(reply.body[0])


# -- the world the calls name, and putting things back -------------------------------------------------

RUNNING_NAME = "fz-world-run"
STOPPED_NAME = "fz-world-stop"


async def manager_call(bus: Any, member: str, signature: str = "", *body: Any) -> list[Any]:
    """A well-formed call the harness itself needs; an error answer raises."""
    reply = await asyncio.wait_for(bus.call(Message(
        destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member=member, signature=signature,
        body=list(body))), 60)
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
    result: list[Any] = reply.body
    return result


async def _state(bus: Any, ref: str) -> tuple[str, str] | None:
    """(id, state) of a container, or None if there is none of that name."""
    reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER,
                                   member="GetContainerInfo", signature="s", body=[ref]))
    if reply.message_type == MessageType.ERROR:
        if reply.error_name == QUILT_ERROR + "NoSuchContainer":
            return None
        raise RuntimeError(f"GetContainerInfo: {reply.error_name}: {reply.body}")
    info = reply.body[0]
    return info["Id"].value, info["State"].value


async def refresh_world(bus: Any, world: World) -> None:
    """A running and a stopped container of the fuzz's own, whatever earlier calls did to them."""
    images = (await manager_call(bus, "ListImages"))[0]
    if not any(image[0] == "busybox" for image in images):
        # RemoveImageEx with force removes an image once no active container uses it.
        await manager_call(bus, "ImportImage", "ssa{sv}", "busybox", BUSYBOX_SOURCE, {})
    running = await _state(bus, RUNNING_NAME)
    if running is None:
        await manager_call(bus, "CreateContainer", "ssasa{sv}", RUNNING_NAME, "busybox",
                           ["sleep", "100000"], {})
    elif running[1] in ("created", "exited", "failed"):
        await manager_call(bus, "StartContainer", "s", RUNNING_NAME)
    await manager_call(bus, "WaitContainerStarted", "st", RUNNING_NAME, 30_000_000)
    running = await _state(bus, RUNNING_NAME)
    stopped = await _state(bus, STOPPED_NAME)
    if stopped is None:
        await manager_call(bus, "CreateContainer", "ssasa{sv}", STOPPED_NAME, "busybox", ["true"],
                           {"start": Variant("b", False)})
        stopped = await _state(bus, STOPPED_NAME)
    assert running is not None and stopped is not None
    world.running, world.stopped = (running[0], RUNNING_NAME), (stopped[0], STOPPED_NAME)
    world.containers = sorted({*world.containers, running[0], stopped[0]})


@dataclass(frozen=True)
class Inventory:
    """What quiltd holds: what the fuzz made is what is new after it."""

    containers: frozenset[str]
    images: frozenset[str]
    networks: frozenset[str]
    volumes: frozenset[str]
    # Warm pools by image and options, as ListWarmPools gives them.
    pools: frozenset[tuple[str, str]] = frozenset()


async def inventory(bus: Any) -> Inventory:
    containers = (await manager_call(bus, "ListContainers", "a{sv}", {}))[0]
    images = (await manager_call(bus, "ListImages"))[0]
    networks = (await manager_call(bus, "ListNetworks"))[0]
    volumes = (await manager_call(bus, "ListVolumes"))[0]
    pools = (await manager_call(bus, "ListWarmPools"))[0]
    return Inventory(frozenset(c[0] for c in containers), frozenset(i[0] for i in images),
                     frozenset(n[0] for n in networks), frozenset(v[0] for v in volumes),
                     frozenset((p[0], _pool_key(p[1])) for p in pools))


def _pool_key(options: dict[str, Any]) -> str:
    return repr(sorted((k, v.signature, v.value) for k, v in options.items()))


async def clean_up(address: str, before: Inventory) -> None:
    """Removes every container, image, network and volume made since `before`."""
    bus = await connect(address)
    try:
        now = await inventory(bus)
        # Pools first: their containers would serve the creates of whatever runs next.
        for image, options, _, _ in (await manager_call(bus, "ListWarmPools"))[0]:
            if (image, _pool_key(options)) not in before.pools:
                await manager_call(bus, "SetWarmPool", "sua{sv}", image, 0, options)
        for cid in sorted(now.containers - before.containers):
            await manager_call(bus, "RemoveContainer", "sb", cid, True)
        for image in sorted(now.images - before.images):
            await manager_call(bus, "RemoveImageEx", "sa{sv}", image, {"force": Variant("b", True)})
        for network in sorted(now.networks - before.networks):
            await manager_call(bus, "RemoveNetwork", "s", network)
        for volume in sorted(now.volumes - before.volumes):
            await manager_call(bus, "RemoveVolume", "s", volume)
    finally:
        bus.disconnect()


HUGE = 4 << 20  # the longest string the generator sends


async def prime(address: str) -> None:
    """Starts a follow and sends the largest messages the generator makes, before a baseline is taken.

    RSS is a high-water mark: memory freed after a 4 MiB message stays with
    the process (glibc raises its mmap threshold once a large block is freed,
    so later ones come from the heap and are kept). A baseline taken before
    the first large message would count that once-only growth as a leak.
    """
    bus = await connect(address)
    try:
        # One follow, so the journal watch every follow shares (a thread and two descriptors,
        # started by the first and kept) is in the baseline too.
        await manager_call(bus, "CreateContainer", "ssasa{sv}", "fz-prime", "busybox", ["sleep", "1000"], {})
        await manager_call(bus, "WaitContainerStarted", "st", "fz-prime", 30_000_000)
        r, w = os.pipe()
        try:
            await asyncio.wait_for(bus.call(Message(
                destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member="FollowLogs",
                signature="sa{sv}h", body=["fz-prime", {}, 0], unix_fds=[w])), 60)
        finally:
            os.close(w)
            os.close(r)
        await manager_call(bus, "RemoveContainer", "sb", "fz-prime", True)
        for member, signature, body in (
                ("GetContainerInfo", "s", ["y" * HUGE]),
                ("CreateContainer", "ssasa{sv}", ["y" * HUGE, "busybox", ["true"], {}]),
                ("Exec", "sasa{sv}", ["nope", ["y" * HUGE], {}]),
                ("ImportImage", "ssa{sv}", ["fz-img", "/" + "y" * HUGE, {}]),
        ):
            msg = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member=member,
                          signature=signature, body=body)
            await asyncio.wait_for(bus.call(msg), 60)
    finally:
        bus.disconnect()


async def fuzz(address: str, transport: Transport, calls: int, seed: int, scratch: Path,
               timeout: float = 25.0, parallel: int = 1) -> Summary:
    """One fuzz run against quiltd at address, leaving quiltd holding what it held before."""
    bus = await connect(address)
    try:
        before = await inventory(bus)
    finally:
        bus.disconnect()
    world = World()
    try:
        fuzzer = Fuzzer(address, transport, world, scratch, timeout, refresh_world, parallel=parallel)
        return await fuzzer.run(calls, seed)
    finally:
        await clean_up(address, before)


# -- quiltd in a sandbox: its socket, and what it holds -----------------------------------------------

SOCKET = "/run/quilt/quiltd.sock"


@dataclass(frozen=True)
class Process:
    """quiltd as systemd and /proc see it."""

    pid: int
    restarts: int
    fds: int
    rss_kib: int
    fd_targets: tuple[str, ...]  # what each descriptor is (socket:[N] as socket), to say what grew
    threads: int  # quiltd's own
    processes: int  # quiltd and its descendants: the fork server and the inits it keeps waiting


def quiltd_process(sandbox: Any) -> Process:
    show = sandbox.run(["systemctl", "show", "-p", "MainPID", "-p", "NRestarts", "quiltd"]).stdout.decode()
    props = dict(line.split("=", 1) for line in show.split())
    pid = int(props["MainPID"])
    listing = sandbox.run(["ls", "-l", f"/proc/{pid}/fd"]).stdout.decode().splitlines()
    targets = tuple(re.sub(r"\[\d+\]$", "", line.split(" -> ", 1)[1]) for line in listing if " -> " in line)
    fds = len(targets)
    status = sandbox.run(["cat", f"/proc/{pid}/status"]).stdout.decode()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    threads = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:"))
    parents = [tuple(map(int, line.split())) for line in
               sandbox.run(["ps", "-e", "-o", "pid=,ppid="]).stdout.decode().splitlines() if line.strip()]
    tree = {pid}
    for _ in range(8):  # the inits are grandchildren of the fork server
        tree |= {child for child, parent in parents if parent in tree}
    return Process(pid, int(props["NRestarts"]), fds, rss, targets, threads, len(tree))


def settled(sandbox: Any, before: Process, fd_slack: int, seconds: float = 10.0) -> Process:
    """quiltd once what the fuzz left has ended, or after `seconds`.

    A follow ends on its own thread after its container is removed, writing
    what journald still has before it closes its reader and descriptor.
    """
    deadline = time.monotonic() + seconds
    while True:
        now = quiltd_process(sandbox)
        done = now.fds <= before.fds + fd_slack and now.threads <= before.threads
        if done or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def serve_socket(sandbox: Any) -> None:
    """quiltd started by its socket unit, so it serves /run/quilt/quiltd.sock as well as the bus.

    And a FIFO for calls to name as a path: opening one for reading waits for a writer.
    """
    sandbox.run(["sh", "-c", f"[ -p {FIFO} ] || mkfifo -m 0666 {FIFO}"])
    sandbox.run(["systemctl", "stop", "quiltd"])
    sandbox.run(["systemctl", "start", "quiltd.socket", "quiltd"])


def stop_serving_socket(sandbox: Any) -> None:
    sandbox.run(["systemctl", "stop", "quiltd.socket", "quiltd"], check=False)
    sandbox.run(["systemctl", "reset-failed", "quiltd"], check=False)


def addresses(sandbox: Any) -> dict[Transport, str]:
    return {Transport.BUS: sandbox.bus_address,
            Transport.SOCKET: f"unix:path={sandbox.host_path(SOCKET)}"}
