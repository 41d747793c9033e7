"""Client mistakes get named errors, leave nothing behind, and never hurt the daemon."""

from __future__ import annotations

import contextlib
import os
import select
from typing import Any

import pytest
from dbus_next.signature import Variant

from quiltd import errors
from tests.system.conftest import records, run

pytestmark = pytest.mark.system


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-bad", "busybox", ["true"], {}], errors.InvalidArgument),
        (["a" * 64, "busybox", ["true"], {}], errors.InvalidArgument),
        (["has space", "busybox", ["true"], {}], errors.InvalidArgument),
        (["ok-name", "no-such-image", ["true"], {}], errors.NoSuchImage),
        (["ok-name", "busybox", [], {}], errors.InvalidArgument),
        (["ok-name", "busybox", [""], {}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"memory_max": Variant("s", "1G")}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"memory_max": Variant("t", 1)}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"cpu_quota": Variant("d", -1.0)}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"tasks_max": Variant("t", 0)}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"network": Variant("s", "nowhere")}], errors.NoSuchNetwork),
        (["ok-name", "busybox", ["true"], {"network": Variant("s", "no/such")}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"workdir": Variant("s", "relative")}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"env": Variant("as", ["NOEQUALS"])}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"bogus": Variant("b", True)}], errors.InvalidArgument),
        (["ok-name", "busybox", ["true"], {"userns": Variant("s", "yes")}], errors.InvalidArgument),
    ],
)
def test_create_refuses_bad_input_and_leaves_nothing(quilt: Any, args: list[Any],
                                                     error: type[errors.QuiltError]) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            with pytest.raises(error):
                await q.call("CreateContainer", "ssasa{sv}", *args)
            assert await records(q) == before
            assert (await q.system_info())["Version"]  # still answering

    run(scenario())


def test_duplicate_name_is_taken(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["true"], start=False)
            with pytest.raises(errors.NameTaken, match=name):
                await q.create(name, "busybox", ["true"])
            assert len([r for r in await q.list_containers() if r[1] == name]) == 1
            await q.remove(name)

    run(scenario())


def test_unknown_refs_and_wrong_states(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            for call in (q.start("nope"), q.stop("nope"), q.kill("nope", 15), q.remove("nope"),
                         q.wait("nope"), q.info("nope")):
                with pytest.raises(errors.NoSuchContainer, match="nope"):
                    await call
            await q.create(name, "busybox", ["true"], start=False)
            with pytest.raises(errors.InvalidState):
                await q.kill(name, 15)
            with pytest.raises(errors.InvalidState):
                await q.wait(name)
            await q.start(name)
            assert await q.wait(name) == ("exited", 0)
            with pytest.raises(errors.InvalidState):
                await q.kill(name, 15)
            with pytest.raises(errors.InvalidArgument):
                await q.call("KillContainer", "si", name, 999)
            await q.remove(name)

    run(scenario())


def test_missing_program_fails_the_start_with_a_reason(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["/no/such/program"], start=False)
            with pytest.raises(errors.StartFailed, match="no/such/program"):
                await q.start(name)
            info = await q.info(name)
            assert info["State"] == "failed" and "No such file" in info["Reason"]
            assert await q.wait(name) == ("failed", 127)
            await q.remove(name)

    run(scenario())


def test_bad_tarball_is_invalid_image_and_leaves_no_files(sandbox: Any, quilt: Any) -> None:
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as t:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    sandbox.host_path("/var/tmp/evil.tar").write_bytes(data.getvalue())
    images_dir = sandbox.host_path("/var/lib/quilt/images")
    before = sorted(p.name for p in images_dir.iterdir())

    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidImage, match=r"\.\./escape"):
                await q.import_image("evil", "/var/tmp/evil.tar")
            with pytest.raises(errors.InvalidImage):
                await q.import_image("missing", "/var/tmp/does-not-exist.tar")
            # A regular file by stat whose reads fail (EIO).
            with pytest.raises(errors.InvalidImage, match="cannot read"):
                await q.import_image("unreadable", "/proc/self/mem")
            with pytest.raises(errors.InvalidArgument):
                await q.import_image("bad name!", "/var/tmp/evil.tar")
            assert "evil" not in [i[0] for i in await q.images()]

    run(scenario())
    assert sorted(p.name for p in images_dir.iterdir()) == before
    assert not sandbox.host_path("/escape").exists()


def test_image_in_use_cannot_be_removed(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["true"], start=False)
            with pytest.raises(errors.InvalidState, match=name):
                await q.remove_image("busybox")
            with pytest.raises(errors.NoSuchImage):
                await q.remove_image("never-imported")
            await q.remove(name)

    run(scenario())


def test_a_trailing_newline_makes_no_second_name(quilt: Any, name: str) -> None:
    """`$` in a pattern also matches before a final newline: "web" and "web\\n" must not both exist."""
    twin = name + "\n"

    def create(suffix: str, image: str = "busybox", **options: str) -> tuple[Any, ...]:
        return ("CreateContainer", "ssasa{sv}", f"{name}-{suffix}", image, ["true"],
                {k: Variant("s", v) for k, v in options.items()})

    attempts: dict[str, tuple[Any, ...]] = {
        "container": ("CreateContainer", "ssasa{sv}", twin, "busybox", ["true"], {}),
        "hostname": create("h", hostname="box\n"),
        "user": create("u", user="root\n"),
        "network option": create("n", network="bridge\n"),
        "image ref": create("i", image="busybox\n"),
        "volume": ("CreateVolume", "s", twin),
        "network": ("CreateNetwork", "sa{sv}", twin, {}),
        "image": ("ImportImage", "ssa{sv}", twin, "/var/tmp/quilt-test-busybox.tar.gz", {}),
    }

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["true"], start=False)
            before = await records(q)
            answers = {}
            try:
                for what, call in attempts.items():
                    try:
                        await q.call(*call)
                        answers[what] = "accepted"
                    except errors.QuiltError as e:
                        answers[what] = type(e).__name__
                assert answers == dict.fromkeys(attempts, "InvalidArgument")
                assert await records(q) == before
            finally:
                removals = [q.remove(twin, force=True), q.remove_volume(twin), q.remove_network(twin),
                            q.remove_image(twin), q.remove(name, force=True),
                            *(q.remove(f"{name}-{s}", force=True) for s in "huni")]
                for removal in removals:
                    with contextlib.suppress(errors.QuiltError):
                        await removal

    run(scenario())


@pytest.mark.parametrize("labels", [
    Variant("a{sv}", {"team": Variant("as", ["ml"])}),
    Variant("a{sv}", {"team": Variant("a{sv}", {})}),
    Variant("a{sv}", {"team": Variant("i", 1)}),
    Variant("as", ["team"]),
])
def test_a_labels_filter_that_is_not_strings_is_invalid(quilt: Any, labels: Variant) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="labels"):
                await q.call("ListContainers", "a{sv}", {"labels": labels})

    run(scenario())


BOGUS = {"bogus": Variant("b", True)}


@pytest.mark.parametrize(("member", "signature", "args", "fds"), [
    ("CreateContainer", "ssasa{sv}", ["ok-name", "busybox", ["true"], BOGUS], 0),
    ("ListContainers", "a{sv}", [BOGUS], 0),
    ("ExecStart", "sasa{sv}", ["no-such", ["true"], BOGUS], 0),
    ("ExecEx", "sasa{sv}", ["no-such", ["true"], BOGUS], 0),
    ("GetLogs", "sa{sv}", ["no-such", BOGUS], 0),
    ("ImportImage", "ssa{sv}", ["img", "/nowhere.tar", BOGUS], 0),
    ("RemoveImageEx", "sa{sv}", ["busybox", BOGUS], 0),
    ("CreateNetwork", "sa{sv}", ["net", BOGUS], 0),
    ("SetWarmPool", "sua{sv}", ["busybox", 1, BOGUS], 0),
    ("ExecWithFds", "sasa{sv}hhh", ["no-such", ["true"], BOGUS, 0, 1, 2], 3),
    ("FollowLogs", "sa{sv}h", ["no-such", BOGUS, 0], 1),
    ("CopyInEx", "ssha{sv}", ["no-such", "/", 0, BOGUS], 1),
    ("CopyOutEx", "ssha{sv}", ["no-such", "/", 0, BOGUS], 1),
    ("ImportImageFdEx", "sha{sv}", ["img", 0, BOGUS], 1),
])
def test_an_unknown_option_is_named_first_and_the_calls_descriptors_are_let_go(
        quilt: Any, member: str, signature: str, args: list[Any], fds: int) -> None:
    """Options are read before anything else: the refusal names the option and the known ones,
    even for a ref that names nothing, and quiltd keeps no copy of a descriptor the call brought."""
    async def scenario() -> None:
        async with quilt() as q:
            before = await records(q)
            pipes = [os.pipe() for _ in range(fds)]
            try:
                with pytest.raises(errors.InvalidArgument,
                                   match=r"unknown .*\(s\).*: bogus; the known ones are \w"):
                    await q.call(member, signature, *args, unix_fds=[w for _, w in pipes])
                for r, w in pipes:
                    os.close(w)
                    # quiltd's copy of the write end is closed too, or this read would wait.
                    assert select.select([r], [], [], 10)[0] == [r], member
                    assert os.read(r, 1) == b""
            finally:
                for r, w in pipes:
                    os.close(r)
                    with contextlib.suppress(OSError):
                        os.close(w)
            assert await records(q) == before

    run(scenario())
