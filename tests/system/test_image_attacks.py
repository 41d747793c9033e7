"""A corpus of hostile tarballs through ImportImage: each refused by name, nothing left behind.

(The fork bomb and the memory hog are in test_lifecycle.py, filling the
writable layer past disk_max in test_disk_max.py.)
"""

from __future__ import annotations

import gzip
import secrets
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from tests import imagebuilders as b
from tests.system.conftest import run

pytestmark = pytest.mark.system

BOMB_CAP = 1 << 20
BOMB = gzip.compress(b.tar_bytes([b.directory("big"), b.file("big/zeros", bytes(10 * BOMB_CAP))]))

CORPUS = {
    "traversal": (b.tar_bytes([b.file("../../../../tmp/quilt-escaped", b"x")]), r"\.\./\.\./"),
    "absolute-path": (b.tar_bytes([b.file("/tmp/quilt-escaped", b"x")]), "'/tmp/quilt-escaped'"),
    # An absolute link is stored (it resolves in the container's root), but
    # nothing is ever written through it.
    "write-through-absolute-symlink": (
        b.tar_bytes([b.symlink("tmp", "/tmp"), b.file("tmp/quilt-escaped", b"x")]),
        "'tmp/quilt-escaped'.*refusing to write through it",
    ),
    "escaping-symlink": (b.tar_bytes([b.directory("a"), b.symlink("a/up", "../../etc")]),
                         "'a/up': symlink target '../../etc' escapes"),
    "hardlink-to-shadow": (b.tar_bytes([b.hardlink("shadow", "/etc/shadow")]),
                           "'shadow': absolute hard link target '/etc/shadow'"),
    "hardlink-up": (b.tar_bytes([b.hardlink("shadow", "../../../etc/shadow")]), "'shadow'.*'\\.\\.'"),
    # A device node is skipped, not refused (test_distro_images.py); one
    # below a link is still refused, by the link.
    "device-node-through-symlink": (b.tar_bytes([b.symlink("dev", "/dev"), b.device("dev/mem")]),
                                    "'dev/mem'.*refusing to write through it"),
}


@pytest.mark.parametrize("attack", sorted(CORPUS))
def test_hostile_tarball_is_invalid_image_naming_the_path(sandbox: Any, quilt: Any, attack: str) -> None:
    data, message = CORPUS[attack]
    source = f"/var/tmp/quilt-attack-{attack}-{secrets.token_hex(3)}.tar"
    sandbox.host_path(source).write_bytes(data)
    images_dir = sandbox.host_path("/var/lib/quilt/images")
    before = sorted(p.name for p in images_dir.iterdir())
    image = f"attack-{attack}"

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidImage, match=message):
                await q.import_image(image, source, max_bytes=BOMB_CAP)
            assert image not in [i[0] for i in await q.images()]
            assert (await q.system_info())["Version"]  # the daemon is unharmed

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
    assert sorted(p.name for p in images_dir.iterdir()) == before
    assert sandbox.run(["test", "-e", "/tmp/quilt-escaped"], check=False).returncode != 0


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd"])
def test_docker_layer_not_matching_its_diff_id_leaves_nothing(sandbox: Any, quilt: Any,
                                                              compression: str) -> None:
    files = b.docker_files([b.compress(b.tar_bytes([b.file("f", b"good")]), compression)], {})
    layer = next(p for p in files if p.endswith("/layer.tar"))
    files[layer] = b.compress(b.tar_bytes([b.file("f", b"evil")]), compression)
    source = f"/var/tmp/quilt-attack-diff-id-{secrets.token_hex(3)}.tar"
    b.write_tar(files, sandbox.host_path(source))
    images_dir = sandbox.host_path("/var/lib/quilt/images")
    before = sorted(p.name for p in images_dir.iterdir())
    image = f"attack-diff-id-{compression}"

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidImage, match=rf"layer 1 \({layer}\): .* diff_id"):
                await q.import_image(image, source)
            assert image not in [i[0] for i in await q.images()]

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
    assert sorted(p.name for p in images_dir.iterdir()) == before


def _import_over_a_limit(sandbox: Any, quilt: Any, data: bytes, image: str, message: str,
                         **options: Any) -> None:
    """Imports data: LimitExceeded naming message, then no image, no row and no directory."""
    source = f"/var/tmp/quilt-attack-{image}-{secrets.token_hex(3)}.tar"
    sandbox.host_path(source).write_bytes(data)
    images_dir = sandbox.host_path("/var/lib/quilt/images")
    before = sorted(p.name for p in images_dir.iterdir())

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.LimitExceeded, match=message):
                await q.import_image(image, source, **options)
            assert image not in [i[0] for i in await q.images()]
            assert (await q.system_info())["Version"]

    try:
        run(scenario())
    finally:
        sandbox.host_path(source).unlink()
    assert sorted(p.name for p in images_dir.iterdir()) == before


def test_a_bomb_past_max_bytes_is_limit_exceeded(sandbox: Any, quilt: Any) -> None:
    assert len(BOMB) < BOMB_CAP  # the archive is under the cap; its content is 10 times over it
    _import_over_a_limit(sandbox, quilt, BOMB, "attack-bomb",
                         "'big/zeros': image content exceeds the limit of 1048576 bytes",
                         max_bytes=BOMB_CAP)


def test_a_sparse_member_counts_its_holes_against_max_bytes(sandbox: Any, quilt: Any) -> None:
    # A few hundred bytes of archive that extract to 256 MiB of zeros.
    data = gzip.compress(b.sparse_tar("holes", 256 << 20))
    assert len(data) < 1024
    _import_over_a_limit(sandbox, quilt, data, "attack-sparse",
                         "'holes': image content exceeds the limit of 67108864 bytes",
                         max_bytes=64 << 20)


def test_an_import_larger_than_the_free_disk_is_refused_before_writing(sandbox: Any, quilt: Any) -> None:
    # The images directory on a 128 MiB filesystem, and an archive of a few
    # hundred bytes whose one file is 256 MiB, well under the default max_bytes.
    # Before anything is written, not after the disk is full: the state
    # database may share the filesystem.
    data = gzip.compress(b.sparse_tar("holes", 256 << 20))
    images = "/var/lib/quilt/images"
    sandbox.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0700", "quilt-small", images])
    try:
        _import_over_a_limit(sandbox, quilt, data, "attack-disk", "'holes': 268435456 bytes do not fit "
                             "in the free space of the image directory's filesystem")
        used = sandbox.run(["df", "--output=used", "-B1", images]).stdout.decode().split()[-1]
        assert int(used) < 1 << 20, f"{used} bytes were written to the images filesystem"
    finally:
        sandbox.run(["umount", images])


def test_max_bytes_option_is_checked(quilt: Any) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="max_bytes"):
                await q.import_image("x", "/var/tmp/none.tar", max_bytes=0)
            with pytest.raises(errors.InvalidArgument, match="unknown option"):
                await q.call("ImportImage", "ssa{sv}", "x", "/var/tmp/none.tar",
                             {"bogus": Variant("b", True)})

    run(scenario())
