"""Layers kept once: images on one base share it on disk, and the overlay stacks the layers."""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests import distroimages
from tests import imagebuilders as b
from tests.system.conftest import BUS, eventually, run
from tests.system.test_copy import copy_out, members

pytestmark = pytest.mark.system

IMAGES = "/var/lib/quilt/images"
LAYERS = f"{IMAGES}/layers"
BUSYBOX = Path("/bin/busybox").read_bytes()


def _du(sandbox: Any) -> int:
    out = sandbox.run(["du", "-s", "--block-size=1", IMAGES]).stdout.decode()
    return int(out.split()[0])


def _layer_dirs(sandbox: Any) -> list[str]:
    path = sandbox.host_path(LAYERS)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


async def _sh(q: Any, container: str, script: str) -> str:
    code, out, err = await q.exec(container, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return str(out.decode())


def test_two_images_on_one_debian_base_share_it(sandbox: Any, quilt: Any, name: str) -> None:
    base = distroimages.debootstrap_tars()["tar"].read_bytes()
    tag = secrets.token_hex(3)
    refs = [f"agent-a-{tag}:latest", f"agent-b-{tag}:latest"]
    tops = [b.tar_bytes([b.directory("srv"), b.file(f"srv/{who}", who.encode())]) for who in ("a", "b")]
    # One archive of both, as `docker save a b` writes it: the base is in it once.
    archive = b.merged(*(b.docker_files([base, top], {"Cmd": ["sleep", "infinity"]}, tags=[ref])
                         for top, ref in zip(tops, refs, strict=True)))
    source = f"/var/tmp/quilt-shared-{tag}.tar"
    b.write_tar(archive, sandbox.host_path(source))
    del archive
    images = [f"shared-a-{tag}", f"shared-b-{tag}"]
    before = _du(sandbox)
    layers_before = _layer_dirs(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            progress: list[list[Any]] = []
            await q.watch_signal("ImportProgress", progress.append)
            sizes = []
            for image, ref in zip(images, refs, strict=True):
                sizes.append((await q.import_image_ex(image, source, ref=ref))["SizeBytes"])
            # The second import read only its own top layer, not the base again.
            totals = {body[0]: body[2] for body in progress}
            assert totals[images[0]] > len(base) > 1000 * totals[images[1]]
            grown = _du(sandbox) - before
            assert sizes[0] > 100 << 20 and abs(sizes[0] - sizes[1]) < 1 << 20
            # Two full roots would be twice the content; one base and two
            # small layers are about one.
            assert grown < sizes[0] * 1.3, (grown, sizes)
            assert len(_layer_dirs(sandbox)) == len(layers_before) + 3
            for image, who, userns in ((images[0], "a", False), (images[1], "b", True)):
                container = f"{name}-{who}"
                await q.create(container, image, [], userns=userns)
                try:
                    assert await q.wait_started(container, 30_000_000) == "running"
                    out = await _sh(q, container, "cut -d. -f1 /etc/debian_version; ls /srv; "
                                                  "readlink /etc/alternatives/awk")
                    assert out == f"12\n{who}\n/usr/bin/mawk\n"
                finally:
                    await q.remove(container, force=True)
            await q.remove_image(images[0])
            # The base stays for the other image; the first image's top layer goes.
            await eventually(_cleaned(q))
            assert len(_layer_dirs(sandbox)) == len(layers_before) + 2
            await q.create(name, images[1], [])
            try:
                assert await q.wait_started(name, 30_000_000) == "running"
                assert await _sh(q, name, "cat /srv/b; test -e /srv/a || echo no-a") == "bno-a\n"
            finally:
                await q.remove(name, force=True)
            await q.remove_image(images[1])
            await eventually(_cleaned(q))
            assert _layer_dirs(sandbox) == layers_before

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
    assert _du(sandbox) <= before + (1 << 20)


def _cleaned(q: Any) -> Any:
    async def check() -> bool:
        return not (await q.call("GetCleanupStatus"))[0]
    return check


@pytest.mark.parametrize("userns", [False, True])
def test_whiteouts_and_links_of_stacked_layers(sandbox: Any, quilt: Any, name: str, userns: bool) -> None:
    lower = b.tar_bytes([
        b.directory("bin"), b.file("bin/busybox", BUSYBOX, 0o755), b.symlink("bin/sh", "/bin/busybox"),
        b.directory("etc"), b.file("etc/a", b"a"), b.file("etc/b", b"b"),
        b.directory("opt"), b.file("opt/keep", b"k"), b.directory("opt/x"), b.file("opt/x/old", b"o"),
        b.directory("gone"), b.file("gone/f", b"f"),
    ])
    upper = b.tar_bytes([
        b.whiteout("etc/a"), b.whiteout("gone"),
        b.file("opt/x/new", b"n"), b.opaque("opt"), b.file("opt/new", b"n"),
        b.hardlink("etc/b2", "etc/b"),
    ])
    source = f"/var/tmp/quilt-stacked-{secrets.token_hex(3)}.tar"
    config = {"Cmd": ["/bin/busybox", "sleep", "1000"]}
    b.write_tar(b.oci_files([lower, upper], config), sandbox.host_path(source))
    image = f"stacked-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            await q.import_image(image, source)
            try:
                await q.create(name, image, [], userns=userns)
                try:
                    assert await q.wait_started(name, 30_000_000) == "running"
                    # (etc also holds the hosts and resolv.conf quiltd binds there.)
                    script = ("cd /; busybox ls opt opt/x; busybox cat etc/b2; test -e etc/a || echo no-a; "
                              "busybox ls -d gone")
                    code, out, err = await q.exec(name, ["/bin/busybox", "sh", "-c", script])
                    assert out.decode() == "opt:\nnew\nx\n\nopt/x:\nnew\nbno-a\n", err
                    assert code != 0 and b"gone" in err  # whited out
                    assert (await q.exec(name, ["/bin/busybox", "stat", "-c", "%u", "/etc/b"]))[1] == b"0\n"
                    await q.stop(name, 5)
                    # A stopped container's copy mounts the stacked layers itself.
                    got = members(await copy_out(q, name, "/opt"))
                    assert sorted(got) == ["opt", "opt/new", "opt/x", "opt/x/new"]
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(image)

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()


def test_a_layer_refused_after_another_was_stored_leaves_no_layer(sandbox: Any, quilt: Any) -> None:
    tag = secrets.token_hex(3)
    good = b.tar_bytes([b.file(f"good-{tag}", b"fine")])  # new to the store: stored, then taken back
    files = b.docker_files([good, b.tar_bytes([b.file("f", b"good")])], {})
    bad = next(p for p in files if files[p] != good and p.endswith("/layer.tar"))
    files[bad] = b.tar_bytes([b.file("f", b"evil")])
    source = f"/var/tmp/quilt-half-{tag}.tar"
    b.write_tar(files, sandbox.host_path(source))
    before = _layer_dirs(sandbox)

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidImage, match=r"layer 2 .*diff_id"):
                await q.import_image(f"half-{tag}", source)
            await eventually(_cleaned(q))
            assert f"half-{tag}" not in [i[0] for i in await q.images()]

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
    assert _layer_dirs(sandbox) == before


BUILD_BIG = """set -e
cd "$1"
mkdir -p root/d && head -c 400M /dev/zero > root/d/zero
tar -C root -cf layer.tar d && rm -rf root
diff=$(sha256sum layer.tar | cut -d' ' -f1)
gzip -1 layer.tar
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$diff" \
    > config.json
printf '[{"Config":"config.json","RepoTags":["big:latest"],"Layers":["layer.tar.gz"]}]' > manifest.json
tar -cf image.tar config.json manifest.json layer.tar.gz
"""


def test_an_import_cut_off_by_kill_leaves_no_half_layer(sandbox: Any, quilt: Any) -> None:
    # A docker archive of one big layer of zeros: small, and slow to write out.
    work = f"/var/tmp/quilt-big-{secrets.token_hex(3)}"
    sandbox.run(["mkdir", work])
    sandbox.run(["sh", "-c", BUILD_BIG, "build", work], timeout=120)
    before = _layer_dirs(sandbox)
    image = f"big-{secrets.token_hex(3)}"
    importer = subprocess.Popen(sandbox.argv(["busctl", "--timeout=120", "call", *BUS, "ImportImage",
                                              "ssa{sv}", image, f"{work}/image.tar", "0"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async def extracting() -> bool:
            return any(n.startswith(".part-") for n in _layer_dirs(sandbox))

        run(eventually(extracting, timeout=30))
        sandbox.run(["systemctl", "kill", "-s", "KILL", "quiltd"])
        importer.wait(timeout=30)
        assert importer.returncode != 0  # cut off, not finished
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
        sandbox.run(["rm", "-rf", work], check=False)

    async def cleaned() -> bool:
        async with quilt() as q:  # bus activation brings quiltd back
            assert image not in [row[0] for row in await q.images()]
            return _layer_dirs(sandbox) == before and not (await q.call("GetCleanupStatus"))[0]

    run(eventually(cleaned, timeout=30))


def test_a_half_layer_left_by_a_crash_is_removed_at_start(sandbox: Any, quilt: Any) -> None:
    sandbox.run(["systemctl", "stop", "quiltd"])
    layers = sandbox.host_path(LAYERS)
    layers.mkdir(parents=True, exist_ok=True)
    half = layers / f".part-{secrets.token_hex(8)}"
    (half / "usr/bin").mkdir(parents=True)
    (half / "usr/bin/half-written").write_bytes(b"x" * 100)
    stray = layers / secrets.token_hex(32)  # stored, but the image never made it into the store
    (stray / "etc").mkdir(parents=True)

    async def check() -> None:
        async with quilt() as q:  # the call starts quiltd again, by bus activation
            await eventually(_cleaned(q))
    run(check())
    assert not half.exists() and not stray.exists()
    journal = sandbox.run(["journalctl", "-u", "quiltd", "-o", "cat", "--no-pager"]).stdout.decode()
    assert re.search(rf"layer directory {re.escape(str(LAYERS))}/\.part-\w+ is on no record", journal)
