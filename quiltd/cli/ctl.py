"""quiltctl: the command line of Quilt, with the habits of podman and machinectl.

Every verb is a thin layer over quiltd.client. Output of containers comes from
quiltd (GetLogsRaw, FollowLogs), which reads the journal, so a member of group
quilt needs no access to the journal. Exit codes are listed in
docs/quiltctl.md and in EXIT_CODES below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from dbus_next.errors import AuthError

from quiltd import __version__, errors
from quiltd.cli import ctlmonitor, ctloutput, ctlpty, ctlstreams
from quiltd.client import QuiltClient

T = TypeVar("T")
SOCKET_ADDRESS = "unix:path=/run/quilt/quiltd.sock"
EXIT_OK = 0
EXIT_FAILED = 1  # quiltd answered with an error
EXIT_USAGE = 2  # bad command line
EXIT_UNREACHABLE = 3  # no connection to quiltd
EXIT_RUN_FAILED = 125  # `run`: the container never ran; `exec`: the command could not be started (as podman)
EXIT_CANNOT_EXEC = 126  # `exec`: the program could not be executed
EXIT_NOT_FOUND = 127  # `exec`: the program was not found
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "quiltd refused or failed the request (the message says why)",
    EXIT_USAGE: "the command line is wrong",
    EXIT_UNREACHABLE: "quiltd could not be reached",
    EXIT_RUN_FAILED: "run: the container could not be created or started; exec: the command could not be run",
    EXIT_CANNOT_EXEC: "exec: the program could not be executed",
    EXIT_NOT_FOUND: "exec: the program or workdir was not found",
}
# Verbs of the design that this quiltd does not offer yet.
STOP_TIMEOUT = 10
RELAY_WAIT = 2.0  # after an exec ends, how long its output may still drain through our relays


class Failure(Exception):
    """A one-line error for the user, with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- the parser


def _memory(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.strip().lower().removesuffix("ib").removesuffix("i")
    suffix = number[-1:] if number[-1:].isalpha() else ""
    try:
        return int(float(number[: len(number) - len(suffix)]) * units[suffix])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 512M or 2G") from None


def _pool_size(text: str) -> int:
    # quiltd checks the upper bound; a negative number cannot even be sent as its u.
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: a number of containers, 0 or more")
    return int(text)


def _mount(text: str) -> tuple[str, str, bool]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise argparse.ArgumentTypeError(f"invalid volume {text!r}: use SOURCE:TARGET[:ro]")
    return parts[0], parts[1], len(parts) == 3 and parts[2] == "ro"


def _signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}") from None


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: use KEY=VALUE")
    return key, value


def _publish(text: str) -> tuple[int, int, str]:
    ports, _, proto = text.partition("/")
    host, sep, inner = ports.partition(":")
    if not sep or not host.isdigit() or not inner.isdigit() or proto not in ("", "tcp", "udp"):
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use HOSTPORT:CONTAINERPORT[/tcp|/udp]")
    return int(host), int(inner), proto or "tcp"


def _entrypoint(text: str) -> list[str]:
    """As podman: a JSON list of strings, or one program; "" clears the image's Entrypoint."""
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise argparse.ArgumentTypeError(
                f"invalid entrypoint {text!r}: use PROGRAM or a JSON list of strings")
        return value
    return [text] if text else []


def _env_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="environment variable; NAME alone takes ours (repeatable)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="NAME=VALUE lines of a file, as -e (repeatable; # comments)")


def _container_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="container name (default: quiltd picks one from the id)")
    _env_options(p)
    p.add_argument("-u", "--user", help="user[:group] the command runs as, by name or number "
                                        "(default: the image's USER, else root); execs too")
    p.add_argument("-p", "--publish", action="append", default=[], type=_publish,
                   metavar="HOSTPORT:PORT[/PROTO]",
                   help="forward a host port to the container's (repeatable)")
    p.add_argument("--entrypoint", type=_entrypoint, metavar="PROGRAM|JSON",
                   help="replace the image's Entrypoint: a program, or a JSON list; '' clears it")
    p.add_argument("-v", "--volume", action="append", default=[], type=_mount, metavar="SRC:DST[:ro]",
                   help="bind mount a host path (repeatable; needs a quiltd with mounts)")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("--hostname", help="host name inside the container (default: its name)")
    p.add_argument("-m", "--memory", type=_memory, metavar="SIZE", help="memory limit, e.g. 512M")
    p.add_argument("--cpus", type=float, help="CPU limit in cores, e.g. 0.5")
    p.add_argument("--pids-limit", type=int, dest="tasks_max", metavar="N", help="most tasks at once")
    p.add_argument("--network", help="network: bridge (default), none, or one quiltd knows")
    p.add_argument("--userns", action="store_true",
                   help="run as root of a user namespace: an unprivileged range of host ids")
    p.add_argument("--ttl", type=int, metavar="SECONDS", help="stop the container after this long")
    p.add_argument("-l", "--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                   help="label (repeatable)")
    p.add_argument("image", help="image name (see `quiltctl images`)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command and its arguments (default: the image's; replaces its Cmd)")


# An argument: its names or flags, and add_argument's keywords.
_Arg = tuple[tuple[str, ...], dict[str, Any]]
# --format table|json and --json (dest "format"), on every verb that lists.
FORMAT_ARGS: list[_Arg] = [
    (("--format",), {"choices": ctloutput.FORMATS, "default": "table",
                     "help": "output format (default table)"}),
    (("--json",), {"action": "store_const", "const": "json", "dest": "format", "help": "as --format json"}),
]
NAME_ARG: _Arg = (("name",), {})
NAMES_ARG: _Arg = (("names",), {"nargs": "+", "metavar": "NAME"})
# save, as podman save: docker-archive unless told otherwise.
SAVE_ARGS: list[_Arg] = [
    (("--format",), {"choices": ("docker-archive", "oci-archive"), "default": "docker-archive",
                     "dest": "archive_format", "help": "archive format (default docker-archive, as podman)"}),
    (("-o", "--output"), {"metavar": "FILE", "help": "write to FILE instead of stdout"}),
    (("image",), {"metavar": "IMAGE"}),
]
SAVE_TEXT = "write an image as a docker-archive or an OCI archive, as podman save"


def _subverbs(p: argparse.ArgumentParser, dest: str,
              table: list[tuple[str, str, str, Callable[..., Awaitable[int]], list[_Arg]]]) -> None:
    """The verbs under volume, network or images: (name, help, description, function, arguments).

    The verb alone lists, as its ls does, so it takes --format and --json as well.
    """
    ctloutput.add_format(p)
    verbs = p.add_subparsers(dest=dest, metavar=dest.upper())
    for name, text, description, fn, arguments in table:
        s = verbs.add_parser(name, help=text, description=description)
        for flags, keywords in arguments:
            s.add_argument(*flags, **keywords)
        s.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quiltctl", description="Run and manage Quilt containers through quiltd.",
        epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
        + ". run exits with the container's own code.",
    )
    p.add_argument("--version", action="version", version=f"quiltctl {__version__}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=os.environ.get("QUILT_ADDRESS"),
                       help="D-Bus address of quiltd (default: the system bus, or $QUILT_ADDRESS)")
    where.add_argument("--direct", action="store_const", const=SOCKET_ADDRESS, dest="direct",
                       help=f"talk to quiltd on its own socket ({SOCKET_ADDRESS.split('=', 1)[1]})")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    def verb(name: str, text: str, fn: Callable[..., Awaitable[int]]) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=text, description=text)
        sub.set_defaults(fn=fn)
        return sub

    s = verb("run", "create a container, start it, show its output and exit with its code", cmd_run)
    s.add_argument("-d", "--detach", action="store_true", help="print the id and return at once")
    s.add_argument("--rm", action="store_true", help="remove the container when it exits")
    _container_options(s)
    s = verb("create", "create a container without starting it; prints its id", cmd_create)
    _container_options(s)
    s = verb("start", "start created or exited containers", cmd_start)
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("stop", "stop containers: SIGTERM, then SIGKILL after the timeout", cmd_stop)
    s.add_argument("-t", "--time", type=int, default=STOP_TIMEOUT, help="seconds of grace (default 10)")
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("kill", "send a signal to containers", cmd_kill)
    s.add_argument("-s", "--signal", type=_signal, default=int(signal.SIGKILL),
                   help="signal name or number (default KILL)")
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("pause", "freeze every process of running containers", cmd_pause)
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("unpause", "thaw paused containers", cmd_unpause)
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("rm", "remove containers", cmd_rm)
    s.add_argument("-f", "--force", action="store_true", help="stop running containers first")
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("ps", "list containers (running ones unless -a)", cmd_ps)
    s.add_argument("-a", "--all", action="store_true", help="all containers, ended ones too")
    s.add_argument("--filter", action="append", default=[], type=_label, metavar="KEY=VALUE",
                   help="state=, name=, image= or label=KEY=VALUE (repeatable)")
    s.add_argument("--format", choices=("table", "json", "ids", "names"), default="table")
    s.add_argument("--json", action="store_const", const="json", dest="format", help="as --format json")
    s.add_argument("-q", "--quiet", action="store_const", const="ids", dest="format", help="ids only")
    s = verb("inspect", "show everything about containers as JSON", cmd_inspect)
    ctloutput.add_format(s, ("json",))  # JSON is its only form; taken for the habit of podman's flags
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("exec", "run a command in a running container; exits with its code", cmd_exec)
    s.add_argument("-i", "--interactive", action="store_true", help="pass our stdin to the command")
    how = s.add_mutually_exclusive_group()
    how.add_argument("-d", "--detach", action="store_true",
                     help="run in the background (output to the container's log); prints the exec id")
    how.add_argument("-t", "--tty", action="store_true", help="run on a pseudo-terminal of the container")
    _env_options(s)
    s.add_argument("-w", "--workdir", help="working directory inside the container")
    s.add_argument("-u", "--user", help="user[:group], by name or number (default: the container's user)")
    s.add_argument("ref", metavar="CONTAINER")
    s.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    s = verb("execs", "list a container's background execs", cmd_execs)
    s.add_argument("--json", action="store_true", help="as JSON")
    s.add_argument("ref", metavar="CONTAINER")
    s = verb("exec-wait", "wait for background execs to end; prints their exit codes", cmd_exec_wait)
    s.add_argument("ids", nargs="+", metavar="EXEC_ID")
    s = verb("exec-kill", "send a signal to background execs", cmd_exec_kill)
    s.add_argument("-s", "--signal", type=_signal, default=int(signal.SIGKILL),
                   help="signal name or number (default KILL)")
    s.add_argument("ids", nargs="+", metavar="EXEC_ID")
    s = verb("save", SAVE_TEXT, cmd_save)
    for flags, keywords in SAVE_ARGS:
        s.add_argument(*flags, **keywords)
    s = verb("export", "write a container's filesystem as a tar archive, as podman export", cmd_export)
    s.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    s.add_argument("ref", metavar="CONTAINER")
    s = verb("cp", "copy files between a container and here, as tar streams", cmd_cp)
    s.add_argument("--max-bytes", type=_memory, metavar="SIZE",
                   help="most bytes of tar stream, e.g. 4G (default: 1G into a container, no cap out of one)")
    s.add_argument("source", metavar="SRC", help="CONTAINER:PATH, a local path, or - for a tar on stdin")
    s.add_argument("dest", metavar="DEST", help="CONTAINER:PATH, a local path, or - for a tar on stdout")
    s = verb("logs", "show a container's output (from the journal, through quiltd)", cmd_logs)
    s.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    s.add_argument("-n", "--tail", default="all", help="only the last N lines")
    s.add_argument("ref", metavar="CONTAINER")
    s = verb("wait", "wait for containers to end; prints their exit codes", cmd_wait)
    s.add_argument("refs", nargs="+", metavar="CONTAINER")
    s = verb("pull", "pull an image from a registry (through quiltd) or an archive transport", cmd_pull)
    s.add_argument("--name", help="the image's name (default: the repository's last part and tag, "
                                  "as bb:1 for 127.0.0.1:5000/agents/bb:1)")
    s.add_argument("--timeout", type=int, metavar="SEC",
                   help="give up after SEC seconds (default: the daemon's, 600)")
    s.add_argument("source", metavar="IMAGE",
                   help="HOST/REPO[:TAG|@sha256:DIGEST] or docker://..., oci-archive:PATH[:REF], "
                        "docker-archive:PATH[:REF]")
    s = verb("commit", "make an image of a container's filesystem as it is now; prints its id", cmd_commit)
    s.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set in the image's environment (repeatable)")
    s.add_argument("-w", "--workdir", help="the image's working directory")
    s.add_argument("-u", "--user", help="the image's user[:group]")
    s.add_argument("--entrypoint", metavar="WORDS", help="the image's Entrypoint, as shell words")
    s.add_argument("--cmd", metavar="WORDS", help="the image's Cmd, as shell words")
    s.add_argument("-l", "--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                   help="label of the image (repeatable)")
    s.add_argument("ref", metavar="CONTAINER")
    s.add_argument("image", metavar="IMAGE")
    s = verb("fork", "make containers that start from a container's filesystem; prints their ids once "
             "they run", cmd_fork)
    s.add_argument("--command", metavar="WORDS",
                   help="what the forks run, as shell words (default: the container's command)")
    s.add_argument("--no-start", action="store_true", help="leave the forks created, not started")
    s.add_argument("-t", "--time", type=int, default=STOP_TIMEOUT,
                   help="seconds a running container gets to stop before SIGKILL (default 10)")
    s.add_argument("ref", metavar="CONTAINER")
    s.add_argument("names", nargs="+", metavar="NAME")
    s = verb("info", "show quiltd's version, counts and directories", cmd_info)
    ctloutput.add_format(s)
    ctlmonitor.add_verbs(verb)
    _subverbs(verb("volume", "list, create and remove named volumes", cmd_volume_ls), "volume_verb", [
        ("ls", "list volumes", "list volumes", cmd_volume_ls, FORMAT_ARGS),
        ("create", "create a volume", "create a named volume", cmd_volume_create, [NAME_ARG]),
        ("rm", "remove volumes", "remove volumes no container uses", cmd_volume_rm, [NAMES_ARG]),
    ])
    _subverbs(verb("network", "list, create and remove networks", cmd_network_ls), "network_verb", [
        ("ls", "list networks", "list networks", cmd_network_ls, FORMAT_ARGS),
        ("create", "create a network", "create a network: its own bridge and subnet", cmd_network_create, [
            (("--subnet",), {"help": "CIDR, e.g. 10.90.0.0/24 (default: a free /16)"}),
            (("--egress",), {"help": "none (default), all, or comma-separated CIDR[:PORT] entries"}),
            NAME_ARG,
        ]),
        ("rm", "remove networks", "remove networks no container uses", cmd_network_rm, [NAMES_ARG]),
    ])
    _subverbs(verb("pool", "list and size warm pools", cmd_pool_ls), "pool_verb", [
        ("ls", "list warm pools", "list warm pools: image, size, containers ready now, setup options",
         cmd_pool_ls, FORMAT_ARGS),
        ("set", "keep containers of an image ready",
         "keep SIZE containers of IMAGE ready for creates with these setup options (root only); "
         "SIZE 0 removes the pool and its ready containers", cmd_pool_set, [
             (("-m", "--memory"), {"type": _memory, "metavar": "SIZE", "help": "memory limit, e.g. 512M"}),
             (("--cpus",), {"type": float, "help": "CPU limit in cores, e.g. 0.5"}),
             (("--pids-limit",), {"type": int, "dest": "tasks_max", "metavar": "N",
                                  "help": "most tasks at once"}),
             (("--network",), {"help": "network: bridge (default), none, or one quiltd knows"}),
             (("--userns",), {"action": "store_true", "help": "containers in a user namespace"}),
             (("image",), {"metavar": "IMAGE"}),
             (("size",), {"type": _pool_size, "metavar": "SIZE"}),
         ]),
    ])
    _subverbs(verb("images", "list, import and remove images", cmd_images_ls), "image_verb", [
        ("ls", "list images", "list images", cmd_images_ls, FORMAT_ARGS),
        ("import", "import an image archive you can read",
         "import a rootfs tarball (.tar, .tar.gz, .tar.xz, .tar.zst), an OCI image layout (directory or tar) "
         "or a docker save archive: quiltctl opens it as you and hands quiltd the open file, so you "
         "import only what you can read; '-' reads it from stdin",
         cmd_images_import, [
             (("--ref",), {"help": "which image of an archive holding several, e.g. busybox:latest "
                                   "(a docker RepoTag or an OCI ref name)"}),
             NAME_ARG,
             (("source",), {"help": "path of the archive or layout, or - for stdin"}),
         ]),
        ("rm", "remove images", "remove images", cmd_images_rm, [NAMES_ARG]),
        ("save", SAVE_TEXT, SAVE_TEXT, cmd_save, SAVE_ARGS),
    ])
    return p


# ---------------------------------------------------------------- the verbs


def _env(args: argparse.Namespace) -> list[str]:
    """-e and --env-file as NAME=VALUE entries: files first, then -e, the later winning as podman's."""
    entries: list[str] = []
    for path in args.env_file:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise Failure(f"--env-file {path}: {e.strerror or e}", EXIT_USAGE) from None
        entries += [line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    entries += args.env
    env: list[str] = []
    for item in entries:
        if "=" not in item:
            if item not in os.environ:
                continue  # as podman: a name we do not have is left out
            item = f"{item}={os.environ[item]}"
        env.append(item)
    return env


def _create_options(args: argparse.Namespace, start: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"start": start}
    pairs: list[tuple[str, Any]] = [
        ("env", _env(args)), ("workdir", args.workdir), ("hostname", args.hostname),
        ("user", args.user), ("publish", args.publish),
        ("memory_max", args.memory), ("cpu_quota", args.cpus), ("tasks_max", args.tasks_max),
        ("network", args.network), ("ttl_sec", args.ttl), ("labels", dict(args.label)),
        ("mounts", [list(m) for m in args.volume]), ("userns", args.userns or None),
    ]
    for key, value in pairs:
        if value not in (None, [], {}):
            opts[key] = value
    if args.entrypoint is not None:
        opts["entrypoint"] = args.entrypoint  # [] too: it clears the image's
    return opts


def _name(args: argparse.Namespace) -> str:
    if args.name:
        return str(args.name)
    # quiltd wants a name; make one from the image, as podman makes up its own.
    base = "".join(c if c.isalnum() else "-" for c in args.image).strip("-")[:48] or "c"
    return f"{base}-{secrets.token_hex(3)}"


def _command(args: argparse.Namespace, required: bool = True) -> list[str]:
    command: list[str] = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command and required:
        raise Failure("give the command to run after the container", EXIT_USAGE)
    return command


async def cmd_create(q: QuiltClient, args: argparse.Namespace) -> int:
    cid, _ = await q.create(_name(args), args.image, _command(args, required=False),
                            **_create_options(args, False))
    print(cid)
    return EXIT_OK


async def cmd_run(q: QuiltClient, args: argparse.Namespace) -> int:
    command = _command(args, required=False)  # none: the image's Entrypoint and Cmd
    try:
        if args.detach:
            opts = _create_options(args, True)
            if args.rm:
                opts["auto_remove"] = True
            cid, _ = await q.create(_name(args), args.image, command, **opts)
            print(cid)
            return EXIT_OK
        cid, _ = await q.create(_name(args), args.image, command, **_create_options(args, False))
    except errors.QuiltError as e:
        raise Failure(_message(e), EXIT_RUN_FAILED) from None
    since = time.time_ns() // 1000  # every line of this run is logged after this
    follow: LogFollow | None = None
    try:
        try:
            await q.start(cid)
        except errors.QuiltError as e:
            raise Failure(_message(e), EXIT_RUN_FAILED) from None
        # Ends with the container, once the last lines are written.
        follow = await LogFollow.open(q, cid, since_usec=since)
        with _forward_signals(q, cid):
            state, code = await q.wait(cid)
            await follow.finished()
    finally:
        if follow is not None:
            follow.close()
        if args.rm:
            with contextlib.suppress(errors.QuiltError):
                await q.remove(cid, True)
    if state == "failed":
        return EXIT_RUN_FAILED
    return code


@contextlib.contextmanager
def _forward_signals(q: QuiltClient, cid: str) -> Any:
    """Ctrl-C and SIGTERM go to the container, as with podman run."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def send(signum: int) -> None:
        with contextlib.suppress(errors.QuiltError):
            await q.kill(cid, signum)

    def forward(signum: int) -> None:
        task = loop.create_task(send(signum))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in handled:
        loop.add_signal_handler(signum, forward, int(signum))
    try:
        yield
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def _each(refs: Sequence[str], action: Callable[[str], Awaitable[None]], echo: bool = True) -> int:
    """Applies to every ref, reports each failure on its own line, and fails if any did."""
    code = EXIT_OK
    for ref in refs:
        try:
            await action(ref)
        except errors.QuiltError as e:
            print(f"quiltctl: {ref}: {_message(e)}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        if echo:
            print(ref)
    return code


async def cmd_start(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, q.start)


async def cmd_stop(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, lambda ref: q.stop(ref, args.time))


async def cmd_kill(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, lambda ref: q.kill(ref, args.signal))


async def cmd_pause(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, q.pause)


async def cmd_unpause(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, q.resume)


async def cmd_rm(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.refs, lambda ref: q.remove(ref, args.force))


async def cmd_commit(q: QuiltClient, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.env:
        options["env"] = args.env
    for key in ("workdir", "user"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    for key in ("entrypoint", "cmd"):
        if getattr(args, key) is not None:
            options[key] = shlex.split(getattr(args, key))
    if args.label:
        options["labels"] = dict(args.label)
    print(await q.commit(args.ref, args.image, **options))
    return EXIT_OK


async def cmd_fork(q: QuiltClient, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"start": not args.no_start, "stop_timeout_sec": args.time}
    if args.command is not None:
        options["command"] = shlex.split(args.command)
    made = await q.fork(args.ref, args.names, **options)
    code = EXIT_OK
    for name, (fork_id, _) in zip(args.names, made, strict=True):
        # Printed once it runs, as a command after this one expects of it.
        if not args.no_start and await q.wait_started(fork_id) == "failed":
            reason = (await q.info(fork_id)).get("Reason", "")
            print(f"quiltctl: {name}: failed to start: {reason}", file=sys.stderr)
            code = EXIT_FAILED
        print(fork_id)
    return code


async def cmd_wait(q: QuiltClient, args: argparse.Namespace) -> int:
    async def wait(ref: str) -> None:
        _, code = await q.wait(ref)
        print(code)

    return await _each(args.refs, wait, echo=False)


async def cmd_ps(q: QuiltClient, args: argparse.Namespace) -> int:
    filters: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, value in args.filter:
        if key == "label":
            k, _, v = value.partition("=")
            labels[k] = v
        elif key in ("state", "name", "image"):
            filters[key] = value
        else:
            raise Failure(f"unknown filter {key!r}: use state=, name=, image= or label=", EXIT_USAGE)
    if labels:
        filters["labels"] = labels
    rows = await q.list_containers(**filters)
    if not args.all and "state" not in filters:
        rows = [r for r in rows if r[3] in ("created", "starting", "running", "stopping", "paused")]
    keys = ("id", "name", "image", "state", "path")
    if args.format == "json":
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
    elif args.format in ("ids", "names"):
        for r in rows:
            print(r[0] if args.format == "ids" else r[1])
    else:
        _table(["ID", "NAME", "IMAGE", "STATE"], [list(r[:4]) for r in rows])
    return EXIT_OK


async def cmd_inspect(q: QuiltClient, args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []

    async def inspect(ref: str) -> None:
        found.append(await q.info(ref))

    code = await _each(args.refs, inspect, echo=False)
    print(json.dumps(found, indent=2, sort_keys=True))
    return code


async def cmd_logs(q: QuiltClient, args: argparse.Namespace) -> int:
    if args.tail != "all" and not args.tail.isdigit():
        raise Failure(f"--tail takes a number of lines, got {args.tail!r}", EXIT_USAGE)
    options = {} if args.tail == "all" else {"tail": int(args.tail)}
    if args.follow:
        follow = await LogFollow.open(q, args.ref, **options)
        try:
            await follow.finished()
        finally:
            follow.close()
        return EXIT_OK
    for _, stream, data in await q.logs_raw(args.ref, **options):
        _write_line(stream, data)
    return EXIT_OK


def _exec_options(args: argparse.Namespace) -> dict[str, Any]:
    env = _env(args)
    options: dict[str, Any] = {"env": env} if env else {}
    if args.workdir:
        options["workdir"] = args.workdir
    if args.user:
        options["user"] = args.user
    return options


async def _exec_call(call: Awaitable[T]) -> T:
    """An exec call, its failure to start told with podman's exit codes."""
    try:
        return await call
    except errors.ExecFailed as e:
        missing = "No such file" in e.message
        raise Failure(_message(e), EXIT_NOT_FOUND if missing else EXIT_CANNOT_EXEC) from None
    except errors.QuiltError as e:
        raise Failure(_message(e), EXIT_RUN_FAILED) from None


async def cmd_exec(q: QuiltClient, args: argparse.Namespace) -> int:
    command = _command(args)
    options = _exec_options(args)
    if args.detach:
        if args.interactive:
            raise Failure("-d and -i do not go together: a background exec's stdin is empty", EXIT_USAGE)
        print(await _exec_call(q.exec_start(args.ref, command, **options)))
        return EXIT_OK
    if args.tty:
        code: int = await ctlpty.run(q, args.ref, command, options, args.interactive, _exec_call)
        return code
    loop = asyncio.get_running_loop()
    relays: list[threading.Thread] = []
    ours: list[int] = []  # our copies of what quiltd gets; closed once it has them
    stdio: list[int] = []
    for std in (0, 1, 2):
        if std == 0 and not args.interactive:
            r, w = os.pipe()
            os.close(w)  # empty: end of file at once
            stdio.append(r)
            ours.append(r)
        elif ctlstreams.passable(std):
            stdio.append(std)  # quiltd takes our own descriptor: no copy on the way
        else:
            # A terminal: quiltd does not hand it to a container, so it goes through a pipe.
            r, w = os.pipe()
            if std == 0:
                # Not waited for: it may sit in a read of the terminal when the command is done.
                ctlstreams.start(ctlstreams.pump, os.dup(std), w, True)
                stdio.append(r)
                ours.append(r)
            else:
                relays.append(ctlstreams.start(ctlstreams.pump, r, std, False))
                stdio.append(w)
                ours.append(w)
    try:
        code = await _exec_call(q.exec_with_fds(args.ref, command, stdio[0], stdio[1], stdio[2], **options))
    finally:
        for fd in ours:
            os.close(fd)
    for relay in relays:  # our stdout and stderr, when they are terminals
        await loop.run_in_executor(None, relay.join, RELAY_WAIT)
    return code


async def cmd_execs(q: QuiltClient, args: argparse.Namespace) -> int:
    rows = await q.list_execs(args.ref)
    keys = ("id", "state", "command", "exit_code", "created_usec")
    if args.json:
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return EXIT_OK
    _table(["ID", "STATE", "EXIT", "COMMAND"],
           [[i, state, "" if state == "running" else str(code), " ".join(cmd)]
            for i, state, cmd, code, _ in rows])
    return EXIT_OK


async def cmd_exec_wait(q: QuiltClient, args: argparse.Namespace) -> int:
    async def wait(exec_id: str) -> None:
        _, code = await q.exec_wait(exec_id)
        print(code)

    return await _each(args.ids, wait, echo=False)


async def cmd_exec_kill(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.ids, lambda exec_id: q.exec_kill(exec_id, args.signal))


def _container_path(text: str) -> tuple[str, str] | None:
    """(container, path) for CONTAINER:PATH; None for a local path (write ./a:b for a local name with ':')."""
    ref, sep, path = text.partition(":")
    if not sep or not ref or "/" in ref:
        return None
    if not path.startswith("/"):
        raise Failure(f"the path in {text!r} must be absolute inside the container", EXIT_USAGE)
    return ref, path


async def cmd_export(q: QuiltClient, args: argparse.Namespace) -> int:
    await _write_out(args.output, lambda fd: q.export(args.ref, fd))
    return EXIT_OK


async def cmd_save(q: QuiltClient, args: argparse.Namespace) -> int:
    await _write_out(args.output, lambda fd: q.export_image(args.image, fd, args.archive_format))
    return EXIT_OK


async def _write_out(output: str | None, write: Callable[[int], Awaitable[object]]) -> None:
    """Hands quiltd stdout, or FILE opened here as the user: quiltd writes into the descriptor,
    never a path of ours."""
    if output is None:
        if not ctlstreams.passable(1):
            raise Failure("stdout is a terminal: redirect it, or give -o FILE", EXIT_USAGE)
        await write(1)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        await write(fd)
    except BaseException:
        os.unlink(output)  # no half archive left behind
        raise
    finally:
        os.close(fd)


async def cmd_cp(q: QuiltClient, args: argparse.Namespace) -> int:
    source, dest = _container_path(args.source), _container_path(args.dest)
    if (source is None) == (dest is None):
        raise Failure("give exactly one of SRC and DEST as CONTAINER:PATH", EXIT_USAGE)
    options = {} if args.max_bytes is None else {"max_bytes": args.max_bytes}
    if dest is not None:
        await _copy_in(q, args.source, *dest, options)
    else:
        assert source is not None
        await _copy_out(q, *source, args.dest, options)
    return EXIT_OK


async def _copy_in(q: QuiltClient, local: str, ref: str, path: str, options: dict[str, int]) -> None:
    if local == "-":
        if not ctlstreams.passable(0):
            raise Failure("stdin is a terminal: pipe a tar stream into `quiltctl cp -`", EXIT_USAGE)
        await q.copy_in(ref, path, 0, **options)
        return
    source = Path(local)
    if not source.exists() and not source.is_symlink():
        raise Failure(f"{local}: no such file or directory", EXIT_USAGE)
    arcname = source.resolve().name if source.name in ("", ".", "..") else source.name
    try:
        # Into path if it is a directory, as path/<name>.
        await _send_tar(q, ref, path, source, arcname, options)
    except (errors.NoSuchPath, errors.InvalidArgument) as e:
        if isinstance(e, errors.InvalidArgument) and "not a directory" not in e.message:
            raise
        # Else as path itself, in its parent (which must exist), as cp does.
        parent, _, name = path.rstrip("/").rpartition("/")
        if not name:
            raise
        await _send_tar(q, ref, parent or "/", source, name, options)


async def _send_tar(q: QuiltClient, ref: str, path: str, source: Path, arcname: str,
                    options: dict[str, int]) -> None:
    r, w = os.pipe()
    writer = ctlstreams.start(ctlstreams.write_tar, source, arcname, w)
    try:
        await q.copy_in(ref, path, r, **options)
    finally:
        os.close(r)  # a writer still writing after an error gets a broken pipe and stops
        await asyncio.get_running_loop().run_in_executor(None, writer.join)


async def _copy_out(q: QuiltClient, ref: str, path: str, local: str, options: dict[str, int]) -> None:
    if local == "-":
        if not ctlstreams.passable(1):
            raise Failure("stdout is a terminal: redirect the tar stream of `quiltctl cp ... -`", EXIT_USAGE)
        await q.copy_out(ref, path, 1, **options)
        return
    dest = Path(local)
    name = path.rstrip("/").rpartition("/")[2]
    if dest.is_dir():
        into, rename = dest, None  # as dest/<name>
    elif dest.parent.is_dir() and not dest.exists():
        into, rename = dest.parent, dest.name  # as dest itself
    else:
        raise Failure(f"{local}: not a directory, and not a new name in an existing directory", EXIT_USAGE)
    if not name and rename is None:
        rename = None  # the container's / comes as "."
    r, w = os.pipe()
    problems: list[str] = []
    reader = ctlstreams.start(ctlstreams.extract_tar, r, into, rename, problems)
    try:
        await q.copy_out(ref, path, w, **options)
    finally:
        os.close(w)
        await asyncio.get_running_loop().run_in_executor(None, reader.join)
    if problems:
        raise Failure(f"extracting into {into}: {problems[0]}")


async def cmd_info(q: QuiltClient, args: argparse.Namespace) -> int:
    info = await q.system_info()
    if args.format == "json":
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{n} {k}" for k, n in value.items())
        print(f"{key}: {value}")
    return EXIT_OK


async def cmd_images_ls(q: QuiltClient, args: argparse.Namespace) -> int:
    rows = await q.images()
    if args.format == "json":
        keys = ("name", "id", "size_bytes", "created_usec")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return EXIT_OK
    _table(["NAME", "ID", "SIZE"], [[name, iid[:12], _size(size)] for name, iid, size, _ in rows])
    return EXIT_OK


async def cmd_images_import(q: QuiltClient, args: argparse.Namespace) -> int:
    try:
        fd = _image_source(args.source)
    except OSError as e:
        raise Failure(f"{args.source}: {e.strerror or e}", EXIT_FAILED) from None
    progress = ctloutput.Progress(args.name)
    if progress.shown:
        await q.watch_signal("ImportProgress",
                             lambda body: progress.update(body[1], body[2]) if body[0] == args.name else None)
    try:
        result = await q.import_image_fd_ex(args.name, fd, ref=args.ref)
    finally:
        os.close(fd)
        progress.finish()
    print(result["Id"])
    if result["SkippedDevices"]:
        # Not an error: the container's /dev comes from quiltd. Said so
        # that a missing node at run time is no surprise.
        print(f"quiltctl: skipped {result['SkippedDevices']} device node(s) of the image; "
              "containers get their /dev from quiltd", file=sys.stderr)
    return EXIT_OK


def _image_source(source: str) -> int:
    """The image opened as the user: a file or layout directory, or stdin (copied to a file if a stream)."""
    if source != "-":
        return os.open(source, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    fd = os.dup(sys.stdin.fileno())
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    # quiltd reads an archive more than once (to tell its format, then to
    # extract), so a pipe is first copied into an unnamed temporary file.
    with os.fdopen(fd, "rb", buffering=0) as stream, tempfile.TemporaryFile() as spool:
        while chunk := stream.read(1 << 20):
            spool.write(chunk)
        spool.flush()
        return os.dup(spool.fileno())


def _pull_source(source: str) -> str:
    """A bare HOST/REPO:TAG is a docker:// reference, as podman pull takes it."""
    transport = source.partition(":")[0]
    if source.startswith("/") or transport in ("docker", "oci-archive", "docker-archive"):
        return source
    return f"docker://{source}"


def _pull_name(source: str) -> str:
    """The image name a pull gets unless --name is given: repository's last part and tag."""
    transport, _, rest = source.partition(":")
    if transport != "docker":
        stem = os.path.basename(rest.partition(":")[0]).split(".")[0]
        name = rest.partition(":")[2] or stem
        return "".join(c if c.isalnum() or c in "._:-" else "-" for c in name).strip("-._:") or "image"
    repo, _, digest = rest.removeprefix("//").partition("@")
    last = repo.rsplit("/", 1)[-1]
    if digest:
        return f"{last.split(':')[0]}:{digest.removeprefix('sha256:')[:12]}"
    return last if ":" in last else f"{last}:latest"


async def cmd_pull(q: QuiltClient, args: argparse.Namespace) -> int:
    source = _pull_source(args.source)
    name = args.name or _pull_name(source)
    progress = ctloutput.Progress(name)
    if progress.shown:
        await q.watch_signal("ImportProgress",
                             lambda body: progress.update(body[1], body[2]) if body[0] == name else None)
    try:
        image_id = await q.pull(name, source, timeout_sec=args.timeout)
    finally:
        progress.finish()
    print(image_id)
    return EXIT_OK


async def cmd_images_rm(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.names, q.remove_image)


async def cmd_volume_ls(q: QuiltClient, args: argparse.Namespace) -> int:
    rows = await q.volumes()
    if args.format == "json":
        print(json.dumps([dict(zip(("name", "path", "size_bytes"), r, strict=True)) for r in rows], indent=2))
        return EXIT_OK
    _table(["NAME", "SIZE", "PATH"], [[name, _size(size), path] for name, path, size in rows])
    return EXIT_OK


async def cmd_volume_create(q: QuiltClient, args: argparse.Namespace) -> int:
    await q.create_volume(args.name)
    print(args.name)
    return EXIT_OK


async def cmd_volume_rm(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.names, q.remove_volume)


async def cmd_network_ls(q: QuiltClient, args: argparse.Namespace) -> int:
    rows = await q.networks()
    keys = ("name", "subnet", "gateway", "bridge", "egress")
    if args.format == "json":
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return EXIT_OK
    _table([k.upper() for k in keys], [list(r) for r in rows])
    return EXIT_OK


async def cmd_network_create(q: QuiltClient, args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("subnet", args.subnet), ("egress", args.egress)) if v is not None}
    print(await q.create_network(args.name, **options))
    return EXIT_OK


async def cmd_network_rm(q: QuiltClient, args: argparse.Namespace) -> int:
    return await _each(args.names, q.remove_network)


async def cmd_pool_ls(q: QuiltClient, args: argparse.Namespace) -> int:
    pools = await q.warm_pools()
    if args.format == "json":
        print(json.dumps([{"image": image, "size": size, "ready": ready, "options": options}
                          for image, options, size, ready in pools], indent=2))
        return EXIT_OK
    _table(["IMAGE", "SIZE", "READY", "OPTIONS"],
           [[image, str(size), str(ready), ",".join(f"{k}={v}" for k, v in sorted(options.items()))]
            for image, options, size, ready in pools])
    return EXIT_OK


async def cmd_pool_set(q: QuiltClient, args: argparse.Namespace) -> int:
    pairs = (("memory_max", args.memory), ("cpu_quota", args.cpus), ("tasks_max", args.tasks_max),
             ("network", args.network), ("userns", args.userns or None))
    await q.set_warm_pool(args.image, args.size, **{k: v for k, v in pairs if v is not None})
    print(args.image)
    return EXIT_OK


# ---------------------------------------------------------------- output


_table = ctloutput.table
_size = ctloutput.size


def _message(e: errors.QuiltError) -> str:
    """The client's "name: text" as "text (ShortName)", one line."""
    name, sep, text = e.message.partition(": ")
    if not sep:
        return e.message.splitlines()[0]
    short = name.rsplit(".", 1)[-1]
    return f"{text.splitlines()[0] if text else short} ({short})"


def _write_line(stream: str, data: bytes) -> None:
    # "error" is quiltd's own last word on a follow that could not go on.
    out = sys.stderr if stream in ("stderr", "error") else sys.stdout
    out.flush()
    out.buffer.write(data + b"\n")
    out.buffer.flush()


class LogFollow:
    """A container's lines from FollowLogs, written to our stdout or stderr as they were."""

    def __init__(self, r: int) -> None:
        self._r = r
        self._thread = ctlstreams.start(self._copy)

    @classmethod
    async def open(cls, q: QuiltClient, ref: str, **options: Any) -> LogFollow:
        r, w = os.pipe()
        try:
            await q.follow_logs(ref, w, **options)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # quiltd holds its copy until the container ends
        return cls(r)

    def _copy(self) -> None:
        rest = b""
        with contextlib.suppress(OSError), os.fdopen(self._r, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    _, stream, data = [*line.split(b" ", 2), b"", b""][:3]
                    _write_line(stream.decode(errors="replace"), data)

    async def finished(self) -> None:
        """Once quiltd has written the last line and closed its end."""
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def close(self) -> None:
        pass  # the thread ends with quiltd's end of the pipe; it is a daemon thread


# ---------------------------------------------------------------- main


async def _main(args: argparse.Namespace) -> int:
    address = args.direct or args.address
    try:
        q = await QuiltClient.connect(address)
    except (OSError, AuthError, EOFError) as e:
        where = address or "the system bus"
        raise Failure(f"cannot connect to quiltd on {where}: {e}", EXIT_UNREACHABLE) from None
    try:
        code: int = await args.fn(q, args)
        return code
    finally:
        q.close()


def fail(message: str, code: int) -> NoReturn:
    print(f"quiltctl: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(_main(args))
    except Failure as e:
        fail(str(e), e.code)
    except ctlmonitor.UsageError as e:
        fail(str(e), EXIT_USAGE)
    except errors.QuiltError as e:
        fail(_message(e), EXIT_RUN_FAILED if args.verb == "run" else EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(EXIT_OK)  # `quiltctl ps | head`
    except Exception as e:  # a bug of ours: still one line, unless asked for the trace
        if os.environ.get("QUILTCTL_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e} (set QUILTCTL_DEBUG=1 for a trace)", EXIT_FAILED)
    sys.exit(code)


if __name__ == "__main__":
    main()
