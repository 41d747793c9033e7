"""Fakes of the core's mechanisms (quiltd/core/mechanisms.py), for unit tests of the state machine.

Each keeps its protocol's contract as the core relies on it, and lets a test
play the other side: a FakeInit is told its spec and GO, answers, takes
signals and exits; FakeScopes makes, kills and stops units and can be made
to fail or to hold a start; FakeLinks makes veths and can fail. An init's
pidfd is the read end of a pipe whose write end the FakeInit holds: closing
it is the process ending, and the event loop sees it as it sees a pidfd.

The store, the networks' bookkeeping (Networks over FakeLinks) and the
directories are real, in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quiltd.access import Credentials
from quiltd.core.manager import Manager
from quiltd.errors import Internal
from quiltd.host.scopes import ScopeLimits
from quiltd.model import Container, Image, Usage
from quiltd.names import veth_name
from quiltd.net.network import Link
from quiltd.net.networks import Networks
from quiltd.paths import Paths
from quiltd.runtime import spawner
from quiltd.runtime.execproto import CONTROL_SOCKET
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.spawner import Launched, read_to_end
from quiltd.runtime.wire import Code, Failure
from quiltd.store.database import Store

T = TypeVar("T")
ROOT = Credentials(0, frozenset({0}))
IMAGE = "busybox"


class FakeInit:
    """One init the fake fork server made; the test plays its part."""

    def __init__(self, pid: int, exit_dir: Callable[[str], Path]) -> None:
        self.pid = pid
        self.starttime = pid * 10
        self._exit_file = exit_dir
        self._alive_r, self._alive_w = os.pipe()  # the write end closed = the process ended
        self._spec_r, spec_w = os.pipe()
        error_r, self._error_w = os.pipe()
        self.launched = Launched(pid, self.starttime, os.dup(self._alive_r), spec_w, error_r)
        self.spec: LaunchSpec | None = None
        self.went_in = False
        self.went = False
        self.claim: Mapping[str, object] | None = None
        self.signals: list[int] = []
        self.ignores_term = False
        self.alive = True

    def answer(self, failure: str = "") -> None:
        """Init's answer on the error pipe after GO: "" is the command executed."""
        if self._error_w < 0:
            return
        if failure:
            os.write(self._error_w, failure.encode())
        os.close(self._error_w)
        self._error_w = -1

    def exit(self, code: int | None) -> None:
        """The init ends: with code the command's exit status as it records it; None for killed."""
        if not self.alive:
            return
        if code is not None and self.spec is not None:
            self._exit_file(self.spec.container_id).write_text(str(code))
        self.alive = False
        self.answer("")
        os.close(self._alive_w)

    @property
    def abandoned(self) -> bool:
        """The daemon closed the spec pipe without GO: a real init reads end of file and leaves."""
        os.set_blocking(self._spec_r, False)
        try:
            return os.read(self._spec_r, 1) == b"" and not self.went
        except BlockingIOError:
            return False

    def pidfd(self) -> int:
        return os.dup(self._alive_r)

    def reconnect(self) -> Launched:
        """A restarted daemon's connection to this waiting pool member: new ends for GO and the answer."""
        for fd in (self._spec_r, self._error_w):
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.close(fd)
        self._spec_r, spec_w = os.pipe()
        error_r, self._error_w = os.pipe()
        self.launched = Launched(self.pid, self.starttime, self.pidfd(), spec_w, error_r)
        return self.launched

    def close(self) -> None:
        for fd in (self._alive_r, self._spec_r, self._error_w):
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.close(fd)
        if self.alive:
            self.alive = False
            os.close(self._alive_w)


class FakeProcesses:
    """Processes: the fake inits, found by pid and start time, signalled through their pidfds."""

    def __init__(self) -> None:
        self.inits: dict[int, FakeInit] = {}
        self._by_pidfd: dict[int, FakeInit] = {}

    def add(self, init: FakeInit) -> None:
        self.inits[init.pid] = init
        self._by_pidfd[init.launched.pidfd] = init

    def open_pidfd(self, pid: int, starttime: int) -> int | None:
        init = self.inits.get(pid)
        if init is None or not init.alive or init.starttime != starttime:
            return None
        fd = init.pidfd()
        self._by_pidfd[fd] = init
        return fd

    def watch_exit(self, pidfd: int, on_exit: Callable[[], None]) -> None:
        # A fake init's pidfd becomes readable when it exits, as a real one does.
        spawner.watch_exit(pidfd, on_exit)

    def send_signal(self, pidfd: int, signum: int) -> None:
        init = self._by_pidfd[pidfd]
        if not init.alive:
            return
        init.signals.append(signum)
        if signum == signal.SIGTERM and not init.ignores_term:
            init.exit(128 + signum)  # init passes it on; the command dies of it and init records that

    def alive(self, pid: int) -> bool:
        # A pid the fakes did not make (a test's own scope) stands for a process that lives.
        init = self.inits.get(pid)
        return init is None or init.alive

    def kill(self, pid: int) -> None:
        """SIGKILL to init itself: it dies without writing its exit file."""
        init = self.inits.get(pid)
        if init is not None:
            init.signals.append(signal.SIGKILL)
            init.exit(None)


class FakeInits:
    """The fork server and its inits' pipes; launch fails with fail_launch if set."""

    def __init__(self, processes: FakeProcesses, paths: Paths) -> None:
        self._processes = processes
        self._paths = paths
        self._pids = itertools.count(10_000)
        self.made: list[FakeInit] = []
        self.fail_launch: Exception | None = None
        self.failure = ""  # what every init answers after GO
        self.answer_at_go = True  # False: the test calls init.answer() itself

    async def launch(self) -> Launched:
        await asyncio.sleep(0)
        if self.fail_launch is not None:
            raise self.fail_launch
        init = FakeInit(next(self._pids), self._paths.exit_file)
        self.made.append(init)
        self._processes.add(init)
        return init.launched

    def _init(self, launched: Launched) -> FakeInit:
        return self._processes.inits[launched.pid]

    def send_spec(self, launched: Launched, spec: LaunchSpec) -> None:
        self._init(launched).spec = spec

    def send_in(self, launched: Launched) -> None:
        self._init(launched).went_in = True

    def send_go(self, launched: Launched, claim: Mapping[str, object] | None = None) -> None:
        init = self._init(launched)
        if not init.went_in:
            # The real init builds the root only once it is in its scope.
            raise AssertionError(f"GO before IN to init {launched.pid}")
        init.went, init.claim = True, claim
        os.close(launched.spec_fd)
        if self.answer_at_go and init.alive:
            init.answer(self.failure)
            if self.failure:
                init.exit(None)  # an init whose command could not run leaves

    async def confirm(self, launched: Launched) -> Failure | None:
        """init's answer as the wire carries it: "<code>: <message>" written by FakeInit.answer."""
        text = (await read_to_end(launched.error_fd)).decode()
        if not text:
            return None
        word, _, message = text.partition(": ")
        code = Code(word) if word in {c.value for c in Code} else Code.INTERNAL
        return Failure(code, message if code != Code.INTERNAL else text)

    def adopt(self, pid: int, starttime: int, control_socket: str) -> Launched | None:
        init = self._processes.inits.get(pid)
        if init is None or not init.alive or init.starttime != starttime or init.spec is None:
            return None
        assert control_socket == str(self._paths.container_run_dir(init.spec.container_id) / CONTROL_SOCKET)
        if not (init.went_in and init.spec.pool_member) or init.went:
            return None  # a real one left when its spec pipe closed
        launched = init.reconnect()
        self._processes.add(init)
        return launched

    def close(self) -> None:
        for init in self.made:
            init.close()


class FakeScopes:
    """systemd's scopes: units with their pids; start_scope fails with fail_start or waits for hold."""

    def __init__(self, processes: FakeProcesses) -> None:
        self._processes = processes
        self._units: dict[str, list[int]] = {}  # unit -> the pids in it
        self.limits: dict[str, ScopeLimits] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_start: Exception | None = None
        self.fail_stop: list[Exception] = []  # raised by the next stops, one each
        self.hold: asyncio.Event | None = None  # start_scope waits for it

    @property
    def units(self) -> dict[str, list[int]]:
        """The units there are now, as systemctl would list them."""
        self._collect()
        return self._units

    def _collect(self) -> None:
        # systemd collects a scope once its last process is gone (CollectMode=inactive-or-failed).
        for unit, pids in list(self._units.items()):
            if not any(self._processes.alive(pid) for pid in pids):
                del self._units[unit]

    async def start_scope(self, unit: str, pid: int, limits: ScopeLimits, description: str) -> None:
        self._collect()
        self.calls.append(("start", unit))
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_start is not None:
            raise self.fail_start
        if unit in self._units:
            raise Internal(f"Unit {unit} already exists.")
        self._units[unit] = [pid]
        self.limits[unit] = limits

    async def attach(self, unit: str, pid: int) -> None:
        self._collect()
        self.calls.append(("attach", unit))
        if unit not in self._units:
            raise Internal(f"Unit {unit} not loaded.")
        self._units[unit].append(pid)

    async def kill(self, unit: str, signal_: int) -> None:
        self._collect()
        self.calls.append((f"kill {signal_}", unit))
        if unit not in self._units:
            raise Internal(f"Unit {unit} not loaded.")
        if signal_ == signal.SIGKILL:
            for pid in self._units[unit]:
                self._processes.kill(pid)

    async def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))
        if self.fail_stop:
            raise self.fail_stop.pop(0)
        for pid in self._units.pop(unit, []):
            self._processes.kill(pid)

    async def usage(self, unit: str) -> Usage:
        self._collect()
        if unit not in self._units:
            raise Internal(f"Unit {unit} not loaded.")
        return Usage(memory_current=4096, cpu_usage_nsec=1000, tasks_current=len(self._units[unit]))

    def is_empty(self, unit: str) -> bool:
        self._collect()
        return unit not in self._units

    async def list_scopes(self, pattern: str = "quilt-*.scope") -> list[tuple[str, str]]:
        self._collect()
        return [(unit, "active") for unit in self._units]


class FakeLinks:
    """The host's links: bridges and veths by name; add_veth fails with fail_veth if set.

    As the kernel does, a veth goes with its network namespace: once the
    process that held it (alive says) is gone.
    """

    def __init__(self, alive: Callable[[int], bool] = lambda pid: True) -> None:
        self._alive = alive
        self._holders: dict[str, int] = {}  # veth -> the pid whose namespace holds its peer
        self.held: set[str] = set()  # veths whose namespace something else holds on to
        self.links_by_name: dict[str, Link] = {}
        self.fail_veth: Exception | None = None
        self.firewall_loads = 0
        self.nft_scripts: list[str] = []

    async def ensure_bridge(self, name: str, gateway: str) -> None:
        self.links_by_name.setdefault(name, Link(name, "bridge", ""))

    async def add_veth(self, container_id: str, bridge: str, gateway: str, pid: int, address: str) -> None:
        await asyncio.sleep(0)
        if self.fail_veth is not None:
            raise self.fail_veth
        self.links_by_name.setdefault(bridge, Link(bridge, "bridge", ""))
        self.links_by_name[veth_name(container_id)] = Link(veth_name(container_id), "veth", bridge)
        self._holders[veth_name(container_id)] = pid

    def _collect(self) -> None:
        for name, pid in list(self._holders.items()):
            if not self._alive(pid) and name not in self.held:
                del self._holders[name]
                self.links_by_name.pop(name, None)

    async def delete_link(self, name: str) -> bool:
        self._collect()
        self._holders.pop(name, None)
        return self.links_by_name.pop(name, None) is not None

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        # Only the firewall's reload comes here; nft is never run on the host.
        self.firewall_loads += 1
        return None  # type: ignore[return-value]

    async def links(self) -> list[Link]:
        self._collect()
        return list(self.links_by_name.values())

    async def set_master(self, name: str, bridge: str) -> None:
        self.links_by_name[name] = Link(name, "veth", bridge)

    async def load_nft(self, script: str) -> None:
        self.nft_scripts.append(script)

    def veths(self) -> set[str]:
        self._collect()
        return {name for name, link in self.links_by_name.items() if link.kind == "veth"}


@dataclass
class Events:
    """What the manager announced, as (event, container name, state)."""

    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def container_added(self, c: Container) -> None:
        self.seen.append(("added", c.name, c.state.value))

    def container_changed(self, c: Container, old: Container) -> None:
        self.seen.append(("changed", c.name, c.state.value))

    def container_removed(self, c: Container) -> None:
        self.seen.append(("removed", c.name, c.state.value))

    def states(self, name: str) -> list[str]:
        """The states name went through, in order (a change within a state, such as its pid, once)."""
        states: list[str] = []
        for event, n, state in self.seen:
            if n == name and event != "removed" and states[-1:] != [state]:
                states.append(state)
        return states


class World:
    """The host as the core sees it: fake mechanisms that outlive any one Manager (a daemon's run)."""

    def __init__(self, root: Path) -> None:
        self.paths = Paths(root / "state", root / "run")
        self.paths.create()
        image_dir = self.paths.images / "busybox"
        image_dir.mkdir(parents=True)
        self.processes = FakeProcesses()
        self.inits = FakeInits(self.processes, self.paths)
        self.scopes = FakeScopes(self.processes)
        self.links = FakeLinks(self.processes.alive)
        self.stores: list[Store] = []
        store = self.store()
        with store.transaction():
            store.insert_image(Image(IMAGE, "sha256:" + "ab" * 32, str(image_dir), 0, 0))

    def store(self) -> Store:
        store = Store(self.paths.database)
        self.stores.append(store)
        return store

    def manager(self) -> tuple[Manager, Events]:
        """A daemon's core, as daemon.py wires it, over the fakes and a store of its own."""
        store = self.store()
        networks = Networks(self.paths, store, self.links, self.links.load_nft)
        manager = Manager(self.paths, store, self.scopes, self.inits, self.processes, networks)
        events = Events()
        manager.add_listener(events)
        return manager, events

    def init_of(self, c: Container) -> FakeInit:
        return next(i for i in self.inits.made if i.spec is not None and i.spec.container_id == c.id)

    def close(self) -> None:
        self.inits.close()
        for store in self.stores:
            store.close()


@contextlib.contextmanager
def world(root: Path) -> Iterator[World]:
    w = World(root)
    try:
        yield w
    finally:
        w.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
