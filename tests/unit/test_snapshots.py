"""The logic of commit and fork above the mechanisms: options, the new image's config, the
records of shared layers and the recovery of a fork cut off."""

from __future__ import annotations

from pathlib import Path

import pytest

from quiltd.core import forkfiles, parse, snapshots
from quiltd.core.requests import CommitOptions, ForkOptions
from quiltd.errors import InvalidArgument, LimitExceeded
from quiltd.model import Container, ContainerSpec, Image, ImageConfig
from quiltd.store.database import Store

BASE, FROZEN, OTHER = ("1" * 64, "f" * 64, "e" * 64)


def test_commit_options_are_checked_type_by_type() -> None:
    assert parse.commit_options({}) == CommitOptions()
    got = parse.commit_options({"env": ["A=1"], "workdir": "/w", "user": "nobody",
                                          "entrypoint": ["sh"], "cmd": [], "labels": {"b": "2", "a": "1"}})
    assert got == CommitOptions(("A=1",), "/w", "nobody", ("sh",), (), (("a", "1"), ("b", "2")))
    for bad in ({"colour": "red"}, {"env": ["no-equals"]}, {"env": "A=1"}, {"workdir": "rel"},
                {"user": "a b"}, {"cmd": "sh"}, {"entrypoint": ["a\0b"]}, {"labels": {"a": 1}}):
        with pytest.raises(InvalidArgument):
            parse.commit_options(bad)


def test_fork_names_and_options_are_checked() -> None:
    assert snapshots.parse_fork_names(["a", "b"]) == ("a", "b")
    for bad in ([], ["a", "a"], ["bad name"], "a", [""]):
        with pytest.raises(InvalidArgument):
            snapshots.parse_fork_names(bad)
    with pytest.raises(LimitExceeded):
        snapshots.parse_fork_names([f"n{i}" for i in range(snapshots.MAX_FORKS + 1)])
    assert parse.fork_options({}) == ForkOptions(None, True, 10)
    assert parse.fork_options({"command": ["true"], "start": False, "stop_timeout_sec": 0}) == \
        ForkOptions(("true",), False, 0)
    for bad in ({"command": []}, {"start": 1}, {"stop_timeout_sec": 3601}, {"stop_timeout_sec": True},
                {"colour": "red"}):
        with pytest.raises(InvalidArgument):
            parse.fork_options(bad)


def _container(command: tuple[str, ...], env: tuple[str, ...] = ("PATH=/bin", "A=1")) -> Container:
    return Container("0" * 16, "c", "img", "id", command, ContainerSpec(env=env, workdir="/srv", user="app"))


def test_the_committed_config_is_the_containers_with_the_options_over_it() -> None:
    image = Image("img", "id", "/x", 0, 0, ImageConfig(entrypoint=("python3",), cmd=("main.py",),
                                                       labels=(("from", "base"),)))
    plain = snapshots.committed_config(image, _container(("python3", "-c", "pass")),
                                       CommitOptions())
    # The Entrypoint stays apart from the command the container was made with.
    assert (plain.entrypoint, plain.cmd) == (("python3",), ("-c", "pass"))
    assert (plain.workdir, plain.user) == ("/srv", "app")
    assert plain.env == ("PATH=/bin", "A=1") and plain.labels == (("from", "base"),)
    # A container made with another entrypoint: its whole argv is the Cmd.
    other = snapshots.committed_config(image, _container(("sh", "-c", "x")), CommitOptions())
    assert (other.entrypoint, other.cmd) == ((), ("sh", "-c", "x"))
    changed = snapshots.committed_config(image, _container(("python3", "x")), parse.commit_options(
        {"env": ["A=2", "B=3"], "entrypoint": ["sh"], "labels": {"step": "7"}, "user": ""}))
    assert changed.env == ("PATH=/bin", "A=2", "B=3")
    assert (changed.entrypoint, changed.cmd, changed.user) == (("sh",), (), "")
    assert changed.labels == (("from", "base"), ("step", "7"))


def test_a_frozen_layer_stays_while_a_container_stacks_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    image = Image("img", "id", "/x", 0, 0, layers=(BASE,))
    source, fork = _container(("true",)), Container("1" * 16, "f", "img", "id", ("true",), ContainerSpec())
    with store.transaction():
        store.insert_image(image, ((BASE, 5),))
        store.insert_container(source)
        store.insert_container(fork)
        store.insert_layer(FROZEN, 7)
        store.insert_layer(OTHER, 1)
        for c in (source, fork):
            store.set_container_layers(c.id, (FROZEN,))
    assert store.container_layers(fork.id) == (FROZEN,)
    assert store.unused_layers() == [OTHER]
    with store.transaction():
        store.delete_container(source.id)
    assert store.unused_layers() == [OTHER]  # the fork still stacks it
    with store.transaction():
        store.delete_container(fork.id)
    assert store.unused_layers() == sorted([OTHER, FROZEN])


def test_an_image_committed_over_a_directory_names_its_base(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with store.transaction():
        store.insert_image(Image("base", "id", "/images/base", 0, 0))
        store.insert_image(Image("snap", "id2", f"/layers/{FROZEN}:/images/base", 0, 0, layers=(FROZEN,)),
                           ((FROZEN, 1),))
        store.set_image_base("snap", "base")
    assert store.images_based_on("base") == ["snap"]
    with store.transaction():
        store.delete_image("snap")
    assert store.images_based_on("base") == []


def test_recovery_finishes_a_recorded_fork_and_undoes_the_rest(tmp_path: Path) -> None:
    containers, layers = tmp_path / "containers", tmp_path / "layers"
    layers.mkdir()
    done, undone = containers / "a", containers / "b"
    for cdir, layer in ((done, FROZEN), (undone, OTHER)):
        pending = cdir / f"upper.fork-{layer}"
        pending.mkdir(parents=True)
        (pending / "file").write_text(cdir.name)
        (cdir / "work" / "work").mkdir(parents=True)
    notes = forkfiles.recover(containers, {FROZEN}, layers)
    assert len(notes) == 2
    assert (layers / FROZEN / "file").read_text() == "a"
    assert not (done / "work").exists()  # the old overlay's work dir goes with the old upper
    assert (undone / "upper" / "file").read_text() == "b"
    assert not (layers / OTHER).exists()
    assert forkfiles.recover(containers, {FROZEN}, layers) == []  # nothing left to do
