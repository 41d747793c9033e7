"""find_container answers from what it found before, and never from what has changed since."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from quiltd.model import Container, ContainerSpec, State
from quiltd.store.database import Store


def _container(cid: str, name: str) -> Container:
    return Container(id=cid, name=name, image="busybox", image_id="x", command=("true",),
                     spec=ContainerSpec(), created_usec=1)


def test_a_change_is_seen_by_every_ref_that_found_the_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    c = _container("0123456789abcdef", "web")
    with store.transaction():
        store.insert_container(c)
    assert store.find_container("web") == store.find_container(c.id) == c
    with store.transaction():
        store.update_container(replace(c, state=State.RUNNING, pid=7))
    assert store.find_container("web").state == store.find_container(c.id).state == State.RUNNING
    with store.transaction():
        store.delete_container(c.id)
    assert store.find_container("web") is None and store.find_container(c.id) is None
    again = _container("fedcba9876543210", "web")  # the name again, on another row
    with store.transaction():
        store.insert_container(again)
    assert store.find_container("web") == again


def test_a_name_that_looks_like_an_id_loses_to_the_id_even_when_found_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    named = _container("1111111111111111", "2222222222222222")
    with store.transaction():
        store.insert_container(named)
    assert store.find_container("2222222222222222") == named
    with store.transaction():
        store.insert_container(_container("2222222222222222", "other"))
    assert store.find_container("2222222222222222").name == "other"


def test_what_a_rolled_back_transaction_wrote_is_not_found(tmp_path: Path) -> None:
    store = Store(tmp_path / "quilt.db")
    c = _container("0123456789abcdef", "web")
    with store.transaction():
        store.insert_container(c)
    with pytest.raises(RuntimeError), store.transaction():
        store.update_container(replace(c, state=State.RUNNING))
        assert store.find_container("web").state == State.RUNNING  # inside, the change is there
        raise RuntimeError("the transaction fails")
    assert store.find_container("web") == c
