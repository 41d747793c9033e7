"""quiltctl's watching verbs, as podman has them: stats, events and top.

stats reads the usage quiltd reports (GetContainerInfo: the scope's CPU
time, memory and tasks) and each container's network counters from the host
end of its veth; events prints quiltd's signals as they come; top lists the
processes in the container's cgroup from /proc. The veth and /proc are read
on this host: with --address to a quiltd elsewhere, NET IO shows "--" and
top finds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quiltd import errors
from quiltd.cli import ctloutput
from quiltd.client import QuiltClient
from quiltd.names import veth_name

ACTIVE = ("starting", "running", "stopping", "paused")
STATS_INTERVAL = 2.0  # seconds between refreshes, as podman stats
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def add_verbs(verb: Callable[[str, str, Callable[..., Any]], argparse.ArgumentParser]) -> None:
    s = verb("stats", "live CPU, memory, tasks and network of containers (running ones unless named)",
             cmd_stats)
    s.add_argument("--no-stream", action="store_true", help="print once and exit")
    s.add_argument("--interval", type=float, default=STATS_INTERVAL, metavar="SECONDS",
                   help=f"seconds between refreshes (default {STATS_INTERVAL:g})")
    ctloutput.add_format(s)
    s.add_argument("refs", nargs="*", metavar="CONTAINER")
    s = verb("events", "print quiltd's events (its D-Bus signals) as they happen, until interrupted",
             cmd_events)
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="container=NAME|ID, type=container|image|exec, event=ACTION, image=NAME "
                        "(repeatable: the same key any of its values, different keys all)")
    ctloutput.add_format(s)
    s = verb("top", "list the processes of a running container", cmd_top)
    ctloutput.add_format(s)
    s.add_argument("ref", metavar="CONTAINER")


class UsageError(Exception):
    """A bad command line; ctl turns it into exit code 2."""


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class Sample:
    id: str
    name: str
    state: str
    cpu_nsec: int
    memory: int
    memory_limit: int  # the container's MemoryMax, or the host's memory without one
    tasks: int
    net_rx: int | None  # bytes the container received, None without a veth here
    net_tx: int | None
    at: float  # time.monotonic() of the sample
    started_usec: int


@dataclass(frozen=True)
class Stat:
    """One row of stats: a sample and the CPU share since the previous one."""

    id: str
    name: str
    cpu_percent: float
    memory_bytes: int
    memory_limit_bytes: int
    memory_percent: float
    tasks: int
    net_rx_bytes: int | None
    net_tx_bytes: int | None


def cpu_percent(now: Sample, before: Sample | None, wall_usec: int) -> float:
    """Percent of one CPU since the previous sample, or since the start for the first one (as podman)."""
    if before is not None and now.at > before.at:
        return max(0.0, (now.cpu_nsec - before.cpu_nsec) / ((now.at - before.at) * 1e9) * 100)
    elapsed_usec = wall_usec - now.started_usec
    if now.started_usec <= 0 or elapsed_usec <= 0:
        return 0.0
    return now.cpu_nsec / (elapsed_usec * 1e3) * 100


def stat(now: Sample, before: Sample | None, wall_usec: int) -> Stat:
    limit = now.memory_limit
    return Stat(now.id, now.name, round(cpu_percent(now, before, wall_usec), 2), now.memory, limit,
                round(now.memory / limit * 100, 2) if limit else 0.0, now.tasks, now.net_rx, now.net_tx)


def stats_rows(stats: list[Stat]) -> list[list[str]]:
    rows = []
    for s in stats:
        net = "--" if s.net_rx_bytes is None or s.net_tx_bytes is None else \
            f"{ctloutput.size(s.net_rx_bytes)} / {ctloutput.size(s.net_tx_bytes)}"
        rows.append([s.id, s.name, f"{s.cpu_percent:.2f}%",
                     f"{ctloutput.size(s.memory_bytes)} / {ctloutput.size(s.memory_limit_bytes)}",
                     f"{s.memory_percent:.2f}%", net, str(s.tasks)])
    return rows


STATS_HEADER = ["ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET IO (RX / TX)", "PIDS"]


def _host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _net(container_id: str) -> tuple[int | None, int | None]:
    """The container's received and sent bytes: the host end of its veth counts them the other way."""
    base = Path("/sys/class/net") / veth_name(container_id) / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except (OSError, ValueError):
        return None, None


def _processes_cpu_nsec(init: int) -> int:
    """CPU time of the container's processes, with their children that ended, from /proc.

    For a scope without CPU accounting (a cgroup v1 host where systemd keeps
    no cpuacct group for it), whose CPUUsageNSec is 0.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    with contextlib.suppress(OSError, StopIteration):
        for pid in cgroup_pids(cgroup_dir(init)):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total * 1_000_000_000 // tick


async def _sample(q: QuiltClient, ref: str, host_memory: int) -> Sample | None:
    try:
        info = await q.info(ref)
    except errors.NoSuchContainer:
        return None  # removed meanwhile
    active = info["State"] in ACTIVE
    rx, tx = _net(info["Id"]) if active else (None, None)
    cpu = info["CPUUsageNSec"]
    if not cpu and active and info["Pid"]:
        cpu = _processes_cpu_nsec(info["Pid"])
    return Sample(info["Id"], info["Name"], info["State"], cpu, info["MemoryCurrent"],
                  info["MemoryMax"] or host_memory, info["TasksCurrent"], rx, tx, time.monotonic(),
                  info["StartedUsec"])


async def cmd_stats(q: QuiltClient, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval takes a number of seconds above 0")
    host_memory = _host_memory()
    before: dict[str, Sample] = {}
    if args.refs:
        for ref in args.refs:  # a wrong name fails now, as with podman
            await q.info(ref)
    terminal = sys.stdout.isatty()
    while True:
        refs = list(args.refs) or [row[0] for row in await q.list_containers() if row[3] in ACTIVE]
        samples = [s for s in [await _sample(q, ref, host_memory) for ref in refs] if s is not None]
        wall_usec = time.time_ns() // 1000
        stats = [stat(s, before.get(s.id), wall_usec) for s in samples]
        before = {s.id: s for s in samples}
        if args.format == "json":
            ctloutput.print_json([asdict(s) for s in stats], lines=not args.no_stream)
        else:
            if terminal and not args.no_stream:
                sys.stdout.write(CLEAR)
            ctloutput.table(STATS_HEADER, stats_rows(stats))
            sys.stdout.flush()
        if args.no_stream:
            return 0
        await asyncio.sleep(args.interval)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    time: str  # ISO 8601, local time with its offset
    type: str  # container, image or exec
    action: str  # a container's new state, "removed", "import", "exited"
    id: str  # the container's id, the image's name or the exec's id
    attributes: dict[str, Any] = field(default_factory=dict)


def event_from_signal(member: str, body: list[Any], when: datetime.datetime) -> Event | None:
    stamp = when.isoformat(timespec="microseconds")
    if member == "ContainerStateChanged":
        cid, name, state, code = body
        return Event(stamp, "container", state, cid, {"name": name, "exit_code": code})
    if member == "ContainerRemoved":
        cid, name = body
        return Event(stamp, "container", "removed", cid, {"name": name})
    if member == "ImportProgress":
        name, done, total = body
        return Event(stamp, "image", "import", name, {"name": name, "bytes_read": done, "bytes_total": total})
    if member == "ExecExited":
        exec_id, cid, code = body
        return Event(stamp, "exec", "exited", exec_id, {"container": cid, "exit_code": code})
    return None


SIGNALS = ("ContainerStateChanged", "ContainerRemoved", "ImportProgress", "ExecExited")
FILTER_KEYS = ("container", "type", "event", "image")


def parse_filters(texts: list[str]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise UsageError(f"invalid filter {text!r}: use " + ", ".join(f"{k}=..." for k in FILTER_KEYS))
        filters.setdefault(key, set()).add(value)
    return filters


def matches(e: Event, filters: dict[str, set[str]]) -> bool:
    """podman's rule: every key given must match, by any of its values."""
    for key, values in filters.items():
        if key == "type":
            ok = e.type in values
        elif key == "event":
            ok = e.action in values
        elif key == "image":
            ok = e.type == "image" and e.id in values
        else:  # container: its id or name, or an exec's container
            ok = (e.type == "container" and (e.id in values or e.attributes.get("name") in values)) or \
                (e.type == "exec" and e.attributes.get("container") in values)
        if not ok:
            return False
    return True


def event_line(e: Event) -> str:
    attributes = ", ".join(f"{k}={v}" for k, v in e.attributes.items())
    return f"{e.time} {e.type} {e.action} {e.id}" + (f" ({attributes})" if attributes else "")


async def cmd_events(q: QuiltClient, args: argparse.Namespace) -> int:
    filters = parse_filters(args.filter)
    # A container named in a filter matches by its id too: an exec's event names only that.
    for ref in list(filters.get("container", ())):
        with contextlib.suppress(errors.NoSuchContainer):  # not made yet: its name still matches
            filters["container"].add((await q.info(ref))["Id"])

    def handler(member: str) -> Callable[[list[Any]], None]:
        def handle(body: list[Any]) -> None:
            e = event_from_signal(member, body, datetime.datetime.now().astimezone())
            if e is None or not matches(e, filters):
                return
            if args.format == "json":
                ctloutput.print_json(asdict(e), lines=True)
            else:
                print(event_line(e), flush=True)
        return handle

    for member in SIGNALS:
        await q.watch_signal(member, handler(member))
    await asyncio.Event().wait()  # until interrupted
    return 0


# ---------------------------------------------------------------- top


@dataclass(frozen=True)
class Process:
    user: str
    pid: int  # in the container's PID namespace
    ppid: int  # likewise; 0 for its init
    host_pid: int
    cpu_percent: float
    elapsed: str
    time: str
    command: str


TOP_HEADER = ["USER", "PID", "PPID", "%CPU", "ELAPSED", "TIME", "COMMAND"]


def duration(seconds: float) -> str:
    """As podman top: 1h2m3s, 4m5s, 6s."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def cgroup_dir(pid: int, root: Path = Path("/sys/fs/cgroup")) -> Path:
    """The cgroup of pid holding its processes: the unified one, else the v1 pids controller's."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    unified = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    if unified and (root / "cgroup.controllers").exists():
        return root / unified[0].lstrip("/")
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return root / "pids" / path.lstrip("/")
    raise FileNotFoundError(f"no cgroup of process {pid}")


def cgroup_pids(directory: Path) -> list[int]:
    pids = []
    for procs in [directory / "cgroup.procs", *directory.rglob("*/cgroup.procs")]:
        try:
            pids += [int(x) for x in procs.read_text().split()]
        except (OSError, ValueError):
            continue  # a child cgroup gone meanwhile
    return sorted(set(pids))


def _inside_id(outside: int, map_text: str) -> int:
    for line in map_text.splitlines():
        inside, start, count = (int(x) for x in line.split())
        if start <= outside < start + count:
            return inside + outside - start
    return 65534  # unmapped: the overflow id


def _user_names(init: int) -> dict[int, str]:
    """The container's own /etc/passwd, where we may read it (root may; a member sees numbers)."""
    names: dict[int, str] = {}
    try:
        with open(f"/proc/{init}/root/etc/passwd", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > 2 and parts[2].isdigit():
                    names.setdefault(int(parts[2]), parts[0])
    except OSError:
        pass
    return names


def processes(init: int) -> list[Process]:
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    now = time.time()
    names = _user_names(init)
    raw = []
    for pid in cgroup_pids(cgroup_dir(init)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            uid_map = Path(f"/proc/{pid}/uid_map").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid, cpu_ticks, start_ticks = int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19])
        tags = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        nspid = int(tags.get("NSpid", str(pid)).split()[-1])
        uid = _inside_id(int(tags["Uid"].split()[0]), uid_map)
        elapsed = max(now - (boot + start_ticks / tick), 0.001)
        cpu = cpu_ticks / tick
        argv = cmdline.rstrip(b"\0").split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv) or f"[{comm}]"  # a kernel-like thread
        raw.append((pid, ppid, Process(names.get(uid, str(uid)), nspid, 0, pid, round(cpu / elapsed * 100, 1),
                                       duration(elapsed), duration(cpu), command)))
    inside = {host: p.pid for host, _, p in raw}
    return [Process(p.user, p.pid, inside.get(ppid, 0), p.host_pid, p.cpu_percent, p.elapsed, p.time,
                    p.command) for _, ppid, p in raw]


async def cmd_top(q: QuiltClient, args: argparse.Namespace) -> int:
    info = await q.info(args.ref)
    if info["State"] not in ACTIVE or not info["Pid"]:
        raise errors.InvalidState(f"org.quilt.Quilt1.Error.InvalidState: container {info['Name']} is "
                                  f"{info['State']}, not running")
    try:
        found = processes(int(info["Pid"]))
    except (OSError, StopIteration) as e:
        raise errors.QuiltError(f"cannot read the processes of {info['Name']} on this host: {e}") from None
    if args.format == "json":
        ctloutput.print_json([asdict(p) for p in found])
    else:
        ctloutput.table(TOP_HEADER, [[p.user, str(p.pid), str(p.ppid), f"{p.cpu_percent:.1f}", p.elapsed,
                                      p.time, p.command] for p in found])
    return 0
