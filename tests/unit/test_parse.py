"""Options are read once, at the edge: one unknown-option rule, one range check, typed requests."""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import quiltd
from quiltd.core import parse
from quiltd.core.parse import ExecKind
from quiltd.core.requests import CopyOptions, ImportOptions, LogOptions, Stream
from quiltd.errors import InvalidArgument
from quiltd.images.pull import MAX_TIMEOUT_SEC

ROOT = Path(quiltd.__file__).parent

READERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "CreateContainer": parse.create_options,
    "SetWarmPool": parse.pool_options,
    "Exec": lambda o: parse.exec_options(o, ExecKind.FOREGROUND),
    "ExecWithFds": lambda o: parse.exec_options(o, ExecKind.WITH_FDS),
    "ExecStart": lambda o: parse.exec_options(o, ExecKind.BACKGROUND),
    "ExecWithPty": lambda o: parse.exec_options(o, ExecKind.PTY),
    "CopyInEx": parse.copy_options,
    "GetLogs": parse.log_options,
    "ImportImage": parse.import_options,
    "RemoveImageEx": parse.remove_image_options,
    "ListContainers": parse.container_filter,
    "CreateNetwork": parse.network_options,
}


@pytest.mark.parametrize("call", sorted(READERS))
def test_every_call_refuses_an_unknown_option_naming_it_and_the_known_ones(call: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        READERS[call]({"zz_nope": 1, "aa_nope": 2})
    message = str(refused.value)
    shape = r"^unknown [a-z ]*(option|filter)\(s\)( \([^)]*\))?: aa_nope, zz_nope; the known ones are \w"
    assert re.search(shape, message), message
    # Every name the message offers is one the call takes.
    offered = message.split("the known ones are ", 1)[1].split(", ")
    for name in offered:
        try:
            READERS[call]({name: object()})
        except InvalidArgument as e:
            assert "unknown" not in str(e), (call, name, e)


@pytest.mark.parametrize("call", sorted(READERS))
def test_every_call_takes_no_options(call: str) -> None:
    READERS[call]({})


HOSTILE = [None, True, 0, -1, 1 << 70, 1.5, float("nan"), "", "\0", "x" * 5000, b"\xff", [], [1], ["a", "b"],
           [["a"]], [[1, 2, 3]], [["/a", "/b", True, 4]], {}, {"a": 1}, {"a": ["b"]}, {1: "a"}]


@pytest.mark.parametrize("call", sorted(READERS))
def test_every_option_of_every_call_refuses_hostile_values_by_name(call: str) -> None:
    """Whatever a client puts in a variant is a request or InvalidArgument: never a TypeError (Internal)."""
    with pytest.raises(InvalidArgument) as refused:
        READERS[call]({"zz": 1})
    known = str(refused.value).split("the known ones are ", 1)[1].split(", ")
    for key in known:
        for value in HOSTILE:
            with contextlib.suppress(InvalidArgument):
                READERS[call]({key: value})


def test_the_messages_of_each_call_keep_their_words() -> None:
    for call, words in (("Exec", "unknown exec option"), ("ExecStart", "output goes to the journal"),
                        ("ExecWithPty", "are the terminal"), ("GetLogs", "unknown log option"),
                        ("CopyInEx", "unknown copy option"), ("SetWarmPool", "cannot be pooled"),
                        ("ImportImage", "unknown option"), ("ListContainers", "unknown filter")):
        with pytest.raises(InvalidArgument, match=words):
            READERS[call]({"nope": 1})


@pytest.mark.parametrize(("read", "key", "low", "high"), [
    (parse.create_options, "tasks_max", 1, parse.MAX_TASKS),
    (parse.create_options, "memory_max", parse.MIN_MEMORY, parse.MAX_MEMORY),
    (parse.create_options, "disk_max", parse.MIN_DISK, parse.MAX_DISK),
    (parse.create_options, "ttl_sec", 0, parse.MAX_TTL_SEC),
    (parse.create_options, "log_rate_burst", 0, parse.MAX_LOG_RATE_BURST),
    (parse.create_options, "log_rate_interval_sec", 1, parse.MAX_LOG_RATE_INTERVAL_SEC),
    (READERS["Exec"], "timeout_sec", 0, parse.MAX_EXEC_TIMEOUT_SEC),
    (READERS["Exec"], "max_output", 0, parse.MAX_OUTPUT_LIMIT),
    (READERS["ExecWithPty"], "rows", 0, parse.MAX_PTY_SIZE),
    (READERS["ExecWithPty"], "cols", 0, parse.MAX_PTY_SIZE),
    (parse.copy_options, "max_bytes", 1, parse.MAX_COPY_BYTES),
    (parse.log_options, "since_usec", 0, parse.MAX_LOG_USEC),
    (parse.log_options, "tail", 0, parse.MAX_LOG_USEC),
    (parse.import_options, "max_bytes", 1, parse.MAX_IMAGE_BYTES),
    (parse.import_options, "timeout_sec", 1, MAX_TIMEOUT_SEC),
])
def test_every_integer_option_has_one_range_check(read: Callable[[dict[str, Any]], object], key: str,
                                                  low: int, high: int) -> None:
    read({key: low})
    read({key: high})
    for bad in (low - 1, high + 1, True, "5", 1.5, None if low else -1):
        if bad is None:
            continue
        with pytest.raises(InvalidArgument, match=rf"^option {key} must be an integer from {low} to {high}"):
            read({key: bad})


def test_requests_are_typed_with_the_defaults_filled() -> None:
    assert parse.copy_options({}) == CopyOptions(None)
    assert parse.copy_options({"max_bytes": 5}) == CopyOptions(5)
    assert parse.log_options({"stream": "stderr", "tail": 3}) == LogOptions(0, 3, Stream.STDERR, "")
    assert parse.import_options({"ref": "busybox:latest"}) == ImportOptions(ref="busybox:latest")
    o = parse.exec_options({"user": 1000, "stdin": list(b"hi"), "env": ["A=1"]}, ExecKind.FOREGROUND)
    assert (o.user, o.stdin, o.env) == ("1000", b"hi", ("A=1",))


def test_create_options_keep_what_the_client_gave_for_the_image_defaults() -> None:
    req = parse.create_options({"env": ["A=1"], "workdir": "/w", "entrypoint": []})
    assert req.env == ("A=1",) and req.entrypoint == () and req.given == {"env", "workdir", "entrypoint"}
    assert req.spec.env[0].startswith("PATH=") and req.spec.workdir == "/w" and req.start
    assert req.spec.hostname == ""  # the core makes it the container's name
    assert parse.create_options({}).entrypoint is None
    req = parse.create_options({"mounts": [["/src", "/data/", True]], "tmpfs": [["/t", 1 << 20]],
                                "volumes": [["v", "/v", False]], "start": False})
    assert req.spec.mounts == (("/src", "/data", True),) and req.spec.tmpfs == (("/t", 1 << 20),)
    assert req.spec.volumes == (("v", "/v", False),) and not req.start
    with pytest.raises(InvalidArgument, match="conflicting options"):
        parse.create_options({"mounts": [["/src", "/d", True]], "volumes": [["v", "/d", False]]})


@pytest.mark.parametrize("ref", ["", "two words", "x" * 256, 3])
def test_ref_option_is_checked(ref: object) -> None:
    with pytest.raises(InvalidArgument, match="option ref"):
        parse.import_options({"ref": ref})


def test_pool_options_are_the_pool_keys_only() -> None:
    with pytest.raises(InvalidArgument, match=r"cannot be pooled.*: env, mounts;"):
        parse.pool_options({"mounts": [], "env": [], "network": "none"})
    assert parse.pool_options({"network": "none", "memory_max": 1 << 26, "userns": True}).spec.userns


def test_network_options() -> None:
    got = parse.network_options({"subnet": "10.90.0.0/24", "egress": ["10.0.0.0/8:443"]})
    assert (str(got.subnet), got.egress, got.rules[0].port) == ("10.90.0.0/24", "list", 443)
    with pytest.raises(InvalidArgument, match="too small"):
        parse.network_options({"subnet": "10.90.0.0/30"})


def _calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        # `sorted(set(opts) - KNOWN)`: the shape of a hand-made unknown-option check
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sorted"
                and node.args and isinstance(diff := node.args[0], ast.BinOp)
                and isinstance(diff.op, ast.Sub)):
            continue
        left = diff.left
        if isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id == "set":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_other_module_checks_for_unknown_options_by_hand() -> None:
    """An a{sv} is read by quiltd.core.parse alone: a difference of its keys elsewhere is a second rule."""
    allowed = {ROOT / "core" / "parse.py", ROOT / "core" / "config.py"}  # config: quiltd.conf, not a client's
    found = [hit for path in sorted(ROOT.rglob("*.py")) if path not in allowed for hit in _calls(path)]
    assert not found, found


def test_the_core_takes_no_dbus_values() -> None:
    for path in sorted((ROOT / "core").rglob("*.py")):
        text = path.read_text()
        assert "dbus_next" not in text and "Variant" not in text, path
