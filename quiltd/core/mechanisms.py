"""What the core asks of the machinery below it, as interfaces.

The core (Manager, Cleaner, Copies) receives each mechanism as one of these
protocols, and daemon.py hands it the real ones: systemd's Manager API
(host.scopes.Systemd), the fork server and the pipes of the inits it forks
(runtime.inits), pidfds (runtime.inits), and the container networks
(net.networks.Networks over netlink and nft). The unit tests hand it fakes
instead (tests/unit/fakes.py), so the state machine runs there in seconds,
without root, with a real store in a temporary directory.

Each docstring states the contract the core relies on: a fake that keeps it
behaves, for the core, as the real mechanism does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Network
from typing import Protocol

from quiltd.host.scopes import ScopeLimits
from quiltd.model import Container, Lease, Network, Usage
from quiltd.net.firewall import EgressRule
from quiltd.net.networks import Attachment
from quiltd.runtime.copyspec import CopySpec
from quiltd.runtime.launchspec import LaunchSpec
from quiltd.runtime.spawner import Forked, Launched
from quiltd.runtime.wire import Failure


class Scopes(Protocol):
    """systemd's transient scopes, one per container (quilt-<id>.scope in quilt.slice).

    Every method raises errors.Internal when systemd refuses or fails; the
    core treats that as "the scope is not (or no longer) there".
    """

    async def start_scope(self, unit: str, pid: int, limits: ScopeLimits, description: str) -> None:
        """Makes unit with pid in it and these limits; returns once the job has finished.

        Internal if the job failed: then pid is in no scope of ours.
        """

    async def attach(self, unit: str, pid: int) -> None:
        """Moves pid into the running unit (a copy's child into its container's scope)."""

    async def kill(self, unit: str, signal: int) -> None:
        """Sends signal to every process of unit; SIGKILL ends the container's init with them."""

    async def stop(self, unit: str) -> None:
        """Stops unit and everything in it; a unit that does not exist is stopped already."""

    async def usage(self, unit: str) -> Usage:
        """The unit's memory, CPU time and tasks now."""

    def is_empty(self, unit: str) -> bool:
        """True when no process is left in unit (or it is gone); False when some are, or it cannot tell."""

    async def freeze(self, unit: str) -> None:
        """Freezes every process of the unit (FreezeUnit; cgroup v2 only)."""

    async def thaw(self, unit: str) -> None:
        """Thaws the unit (ThawUnit)."""

    async def list_scopes(self, pattern: str = "quilt-*.scope") -> list[tuple[str, str]]:
        """(unit, active state) of every loaded unit matching pattern: recovery's orphans."""


class Inits(Protocol):
    """Containers' inits: forked ahead by the fork server, then told what to do on their pipes.

    A start is launch, send_spec, (the scope and the veth), then send_in,
    send_go and confirm; a warm pool's member gets send_in and waits, until a
    claim sends send_go with the claim (past a restart of the daemon: adopt).
    Launched.close() abandons an init at any point: it reads end of file and
    leaves (a pool member's waits for a daemon that comes back instead, and
    ends with its scope).
    """

    async def launch(self) -> Launched:
        """An init in new namespaces, blocked on its spec pipe; Internal if none could be made."""

    def send_spec(self, launched: Launched, spec: LaunchSpec) -> None:
        """Gives the init its LaunchSpec: it waits for IN, builds the root, then waits for GO."""

    def send_in(self, launched: Launched) -> None:
        """Tells the init it is in its scope with its veth: it builds the root, then waits for GO."""

    def send_go(self, launched: Launched, claim: Mapping[str, object] | None = None) -> None:
        """Lets the init run the command (a claim's, for a pool member); closes the spec pipe."""

    async def confirm(self, launched: Launched) -> Failure | None:
        """After GO: None once the command was executed, else init's failure record.

        Takes launched.error_fd over (it is closed on return).
        """

    def adopt(self, pid: int, starttime: int, control_socket: str) -> Launched | None:
        """A warm pool's member whose init outlived the daemon, waiting for GO; None if it is gone.

        Its pipes went with the daemon: send_go and confirm use a connection
        to the init's control socket instead.
        """


class Processes(Protocol):
    """Processes named by pid and start time, watched and signalled through pidfds."""

    def open_pidfd(self, pid: int, starttime: int) -> int | None:
        """A pidfd for pid if it is still the process that started at starttime; None if it is gone."""

    def watch_exit(self, pidfd: int, on_exit: Callable[[], None]) -> None:
        """Calls on_exit once, on the event loop, when the process has ended; takes pidfd over."""

    def send_signal(self, pidfd: int, signum: int) -> None:
        """Sends signum to the process; one that has ended already is not an error."""


class Networking(Protocol):
    """The container networks: leases in the store, bridges, veths, hosts files and firewall.

    Its listener methods are called with the core's own events, so it keeps
    the hosts files current. Link and firewall failures raise errors.Internal.
    """

    def find(self, name: str) -> Network:
        """The network named name; NoSuchNetwork if there is none."""

    def take_lease(self, c: Container) -> Lease | None:
        """c's address lease, taken now if it has none; inside the caller's store transaction."""

    def address(self, container_id: str) -> str:
        """The container's leased address, or ""."""

    def attachment(self, c: Container) -> Attachment | None:
        """What c's init needs to join its network, its files written; None without a lease."""

    def all(self) -> list[Network]:
        """Every network on record."""

    async def create_network(self, name: str, wanted: IPv4Network | None, egress: str,
                             rules: tuple[EgressRule, ...]) -> Network:
        """Records a network on wanted (None: the first free /16) with its egress, and makes its bridge's
        firewall rules."""

    async def remove_network(self, name: str) -> None:
        """Removes a network no container uses; InvalidState if one does."""

    def check_published(self, c: Container) -> None:
        """NameTaken if another container on record publishes one of c's host ports."""

    async def attach(self, c: Container, pid: int) -> None:
        """Makes c's veth, its end in pid's network namespace, and pins its port; no-op without a lease."""

    async def detach(self, c: Container) -> None:
        """Deletes c's veth if it still exists and unpins its port (a failed start, which may be retried)."""

    def release(self, c: Container) -> None:
        """Unpins the port of c, whose processes are gone and which goes for good; its veth goes
        with its network namespace, or a little later if something still holds that."""

    async def forget(self, c: Container) -> None:
        """After c's row is gone: its published ports go from the firewall."""

    async def recover(self, active: list[Container]) -> None:
        """After a restart: firewall and bridges set up again, veths of active containers kept."""

    def container_added(self, c: Container) -> None: ...
    def container_changed(self, c: Container, old: Container) -> None: ...
    def container_removed(self, c: Container) -> None: ...


class CopyForks(Protocol):
    """The fork server's copy children (copyhelper), for CopyIn and CopyOut."""

    async def copy(self, spec: CopySpec, fds: list[int]) -> Forked:
        """Forks a copy child with fds (go, the caller's, result) and the spec; Internal on failure."""
