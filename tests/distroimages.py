"""Debian root filesystems built by Debian's own tools, cached across runs.

The formats users bring are what mmdebstrap, debootstrap + tar, `podman
export` and cloud rootfs tarballs write; a hand-made tar would only test
what its author thought of. The builds need the Debian mirror, so they run
on the host, outside the sandbox (which has no network), once: each result
is kept under /var/cache keyed by the build's command line and the tool's
version, so a later run (CI's too) reuses it. Builders run in a private
mount namespace: whatever they mount for their chroot dies with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE = Path("/var/cache/quilt-test-rootfs")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"


def _version(tool: str) -> str:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed; tools/setup installs it")
    query = ["dpkg-query", "-W", "-f=${Version}", tool]
    return subprocess.run(query, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def _cached(kind: str, recipe: list[str], suffix: str) -> Iterator[tuple[Path, Path | None]]:
    """Yields (path, None) when cached, else (path, scratch path to build into then renamed)."""
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    path = CACHE / f"{kind}-{key}{suffix}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        # Two test runs at once build each image once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            yield path, None
            return
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as scratch:
            out = Path(scratch) / f"out{suffix}"
            yield path, out
            os.rename(out, path)


def _private(argv: list[str]) -> None:
    subprocess.run(["unshare", "--mount", "--propagation", "private", "--", *argv],
                   check=True, capture_output=True)


def mmdebstrap_tar(argv: list[str], output: str) -> Path:
    """Runs mmdebstrap's command line argv, its argument `output` (a .tar) standing for the result."""
    assert argv[0] == "mmdebstrap" and argv.count(output) == 1 and output.endswith(".tar")
    with _cached("mmdebstrap", [*argv, _version("mmdebstrap")], ".tar") as (path, out):
        if out is not None:
            _private([str(out) if a == output else a for a in argv])
    return path


@contextlib.contextmanager
def _debootstrap_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".root-") as scratch:
        root = Path(scratch) / "root"
        _private(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR])
        yield root


def debootstrap_tars() -> dict[str, Path]:
    """One debootstrap --variant=minbase root, written as users write it out.

    "tar": `tar -C root -cf OUT .` (names start with ./, /dev as debootstrap
    made it, with its nodes). "flat": top-level names without ./ and an
    empty /dev, as `docker export` writes a container's root (podman_export_tar
    is podman's own, which keeps the nodes). "cloud-xz": a `.tar.xz` as the
    cloud rootfs downloads are, ./ names.
    """
    recipe = ["debootstrap", "--variant=minbase", SUITE, MIRROR, _version("debootstrap"), "tar-v1"]
    shapes = {"tar": ".tar", "flat": ".tar", "cloud-xz": ".tar.xz"}
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    paths = {shape: CACHE / f"debootstrap-{shape}-{key}{suffix}" for shape, suffix in shapes.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    with _cached("debootstrap-all", recipe, ".stamp") as (_, stamp):
        if stamp is not None:
            with _debootstrap_root() as root:
                for shape, path in paths.items():
                    tmp = path.with_name(f".{path.name}.part")
                    if shape == "tar":
                        argv = ["tar", "-C", str(root), "-cf", str(tmp), "."]
                    elif shape == "flat":
                        top = sorted(os.listdir(root))
                        argv = ["tar", "-C", str(root), "--exclude=dev/*", "-cf", str(tmp), *top]
                    else:
                        argv = ["tar", "-C", str(root), "-cJf", str(tmp), "."]
                    env = {**os.environ, "XZ_OPT": "-T0 -3"}
                    subprocess.run(argv, check=True, capture_output=True, env=env)
                    os.rename(tmp, path)
            stamp.write_text("built\n")
    return paths


def podman_export_tar() -> Path:
    """What `podman export` writes for a container of the debootstrap root (created, never run).

    podman keeps its store in a scratch directory and runs in a network
    namespace of its own, so nothing of it reaches this host's podman or
    network.
    """
    base = debootstrap_tars()["tar"]
    recipe = ["podman-export", base.name, _version("podman")]
    with _cached("podman-export", recipe, ".tar") as (path, out):
        if out is not None:
            store = out.parent
            podman = (f"podman --root {store}/root --runroot {store}/run --storage-driver vfs "
                      "--cgroup-manager cgroupfs --events-backend file")
            script = (f"{podman} import {base} localhost/quilt-test-base >/dev/null && "
                      f"id=$({podman} create --network none localhost/quilt-test-base /bin/true) && "
                      f"{podman} export -o {out} $id")
            subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "--",
                            "sh", "-c", script], check=True, capture_output=True)
    return path

