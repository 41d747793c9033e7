"""Registry pulls against a real registry (Debian's docker-registry) running in the sandbox.

The registry listens on 127.0.0.1:5000 without authentication and on
127.0.0.1:5001 with htpasswd authentication, both over plain HTTP and on one
storage. A three-layer image built from busybox is pushed to it by skopeo.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from quiltd import errors
from quiltd.images.pull import host_arch
from tests import imagebuilders as b
from tests.system.conftest import BUS, BUSYBOX_TARBALL, REPO, run
from tests.system.test_access import AS_MEMBER, member  # noqa: F401  (the fixture)

pytestmark = pytest.mark.system

OPEN = "127.0.0.1:5000"
AUTH = "127.0.0.1:5001"
USER, PASSWORD = "agent", "secret"
# bcrypt of PASSWORD, as `htpasswd -B` writes it (the registry takes bcrypt only).
HTPASSWD = f"{USER}:$2b$12$ZMuG1MWn5qS7bW/Lo9u4h.wnwyPidaFoQheoC05fbX4vvYI6tbkdu\n"
UNITS = ("quilt-test-registry", "quilt-test-registry-auth", "quilt-test-stall")
REGISTRIES_CONF = "/etc/containers/registries.conf.d/50-local-registry.conf"
AUTH_FILES = ("/run/containers/0/auth.json", "/root/.config/containers/auth.json")
PULLS = "/var/lib/quilt/pulls"
IMAGES = "/var/lib/quilt/images"
STALLED = "127.0.0.1:5009"  # accepts connections and never answers
DOWN = "127.0.0.1:5008"  # nothing listens
PATH = f"PATH={REPO / '.venv/bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
HELLO = "hello from a registry"


def doc_blocks(doc: str, heading: str) -> list[str]:
    """The ```sh blocks of one section of a doc (up to the next heading of its level or above)."""
    text = (REPO / doc).read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading):]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    section = rest[:end.start()] if end else rest
    return re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)


IMAGES_BLOCKS = doc_blocks("docs/images.md", "## Pulling from a registry")
CTL_BLOCKS = doc_blocks("docs/quiltctl.md", "## pull")


@dataclass(frozen=True)
class Registry:
    config_digest: str  # sha256:... of the base image's config: its image id
    workdir: str  # a directory of the sandbox, for archives


def sh(sandbox: Any, script: str, check: bool = True) -> Any:
    """A shell script run as root in the sandbox, as a user runs the docs' commands."""
    return sandbox.run(["env", PATH, f"REGISTRY_PASSWORD={PASSWORD}",
                        "bash", "-euo", "pipefail", "-c", script], check=check)


def layers(sandbox: Any) -> list[bytes]:
    base = sandbox.host_path(BUSYBOX_TARBALL).read_bytes()
    second = b.compress(b.tar_bytes([b.directory("srv"), b.file("srv/hello", f"{HELLO}\n".encode()),
                                     b.file("srv/old", b"gone in the next layer\n")]), "gzip")
    third = b.compress(b.tar_bytes([b.directory("srv"), b.file("srv/extra", b"x"), b.whiteout("srv/old")]),
                       "gzip")
    return [base, second, third]


def push(sandbox: Any, layout: str, reference: str) -> None:
    deadline = time.monotonic() + 20
    while True:  # the registry may still be starting
        result = sandbox.run(["skopeo", "copy", f"oci:{layout}:latest", f"docker://{reference}"], check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(result.stderr.decode())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def registry(sandbox: Any, busybox_image: str) -> Iterator[Registry]:
    work = f"/var/tmp/quilt-pull-{secrets.token_hex(4)}"
    host = sandbox.host_path(work)
    host.mkdir()
    (host / "htpasswd").write_text(HTPASSWD)
    for name, addr, auth in (("open.yml", OPEN, ""), ("auth.yml", AUTH, (
            f"auth:\n  htpasswd:\n    realm: quilt-test\n    path: {work}/htpasswd\n"))):
        (host / name).write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {work}/store\n"
                                 f"http:\n  addr: {addr}\n{auth}")
    (host / "stall.py").write_text(
        "import socket\ns = socket.create_server(('127.0.0.1', 5009))\nheld = []\n"
        "while True:\n    held.append(s.accept())\n")
    sh(sandbox, IMAGES_BLOCKS[0])  # the docs' registries.conf: both registries are plain HTTP
    sandbox.run(["systemd-run", f"--unit={UNITS[0]}", "docker-registry", "serve", f"{work}/open.yml"])
    sandbox.run(["systemd-run", f"--unit={UNITS[1]}", "docker-registry", "serve", f"{work}/auth.yml"])
    sandbox.run(["systemd-run", f"--unit={UNITS[2]}", "python3", f"{work}/stall.py"])
    try:
        base = layers(sandbox)
        b.write_dir(b.oci_files(base, {"Cmd": ["cat", "/srv/hello"]},
                                {"org.opencontainers.image.ref.name": "latest"}), host / "base")
        push(sandbox, f"{work}/base", f"{OPEN}/agents/base:1")
        other = json.loads(b.config_json({}, base))
        other["architecture"] = "s390x" if host_arch() != "s390x" else "arm64"
        files = b.oci_files(base, {}, {"org.opencontainers.image.ref.name": "latest"})
        files = _with_config(files, json.dumps(other).encode())
        b.write_dir(files, host / "other-arch")
        push(sandbox, f"{work}/other-arch", f"{OPEN}/agents/other-arch:1")
        unique = b.compress(b.tar_bytes([b.file("bad", secrets.token_bytes(4096))]), "gzip")
        b.write_dir(b.oci_files([base[0], unique], {}, {"org.opencontainers.image.ref.name": "latest"}),
                    host / "bad")
        push(sandbox, f"{work}/bad", f"{OPEN}/agents/bad:1")
        # The registry now serves other bytes under the layer's digest.
        digest = hashlib.sha256(unique).hexdigest()
        blob = host / "store/docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
        blob.write_bytes(bytes(len(unique)))
        cfg = b.config_json({"Cmd": ["cat", "/srv/hello"]}, base)
        yield Registry("sha256:" + hashlib.sha256(cfg).hexdigest(), work)
    finally:
        sandbox.run(["systemctl", "stop", *UNITS], check=False)
        sandbox.run(["rm", "-rf", work, REGISTRIES_CONF, *AUTH_FILES], check=False)


def _with_config(files: dict[str, bytes], config: bytes) -> dict[str, bytes]:
    """An OCI layout's files with its config replaced (and its manifest and index to match)."""
    index = json.loads(files["index.json"])
    old_manifest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads(files.pop(f"blobs/sha256/{old_manifest}"))
    files.pop(f"blobs/sha256/{manifest['config']['digest'].removeprefix('sha256:')}")
    config_hex = hashlib.sha256(config).hexdigest()
    files[f"blobs/sha256/{config_hex}"] = config
    manifest["config"].update(digest=f"sha256:{config_hex}", size=len(config))
    raw = json.dumps(manifest).encode()
    files[f"blobs/sha256/{hashlib.sha256(raw).hexdigest()}"] = raw
    index["manifests"][0].update(digest=f"sha256:{hashlib.sha256(raw).hexdigest()}", size=len(raw))
    files["index.json"] = json.dumps(index).encode()
    return files


def image_names(sandbox: Any) -> list[str]:
    return re.findall(r'"([^"]+)" "[0-9a-f]{64}"', sandbox.run(["busctl", "call", *BUS, "ListImages"])
                      .stdout.decode())


def state(sandbox: Any) -> tuple[list[str], list[str], list[str]]:
    """Images on record, image directories, pull directories: what a failed pull must leave as it was."""
    listing = sandbox.run(["sh", "-c", f"ls -A {IMAGES}; echo --; ls -A {PULLS} 2>/dev/null || true"])
    dirs, pulls = listing.stdout.decode().split("--\n")
    return sorted(image_names(sandbox)), sorted(dirs.split()), sorted(pulls.split())


def ctl(sandbox: Any, *args: str, check: bool = True) -> Any:
    return sandbox.run([str(REPO / ".venv/bin/quiltctl"), *args], check=check)


def remove_images(quilt: Any, *names: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            for image in names:
                with contextlib.suppress(errors.NoSuchImage):
                    await q.remove_image(image)

    run(scenario())


def test_pull_by_tag_reports_progress_and_the_image_runs(sandbox: Any, quilt: Any,
                                                         registry: Registry) -> None:
    image = f"pulled-{secrets.token_hex(3)}"
    progress: list[list[Any]] = []

    async def scenario() -> str:
        async with quilt() as q:
            await q.watch_signal("ImportProgress", progress.append)
            return await q.pull(image, f"docker://{OPEN}/agents/base:1")

    try:
        assert run(scenario()) == registry.config_digest.removeprefix("sha256:")
        # All three layers, in order: the third's whiteout hides the second's srv/old.
        out = ctl(sandbox, "run", "--rm", image, "sh", "-c", "cat /srv/hello; ls /srv").stdout.decode()
        assert out == f"{HELLO}\nextra\nhello\n"
    finally:
        remove_images(quilt, image)
    ours = [(done, total) for name, done, total in progress if name == image]
    downloads = [done for done, total in ours if total == 0]
    assert downloads and downloads[-1] > 1_000_000, ours  # busybox's layer, at least
    assert ours[-1][0] == ours[-1][1] > 0, ours
    assert state(sandbox)[2] == []


def test_pull_by_digest_gets_the_same_image(sandbox: Any, quilt: Any, registry: Registry) -> None:
    digest = sandbox.run(["skopeo", "inspect", "--format", "{{.Digest}}",
                          f"docker://{OPEN}/agents/base:1"]).stdout.decode().strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    try:
        image_id = ctl(sandbox, "pull", f"{OPEN}/agents/base@{digest}").stdout.decode().strip()
        assert image_id == registry.config_digest.removeprefix("sha256:")
        name = "base:" + digest.removeprefix("sha256:")[:12]
        assert name in image_names(sandbox)
        assert ctl(sandbox, "run", "--rm", name, "cat", "/srv/hello").stdout.decode() == f"{HELLO}\n"
    finally:
        remove_images(quilt, "base:" + digest.removeprefix("sha256:")[:12])


@pytest.mark.parametrize(("source", "options", "error", "says"), [
    (f"docker://{OPEN}/agents/base:2", {}, errors.NoSuchImage, "no such image or tag"),
    (f"docker://{OPEN}/agents/none:1", {}, errors.NoSuchImage, "no such image or tag"),
    (f"docker://{OPEN}/agents/base@sha256:{'0' * 64}", {}, errors.NoSuchImage, "no such image or tag"),
    (f"docker://{DOWN}/agents/base:1", {}, errors.Unreachable, "connection refused"),
    (f"docker://{STALLED}/agents/base:1", {"timeout_sec": 2}, errors.Timeout, "did not answer within 2 s"),
    (f"docker://{AUTH}/agents/base:1", {}, errors.AccessDenied, "refused the login"),
    (f"docker://{OPEN}/agents/other-arch:1", {}, errors.InvalidImage, "this host runs linux/"),
    (f"docker://{OPEN}/agents/bad:1", {}, errors.InvalidImage, "does not match its digest"),
    (f"docker://{OPEN}/agents/base:1", {"max_bytes": 100_000}, errors.LimitExceeded, "max_bytes"),
    ("dir:/etc", {}, errors.InvalidArgument, "not taken"),
    ("docker://busybox", {}, errors.InvalidArgument, "names no registry"),
])
def test_a_failed_pull_names_its_cause_and_leaves_nothing(sandbox: Any, quilt: Any, registry: Registry,
                                                          source: str, options: dict[str, int],
                                                          error: type[errors.QuiltError], says: str) -> None:
    before = state(sandbox)
    image = f"failed-{secrets.token_hex(3)}"
    started = time.monotonic()

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(error) as caught:
                await q.pull(image, source, **options)
            assert says in caught.value.message, caught.value.message

    run(scenario())
    assert time.monotonic() - started < 30
    assert state(sandbox) == before


def test_a_refused_login_then_the_docs_login_and_pulls(sandbox: Any, quilt: Any, registry: Registry) -> None:
    wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
    sandbox.host_path("/run/containers/0").mkdir(parents=True, exist_ok=True)
    sandbox.host_path(AUTH_FILES[0]).write_text(json.dumps({"auths": {AUTH: {"auth": wrong}}}))
    before = state(sandbox)
    refused = ctl(sandbox, "pull", "--name", "refused", f"{AUTH}/agents/base:1", check=False)
    assert refused.returncode == 1
    assert b"refused the login" in refused.stderr and b"(AccessDenied)" in refused.stderr, refused.stderr
    assert state(sandbox) == before
    sandbox.run(["rm", AUTH_FILES[0]])
    sh(sandbox, IMAGES_BLOCKS[1])  # skopeo login into the persistent auth file
    try:
        out = sh(sandbox, IMAGES_BLOCKS[2]).stdout.decode()
        assert out.splitlines() == [f's "{registry.config_digest.removeprefix("sha256:")}"',
                                    registry.config_digest.removeprefix("sha256:"), HELLO]
    finally:
        remove_images(quilt, "agent-base", "base:1")
        sandbox.run(["rm", "-f", AUTH_FILES[1]])


def test_quiltctl_docs_pull_runs_as_written(sandbox: Any, quilt: Any, registry: Registry) -> None:
    (block,) = CTL_BLOCKS
    try:
        out = sh(sandbox, block).stdout.decode()
        assert out.splitlines() == [registry.config_digest.removeprefix("sha256:"), HELLO]
    finally:
        remove_images(quilt, "agent-base")
    missing = ctl(sandbox, "pull", f"{OPEN}/agents/base:404", check=False)
    assert missing.returncode == 1 and b"(NoSuchImage)" in missing.stderr, missing.stderr


def test_archive_transports_read_as_the_caller(sandbox: Any, quilt: Any, registry: Registry,
                                                member: str) -> None:  # noqa: F811
    archive = f"{registry.workdir}/base-oci.tar"
    sandbox.run(["skopeo", "copy", f"docker://{OPEN}/agents/base:1", f"oci-archive:{archive}:agents/base:1"])
    sandbox.run(["chmod", "0600", archive])  # root's own file: a member may not read it
    call = ["busctl", "call", *BUS, "ImportImage", "ssa{sv}"]
    try:
        got = sandbox.run([*call, "from-archive", f"oci-archive:{archive}:agents/base:1", "0"])
        assert registry.config_digest.removeprefix("sha256:") in got.stdout.decode()
        before = state(sandbox)
        for source, says in ((f"oci-archive:{archive}", "may not read"),
                             ("oci-archive:/etc/shadow", "may not read"),
                             ("docker-archive:/etc/shadow", "may not read"),
                             ("dir:/etc", "not taken"), ("oci:/var/lib/quilt", "not taken")):
            refused = sandbox.run([*AS_MEMBER, *call, "member-archive", source, "0"], check=False)
            assert refused.returncode != 0 and says in refused.stderr.decode(), (source, refused.stderr)
        assert state(sandbox) == before
        # A member pulls from a registry as root would.
        pulled = sandbox.run([*AS_MEMBER, *call, "member-pull", f"docker://{OPEN}/agents/base:1", "0"])
        assert registry.config_digest.removeprefix("sha256:") in pulled.stdout.decode()
    finally:
        remove_images(quilt, "from-archive", "member-pull")


def test_recovery_removes_what_a_cut_off_pull_left(sandbox: Any, quilt: Any, registry: Registry) -> None:
    leftover = f"{PULLS}/0123456789abcdef"
    sandbox.run(["mkdir", "-p", f"{leftover}/layout/blobs"])
    sandbox.run(["systemctl", "restart", "quiltd"])
    deadline = time.monotonic() + 10
    while sandbox.run(["test", "-e", leftover], check=False).returncode == 0:
        assert time.monotonic() < deadline, "the leftover pull directory is still there"
        time.sleep(0.1)
    journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
    assert f"pull directory {leftover} is left from a pull cut off" in journal


def test_registries_conf_block_is_the_one_the_registry_fixture_ran() -> None:
    # The fixture runs IMAGES_BLOCKS[0]; it must be the registries.conf of the two registries.
    assert REGISTRIES_CONF in IMAGES_BLOCKS[0] and OPEN in IMAGES_BLOCKS[0] and AUTH in IMAGES_BLOCKS[0]
    assert len(IMAGES_BLOCKS) == 3 and len(CTL_BLOCKS) == 1


def test_skopeo_runs_as_nobody_without_capabilities(sandbox: Any, quilt: Any, registry: Registry) -> None:
    seen: list[str] = []

    async def scenario() -> None:
        async with quilt() as q:
            pulling = asyncio.ensure_future(q.pull("stalled", f"docker://{STALLED}/agents/base:1",
                                                   timeout_sec=5))
            deadline = time.monotonic() + 4
            while not seen and time.monotonic() < deadline:
                found = sandbox.run(["sh", "-c", "for p in $(pgrep -x skopeo); do "
                                     "stat -L -c '%U %a' /proc/$p/cwd; grep -E '^(Uid|CapEff|CapPrm)' "
                                     "/proc/$p/status | tr -s '\\t' ' '; done"], check=False)
                seen.extend(found.stdout.decode().splitlines())
                await asyncio.sleep(0.1)
            with pytest.raises(errors.Timeout):
                await pulling

    run(scenario())
    assert seen[:4] == ["nobody 700", "Uid: 65534 65534 65534 65534", "CapPrm: 0000000000000000",
                        "CapEff: 0000000000000000"], seen
