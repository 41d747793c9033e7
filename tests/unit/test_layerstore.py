"""The layer store's names, pins and retiring, and the records of which image stacks which layer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from quiltd.images.layerstore import LayerStore
from quiltd.model import Image
from quiltd.store.database import MIGRATIONS, Store

BASE, TOP_A, TOP_B = ("1" * 64, "a" * 64, "b" * 64)


def _store_layer(store: LayerStore, diff_id: str) -> None:
    scratch = store.scratch()
    (scratch / "etc").mkdir(parents=True)
    store.commit(scratch, diff_id)


def test_a_pinned_layer_is_not_retired(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "layers")
    assert not store.pin(BASE)  # not stored yet
    _store_layer(store, BASE)
    assert store.pin(BASE)
    store.unpin([BASE])
    assert store.retire(BASE) is None  # still pinned once
    store.unpin([BASE])
    gone = store.retire(BASE)
    assert gone is not None and (gone / "etc").is_dir() and not store.path(BASE).exists()
    assert store.retire(BASE) is None  # gone already


def test_the_second_copy_of_a_layer_stored_at_once_is_dropped(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "layers")
    _store_layer(store, BASE)
    _store_layer(store, BASE)
    assert [p.name for p in store.root.iterdir()] == [BASE]


def test_leftovers_are_scratch_retired_and_unrecorded_layers(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "layers")
    for diff_id in (BASE, TOP_A, TOP_B):
        _store_layer(store, diff_id)
    half = store.scratch()
    half.mkdir()
    gone = store.retire(TOP_B)
    (store.root / "notes").mkdir()  # not a name the store gives: left alone
    assert store.leftovers({BASE}) == sorted([half, gone, store.path(TOP_A)])


def test_images_record_their_layers_and_old_images_are_one_directory(tmp_path: Path) -> None:
    path = tmp_path / "quilt.db"
    # A store from before layers were shared, holding an OCI image of then.
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:-1], start=1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={number}")
    db.execute("INSERT INTO images (name, id, path, size_bytes, created_usec) "
               "VALUES ('old', 'x', '/var/lib/quilt/images/0123456789abcdef', 10, 1)")
    db.commit()
    db.close()
    store = Store(path)
    old = store.find_image("old")
    assert old is not None and old.layers == () and old.path == "/var/lib/quilt/images/0123456789abcdef"
    for name, top in (("a", TOP_A), ("b", TOP_B)):
        with store.transaction():
            store.insert_image(Image(name, name, f"/l/{top}:/l/{BASE}", 12, 2, layers=(BASE, top)),
                               ((BASE, 10), (top, 2)))
    assert [i.layers for i in store.list_images()] == [(BASE, TOP_A), (BASE, TOP_B), ()]
    assert store.layer_sizes() == {BASE: 10, TOP_A: 2, TOP_B: 2}
    with store.transaction():
        store.delete_image("a")
    assert store.unused_layers() == [TOP_A]
    with store.transaction():
        store.delete_image("b")
    assert store.unused_layers() == sorted([TOP_A, TOP_B, BASE])
