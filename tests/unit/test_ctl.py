"""quiltctl's command line, without a daemon."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from quiltd.cli import ctl

COMPLETION = Path(__file__).resolve().parents[2] / "packaging/bash-completion/quiltctl"
DOC = Path(__file__).resolve().parents[2] / "docs/quiltctl.md"


def verbs() -> list[str]:
    parser = ctl.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.parametrize("verb", [*verbs(), "images ls", "images import", "images rm"])
def test_every_verb_has_help(verb: str) -> None:
    result = subprocess.run([sys.executable, "-m", "quiltd.cli.ctl", *verb.split(), "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: quiltctl {verb}")


def test_completion_knows_every_available_verb() -> None:
    text = COMPLETION.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith('local verbs="'))
    assert set(line.split('"')[1].split()) == set(verbs())


def test_images_import_takes_a_ref_and_completes_it() -> None:
    args = ctl.build_parser().parse_args(["images", "import", "--ref", "alpine:3.19", "alpine", "x.tar"])
    assert (args.ref, args.name, args.source) == ("alpine:3.19", "alpine", "x.tar")
    assert ctl.build_parser().parse_args(["images", "import", "bb", "x.tar"]).ref is None
    assert 'opts="--ref"' in COMPLETION.read_text()


def test_cp_takes_max_bytes_and_completes_it() -> None:
    args = ctl.build_parser().parse_args(["cp", "--max-bytes", "4G", "web:/etc", "-"])
    assert (args.max_bytes, args.source, args.dest) == (4 << 30, "web:/etc", "-")
    assert ctl.build_parser().parse_args(["cp", "a", "web:/"]).max_bytes is None
    assert 'cp) opts="--max-bytes"' in COMPLETION.read_text()


def test_exit_codes_are_documented() -> None:
    text = DOC.read_text()
    for code in ctl.EXIT_CODES:
        assert f"| {code} |" in text


@pytest.mark.parametrize(("text", "size"), [("512M", 512 << 20), ("2g", 2 << 30), ("1GiB", 1 << 30),
                                            ("4096", 4096), ("1.5k", 1536)])
def test_memory_sizes(text: str, size: int) -> None:
    assert ctl._memory(text) == size


def test_volume_and_signal_parsing() -> None:
    assert ctl._mount("/a:/b:ro") == ("/a", "/b", True)
    assert ctl._mount("/a:/b") == ("/a", "/b", False)
    assert ctl._signal("term") == 15 and ctl._signal("SIGKILL") == 9 and ctl._signal("10") == 10
    with pytest.raises(argparse.ArgumentTypeError):
        ctl._mount("/a")


def test_commit_and_fork_parse_as_documented_and_complete() -> None:
    args = ctl.build_parser().parse_args(["commit", "-e", "MODE=x", "--cmd", "sh -c 'echo hi'", "-l", "a=b",
                                          "web", "web-step-1"])
    assert (args.ref, args.image, args.env, args.cmd, args.label) == \
        ("web", "web-step-1", ["MODE=x"], "sh -c 'echo hi'", [("a", "b")])
    args = ctl.build_parser().parse_args(["fork", "--no-start", "-t", "3", "web", "a", "b"])
    assert (args.ref, args.names, args.no_start) == ("web", ["a", "b"], True)
    assert (args.time, args.command) == (3, None)
    text = COMPLETION.read_text()
    assert 'commit) opts="--env --workdir --user --entrypoint --cmd --label"' in text
    assert 'fork) opts="--command --no-start --time"' in text
