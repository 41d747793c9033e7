"""quiltd.cluster on a real cluster: 3 sandbox hosts (each its own systemd, quiltd and Ray node)
on a private network with a Ray head, booted by `tools/sandbox cluster`.

The drivers are separate processes in the cluster's network, as a user's
would be; each prints one line `RESULT <json>` that the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO, sandbox_tools, unique_sandbox_name
from tests.system.conftest import BUS

BUSYBOX = "/var/tmp/quilt-test-cluster-busybox.tar.gz"
HOSTS = 3
# Sandboxes in the spread test: 300 (the number) is tools/bench --cluster's;
# this many keeps the test near a minute on a 2-core machine.
SPREAD = 60
# The longest a lost host may take to show as lost: Ray's health checks (the
# cluster's head checks every 1 s, 3 misses) plus a call's own time.
LOST_BOUND = 15.0

PRELUDE = """
import json, sys, time
from quiltd.cluster import QuiltCluster
from quiltd import errors
def result(value):
    print("RESULT " + json.dumps(value), flush=True)
def wait_line():
    sys.stdin.readline()
c = QuiltCluster()
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    subprocess.run([str(REPO / "tools/make-busybox-image"), BUSYBOX], check=True, capture_output=True)
    c = sandbox_tools.Cluster.start(HOSTS, unique_sandbox_name("cl"), die_with_parent=True)
    try:
        for sb in c.hosts:
            sb.run(["busctl", "call", *BUS, "ImportImage", "ssa{sv}", "busybox", BUSYBOX, "0"])
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-f", BUSYBOX], check=False)


def driver(cluster: Any, code: str, timeout: float = 240) -> Any:
    """Runs a driver program in the cluster's network; returns what it passed to result()."""
    program = PRELUDE + textwrap.dedent(code)
    r = cluster.run([str(REPO / ".venv/bin/python"), "-c", program], timeout=timeout, check=False)
    out = r.stdout.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"driver exited {r.returncode} without a result:\n{out[-3000:]}\n"
                         f"{r.stderr.decode(errors='replace')[-3000:]}")


class Interactive:
    """A driver that waits for the test between steps: step() lets it go on and reads its next result."""

    def __init__(self, cluster: Any, code: str) -> None:
        program = PRELUDE + textwrap.dedent(code)
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            cluster.run_argv([str(REPO / ".venv/bin/python"), "-c", program]), env=cluster_env(cluster),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )

    def result(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        code = self.proc.wait()
        self.stderr.seek(0)
        raise AssertionError(f"driver exited {code} before its result:\n"
                             f"{self.stderr.read().decode(errors='replace')[-3000:]}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def cluster_env(cluster: Any) -> dict[str, str]:
    return {**os.environ, **cluster.env()}


def host_containers(sb: Any) -> list[str]:
    """Names of the containers a host's own quiltd has, as busctl shows them there."""
    out = sb.run(["busctl", "--json=short", "call", *BUS, "ListContainers", "a{sv}", "0"]).stdout
    return sorted(row[1] for row in json.loads(out)["data"][0])


def docs_block(marker: str) -> str:
    """The ```sh block of docs/cluster.md holding marker, as written."""
    text = (REPO / "docs/cluster.md").read_text()
    for block in text.split("```sh\n")[1:]:
        body = block.split("```")[0]
        if marker in body:
            return body
    raise AssertionError(f"no ```sh block with {marker!r} in docs/cluster.md")


def test_the_docs_cluster_commands_run_as_written() -> None:
    # First, before the module's cluster boots: this block starts (and stops) a cluster of its own.
    block = docs_block("tools/sandbox cluster start 3")
    try:
        r = subprocess.run(["bash", "-euc", block], cwd=REPO, capture_output=True, timeout=600)
    finally:
        subprocess.run([str(REPO / "tools/sandbox"), "cluster", "stop"], cwd=REPO, capture_output=True)
        subprocess.run(["rm", "-f", "/var/tmp/quilt-cluster-busybox.tar.gz"], check=False)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out + r.stderr.decode(errors="replace")[-3000:]
    assert "quilt-cluster-h" in out and "b'hello\\n'" in out, out
    assert "quilt-cluster" not in sandbox_tools.Cluster.names()  # the block's last command stopped it


def test_sandboxes_spread_over_the_hosts_and_answer_exec(cluster: Any) -> None:
    got = driver(cluster, f"""
        specs = [(f"spread-{{i}}", "busybox", ["sleep", "infinity"], {{}}) for i in range({SPREAD})]
        t0 = time.monotonic()
        sbs = c.create_many(specs)
        created = time.monotonic() - t0
        c.wait_started(sbs)
        answers = c.exec_many(sbs, ["hostname"])
        result({{"hosts": [s.host for s in sbs], "created_s": created,
                 "answers": [[a.exit_code, a.stdout.decode().strip()] for a in answers],
                 "listed": sorted((s.name, s.host, s.state) for s in c.list())}})
    """)
    names = {h.name for h in cluster.hosts}
    counts = {h: got["hosts"].count(h) for h in names}
    assert counts == {h: SPREAD // HOSTS for h in names}, counts
    # Each sandbox answered, from inside itself (its hostname is its name).
    assert got["answers"] == [[0, f"spread-{i}"] for i in range(SPREAD)]
    listed = {row[0]: row[1] for row in got["listed"]}
    assert listed == {f"spread-{i}": got["hosts"][i] for i in range(SPREAD)}
    # And each host's own quiltd holds exactly the ones placed on it.
    for sb in cluster.hosts:
        mine = sorted(f"spread-{i}" for i in range(SPREAD) if got["hosts"][i] == sb.name)
        assert [n for n in host_containers(sb) if n.startswith("spread-")] == mine

    left = driver(cluster, """
        for s in c.list():
            c.get(s.name).remove(force=True)
        result([s.name for s in c.list()])
    """)
    assert left == []
    for sb in cluster.hosts:
        assert host_containers(sb) == []


def test_placement_respects_capacity_and_affinity(cluster: Any) -> None:
    got = driver(cluster, """
        infos = c.host_infos(fresh=True)
        mem = min(i.memory_bytes for i in infos.values())
        share = int(mem * 0.4)  # two fit on a host, a third does not
        made = c.create_many([(f"cap-{i}", "busybox", ["sleep", "infinity"], {"memory_max": share})
                              for i in range(2 * len(infos))])
        t0 = time.monotonic()
        try:
            c.create("cap-extra", "busybox", ["sleep", "infinity"], memory_max=share)
            full = "created"
        except errors.Unplaceable as e:
            full = str(e)
        full_s = time.monotonic() - t0
        target = sorted(infos)[1]
        pinned = c.create("pinned", "busybox", ["sleep", "infinity"], host=target)
        try:
            c.create("pinned-big", "busybox", ["sleep", "infinity"], host=target, memory_max=share)
            pinned_full = "created"
        except errors.Unplaceable as e:
            pinned_full = str(e)
        avoided = c.create("avoider", "busybox", ["sleep", "infinity"], avoid=[target, sorted(infos)[0]])
        try:
            c.create("no-image", "no-such-image", ["true"])
            no_image = "created"
        except errors.Unplaceable as e:
            no_image = str(e)
        names_after = sorted(s.name for s in c.list())
        reserved = {n: i.memory_reserved for n, i in c.host_infos(fresh=True).items()}
        result({"hosts": [s.host for s in made], "full": full, "full_s": full_s, "target": target,
                "pinned": pinned.host, "pinned_full": pinned_full, "avoided": avoided.host,
                "all": sorted(infos), "no_image": no_image, "names": names_after, "share": share,
                "reserved": reserved})
        for s in c.list():
            c.get(s.name).remove(force=True)
    """)
    assert sorted(got["hosts"]) == sorted(got["all"] * 2)
    assert "Unplaceable" in got["full"] and "memory bytes free" in got["full"], got["full"]
    assert got["full_s"] < 5.0
    assert got["pinned"] == got["target"]
    assert "Unplaceable" in got["pinned_full"], got["pinned_full"]
    assert got["avoided"] == got["all"][2]
    assert "no image 'no-such-image'" in got["no_image"], got["no_image"]
    # The refused creates left no name behind.
    assert got["names"] == sorted([*(f"cap-{i}" for i in range(6)), "pinned", "avoider"])
    # What each host's quiltd reports as claimed is the limits placed there.
    assert got["reserved"] == {h: 2 * got["share"] for h in got["all"]}


def test_a_host_whose_quiltd_is_down_is_not_placed_on(cluster: Any) -> None:
    down = cluster.hosts[2]
    # quiltd stopped, and every start of it (D-Bus activation included) failing.
    dropin = "/run/systemd/system/quiltd.service.d/down.conf"
    down.run(["sh", "-c", 'mkdir -p "${1%/*}" && cat > "$1"', "sh", dropin],
             input=b"[Service]\nExecStartPre=/bin/false\n")
    down.run(["systemctl", "daemon-reload"])
    down.run(["systemctl", "stop", "quiltd.service"])
    try:
        assert down.run(["busctl", "call", *BUS, "GetSystemInfo"], check=False).returncode != 0
        got = driver(cluster, """
            made = c.create_many([(f"up-{i}", "busybox", ["sleep", "infinity"], {}) for i in range(6)])
            result(sorted({s.host for s in made}))
            for s in made:
                s.remove(force=True)
        """)
    finally:
        down.run(["rm", "-f", dropin])
        down.run(["systemctl", "daemon-reload"])
        down.run(["systemctl", "reset-failed", "quiltd.service"], check=False)
    assert got == sorted(h.name for h in cluster.hosts[:2])


def test_a_handle_reaches_its_host_with_the_clients_results(cluster: Any) -> None:
    got = driver(cluster, """
        import io, tarfile
        target = sorted(c.hosts())[2]
        sb = c.create("calls", "busybox", ["sh", "-c", "echo started; sleep infinity"], host=target)
        placed = sb.host
        sb.wait_started()
        task = sb.exec_start(["sh", "-c", "exit 7"])
        waited = sb.exec_wait(task)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = b"from the driver"
            info = tarfile.TarInfo("note.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        sb.copy_in("/tmp", buf.getvalue())
        read = sb.exec(["cat", "/tmp/note.txt"]).stdout.decode()
        with tarfile.open(fileobj=io.BytesIO(sb.copy_out("/tmp/note.txt"))) as tar:
            back = tar.extractfile("note.txt").read().decode()
        time.sleep(1)  # the journal takes the line in
        logs = [line.line for line in sb.logs()]
        info = sb.info()
        try:
            sb.pause()
            sb.resume()
            paused = "ok"
        except errors.NotSupported as e:
            paused = str(e)
        sb.remove(force=True)
        try:
            sb.info()
            gone = "still there"
        except errors.NoSuchContainer as e:
            gone = type(e).__name__
        result({"target": target, "placed": placed,
                "waited": list(waited), "read": read, "back": back, "logs": logs, "name": info["Name"],
                "state": info["State"], "paused": paused, "gone": gone})
    """)
    assert got["placed"] == got["target"]
    assert got["waited"] == ["exited", 7]
    assert got["read"] == got["back"] == "from the driver"
    assert "started" in got["logs"]
    assert (got["name"], got["state"]) == ("calls", "running")
    assert got["paused"] == "ok" or "NotSupported" in got["paused"], got["paused"]
    assert got["gone"] == "NoSuchContainer"


def test_map_streams_results_with_bounded_concurrency(cluster: Any) -> None:
    got = driver(cluster, """
        def square(sb, x):
            return [sb.name, int(sb.exec(["sh", "-c", f"echo $(({x} * {x}))"]).stdout)]
        rows = [[r.index, r.item, r.value, r.host, r.error is None] for r in
                c.map(square, range(6), image="busybox", concurrency=2)]
        result({"rows": rows, "left": [s.name for s in c.list()]})
    """)
    rows = sorted(got["rows"])
    squares = [(i, item, value[1], ok) for i, item, value, _, ok in rows]
    assert squares == [(i, i, i * i, True) for i in range(6)]
    assert len({value[0] for _, _, value, _, _ in rows}) == 6  # a sandbox each
    assert len({host for *_, host, _ in rows}) >= 2  # spread
    assert got["left"] == []  # each removed after its item


def test_names_are_unique_and_a_restarted_driver_finds_its_sandboxes(cluster: Any) -> None:
    first = driver(cluster, """
        made = c.create_many([(f"keep-{i}", "busybox", ["sleep", "infinity"], {}) for i in range(6)])
        result({s.name: s.host for s in made})
    """)
    # A new driver process: nothing carried over but the cluster itself.
    second = driver(cluster, """
        found = {s.name: s.host for s in c.list()}
        c.wait_started([c.get(n) for n in found])
        answers = {n: c.get(n).exec(["hostname"]).stdout.decode().strip() for n in found}
        try:
            c.create("keep-0", "busybox", ["true"])
            taken = "created"
        except errors.NameTaken as e:
            taken = str(e)
        result({"found": found, "answers": answers, "taken": taken})
        for n in found:
            c.get(n).remove(force=True)
    """)
    assert second["found"] == first
    assert second["answers"] == {n: n for n in first}
    assert "NameTaken" in second["taken"] and "keep-0" in second["taken"]


def test_a_head_restart_leaves_the_sandboxes_running_and_they_are_found_again(cluster: Any) -> None:
    before = driver(cluster, """
        made = c.create_many([(f"head-{i}", "busybox", ["sleep", "infinity"], {}) for i in range(6)])
        c.wait_started(made)
        result({s.name: [s.host, s.info()["StartedUsec"]] for s in made})
    """)
    cluster.restart_head()
    # The hosts' Ray nodes end without their head and their services start them again.
    cluster.wait_hosts(HOSTS)
    after = driver(cluster, """
        found = {s.name: s.host for s in c.list()}
        out = {n: [h, c.get(n).info()["StartedUsec"], c.get(n).exec(["hostname"]).stdout.decode().strip()]
               for n, h in found.items()}
        result(out)
        for n in found:
            c.get(n).remove(force=True)
    """)
    # Same hosts, same containers (not started again), and each answers.
    assert after == {n: [h, started, n] for n, (h, started) in before.items()}


LOSS_DRIVER = """
    made = c.create_many([(f"{prefix}-{i}", "busybox", ["sleep", "infinity"], {}) for i in range(6)])
    c.wait_started(made)
    victims = [s for s in made if s.host == victim_host]
    result({"placed": {s.name: s.host for s in made}})
    wait_line()  # the test takes the host away now
    t0 = time.monotonic()
    while True:
        try:
            victims[0].exec(["true"])
        except errors.HostLost as e:
            lost_after, lost_error = time.monotonic() - t0, str(e)
            break
        time.sleep(0.05)
    others = {s.name: s.exec(["hostname"]).stdout.decode().strip() for s in made if s not in victims}
    states = {s.name: s.state for s in c.list()}
    errors_seen = []
    for s in victims:
        try:
            s.info()
        except errors.HostLost as e:
            errors_seen.append(type(e).__name__)
    moved = [s.name for s in c.recreate_lost()]
    after = {s.name: [s.host, s.wait_started(), s.exec(["hostname"]).stdout.decode().strip()]
             for s in victims}
    result({"lost_after": lost_after, "lost_error": lost_error, "others": others, "states": states,
            "errors": errors_seen, "moved": moved, "after": after})
    wait_line()  # the test brings the host back (or not)
    listed = {s.name: [s.host, s.state] for s in c.list()}
    for s in made:
        s.remove(force=True)
    result({"listed": listed, "left": [s.name for s in c.list()]})
"""


def _loss(cluster: Any, prefix: str, victim: Any, take_away: Any, bring_back: Any) -> dict[str, Any]:
    setup = f"prefix, victim_host = {prefix!r}, {victim.name!r}\n"
    d = Interactive(cluster, setup + textwrap.dedent(LOSS_DRIVER))
    try:
        placed = d.result()["placed"]
        take_away()
        d.go()
        lost = d.result()
        bring_back()
        d.go()
        final = d.result()
    finally:
        d.close()
    victims = sorted(n for n, h in placed.items() if h == victim.name)
    assert victims, placed
    assert "HostLost" in lost["lost_error"] and victim.name in lost["lost_error"]
    assert lost["lost_after"] < LOST_BOUND, lost["lost_after"]
    # Every call on a lost sandbox names the loss; the others keep working.
    assert lost["errors"] == ["HostLost"] * len(victims)
    assert lost["others"] == {n: n for n in placed if n not in victims}
    assert {n: s for n, s in lost["states"].items() if s == "lost"} == {n: "lost" for n in victims}
    # recreate_lost made them again on the hosts left, running and answering.
    assert sorted(lost["moved"]) == victims
    for n in victims:
        host, state, answer = lost["after"][n]
        assert host != victim.name and state == "running" and answer == n
    assert final["left"] == []
    return {"placed": placed, "victims": victims, "lost": lost, "final": final}


def test_a_cut_off_host_is_lost_then_reconciled_when_it_comes_back(cluster: Any) -> None:
    victim = cluster.hosts[1]

    def back() -> None:
        cluster.set_link(1, True)
        cluster.start_ray(1)  # its old node was declared dead: it joins as a new one
        cluster.wait_hosts(HOSTS)

    out = _loss(cluster, "cut", victim, lambda: cluster.set_link(1, False), back)
    # Seen again, the host removed its copies of the sandboxes recreated elsewhere:
    # each name runs once, where the registry says.
    listed = out["final"]["listed"]
    for n in out["victims"]:
        assert listed[n][0] != victim.name and listed[n][1] == "running"
    assert not [n for n in host_containers(victim) if n.startswith("cut-")]


def test_a_stopped_host_is_lost_within_the_bound_and_its_sandboxes_recreated(cluster: Any) -> None:
    # Last: the host does not come back.
    out = _loss(cluster, "stop", cluster.hosts[2], lambda: cluster.stop_host(2), lambda: None)
    listed = out["final"]["listed"]
    assert all(listed[n][1] == "running" for n in out["placed"]), listed
    print(f"lost after {out['lost']['lost_after']:.2f} s")
