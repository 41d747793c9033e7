"""The benchmark still runs end to end and reports every number (it is not timed here)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
QUILT_METRICS = ("create", "create_start", "info", "info_created", "running", "running_daemon",
                 "run_true", "exec_true", "exec_start", "get_logs")
MEMORY_METRICS = ("init_pss_kib", "init_rss_kib", "container_pss_kib", "memory_current_kib")


def test_quick_bench_reports_every_metric(
    sandbox_name: Callable[[str], str], sandbox_module: ModuleType
) -> None:
    name = sandbox_name("bench")
    r = subprocess.run(
        [str(REPO / "tools/bench"), "--quick", "--json", "--iterations", "3", "--idle", "2", "--copy-mb", "4",
         "--sandbox-name", name],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)

    for metric in QUILT_METRICS:
        v = result["quilt"][metric]
        assert v["n"] >= 3, (metric, v)
        assert 0 < v["p50_ms"] <= v["p99_ms"], (metric, v)
        assert v["target_p50_ms"] > 0, (metric, v)

    for peer in ("systemd-run", "bwrap"):
        v = result["peers"][peer]
        assert v.get("n") == 3 and 0 < v["p50_ms"] <= v["p99_ms"], (peer, v)
        assert result["ratios_quilt_over_peer"][peer]["p50"] > 0
    podman = result["peers"]["podman"]
    assert "skipped" in podman or podman["p50_ms"] > 0, podman

    copy = result["copy"]
    assert copy["files"] == 4
    for key in ("copy_in_mb_s", "copy_out_mb_s", "tar_pipe_mb_s"):
        assert copy[key] > 0, copy

    memory = result["memory"]
    assert memory["containers"] == 2
    for metric in MEMORY_METRICS:
        assert memory[metric]["n"] == 2 and memory[metric]["min"] > 0, (metric, memory[metric])
    assert isinstance(memory["quiltd_uss_growth_kib"]["median"], float | int)
    for transport in ("bus", "direct"):  # through the broker, and straight over quiltd.socket
        assert 0 < result["direct"][transport]["p50_ms"] <= result["direct"][transport]["p99_ms"]
    recovery = result["recovery"]
    assert recovery["still_running"] == recovery["containers"] > 0  # a restart stops none
    assert recovery["restart"]["n"] == 3 and recovery["restart"]["p50_ms"] > 0
    assert recovery["exit_file_us"]["write"] > 0 and recovery["exit_file_us"]["read"] > 0

    # Its sandbox is gone, whatever happened inside.
    assert name not in sandbox_module.Sandbox.names()

    # The table a person reads shows the same results next to the targets.
    table = _bench_module().render(result)
    for line in ("CreateContainer round trip (start=false)", "GetContainerInfo round trip",
                 "create -> running (client: signal)", "whole run of `true`",
                 "systemd-run --scope + unshare + chroot", "bwrap --unshare-all",
                 "container init PSS", "scope MemoryCurrent", "Exec of `true` round trip",
                 "GetLogs of 1,000 lines", "CopyIn (tar -c | CopyIn)", "tar -c | tar -x, same tree"):
        assert line in table, (line, table)
    assert f"{result['quilt']['create']['p50_ms']:.2f}" in table


def test_warm_bench_compares_the_pool_with_the_cold_path_and_the_peer(
    sandbox_name: Callable[[str], str], sandbox_module: ModuleType
) -> None:
    name = sandbox_name("warm")
    r = subprocess.run(
        [str(REPO / "tools/bench"), "--warm", "--quick", "--json", "--runs", "3", "--pool-size", "2",
         "--sandbox-name", name],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    for path in ("warm", "cold"):
        for metric in ("running", "running_daemon", "run_true", "run_true_exited", "run_true_remove"):
            v = result["quilt"][path][metric]
            assert v["n"] == 3 and 0 < v["p50_ms"] <= v["p99_ms"], (path, metric, v)
    assert result["peer"]["n"] == 3 and result["peer"]["p50_ms"] > 0
    # Every warm create was served from the pool, and no cold one.
    assert result["served_from_pool"] == {"warm": result["creates"], "cold": 0}
    assert result["environment"]["loadavg_before"]
    assert name not in sandbox_module.Sandbox.names()
    table = _bench_module().render_warm(result)
    for line in ("create -> running (client: signal)", "whole run of `true`", "of which RemoveContainer",
                 "systemd-run --scope + unshare + chroot", f"warm {result['creates']} of "):
        assert line in table, (line, table)


def test_fork_bench_reports_commit_fork_and_the_copies_beside(
    sandbox_name: Callable[[str], str], sandbox_module: ModuleType
) -> None:
    name = sandbox_name("fork")
    r = subprocess.run(
        [str(REPO / "tools/bench"), "--fork", "--quick", "--json", "--written-mb", "8",
         "--fork-counts", "1,3", "--sandbox-name", name],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    written = 8 << 20
    # The commit and cp -a copy what was written; a fork copies nothing.
    for copy in ("commit", "cp_a"):
        assert result[copy]["seconds"] > 0 and result[copy]["disk_bytes"] >= written, (copy, result[copy])
    assert [f["forks"] for f in result["forks"]] == [1, 3]
    for f in result["forks"]:
        assert f["seconds"] > 0 and f["disk_bytes"] < written // 4, f
    assert result["fork_running"]["seconds"] > 0
    podman = result["podman_commit"]
    assert "skipped" in podman or podman["seconds"] > 0, podman
    assert name not in sandbox_module.Sandbox.names()
    table = _bench_module().render_fork(result)
    for line in ("CommitContainer (running, frozen for the copy)", "cp -a of the writable layer",
                 "ForkContainer of a stopped container, 3 fork(s)", "ForkContainer of a running one"):
        assert line in table, (line, table)


LOAD_CALLS = {
    "closed": ("CreateContainer", "create -> running", "Exec", "GetContainerInfo", "RemoveContainer"),
    "open": ("Exec", "Exec (from sending)"),
    "burst": ("CreateContainer", "create -> running"),
    "status": ("GetContainerInfo",),
}
CPU_KEYS = ("quiltd", "fork_server", "quiltd_service_other", "quilt_slice", "systemd", "dbus", "journald",
            "total", "sandbox_other")


def test_load_bench_reports_every_part(
    sandbox_name: Callable[[str], str], sandbox_module: ModuleType
) -> None:
    """tools/bench --load with tiny counts: every part reports its fields and no call failed."""
    name = sandbox_name("bench-load")
    r = subprocess.run(
        [str(REPO / "tools/bench"), "--load", "--json", "--clients", "2", "--seconds", "2",
         "--containers", "2", "--burst", "4", "--burst-clients", "2", "--status-clients", "2",
         "--procs", "2", "--sandbox-name", name],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    load = result["load"]
    assert set(load) == set(LOAD_CALLS)
    for part, calls in LOAD_CALLS.items():
        v = load[part]
        assert v["errors"] == {}, (part, v["errors"])
        for call in calls:
            stats = v["calls"][call]
            assert stats["n"] >= 1 and 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"], (part, call)
        for when in ("before", "after"):
            assert v["quiltd"][when]["rss_kib"] > 0 and v["quiltd"][when]["fds"] > 0, (part, v["quiltd"])
        assert v["quiltd"]["peak"]["fds"] >= v["quiltd"]["before"]["fds"]
        assert v["restarts"] == 0 and v["leftover_containers"] == 0, (part, v)
        assert v["loadavg"]["max"] >= 0

    closed = load["closed"]
    assert closed["loops"] >= 1 and closed["loops_per_s"] > 0 and closed["slowest_over_median"] >= 1
    assert closed["wait"] == "signal"
    assert closed["calls"]["Exec"]["n"] == 5 * closed["loops"]
    cpu = closed["server_cpu_ms_per_loop"]
    assert set(cpu) == set(CPU_KEYS) and cpu["quiltd"] > 0 and cpu["total"] >= cpu["quiltd"], cpu
    assert closed["generator_cpu_ms_per_loop"] > 0
    # quiltd stays responsive: one more client asked GetSystemInfo all along.
    info = closed["system_info"]
    assert info["n"] >= 2 and 0 < info["p50_ms"] <= info["p99_ms"] <= info["max_ms"] < 60_000, info
    bus = closed["bus_round_trip"]  # and the bus's own GetId after each, to read it against
    assert bus["n"] == info["n"] and 0 < bus["p50_ms"] <= bus["max_ms"] < 60_000, bus

    opened = load["open"]
    assert opened["running"] == 2 and opened["completed"] == opened["offered"] == 2 * opened["seconds"]

    burst = load["burst"]
    assert burst["accepted"] == burst["running"] == 4 and burst["failed"] == 0
    assert burst["first_create_to_last_running_s"] > 0
    assert burst["list_containers"]["rows"] >= 4 and burst["list_containers"]["p50_ms"] > 0
    assert set(burst["quiltd_at_running"]) == {"0", "4"}
    assert burst["removal"]["errors"] == {} and burst["removal"]["calls"]["RemoveContainer"]["n"] == 4

    status = load["status"]
    assert status["calls_per_s"] > 0 and status["generator_cpu_cores"] is not None

    # Its sandbox is gone, whatever happened inside.
    assert name not in sandbox_module.Sandbox.names()

    table = _bench_module().render_load(result)
    for line in ("1. Closed agent loop", "ms/loop", "quiltd (the daemon process)", "3. Open-loop exec load",
                 "4. Burst", "ListContainers with", "5. Status saturation", "load generator CPU",
                 "the bus's own GetId"):
        assert line in table, (line, table)


def test_cluster_bench_reports_overhead_creates_spread_and_a_lost_host() -> None:
    """tools/bench --cluster with tiny counts: every number is there and the cluster is gone after."""
    r = subprocess.run(
        [str(REPO / "tools/bench"), "--cluster", "--quick", "--json", "--calls", "5", "--spread", "6"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    assert len(result["hosts"]) == 3
    assert len(result["exec_direct_ms"]) == len(result["exec_cluster_ms"]) == 5
    assert min(result["exec_direct_ms"]) > 0 and min(result["exec_cluster_ms"]) > 0
    assert sorted(result["creates"]) == ["1", "2", "3"]
    for k, v in result["creates"].items():
        assert v["n"] == 5 * int(k) and v["running"] == v["n"] and v["seconds"] > 0, (k, v)
    spread = result["spread"]
    assert spread["answered"] == 6 and sorted(spread["per_host"].values()) == [2, 2, 2], spread
    assert 0 < result["lost_seconds"] < 15, result["lost_seconds"]
    assert result["moved"] and result["hosts"][-1] not in result["moved"]
    assert not _bench_module().sandbox_module_clusters(), "the bench left a cluster behind"
    table = _bench_module().render_cluster(result)
    for line in ("through the cluster", "creates until running", "sandboxes spread", "lost host: HostLost"):
        assert line in table, (line, table)


def _bench_module() -> ModuleType:
    # tools/bench is a script without a .py suffix: load it by path.
    loader = importlib.machinery.SourceFileLoader("quilt_bench", str(REPO / "tools/bench"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module

