"""QuiltCluster: sandboxes across the hosts of a Ray cluster, each host's quiltd doing the work.

Ray gives membership, failure detection and transport; Quilt adds no
scheduler or detector of its own. The driver places a sandbox from the
hosts' own reports (GetSystemInfo through each host's agent), records the
name in the cluster's registry, and sends every later call to the agent of
the host it lives on. See docs/cluster.md.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from quiltd import errors
from quiltd.client import ExecResult, LogLine
from quiltd.cluster import placement
from quiltd.cluster.agent import HostAgent
from quiltd.cluster.records import LOST, HostInfo, MapResult, Need, SandboxRecord, SandboxSummary
from quiltd.cluster.registry import Registry

T = TypeVar("T")

NAMESPACE = "quilt"
REGISTRY_NAME = "quilt-registry"
# Ray nodes that are Quilt hosts carry this resource (ray start --resources).
QUILT_RESOURCE = "quilt_host"
HEAD_RESOURCE = "node:__internal_head__"
# How long a host's report may answer late before the host is left out of a
# placement: a quiltd that hangs must not hang every create.
INFO_TIMEOUT = 10.0
# Reports older than this are asked again before a placement.
INFO_TTL = 1.0


@dataclass(frozen=True)
class _Host:
    name: str
    node_id: str
    agent: Any  # the Ray actor handle of its HostAgent


def _unwrap(e: RayTaskError) -> BaseException:
    """The error the agent raised (a QuiltError keeps its class), not Ray's wrapper."""
    cause = e.cause
    return cause if isinstance(cause, BaseException) else e


class QuiltCluster:
    """Connects to a Ray cluster (address as ray.init takes it) whose Quilt hosts run quiltd.

    Use one per driver process. Calls are plain (not asyncio) and thread-safe.
    """

    def __init__(self, address: str | None = "auto", *, namespace: str = NAMESPACE) -> None:
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
        self._namespace = namespace
        self._registry = self._registry_actor()
        self._hosts: dict[str, _Host] = {}  # node id -> host, live nodes only
        self._infos: dict[str, HostInfo] = {}  # host name -> report, claims applied
        self._infos_at = 0.0
        self._cache: dict[str, SandboxRecord] = {}  # name -> record, as last read from the registry
        # Seeing the hosts squares them with the registry: after a head restart
        # this is what refills it, before the first get() asks it.
        self.hosts()

    def _registry_actor(self) -> Any:
        return ray.remote(Registry).options(  # type: ignore[attr-defined]
            name=REGISTRY_NAME, namespace=self._namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_concurrency=1,
        ).remote()

    def _reg(self, method: str, *args: Any) -> Any:
        """registry.method(*args); a registry that died (its head restarted) is made again from the hosts."""
        try:
            return self._call(getattr(self._registry, method).remote(*args))
        except RayActorError:
            self._registry = self._registry_actor()
            self._hosts.clear()  # each host gives the new registry its sandboxes when seen again
            self.hosts()
            return self._call(getattr(self._registry, method).remote(*args))

    # -- hosts

    def _agent(self, node_id: str) -> Any:
        return ray.remote(HostAgent).options(  # type: ignore[attr-defined]
            name=f"quilt-host-{node_id}", namespace=self._namespace, lifetime="detached",
            get_if_exists=True, num_cpus=0, max_restarts=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()

    def hosts(self) -> dict[str, _Host]:
        """Live hosts by name: Ray's view of its nodes, each with its agent (made on first sight)."""
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["Resources"].get(QUILT_RESOURCE)}
        for node_id in list(self._hosts):
            if node_id not in alive:
                del self._hosts[node_id]
        unsquared: builtins.list[_Host] = []
        for node_id in alive:
            if node_id in self._hosts:
                continue
            agent = self._agent(node_id)
            try:
                name = ray.get(agent.hostname.remote(), timeout=INFO_TIMEOUT)
            except (RayActorError, GetTimeoutError):
                continue  # the node went between the two calls, or is too slow to count
            host = _Host(name, node_id, agent)
            if self._reconcile(host):
                self._hosts[node_id] = host
            else:
                unsquared.append(host)  # live, but asked again next time
        return {h.name: h for h in [*self._hosts.values(), *unsquared]}

    def _reconcile(self, host: _Host) -> bool:
        """Squares a host this driver sees for the first time with the registry.

        Its copies of sandboxes the registry places elsewhere (recreated while
        it was away) are removed, so no name runs twice; sandboxes the registry
        lacks (it is new, after a head restart) are taken into it. False if
        its quiltd did not answer: it is tried again when next seen.
        """
        try:
            here: builtins.list[SandboxRecord] = ray.get(host.agent.records.remote(), timeout=INFO_TIMEOUT)
        except (RayActorError, GetTimeoutError, RayTaskError):
            return False
        current = self._reg("adopt", here)
        for s in here:
            r = current.get(s.name)
            if r is not None and (r.host, r.container_id) != (host.name, s.container_id):
                with contextlib.suppress(RayActorError, RayTaskError):
                    ray.get(host.agent.remove.remote(s.container_id, True))
        return True

    def host_infos(self, *, fresh: bool = False) -> dict[str, HostInfo]:
        """Reports of the live hosts whose quiltd answers; the others get nothing placed on them."""
        if fresh or time.monotonic() - self._infos_at > INFO_TTL:
            hosts = self.hosts()
            refs = {name: h.agent.host_info.remote(h.node_id) for name, h in hosts.items()}
            infos = {}
            for name, ref in refs.items():
                try:
                    infos[name] = ray.get(ref, timeout=INFO_TIMEOUT)
                except (RayActorError, RayTaskError, GetTimeoutError):
                    continue
            self._infos, self._infos_at = infos, time.monotonic()
        return dict(self._infos)

    # -- the registry

    def _records(self) -> builtins.list[SandboxRecord]:
        records: builtins.list[SandboxRecord] = self._reg("records")
        return records

    def _record(self, name: str, *, fresh: bool = True) -> SandboxRecord:
        if fresh or name not in self._cache:
            self._cache[name] = self._reg("get", name)
        return self._cache[name]

    def _live_host(self, name: str, *, fresh: bool) -> _Host | None:
        """The live host of that name; from what this driver last saw unless fresh or unseen."""
        for h in self._hosts.values():
            if h.name == name and not fresh:
                return h
        return self.hosts().get(name)

    def _call(self, ref: Any, timeout: float | None = None) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except RayTaskError as e:
            raise _unwrap(e) from None

    # -- sandboxes

    def create(self, name: str, image: str, command: Sequence[str] = (), *, host: str | None = None,
               avoid: Iterable[str] = (), pull: str | None = None, **options: Any) -> Sandbox:
        """Places and creates one sandbox (started unless start=False); options are CreateContainer's.

        host: only this host; avoid: not these; pull: a source (docker://...) each host
        without the image pulls it from. Unplaceable at once if no live host can take it.
        """
        return self.create_many([(name, image, command, options)], host=host, avoid=avoid, pull=pull)[0]

    def create_many(self, specs: Sequence[tuple[str, str, Sequence[str], Mapping[str, Any]]], *,
                    host: str | None = None, avoid: Iterable[str] = (),
                    pull: str | None = None) -> builtins.list[Sandbox]:
        """Creates many (name, image, command, options): placed together, one call per host and step.

        All or nothing: if any fails, those made are removed and the error is raised.
        """
        infos = self.host_infos()
        hosts = self.hosts()
        plan: builtins.list[tuple[str, str, tuple[str, ...], dict[str, Any], HostInfo]] = []
        for name, image, command, options in specs:
            need = Need(image, float(options.get("cpu_quota") or 0.0), int(options.get("memory_max") or 0),
                        host, frozenset(avoid), pull is not None)
            chosen = placement.choose(list(infos.values()), need)
            infos[chosen.name] = placement.claim(chosen, need)
            plan.append((name, image, tuple(command), dict(options), chosen))
        reserved: builtins.list[str] = []
        made: builtins.list[tuple[str, str]] = []  # (host, container id)
        try:
            # One registry call for the batch: the registry serves every driver one call at a time.
            names = [name for name, *_ in plan]
            self._reg("reserve_many", names)
            reserved = names
            refs = [hosts[h.name].agent.create.remote(name, image, command, options, pull)
                    for name, image, command, options, h in plan]
            ids = []
            first: BaseException | None = None
            for (name, *_, h), ref in zip(plan, refs, strict=True):
                try:
                    cid = self._call(ref)
                    made.append((h.name, cid))
                    ids.append(cid)
                except RayActorError:
                    first = first or errors.HostLost(f"{errors.HostLost.dbus_name}: host {h.name} went "
                                                     f"while {name!r} was created there")
                except BaseException as e:
                    first = first or e
            if first is not None:
                raise first
        except BaseException:
            for hname, cid in made:
                # A host that went meanwhile reconciles it away when seen again.
                with contextlib.suppress(RayActorError, RayTaskError):
                    ray.get(hosts[hname].agent.remove.remote(cid, True))
            self._reg("release_many", reserved)
            raise
        records = [SandboxRecord(name, h.name, cid, image, command, tuple(sorted(options.items())))
                   for (name, image, command, options, h), cid in zip(plan, ids, strict=True)]
        self._reg("commit_many", records)
        self._infos.update(infos)
        return [Sandbox(self, r.name) for r in records]

    def get(self, name: str) -> Sandbox:
        """The handle of an existing sandbox (NoSuchContainer if the cluster has none of that name)."""
        self._record(name)
        return Sandbox(self, name)

    def list(self) -> builtins.list[SandboxSummary]:
        """Every sandbox of the cluster: those of live hosts as their quiltd reports them, the rest lost."""
        hosts = self.hosts()
        refs = {name: h.agent.sandboxes.remote() for name, h in hosts.items()}
        rows: dict[str, SandboxSummary] = {}
        answered = set()
        for name, ref in refs.items():
            try:
                for s in ray.get(ref, timeout=INFO_TIMEOUT):
                    rows[s.name] = s
                answered.add(name)
            except (RayActorError, RayTaskError, GetTimeoutError):
                continue
        for r in self._records():
            if r.host not in hosts:
                rows[r.name] = SandboxSummary(r.name, r.host, r.container_id, r.image, LOST)
            elif r.name not in rows and r.host not in answered:
                rows[r.name] = SandboxSummary(r.name, r.host, r.container_id, r.image, "unknown")
        return sorted(rows.values(), key=lambda s: s.name)

    def lost(self) -> builtins.list[SandboxRecord]:
        """The sandboxes whose host Ray no longer has."""
        live = self.hosts()
        return [r for r in self._records() if r.host not in live]

    def recreate_lost(self, names: Iterable[str] | None = None) -> builtins.list[Sandbox]:
        """Makes lost sandboxes again on live hosts, from their image, command and options.

        What they had written is gone with their host. If that host comes back,
        its copies are removed there when it is seen again (reconcile).
        """
        wanted = None if names is None else set(names)
        lost = [r for r in self.lost() if wanted is None or r.name in wanted]
        infos = self.host_infos(fresh=True)
        hosts = self.hosts()
        done = []
        for r in lost:
            options = r.options_dict()
            need = Need(r.image, float(options.get("cpu_quota") or 0.0), int(options.get("memory_max") or 0),
                        avoid=frozenset({r.host}))
            chosen = placement.choose(list(infos.values()), need)
            agent = hosts[chosen.name].agent
            cid = self._call(agent.create.remote(r.name, r.image, r.command, options, None))
            infos[chosen.name] = placement.claim(chosen, need)
            self._reg("move", r.name, chosen.name, cid)
            done.append(Sandbox(self, r.name))
        self._infos.update(infos)
        return done

    def exec_many(self, sandboxes: Sequence[Sandbox], command: Sequence[str],
                  **options: Any) -> builtins.list[ExecResult | errors.QuiltError]:
        """The same exec in many sandboxes: one call per host. Each answer is a result or its error."""
        return self._batch(sandboxes, "exec_many", list(command), options)

    def wait_started(self, sandboxes: Sequence[Sandbox]) -> builtins.list[str | errors.QuiltError]:
        """Waits until each has started (or failed): one call per host. Each answer is its state or error."""
        return self._batch(sandboxes, "wait_started_many")

    def _batch(self, sandboxes: Sequence[Sandbox], method: str, *args: Any) -> builtins.list[Any]:
        """agent.method([container ids], *args) once per host; answers in the order of sandboxes."""
        hosts = self.hosts()
        by_host: dict[str, builtins.list[tuple[int, SandboxRecord]]] = {}
        answers: builtins.list[Any] = [None] * len(sandboxes)
        for i, s in enumerate(sandboxes):
            r = self._record(s.name)
            if r.host not in hosts:
                answers[i] = _lost(r)
            else:
                by_host.setdefault(r.host, []).append((i, r))
        refs = {h: getattr(hosts[h].agent, method).remote([r.container_id for _, r in rows], *args)
                for h, rows in by_host.items()}
        for h, ref in refs.items():
            try:
                results = self._call(ref)
            except RayActorError:
                results = [_lost(r) for _, r in by_host[h]]
            for (i, _), res in zip(by_host[h], results, strict=True):
                answers[i] = res
        return answers

    def map(self, fn: Callable[[Sandbox, Any], T], items: Iterable[Any], *, image: str,
            command: Sequence[str] = ("sleep", "infinity"), concurrency: int = 8,
            **options: Any) -> Iterator[MapResult]:
        """fn(sandbox, item) for each item, each in a fresh sandbox removed after it, streamed as they end.

        At most `concurrency` sandboxes exist at once. fn runs in this driver
        (a thread each); its calls on the sandbox go to the sandbox's host.
        Results come in the order they finish, each a MapResult with the
        item's index and its value or the error it raised.
        """
        if concurrency < 1:
            raise errors.InvalidArgument(f"{errors.InvalidArgument.dbus_name}: concurrency must be >= 1")
        tag = secrets.token_hex(4)

        def one(index: int, item: Any) -> MapResult:
            name = f"map-{tag}-{index}"
            try:
                sb = self.create(name, image, command, **options)
            except BaseException as e:
                return MapResult(index, item, error=e)
            try:
                sb.wait_started()
                return MapResult(index, item, value=fn(sb, item), host=sb.host)
            except BaseException as e:
                return MapResult(index, item, error=e, host=sb.host)
            finally:
                with contextlib.suppress(errors.QuiltError):  # lost with its host: nothing to remove
                    sb.remove(force=True)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            pending: set[Future[MapResult]] = set()
            source = iter(enumerate(items))
            for index, item in source:
                pending.add(pool.submit(one, index, item))
                if len(pending) >= concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)

    # -- one sandbox's calls

    def _on_host(self, name: str, method: str, *args: Any) -> Any:
        """agent.method(container id, *args) on the sandbox's host.

        The first try trusts what this driver last saw; if the host is gone it
        looks again (the sandbox may have been recreated elsewhere) before
        answering HostLost.
        """
        for fresh in (False, True):
            r = self._record(name, fresh=fresh)
            host = self._live_host(r.host, fresh=fresh)
            if host is None:
                continue
            try:
                return self._call(getattr(host.agent, method).remote(r.container_id, *args))
            except RayActorError:
                self._hosts.pop(host.node_id, None)
        raise _lost(r)


def _lost(r: SandboxRecord) -> errors.HostLost:
    return errors.HostLost(f"{errors.HostLost.dbus_name}: sandbox {r.name!r} is lost: its host {r.host} "
                           "is gone from the cluster (recreate_lost() makes it again elsewhere)")


class Sandbox:
    """A handle on one sandbox of the cluster, by name: calls go to the host it lives on now."""

    def __init__(self, cluster: QuiltCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    @property
    def host(self) -> str:
        """The host it lives on now (as the registry says)."""
        return self.cluster._record(self.name).host

    def exec(self, command: Sequence[str], **options: Any) -> ExecResult:
        result: ExecResult = self.cluster._on_host(self.name, "exec", list(command), options)
        return result

    def exec_start(self, command: Sequence[str], **options: Any) -> str:
        exec_id: str = self.cluster._on_host(self.name, "exec_start", list(command), options)
        return exec_id

    def exec_wait(self, exec_id: str, timeout_usec: int = 0) -> tuple[str, int]:
        # An exec id is the host's own; it goes to the sandbox's host.
        answer: tuple[str, int] = self.cluster._on_host(self.name, "exec_wait", exec_id, timeout_usec)
        return answer

    def wait_started(self) -> str:
        state: str = self.cluster._on_host(self.name, "wait_started")
        return state

    def copy_in(self, path: str, tar: bytes) -> dict[str, Any]:
        """Extracts the tar stream (bytes) at path inside."""
        info: dict[str, Any] = self.cluster._on_host(self.name, "copy_in", path, tar)
        return info

    def copy_out(self, path: str, max_bytes: int = 64 << 20) -> bytes:
        """path inside as a tar stream; LimitExceeded past max_bytes."""
        data: bytes = self.cluster._on_host(self.name, "copy_out", path, max_bytes)
        return data

    def logs(self, **options: Any) -> list[LogLine]:
        lines: list[LogLine] = self.cluster._on_host(self.name, "logs", options)
        return lines

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.cluster._on_host(self.name, "info")
        return info

    def pause(self) -> None:
        self.cluster._on_host(self.name, "pause")

    def resume(self) -> None:
        self.cluster._on_host(self.name, "resume")

    def remove(self, force: bool = False) -> None:
        """Removes it from its host and frees its name; a lost sandbox's name is freed too."""
        try:
            self.cluster._on_host(self.name, "remove", force)
        except errors.HostLost:
            if not force:
                raise
        self.cluster._reg("release", self.name)
        self.cluster._cache.pop(self.name, None)
