"""OCI layouts and docker save archives through ImportImage, and their config as container defaults."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiltd import errors
from tests import imagebuilders as b
from tests.system.conftest import BUSYBOX_TARBALL, run
from tests.system.test_security import journal_lines

pytestmark = pytest.mark.system

CONFIG = {
    "Env": ["GREETING=hello", "PATH=/bin:/usr/bin"],
    "WorkingDir": "/srv/app",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING from $(pwd) as $(id -u)"; ls /etc/motd 2>&1 | tail -1; echo done 0'],
    "User": "nobody",
}


@pytest.fixture
def archive_dir(sandbox: Any) -> Iterator[Path]:
    """A directory in the sandbox for built archives, seen from the host."""
    inside = f"/var/tmp/quilt-oci-{secrets.token_hex(4)}"
    path = sandbox.host_path(inside)
    path.mkdir()
    try:
        yield path
    finally:
        sandbox.run(["rm", "-rf", inside])


def inside(sandbox: Any, host: Path) -> str:
    return "/" + str(host.relative_to(sandbox.host_path("/")))


def busybox_layers(sandbox: Any) -> list[bytes]:
    base = sandbox.host_path(BUSYBOX_TARBALL).read_bytes()  # a gzip layer, as registries serve them
    upper = b.tar_bytes([b.directory("srv"), b.directory("srv/app", 0o777), b.whiteout("etc/motd"),
                         b.file("srv/app/data", b"x")])
    return [base, upper]


@pytest.mark.parametrize("layout", ["oci-dir", "oci-tar", "docker"])
def test_imported_image_runs_with_its_config_defaults(sandbox: Any, quilt: Any, name: str,
                                                      archive_dir: Path, layout: str) -> None:
    layers = busybox_layers(sandbox)
    if layout == "docker":
        source = b.write_tar(b.docker_files(layers, CONFIG), archive_dir / "image.tar")
    elif layout == "oci-tar":
        source = b.write_tar(b.oci_files(layers, CONFIG), archive_dir / "image.tar")
    else:
        source = b.write_dir(b.oci_files(layers, CONFIG), archive_dir / "layout")
    image = f"oci-{layout}-{secrets.token_hex(3)}"
    progress: list[list[Any]] = []

    async def scenario() -> str:
        async with quilt() as q:
            await q.watch_signal("ImportProgress", progress.append)
            await q.import_image(image, inside(sandbox, source))
            try:
                await q.create(name, image, [])
                try:
                    assert await q.wait(name, 30_000_000) == ("exited", 0)
                    info = await q.info(name)
                    assert info["Command"] == CONFIG["Entrypoint"] + CONFIG["Cmd"]
                    assert (info["Workdir"], info["User"]) == ("/srv/app", "nobody")
                    assert info["Env"] == CONFIG["Env"]
                    return str(info["Id"])
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(image)

    cid = run(scenario())
    lines = journal_lines(sandbox, cid)
    assert lines[0] == "hello from /srv/app as 65534", lines
    assert "No such file or directory" in lines[1], lines  # the whiteout hid the base layer's file
    ours = [p for p in progress if p[0] == image]
    assert ours and ours[-1][1] == ours[-1][2] == sum(len(layer) for layer in layers), ours


def test_options_override_the_image_config(sandbox: Any, quilt: Any, name: str, archive_dir: Path) -> None:
    source = b.write_dir(b.oci_files(busybox_layers(sandbox), CONFIG), archive_dir / "layout")
    image = f"oci-override-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            await q.import_image(image, inside(sandbox, source))
            try:
                await q.create(name, image, ["sh", "-c", "echo $GREETING $(pwd) $(id -u)"],
                               env=["GREETING=bye"], workdir="/", user="root", entrypoint=[], start=False)
                info = await q.info(name)
                assert info["Command"] == ["sh", "-c", "echo $GREETING $(pwd) $(id -u)"]
                assert info["Env"] == ["GREETING=bye", "PATH=/bin:/usr/bin"]
                assert (info["Workdir"], info["User"]) == ("/", "root")
                await q.remove(name)
            finally:
                await q.remove_image(image)

    run(scenario())


def test_remove_image_with_force_takes_ended_containers_only(quilt: Any, name: str,
                                                             sandbox: Any, archive_dir: Path) -> None:
    source = b.write_dir(b.oci_files(busybox_layers(sandbox), CONFIG), archive_dir / "layout")
    image = f"oci-force-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            await q.import_image(image, inside(sandbox, source))
            await q.create(name, image, ["sleep 1000"], start=False)  # the Entrypoint's sh -c runs it
            await q.create(f"{name}-2", image, [], start=False)
            await q.start(name)
            try:
                with pytest.raises(errors.InvalidState, match=name):
                    await q.remove_image(image)
                with pytest.raises(errors.InvalidState, match="active"):
                    await q.remove_image(image, force=True)
                await q.stop(name, 0)
                await q.remove_image(image, force=True)
                assert image not in [i[0] for i in await q.images()]
                assert not [r for r in await q.list_containers() if r[1].startswith(name)]
            finally:
                for c in (name, f"{name}-2"):
                    with contextlib.suppress(errors.NoSuchContainer):
                        await q.remove(c, force=True)
                with contextlib.suppress(errors.NoSuchImage):
                    await q.remove_image(image, force=True)

    run(scenario())


def test_docker_save_of_several_images_imports_the_one_asked_for(sandbox: Any, quilt: Any, name: str,
                                                                 archive_dir: Path) -> None:
    base = sandbox.host_path(BUSYBOX_TARBALL).read_bytes()

    def image(which: str, tag: str) -> dict[str, bytes]:
        layers = [base, b.tar_bytes([b.file("which", which.encode())])]
        return b.docker_files(layers, {"Cmd": ["cat", "/which"], "Env": ["PATH=/bin"]}, tags=[tag])

    source = b.write_tar(b.merged(image("first", "first:1.0"), image("second", "second:2.0")),
                         archive_dir / "two.tar")
    images_dir = sandbox.host_path("/var/lib/quilt/images")
    before = sorted(p.name for p in images_dir.iterdir())
    chosen = f"docker-pair-{secrets.token_hex(3)}"

    async def scenario() -> str:
        async with quilt() as q:
            listed = r"first:1\.0, second:2\.0$"
            with pytest.raises(errors.InvalidArgument, match=r"2 images; choose one with the option ref: "
                               + listed):
                await q.import_image(chosen, inside(sandbox, source))
            with pytest.raises(errors.InvalidArgument, match=r"no image 'third:1' in the archive; it holds: "
                               + listed):
                await q.import_image(chosen, inside(sandbox, source), ref="third:1")
            assert chosen not in [i[0] for i in await q.images()]
            assert sorted(p.name for p in images_dir.iterdir()) == before

            await q.import_image(chosen, inside(sandbox, source), ref="second:2.0")
            try:
                await q.create(name, chosen, [])
                try:
                    assert await q.wait(name, 30_000_000) == ("exited", 0)
                    return str((await q.info(name))["Id"])
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(chosen)

    cid = run(scenario())
    assert journal_lines(sandbox, cid) == ["second"]


ECHO_CONFIG = {"Entrypoint": ["/bin/echo", "entry"], "Cmd": ["cmd"]}


@pytest.mark.parametrize(("command", "options", "argv"), [
    ([], {}, ["/bin/echo", "entry", "cmd"]),  # Entrypoint + Cmd
    (["given"], {}, ["/bin/echo", "entry", "given"]),  # the command replaces Cmd, keeps Entrypoint
    ([], {"entrypoint": ["/bin/echo", "other"]}, ["/bin/echo", "other"]),  # the image's Cmd goes with it
    (["x"], {"entrypoint": ["/bin/echo", "other"]}, ["/bin/echo", "other", "x"]),
    (["echo", "alone"], {"entrypoint": []}, ["echo", "alone"]),  # cleared: the command alone
])
def test_command_and_entrypoint_as_docker_combines_them(
        sandbox: Any, quilt: Any, name: str, archive_dir: Path, command: list[str], options: dict[str, Any],
        argv: list[str]) -> None:
    source = b.write_dir(b.oci_files([sandbox.host_path(BUSYBOX_TARBALL).read_bytes()], ECHO_CONFIG),
                         archive_dir / "layout")
    image = f"oci-entry-{secrets.token_hex(3)}"

    async def scenario() -> str:
        async with quilt() as q:
            await q.import_image(image, inside(sandbox, source))
            try:
                await q.create(name, image, command, **options)
                try:
                    assert await q.wait(name, 30_000_000) == ("exited", 0)
                    info = await q.info(name)
                    assert info["Command"] == argv
                    return str(info["Id"])
                finally:
                    await q.remove(name, force=True)
            finally:
                await q.remove_image(image)

    cid = run(scenario())
    assert journal_lines(sandbox, cid)[:1] == [" ".join(argv[1:])]


def test_an_entrypoint_of_python3_takes_the_command_as_its_arguments(sandbox: Any, quilt: Any,
                                                                   name: str, archive_dir: Path) -> None:
    """The case of the report: ENTRYPOINT ["python3"] run with -c CODE (on the host image's python3)."""
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "host", ["-c", "print(6 * 7)"], entrypoint=["python3"])
            try:
                assert await q.wait(name, 30_000_000) == ("exited", 0)
                assert (await q.info(name))["Command"] == ["python3", "-c", "print(6 * 7)"]
                assert [line for _, _, line in await q.logs(name)] == ["42"]
            finally:
                await q.remove(name, force=True)

    run(scenario())


def test_bad_entrypoints_get_named_errors(sandbox: Any, quilt: Any, name: str, archive_dir: Path) -> None:
    from dbus_next.signature import Variant

    source = b.write_dir(b.oci_files([sandbox.host_path(BUSYBOX_TARBALL).read_bytes()], {}),
                         archive_dir / "layout")
    image = f"oci-bare-{secrets.token_hex(3)}"

    async def scenario() -> None:
        async with quilt() as q:
            await q.import_image(image, inside(sandbox, source))
            try:
                with pytest.raises(errors.InvalidArgument, match="no Entrypoint or Cmd"):
                    await q.create(name, image, [], entrypoint=[])
                with pytest.raises(errors.InvalidArgument, match="entrypoint must be a list of strings"):
                    await q.call("CreateContainer", "ssasa{sv}", name, image, [],
                                 {"entrypoint": Variant("s", "/bin/sh")})
                with pytest.raises(errors.InvalidArgument, match=r"program to run .* is empty"):
                    await q.create(name, image, ["x"], entrypoint=[""])
                assert name not in [r[1] for r in await q.list_containers()]
            finally:
                await q.remove_image(image)

    run(scenario())
