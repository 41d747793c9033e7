"""Every shell command of README.md and docs/*.md runs as written, in a sandbox of its own.

Each ```sh block is taken from the files themselves, its lines joined where
they end in a backslash, and run one command at a time, in order, as root
inside a fresh sandbox with quiltd installed: a command the docs show that
fails here fails this test. What a block needs first is made for it (see
`prepare`); a placeholder such as <id> is replaced by the real value. The
commands that cannot run in a sandbox are listed in HOST_ONLY with the
reason and the test that covers them instead; a new block with a command
that is neither run nor listed fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BUS = ("org.quilt.Quilt1", "/org/quilt/Quilt1", "org.quilt.Quilt1.Manager")
TARBALL = "/var/tmp/quilt-docs-busybox.tar.gz"
# The image paths the docs use, all the same busybox rootfs.
IMAGE_PATHS = ("/srv/busybox-rootfs.tar.gz", "/srv/images/busybox-rootfs.tar.gz", "/srv/busybox.tar.gz",
               "/var/tmp/big.tar")
PATH = f"{REPO}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Commands that follow until interrupted: run for a while, then stopped as a user would.
FOLLOWS = ("journalctl -f ", "busctl monitor ", "quiltctl logs -f ")
FOLLOW_SEC = 3
# Exit statuses a command may end with besides 0: `systemctl status` says 3
# for a unit that is not active (a slice or scope with no container left).
ALSO_OK = {"systemctl status ": (3,)}
HOST_ONLY = {
    "tools/demo": "boots its own sandbox: tests/system/test_demo.py",
    "tools/test": "the test suite itself",
    "tools/bench": "tests/system/test_bench.py",
    "tools/fuzz": "tests/system/test_fuzz.py",
    # A cluster is several sandboxes and a Ray head, booted from the host.
    "tools/sandbox cluster ": "tests/system/test_cluster.py (the docs' block, as written)",
    "tools/make-busybox-image /var/tmp/quilt-cluster-": "tests/system/test_cluster.py",
    "for h in 0 1 2; do tools/sandbox run quilt-cluster-h": "tests/system/test_cluster.py",
    "sudo tools/setup": "installs the host's build tools",
    "tools/build-deb": "builds the package on the host: tests/system/test_package.py",
    "sudo apt install ./out/quiltd_": "installs the package built above: tests/system/test_package.py",
    "sudo usermod -aG quilt ": "names a user of the reader's host: tests/system/test_members.py",
    # Pulls need a registry, which tests/system/test_pull.py runs and these blocks with it.
    "cat > /etc/containers/registries.conf.d/": "the registry's configuration: tests/system/test_pull.py",
    "printf '%s\\n' \"$REGISTRY_PASSWORD\" | skopeo login ": "a registry login: tests/system/test_pull.py",
    "busctl call org.quilt.Quilt1 /org/quilt/Quilt1 org.quilt.Quilt1.Manager ImportImage 'ssa{sv}' "
    "agent-base docker://": "a pull: tests/system/test_pull.py",
    "quiltctl pull ": "a pull: tests/system/test_pull.py",
    "quiltctl run --rm base:1 ": "runs the pulled image: tests/system/test_pull.py",
    "quiltctl run --rm agent-base ": "runs the pulled image: tests/system/test_pull.py",
}


@dataclass(frozen=True)
class Block:
    source: str  # file:line of the opening fence
    commands: tuple[str, ...]


def blocks(path: Path) -> Iterator[Block]:
    """The ```sh blocks of a Markdown file, as logical command lines (comments and blanks left out)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```sh":
            i += 1
            continue
        start, i = i + 1, i + 1
        commands: list[str] = []
        current = ""
        while lines[i].strip() != "```":
            line = lines[i]
            i += 1
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            heredoc = re.search(r"<<-?'?(\w+)'?\s*$", line)
            if heredoc:  # the document's lines are part of the command, up to its terminator
                while lines[i].strip() != heredoc.group(1):
                    current += "\n" + lines[i]
                    i += 1
                current += "\n" + lines[i]
                i += 1
            if current.strip() and not current.strip().startswith("#"):
                commands.append(current.strip())
            current = ""
        yield Block(f"{path.relative_to(REPO)}:{start}", tuple(commands))
        i += 1


def host_only(command: str) -> bool:
    return any(command.startswith(prefix) for prefix in HOST_ONLY)


ALL = [b for path in DOCS for b in blocks(path)]
RUNNABLE = [b for b in ALL if not all(host_only(c) for c in b.commands)]


def test_the_blocks_are_found_and_each_is_run_or_listed_as_host_only() -> None:
    assert len(ALL) >= 12
    for block in ALL:
        kinds = {host_only(c) for c in block.commands}
        assert len(kinds) == 1, f"{block.source} mixes commands run here with host-only ones"
    used = {p for p in HOST_ONLY for b in ALL for c in b.commands if c.startswith(p)}
    assert used == set(HOST_ONLY), f"HOST_ONLY lists commands no doc has: {set(HOST_ONLY) - used}"


@pytest.fixture(scope="module")
def docs_sandbox(sandbox_module: ModuleType, sandbox_name: Callable[[str], str]) -> Iterator[Any]:
    """A sandbox of its own: the docs import images and name containers as they like."""
    sb = sandbox_module.Sandbox.start(sandbox_name("docs"), share=[REPO], die_with_parent=True)
    try:
        sb.install(REPO)
        subprocess.run([str(REPO / "tools/make-busybox-image"), str(sb.host_path(TARBALL))],
                       check=True, capture_output=True)
        for path in IMAGE_PATHS:
            sb.run(["sh", "-c", f'mkdir -p "${{1%/*}}" && cp {TARBALL} "$1"', "sh", path])
        # As the package does at install: the socket listens from the start.
        sb.run(["systemctl", "start", "quiltd.socket"])
        yield sb
    finally:
        sb.stop()


def busctl(sb: Any, *args: str) -> str:
    out: str = sb.run(["busctl", "--json=short", "call", *BUS, *args], timeout=120).stdout.decode()
    return out


def reset(sb: Any) -> None:
    """No container, no image, no network but the default: as on a fresh install."""
    for row in json.loads(busctl(sb, "ListContainers", "a{sv}", "0"))["data"][0]:
        busctl(sb, "RemoveContainer", "sb", row[0], "true")
    for row in json.loads(busctl(sb, "ListNetworks"))["data"][0]:
        if row[0] != "bridge":
            busctl(sb, "RemoveNetwork", "s", row[0])
    for row in json.loads(busctl(sb, "ListImages"))["data"][0]:
        if row[0] != "host":
            busctl(sb, "RemoveImage", "s", row[0])


def prepare(sb: Any, block: Block) -> dict[str, str]:
    """Makes what the block takes as given; returns the placeholders' values.

    A block that imports busybox starts from nothing; one that creates the
    container demo, from the image; any other, from a running demo with
    one background exec.
    """
    text = "\n".join(block.commands)
    reset(sb)
    if re.search(r"import busybox |ImportImage \S+ busybox ", text):
        return {}
    busctl(sb, "ImportImage", "ssa{sv}", "busybox", TARBALL, "0")
    if re.search(r"CreateContainer \S+ demo ", text):
        return {}
    busctl(sb, "CreateContainer", "ssasa{sv}", "demo", "busybox", "2", "sleep", "600", "0")
    busctl(sb, "WaitContainerStarted", "st", "demo", "0")
    exec_id = json.loads(busctl(sb, "ExecStart", "sasa{sv}", "demo", "2", "echo", "from an exec", "0"))
    return {"<exec id>": exec_id["data"][0]}


def placeholders(sb: Any, command: str, given: dict[str, str]) -> str:
    if "<id>" in command:
        info = json.loads(busctl(sb, "GetContainerInfo", "s", "demo"))["data"][0]
        command = command.replace("<id>", info["Id"]["data"])
    for key, value in given.items():
        command = command.replace(key, value)
    assert "<" not in command.replace("<uint64", "").replace("<{", "").replace("<'", ""), \
        f"a placeholder with no value: {command}"
    return command


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.source for b in RUNNABLE])
def test_doc_block_runs_as_written(docs_sandbox: Any, block: Block) -> None:
    sb = docs_sandbox
    given = prepare(sb, block)
    for written in block.commands:
        command = placeholders(sb, written, given)
        # Root already: sudo (not installed here) would change nothing.
        script = f"sudo() {{ \"$@\"; }}\n{command}"
        follow = any(command.startswith(f) for f in FOLLOWS)
        argv = ["timeout", str(FOLLOW_SEC), "sh", "-c", script] if follow else ["sh", "-c", script]
        r = sb.run(argv, check=False, timeout=180, env={"PATH": PATH})
        ok = {0, 124} if follow else {0, *next((v for k, v in ALSO_OK.items() if command.startswith(k)), ())}
        assert r.returncode in ok, (
            f"{block.source}: `{written}` exited {r.returncode}\n"
            f"stdout: {r.stdout.decode(errors='replace')[-2000:]}\n"
            f"stderr: {r.stderr.decode(errors='replace')[-2000:]}"
        )


def test_dbus_send_cannot_pass_options_as_api_md_says(docs_sandbox: Any) -> None:
    # docs/api.md sends readers to busctl or gdbus for options: dbus-send has no way to write them.
    argv = ["dbus-send", "--system", "--print-reply", "--dest=org.quilt.Quilt1", "/org/quilt/Quilt1",
            "org.quilt.Quilt1.Manager.ListContainers"]
    r = docs_sandbox.run([*argv, "dict:string:variant:state,string:running"], check=False)
    assert r.returncode != 0 and b"variant" in r.stderr.lower(), r.stderr
