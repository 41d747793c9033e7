"""Parsing pull sources and options, and naming skopeo's failures, without a registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from quiltd import errors
from quiltd.cli import ctl
from quiltd.images import pull
from quiltd.images.pull import PullSource, Transport

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("source", "expected"), [
    ("/var/tmp/x.tar", None),
    ("docker://127.0.0.1:5000/agents/bb:1", PullSource(Transport.DOCKER, "127.0.0.1:5000/agents/bb:1")),
    ("docker://registry.example/bb", PullSource(Transport.DOCKER, "registry.example/bb:latest")),
    ("docker://localhost/a/b@" + DIGEST, PullSource(Transport.DOCKER, "localhost/a/b@" + DIGEST)),
    ("oci-archive:/srv/a.tar", PullSource(Transport.OCI_ARCHIVE, "/srv/a.tar")),
    ("docker-archive:/srv/a.tar:busybox:latest",
     PullSource(Transport.DOCKER_ARCHIVE, "/srv/a.tar", "busybox:latest")),
])
def test_sources_are_parsed(source: str, expected: PullSource | None) -> None:
    assert pull.parse_source(source) == expected


@pytest.mark.parametrize(("source", "says"), [
    ("docker:busybox", "docker://HOST"),
    ("docker://busybox", "names no registry"),
    ("docker://library/busybox:latest", "names no registry"),
    ("docker://host.example/Upper/case", "not an image reference"),
    ("docker://host.example/a:b:c", "not an image reference"),
    ("docker://host.example/a --src-creds x", "not an image reference"),
    ("docker://host.example/a@sha256:short", "not an image reference"),
    ("oci-archive:relative.tar", "must be absolute"),
    ("oci:/etc", "not taken"),
    ("dir:/etc", "not taken"),
    ("containers-storage:busybox", "not taken"),
    ("docker-daemon:busybox:latest", "not taken"),
    ("http://host/x", "unknown image source"),
])
def test_bad_sources_are_refused_with_the_reason(source: str, says: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=says):
        pull.parse_source(source)


def test_a_relative_path_is_left_to_the_path_import() -> None:
    assert pull.parse_source("image.tar") is None


def fatal(msg: str) -> str:
    return f'Getting image source signatures\ntime="2026-01-01T00:00:00Z" level=fatal msg="{msg}"\n'


@pytest.mark.parametrize(("stderr", "error", "says"), [
    (fatal("reading manifest 2 in h/bb: manifest unknown: manifest unknown"), errors.NoSuchImage, "no such"),
    (fatal("reading manifest 1 in h/bb: unauthorized: authentication required"), errors.AccessDenied,
     "refused the login"),
    (fatal("pinging container registry h: Get \\\"http://h/v2/\\\": context deadline exceeded"),
     errors.Timeout, "within 7 s"),
    (fatal("dial tcp 127.0.0.1:1: connect: connection refused"), errors.Unreachable, "cannot reach"),
    (fatal("http: server gave HTTP response to HTTPS client"), errors.Unreachable, "insecure = true"),
    (fatal("writing blob: Digest did not match, expected sha256:1, got sha256:2"), errors.InvalidImage,
     "does not match its digest"),
    (fatal("choosing image instance: no image found in manifest list for architecture amd64"),
     errors.InvalidImage, "no image for"),
    (fatal("open /x: permission denied"), errors.InvalidImage, "pull failed"),
    ("", errors.InvalidImage, "without a message"),
])
def test_skopeo_failures_get_named_errors(stderr: str, error: type[errors.QuiltError], says: str) -> None:
    got = pull.classify("docker://h/bb:1", stderr, 7)
    assert type(got) is error
    assert says in got.message and got.message.startswith("docker://h/bb:1: ")


def test_an_image_for_another_architecture_is_refused(tmp_path: Path) -> None:
    def blob(data: dict[str, object]) -> str:
        raw = json.dumps(data).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (tmp_path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (tmp_path / "blobs/sha256" / digest).write_bytes(raw)
        return "sha256:" + digest

    def layout(arch: str) -> None:
        config = blob({"architecture": arch, "os": "linux"})
        manifest = blob({"config": {"digest": config}, "layers": []})
        (tmp_path / "index.json").write_text(json.dumps({"manifests": [{"digest": manifest}]}))

    layout(pull.host_arch())
    pull.check_platform(tmp_path, "x")
    other = "s390x" if pull.host_arch() != "s390x" else "amd64"
    layout(other)
    with pytest.raises(errors.InvalidImage, match=f"is for linux/{other}; this host runs linux/"):
        pull.check_platform(tmp_path, "x")


@pytest.mark.parametrize(("given", "name"), [
    ("127.0.0.1:5000/agents/bb:1", "bb:1"),
    ("registry.example/tools/python", "python:latest"),
    ("docker://h.example/a/bb@" + DIGEST, "bb:" + "ab" * 6),
    ("oci-archive:/srv/images/agent.tar", "agent"),
    ("docker-archive:/srv/all.tar:busybox:latest", "busybox:latest"),
])
def test_quiltctl_pull_names_the_image_from_its_source(given: str, name: str) -> None:
    assert ctl._pull_name(ctl._pull_source(given)) == name
    args = ctl.build_parser().parse_args(["pull", "--timeout", "30", given])
    assert (args.source, args.timeout, args.name) == (given, 30, None)
