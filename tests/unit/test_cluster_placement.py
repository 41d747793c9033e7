"""Placement and the name registry of quiltd.cluster: the logic above Ray, on plain records."""

from __future__ import annotations

import pytest

from quiltd.cluster.placement import choose, claim
from quiltd.cluster.records import HostInfo, Need, SandboxRecord
from quiltd.cluster.registry import Registry
from quiltd.errors import NameTaken, NoSuchContainer, Unplaceable

GIB = 1 << 30


def host(name: str, *, cpus: float = 2.0, mem: int = 8 * GIB, cpu_res: float = 0.0, mem_res: int = 0,
         containers: int = 0, images: frozenset[str] = frozenset({"busybox"})) -> HostInfo:
    return HostInfo(name, f"node-{name}", cpus, mem, cpu_res, mem_res, containers, images)


def test_the_host_with_fewest_sandboxes_wins_and_claims_spread_a_batch() -> None:
    hosts = {h.name: h for h in (host("a", containers=3), host("b", containers=1), host("c", containers=2))}
    order = []
    for _ in range(6):
        chosen = choose(list(hosts.values()), Need("busybox"))
        hosts[chosen.name] = claim(chosen, Need("busybox"))
        order.append(chosen.name)
    assert order == ["b", "b", "c", "a", "b", "c"]
    assert {h.name: h.containers for h in hosts.values()} == {"a": 4, "b": 4, "c": 4}


def test_room_is_capacity_less_the_limits_claimed() -> None:
    need = Need("busybox", cpus=1.5, memory_bytes=3 * GIB)
    full_cpu = host("a", cpu_res=1.0)
    full_mem = host("b", mem_res=6 * GIB)
    roomy = host("c", containers=50)
    assert choose([full_cpu, full_mem, roomy], need).name == "c"
    with pytest.raises(Unplaceable) as e:
        choose([full_cpu, full_mem], need)
    assert "a: 1 of 2 CPUs free, 1.5 asked" in str(e.value)
    assert f"b: {2 * GIB} of {8 * GIB} memory bytes free, {3 * GIB} asked" in str(e.value)


def test_affinity_image_and_no_hosts() -> None:
    hosts = [host("a"), host("b"), host("c", images=frozenset())]
    assert choose(hosts, Need("busybox", host="b")).name == "b"
    assert choose(hosts, Need("busybox", avoid=frozenset({"a", "b"}), pull=True)).name == "c"
    with pytest.raises(Unplaceable, match="c: no image 'busybox'"):
        choose(hosts, Need("busybox", avoid=frozenset({"a", "b"})))
    with pytest.raises(Unplaceable, match="not the host asked for"):
        choose(hosts, Need("busybox", host="z"))
    with pytest.raises(Unplaceable, match="no live host"):
        choose([], Need("busybox"))


def record(name: str, host: str = "a", cid: str = "0" * 16) -> SandboxRecord:
    return SandboxRecord(name, host, cid, "busybox", ("sleep", "1"))


def test_registry_names_are_unique_and_a_failed_batch_reserves_nothing() -> None:
    r = Registry()
    r.reserve_many(["x", "y"])
    with pytest.raises(NameTaken, match=r"'y'.*a create under way"):
        r.reserve_many(["z", "y"])
    r.reserve("z")  # the failed batch did not keep z
    r.commit_many([record("x"), record("y", "b")])
    with pytest.raises(NameTaken, match=r"'x'.*on a"):
        r.reserve("x")
    with pytest.raises(NameTaken, match="twice"):
        r.reserve_many(["w", "w"])
    r.release("x")
    r.reserve("x")
    with pytest.raises(NoSuchContainer):
        r.get("nope")


def test_registry_adopts_what_it_lacks_and_answers_where_each_name_lives() -> None:
    r = Registry()
    r.commit(record("moved", "b", "2" * 16))
    r.reserve("creating")
    answer = r.adopt([record("moved", "a", "1" * 16), record("unknown", "a", "3" * 16),
                      record("creating", "a", "4" * 16)])
    # moved lives on b now: host a removes its copy; unknown is taken in; creating is left to its create.
    assert answer["moved"] == record("moved", "b", "2" * 16)
    assert answer["unknown"] == record("unknown", "a", "3" * 16)
    assert answer["creating"] is None
    m = r.move("unknown", "c", "5" * 16)
    assert (m.host, m.container_id, m.generation) == ("c", "5" * 16, 1)
    assert [x.name for x in r.records()] == ["moved", "unknown"]
