"""Debian roots as mmdebstrap, debootstrap + tar, `podman export` and cloud tarballs write them.

The archives are built by the real tools (tests/distroimages.py, cached under
/var/cache) and handed to the daemon as a descriptor, so a 200 MB root is
neither copied into the sandbox nor looked up there by name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from quiltd.client import Quilt
from tests import distroimages
from tests import imagebuilders as b
from tests.system.conftest import REPO, run

pytestmark = pytest.mark.system


def _devices(archive: Path) -> int:
    """Character and block device members, counted as a user would with tar -tv."""
    listing = subprocess.run(["tar", "-tvf", str(archive)], check=True, capture_output=True).stdout
    return sum(1 for line in listing.splitlines() if line[:1] in (b"c", b"b"))


def _journal(sandbox: Any, image: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        out = sandbox.run(["journalctl", "-u", "quiltd", f"QUILT_IMAGE={image}", "-o", "json",
                           "--no-pager"]).stdout.decode()
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def _host_devices(sandbox: Any) -> str:
    found = sandbox.run(["find", "/var/lib/quilt/images", "(", "-type", "c", "-o", "-type", "b", ")"])
    return found.stdout.decode()


async def _import(q: Any, image: str, archive: Path) -> dict[str, Any]:
    fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result: dict[str, Any] = await q.import_image_fd_ex(image, fd)
        return result
    finally:
        os.close(fd)


async def _sh(q: Any, container: str, script: str) -> str:
    code, out, err = await q.exec(container, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return str(out.decode())


def _doc_example() -> list[str]:
    """The commands of docs/images.md's Debian example, as written there."""
    text = (REPO / "docs/images.md").read_text(encoding="utf-8")
    block = text.split("For example, a Debian bookworm root", 1)[1].split("```")[1]
    return [line for line in block.splitlines() if line.strip()]


def test_mmdebstrap_root_runs_an_agent_session(sandbox: Any, quilt: Any, name: str) -> None:
    build, load = _doc_example()
    archive = distroimages.mmdebstrap_tar(shlex.split(build), "debian.tar")
    devices = _devices(archive)
    assert devices >= 5  # mmdebstrap's /dev: console, null, zero, full, random, ...
    workdir = f"/var/tmp/quilt-doc-{secrets.token_hex(3)}"
    sandbox.host_path(workdir).mkdir()
    shutil.copyfile(archive, sandbox.host_path(f"{workdir}/debian.tar"))
    image = "debian"
    try:
        done = sandbox.run(["sh", "-c", f"PATH={REPO}/.venv/bin:$PATH; cd {workdir} && {load}"])
    finally:
        shutil.rmtree(sandbox.host_path(workdir))
    image_id = done.stdout.decode().strip()
    assert re.fullmatch("[0-9a-f]{64}", image_id)
    assert f"skipped {devices} device node(s)" in done.stderr.decode()

    async def scenario() -> None:
        async with quilt() as q:
            try:
                assert (image, image_id) in [r[:2] for r in await q.images()]
                await q.create(name, image, ["sleep", "infinity"])
                try:
                    assert await q.wait_started(name, 30_000_000) == "running"
                    assert await _sh(q, name, "python3 -c 'import sys; print(sys.version_info[0])'") == "3\n"
                    # /etc/alternatives/awk -> /usr/bin/mawk: absolute, resolved in the container.
                    assert await _sh(q, name, "readlink /etc/alternatives/awk; awk 'BEGIN{print 6*7}'") \
                        == "/usr/bin/mawk\n42\n"
                    log = await _sh(q, name, " && ".join([
                        "mkdir -p /srv/work", "cd /srv/work", "git init -q",
                        "git config user.email agent@example.org", "git config user.name agent",
                        "echo 'print(1)' > main.py", "git add main.py", "git commit -qm 'first commit'",
                        "python3 main.py", "git log --format=%s",
                    ]))
                    assert log == "1\nfirst commit\n"
                finally:
                    await q.remove(name, force=True)
                entries = _journal(sandbox, image)
                assert [e["QUILT_SKIPPED_DEVICES"] for e in entries] == [str(devices)]
                assert entries[0]["QUILT_IMAGE_ID"] == image_id
                # As docs/images.md shows it.
                shown = sandbox.run(["journalctl", "-u", "quiltd", "QUILT_IMAGE=debian", "--no-pager"])
                assert f"{devices} device node(s) in it skipped" in shown.stdout.decode()
            finally:
                await q.remove_image(image)

    run(scenario())
    assert _host_devices(sandbox) == ""


@pytest.mark.parametrize("shape", ["tar", "flat", "cloud-xz", "podman-export"])
def test_debootstrap_root_as_users_write_it_imports_and_runs(sandbox: Any, quilt: Any, name: str,
                                                             shape: str) -> None:
    archive = (distroimages.podman_export_tar() if shape == "podman-export"
               else distroimages.debootstrap_tars()[shape])
    devices = _devices(archive)
    # The flat tar is `docker export`'s shape: an empty /dev, top-level names without ./;
    # podman's own export keeps the base's nodes.
    assert (devices == 0) == (shape == "flat")
    image = f"debootstrap-{shape}-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            result = await _import(q, image, archive)
            assert result["SkippedDevices"] == devices
            assert (image, result["Id"], result["SizeBytes"]) in [r[:3] for r in await q.images()]
            try:
                # In a user namespace too: the root's files, its absolute
                # links included, are seen through the idmapped image.
                await q.create(name, image, ["sleep", "infinity"], userns=shape == "flat")
                try:
                    assert await q.wait_started(name, 30_000_000) == "running"
                    out = await _sh(q, name, "cut -d. -f1 /etc/debian_version; ls -l /bin | cut -d'>' -f2; "
                                             "awk 'BEGIN{print 6*7}'; id -un; stat -c %U /etc/passwd")
                    assert out == "12\n usr/bin\n42\nroot\nroot\n"
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(image)

    run(scenario())
    assert _host_devices(sandbox) == ""


def test_device_nodes_are_skipped_counted_and_never_made(sandbox: Any, busybox_image: str) -> None:
    # /dev/mem made in an image directory would be the host's memory for
    # anyone who reaches the directory; it is left out, and counted.
    source = f"/var/tmp/quilt-devices-{secrets.token_hex(3)}.tar"
    sandbox.host_path(source).write_bytes(b.tar_bytes([
        b.directory("dev"), b.device("dev/mem"), b.device("dev/null"), b.symlink("etc", "/etc-real"),
        b.directory("etc-real"), b.file("etc-real/hostname", b"h\n"),
    ]))
    by_path, by_fd = f"devices-{secrets.token_hex(3)}", f"devices-fd-{secrets.token_hex(3)}"
    try:
        with Quilt(sandbox.bus_address) as quilt:
            result = quilt.import_image_ex(by_path, source)
            quilt.remove_image(by_path)
            assert (result["Name"], result["Format"], result["SkippedDevices"]) == (by_path, "rootfs", 2)
            fd = os.open(sandbox.host_path(source), os.O_RDONLY | os.O_CLOEXEC)
            try:
                result = quilt.import_image_fd_ex(by_fd, fd)
            finally:
                os.close(fd)
            quilt.remove_image(by_fd)
            assert result["SkippedDevices"] == 2
    finally:
        sandbox.host_path(source).unlink()
    assert [e["QUILT_SKIPPED_DEVICES"] for e in _journal(sandbox, by_path)] == ["2"]
    assert _host_devices(sandbox) == ""


@pytest.mark.parametrize("layout", ["docker", "oci"])
def test_base_layer_with_dev_nodes_imports(sandbox: Any, quilt: Any, layout: str, name: str) -> None:
    base = b.tar_bytes([b.directory("dev"), b.device("dev/console"), b.device("dev/null"),
                        b.directory("bin"), b.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755),
                        b.symlink("bin/sh", "/bin/busybox")])
    top = b.tar_bytes([b.file("hello", b"hi\n")])
    files = (b.docker_files if layout == "docker" else b.oci_files)([base, top], {"Cmd": ["/bin/sh"]})
    source = f"/var/tmp/quilt-devlayer-{secrets.token_hex(3)}.tar"
    b.write_tar(files, sandbox.host_path(source))
    image = f"devlayer-{layout}-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            result = await q.import_image_ex(image, source)
            try:
                assert (result["Format"], result["SkippedDevices"]) == (layout, 2)
                await q.create(name, image, ["/bin/busybox", "cat", "/hello"])
                try:
                    assert await q.wait(name, 30_000_000) == ("exited", 0)
                    assert [line for _, _, line in await q.logs(name)] == ["hi"]
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(image)

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
