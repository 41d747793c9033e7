"""quiltd: the process. Wires the store, the mechanisms, the core and the bus together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from dbus_next.constants import BusType, RequestNameReply
from dbus_next.errors import DBusError
from systemd import daemon as sd_daemon
from systemd import journal

from quiltd import __version__
from quiltd.bus.gate import BusGate
from quiltd.bus.peer import PeerServer, listeners_from_fds
from quiltd.bus.service import BusService
from quiltd.core import config
from quiltd.core.checkpoints import Checkpoints
from quiltd.core.copies import Copies
from quiltd.core.execs import Execs
from quiltd.core.logs import Logs
from quiltd.core.manager import Manager, RecoveryOutcome
from quiltd.core.snapshots import Snapshots
from quiltd.dbusnext.connection import MessageBus
from quiltd.errors import Internal
from quiltd.host.notify import Notifier
from quiltd.host.scopes import Systemd
from quiltd.names import BUS_NAME, FORKSERVER_SCOPE
from quiltd.net import hostreset
from quiltd.net.network import Netlink
from quiltd.net.networks import Networks
from quiltd.paths import Paths
from quiltd.runtime.inits import ForkServerInits, Pidfds
from quiltd.runtime.spawner import ForkServer
from quiltd.store.database import Store

log = logging.getLogger("quiltd")

# Journal message ids (like machined's), so a start, a recovery and a stop
# can be found with journalctl MESSAGE_ID=...
MESSAGE_STARTED = "2b6fa4c7c33e4a0e9a6c1e58f4d1a9e1"
MESSAGE_RECOVERED = "8f1c0d6b5b7a4d2c9e3f0a1b2c3d4e5f"
MESSAGE_STOPPING = "c4d7e9a1f3b54c6d8e0f1a2b3c4d5e6f"
STATUS_INTERVAL = 0.25  # seconds between two STATUS= updates, at least


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quiltd", description="Quilt container daemon")
    p.add_argument("--bus-address", help="D-Bus address to serve on (default: the system bus)")
    p.add_argument("--state-dir", type=Path, default=Paths.state_dir)
    p.add_argument("--run-dir", type=Path, default=Paths.run_dir)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--detach", action="store_true", help="run in the background (outside systemd)")
    p.add_argument("--reset-host-network", action="store_true",
                   help="remove quiltd's nftables tables, bridges and veths from the host and set "
                        "ip_forward back, then exit (for the package's removal, with quiltd stopped)")
    p.add_argument("--version", action="version", version=f"quiltd {__version__}")
    return p.parse_args(argv)


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER="quiltd")
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("quiltd: %(levelname)s %(message)s"))
    root.addHandler(handler)


class Daemon:
    def __init__(self, args: argparse.Namespace, forkserver: ForkServer, listen_fds: list[int],
                 notifier: Notifier) -> None:
        self._args = args
        self._notifier = notifier
        self._listen_fds = listen_fds
        self._paths = Paths(args.state_dir, args.run_dir)
        self._forkserver = forkserver
        self._stop = asyncio.Event()
        self._status_pending = False
        self._status_sent = ""
        self._status_sent_at = -STATUS_INTERVAL
        self.manager: Manager | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_replied_errors)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        try:
            settings = config.load()
        except config.ConfigError as e:
            log.error("not starting: %s", e)
            return 1
        self._paths.create()
        store = Store(self._paths.database)
        if self._args.bus_address:
            bus = MessageBus(bus_address=self._args.bus_address, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await bus.connect()
        # Before anything is exported: no call reaches an object unchecked.
        await BusGate(bus).install()
        systemd = Systemd(bus)
        await systemd.connect()
        try:
            await systemd.start_helper_scope(FORKSERVER_SCOPE, self._forkserver.pid, "Quilt fork server")
        except Internal as e:
            # Containers still start; their inits' first pages count against quiltd.service.
            log.warning("the fork server stays in quiltd's cgroup: %s", e)
        netlink = Netlink()
        networks = Networks(self._paths, store, netlink)
        manager = self.manager = Manager(self._paths, store, systemd, ForkServerInits(self._forkserver),
                                         Pidfds(), networks, settings)
        execs = Execs(manager, self._paths, store)
        copies = Copies(manager, self._forkserver)
        service = BusService(bus, manager, execs, Logs(manager, execs), copies, Snapshots(manager),
                             Checkpoints(manager))
        found = await manager.recover()
        await execs.recover()
        service.export_existing()
        manager.add_listener(self)
        journal.send(
            "recovered: " + "; ".join(f"{o.value}: {len(found[o])}" for o in RecoveryOutcome),
            MESSAGE_ID=MESSAGE_RECOVERED,
            SYSLOG_IDENTIFIER="quiltd",
            **{f"QUILT_{o.name}": " ".join(found[o]) for o in RecoveryOutcome},
        )
        reply = await bus.request_name(BUS_NAME)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            log.error("could not own %s (%s): is another quiltd running?", BUS_NAME, reply)
            return 1
        peers = PeerServer(listeners_from_fds(self._listen_fds), bus, service.signal_sources)
        peers.start()
        journal.send(f"quiltd {__version__} ready", MESSAGE_ID=MESSAGE_STARTED, SYSLOG_IDENTIFIER="quiltd")
        self._status_sent = self._status()
        self._notifier.notify(f"READY=1\nSTATUS={self._status_sent}")
        self._start_watchdog()
        disconnected = loop.create_task(bus.wait_for_disconnect())
        stopped = loop.create_task(self._stop.wait())
        await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if disconnected.done():
            log.error("lost the bus connection; exiting so systemd restarts quiltd")
            return 1
        self._notifier.notify("STOPPING=1")
        journal.send("quiltd stopping; containers keep running", MESSAGE_ID=MESSAGE_STOPPING,
                     SYSLOG_IDENTIFIER="quiltd")
        manager.cleaner.stop()
        peers.close()
        with contextlib.suppress(Exception):
            await bus.release_name(BUS_NAME)
        bus.disconnect()
        netlink.close()
        store.close()
        return 0

    def _status(self) -> str:
        assert self.manager is not None
        counts = self.manager.counts()
        return ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no containers"

    def _start_watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        if usec <= 0:
            return
        loop = asyncio.get_running_loop()
        # Pinging from the loop itself: if the loop stalls, the pings stop and
        # systemd restarts us.
        interval = usec / 1e6 / 2

        def ping() -> None:
            self._notifier.notify("WATCHDOG=1")
            loop.call_later(interval, ping)

        ping()

    # Listener: keep STATUS= current, at most once per STATUS_INTERVAL. Each
    # STATUS= wakes PID 1, which announces the change on the bus; under a
    # stream of creates that cost more than the creates themselves.
    def container_added(self, c: object) -> None:
        self._schedule_status()

    def container_changed(self, c: object, old: object) -> None:
        self._schedule_status()

    def container_removed(self, c: object) -> None:
        self._schedule_status()

    def _schedule_status(self) -> None:
        if self._status_pending:
            return
        self._status_pending = True
        loop = asyncio.get_running_loop()

        def send() -> None:
            self._status_pending = False
            status = self._status()
            if status != self._status_sent:
                self._status_sent, self._status_sent_at = status, loop.time()
                self._notifier.notify(f"STATUS={status}")

        # The first change after a quiet spell goes out at once (at the end
        # of this loop turn); later ones are gathered into one, sent when the
        # interval is over, so the last word is always the current count.
        loop.call_at(max(loop.time(), self._status_sent_at + STATUS_INTERVAL), send)


def _quiet_replied_errors(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    # dbus-next sends the error reply of an async method, then lets the
    # exception escape its callback; the client has its answer, so a
    # client's mistake must not fill the journal with tracebacks.
    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (quiltd.service sets 524288).

    Every connection, exec and copy holds descriptors; the usual soft limit of
    1024 is what a flood of connections ran out of. The peer server caps its
    connections well below the hard limit (bus/peer.py).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, e)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reset_host_network:
        for line in hostreset.reset(Paths(run_dir=args.run_dir).ip_forward_before):
            print(f"quiltd: {line}")
        return
    if args.detach:
        import daemon as python_daemon

        python_daemon.DaemonContext(umask=0o022, working_directory="/").open()
    setup_logging(args.log_level)
    # Taken first, so no child inherits LISTEN_FDS (quiltd.socket's /run/quilt/quiltd.sock).
    listen_fds: list[int] = sd_daemon.listen_fds(unset_environment=True)
    # Started before asyncio brings threads into this process.
    forkserver = ForkServer()
    forkserver.start()
    # After the fork server: it and the containers keep the usual soft limit.
    raise_nofile_limit()
    notifier = Notifier()
    try:
        code = asyncio.run(Daemon(args, forkserver, listen_fds, notifier).run())
    except Exception:
        log.exception("quiltd failed")
        code = 1
    finally:
        forkserver.stop()
        notifier.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
