"""ExportImage: images written as OCI and docker archives that skopeo, podman and quiltd itself read."""

from __future__ import annotations

import gzip
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests import imagebuilders as b
from tests.system.conftest import BUSYBOX_TARBALL, REPO, run

pytestmark = pytest.mark.system

QUILTCTL = str(REPO / ".venv/bin/quiltctl")
# Exits 0 only with the image's Env, WorkingDir and files.
CONFIG = {"Env": ["PATH=/bin", "GREETING=exported"], "WorkingDir": "/app",
          "Cmd": ["sh", "-c", 'test "$GREETING" = exported && test "$PWD" = /app && test -f hello']}
# What the layers leave, deleted and hidden files included.
CHECK = "cat /app/hello /srv/new; ls /srv; test -e /etc/hostname && echo hostname-left; busybox true"


@pytest.fixture
def layered(sandbox: Any, quilt: Any) -> Iterator[str]:
    """An image of two stored layers: busybox, then a layer that adds, deletes and hides."""
    base = gzip.decompress(Path(sandbox.host_path(BUSYBOX_TARBALL)).read_bytes())
    lower = b.tar_bytes([b.directory("srv"), b.file("srv/old", b"old\n")])
    upper = b.tar_bytes([b.directory("app"), b.file("app/hello", b"hello\n"), b.whiteout("etc/hostname"),
                         b.directory("srv"), b.opaque("srv"), b.file("srv/new", b"new\n")])
    name = f"layered-{secrets.token_hex(3)}"
    source = f"/var/tmp/{name}.tar"
    b.write_tar(b.oci_files([base, lower, upper], CONFIG), Path(sandbox.host_path(source)))

    async def load() -> None:
        async with quilt() as q:
            await q.import_image(name, source)

    try:
        run(load())
    finally:
        os.unlink(sandbox.host_path(source))
    yield name

    async def unload() -> None:  # its layers go with it, so later tests see a store without them
        async with quilt() as q:
            await q.remove_image(name)

    run(unload())


def export_to(sandbox: Any, quilt: Any, image: str, fmt: str, path: str) -> dict[str, Any]:
    async def scenario() -> dict[str, Any]:
        async with quilt() as q:
            fd = os.open(sandbox.host_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return await q.export_image(image, fd, fmt)
            finally:
                os.close(fd)

    return run(scenario())


def sh(sandbox: Any, command: str) -> str:
    return sandbox.run(["sh", "-c", command]).stdout.decode()


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_an_exported_layered_image_reads_in_skopeo_and_imports_again(sandbox: Any, quilt: Any, layered: str,
                                                                     fmt: str) -> None:
    transport = fmt
    path = f"/var/tmp/{layered}.{fmt}.tar"
    again = f"{layered}-again-{fmt[:3]}"
    try:
        info = export_to(sandbox, quilt, layered, fmt, path)
        assert info["bytes"] == os.path.getsize(sandbox.host_path(path))
        inspected = json.loads(sh(sandbox, f"skopeo inspect {transport}:{path}"))
        assert len(inspected["Layers"]) == 3
        assert "GREETING=exported" in inspected["Env"]
        config = json.loads(sh(sandbox, f"skopeo inspect --config {transport}:{path}"))
        assert config["config"]["Cmd"] == CONFIG["Cmd"] and config["config"]["WorkingDir"] == "/app"
        assert config["rootfs"]["diff_ids"] == inspected["Layers"]  # uncompressed: digest = diff_id
        assert info["id"].startswith("sha256:")
        # skopeo checks every blob's digest as it copies.
        sh(sandbox, f"rm -rf {path}.dir && skopeo copy {transport}:{path} dir:{path}.dir")
        if fmt == "docker-archive":
            manifest = json.loads(sh(sandbox, f"tar -xOf {path} manifest.json"))
            assert manifest[0]["RepoTags"] == [f"{layered}:latest"]

        async def reimport() -> bytes:
            async with quilt() as q:
                await q.import_image(again, path)
                name = f"c-{again}"
                await q.create(name, again, [])
                assert await q.wait(name, 30_000_000) == ("exited", 0)  # the image's own command
                await q.remove(name)
                await q.create(name, again, ["sleep", "600"])
                assert await q.wait_started(name) == "running"
                code, out, err = await q.exec(name, ["sh", "-c", CHECK])
                assert code == 0, err
                await q.remove(name, force=True)
                await q.remove_image(again)
                return bytes(out)

        assert run(reimport()) == b"hello\nnew\nnew\n"
    finally:
        sh(sandbox, f"rm -rf {path} {path}.dir")


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_podman_loads_an_exported_image(sandbox: Any, quilt: Any, layered: str, fmt: str) -> None:
    """podman load reads the archive (into a store of its own), its layers and config as exported."""
    path = f"/var/tmp/{layered}.{fmt}.podman.tar"
    store = f"/var/tmp/pm-{secrets.token_hex(3)}"  # podman takes a runroot of 50 characters at most
    podman = f"podman --root {store} --runroot {store}.run --storage-driver vfs --cgroup-manager cgroupfs"
    try:
        export_to(sandbox, quilt, layered, fmt, path)
        loaded = sandbox.run(["sh", "-c", f"{podman} load -i {path}"], check=False)
        assert loaded.returncode == 0, loaded.stderr.decode()
        (image,) = json.loads(sh(sandbox, f"{podman} images --format json"))
        assert any(layered in n for n in image.get("Names") or []), image
        (inspected,) = json.loads(sh(sandbox, f"{podman} image inspect {image['Id']}"))
        assert len(inspected["RootFS"]["Layers"]) == 3
        assert "GREETING=exported" in inspected["Config"]["Env"]
        assert inspected["Config"]["WorkingDir"] == "/app"
    finally:
        sandbox.run(["sh", "-c", f"{podman} rmi -a -f >/dev/null 2>&1; rm -rf {path} {store} {store}.run"],
                    check=False)


def test_export_image_refuses_bad_input(quilt: Any, busybox_image: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            r, w = os.pipe()
            try:
                with pytest.raises(errors.NoSuchImage):
                    await q.export_image("no-such-image", w)
                with pytest.raises(errors.InvalidArgument, match="unknown archive format"):
                    await q.export_image(busybox_image, w, "tar.gz")
                with pytest.raises(errors.InvalidArgument, match="writ"):
                    await q.export_image(busybox_image, r)  # the read end
                with pytest.raises(errors.InvalidArgument, match="host"):
                    await q.export_image("host", w)
                with pytest.raises(errors.InvalidArgument, match="descriptor"):
                    await q.call("ExportImage", "shs", busybox_image, 0, "oci-archive")  # no fd sent
            finally:
                os.close(r)
                os.close(w)
            assert busybox_image in [row[0] for row in await q.images()]

    run(scenario())


def test_export_to_a_reader_that_goes_away_fails_and_the_daemon_goes_on(quilt: Any,
                                                                        busybox_image: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            r, w = os.pipe()
            os.close(r)
            try:
                with pytest.raises(errors.CopyFailed, match="writing the archive failed"):
                    await q.export_image(busybox_image, w)
            finally:
                os.close(w)
            assert (await q.system_info())["Version"]

    run(scenario())


def test_quiltctl_save_writes_podmans_default_format_or_the_one_asked(sandbox: Any,
                                                                      busybox_image: str) -> None:
    out = f"/var/tmp/save-{secrets.token_hex(3)}.tar"
    try:
        sandbox.run([QUILTCTL, "save", "-o", out, busybox_image])
        assert "manifest.json" in sh(sandbox, f"tar -tf {out}").split()  # docker-archive, as podman save
        oci = f"{QUILTCTL} images save --format oci-archive {busybox_image}"
        listed = sh(sandbox, f"{oci} | tar -tf -").split()
        assert {"oci-layout", "index.json"} <= set(listed)
        refused = sandbox.run([QUILTCTL, "save", "-o", f"{out}.2", "no-such-image"], check=False)
        assert refused.returncode != 0 and b"NoSuchImage" in refused.stderr
        assert sandbox.run(["test", "-e", f"{out}.2"], check=False).returncode != 0  # no half archive
    finally:
        sandbox.run(["rm", "-f", out, f"{out}.2"])
