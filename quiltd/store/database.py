"""Quilt's state in SQLite: the one place that knows SQL.

WAL with synchronous=NORMAL: a committed transaction survives the daemon
being killed at any moment (not a power cut, which systemd restarts would
not survive either). The daemon has one connection, used from the event
loop thread only, so there is exactly one writer.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from quiltd.errors import Busy, NoSpace
from quiltd.model import (
    CleanupKind,
    CleanupTask,
    Container,
    ContainerListing,
    ContainerSpec,
    Exec,
    ExecState,
    Image,
    ImageConfig,
    Lease,
    Network,
    State,
    Volume,
    WarmPool,
)

# Each entry moves the schema one version up; PRAGMA user_version says how
# many have run. Never edit an entry that has shipped: add one.
MIGRATIONS = (
    """
    CREATE TABLE images (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_usec INTEGER NOT NULL
    );
    CREATE TABLE containers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        image_id TEXT NOT NULL,
        command TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        pid_starttime INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER NOT NULL DEFAULT -1,
        created_usec INTEGER NOT NULL,
        started_usec INTEGER NOT NULL DEFAULT 0,
        finished_usec INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX containers_state ON containers(state);
    """,
    """
    -- AUTOINCREMENT: an id is never handed out twice, so a worker holding a
    -- stale list can never finish another task by mistake.
    CREATE TABLE cleanup_tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_usec INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        UNIQUE (kind, target)
    );
    """,
    """
    CREATE TABLE execs (
        id TEXT PRIMARY KEY,
        container_id TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER NOT NULL DEFAULT 0,
        pid_starttime INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER NOT NULL DEFAULT -1,
        created_usec INTEGER NOT NULL,
        finished_usec INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX execs_container ON execs(container_id);
    """,
    # Networks and address leases. A lease goes with its container (cascade),
    # and the primary key makes handing out one address twice impossible.
    """
    CREATE TABLE networks (
        name TEXT PRIMARY KEY,
        bridge TEXT NOT NULL UNIQUE,
        subnet TEXT NOT NULL,
        gateway TEXT NOT NULL,
        egress TEXT NOT NULL,
        created_usec INTEGER NOT NULL
    );
    INSERT INTO networks (name, bridge, subnet, gateway, egress, created_usec)
        VALUES ('bridge', 'quilt0', '10.88.0.0/16', '10.88.0.1', 'none', 0);
    CREATE TABLE leases (
        network TEXT NOT NULL REFERENCES networks(name),
        address TEXT NOT NULL,
        container_id TEXT NOT NULL UNIQUE REFERENCES containers(id) ON DELETE CASCADE,
        PRIMARY KEY (network, address)
    );
    """,
    """
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        created_usec INTEGER NOT NULL
    );
    -- Which containers on record name which volumes: RemoveVolume asks here,
    -- and a container's rows go with it.
    CREATE TABLE container_volumes (
        container_id TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
        volume TEXT NOT NULL REFERENCES volumes(name),
        PRIMARY KEY (container_id, volume)
    );
    CREATE INDEX container_volumes_volume ON container_volumes(volume);
    """,
    """
    -- An OCI or docker image's defaults for its containers (Env, WorkingDir,
    -- Entrypoint, Cmd, User) as JSON, and '{}' for a rootfs tarball.
    -- (No semicolon in comments: migrations are split on it.)
    ALTER TABLE images ADD COLUMN config TEXT NOT NULL DEFAULT '{}';
    """,
    """
    -- The first host id of a container's user namespace range, 0 for none.
    -- Unique, so two containers can never be given the same range.
    ALTER TABLE containers ADD COLUMN userns_base INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX containers_userns_base ON containers(userns_base) WHERE userns_base > 0;
    """,
    """
    -- The order containers were created in. created_usec is the wall clock,
    -- which can be set back: ListContainers orders by this sequence instead.
    -- Rows from before number in their created_usec order.
    ALTER TABLE containers ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE containers SET seq = (
        SELECT COUNT(*) FROM containers AS o
        WHERE o.created_usec < containers.created_usec
           OR (o.created_usec = containers.created_usec AND o.id <= containers.id));
    CREATE INDEX containers_seq ON containers(seq);
    -- When a container's command started, on CLOCK_BOOTTIME: its exit time is
    -- its start plus how long it ran on that clock (see manager.finished_usec).
    ALTER TABLE containers ADD COLUMN started_boot_usec INTEGER NOT NULL DEFAULT 0;
    """,
    """
    -- Warm pools: how many containers to keep ready per image and options.
    CREATE TABLE warm_pools (
        id TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        options TEXT NOT NULL,
        size INTEGER NOT NULL,
        UNIQUE (image, options)
    );
    -- The pool of a container made ready ahead and not yet claimed, '' for
    -- every container a caller made: listings and counts show only those.
    ALTER TABLE containers ADD COLUMN pool TEXT NOT NULL DEFAULT '';
    CREATE INDEX containers_pool ON containers(pool) WHERE pool != '';
    """,
    """
    -- Layers kept once by diff_id (images/layers/<diff_id>) and which image
    -- stacks which, base first (position 0). An image with no rows here is
    -- one directory, its path, as every image imported before was.
    CREATE TABLE layers (
        diff_id TEXT PRIMARY KEY,
        size_bytes INTEGER NOT NULL
    );
    CREATE TABLE image_layers (
        image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        diff_id TEXT NOT NULL REFERENCES layers(diff_id),
        PRIMARY KEY (image, position)
    );
    CREATE INDEX image_layers_diff_id ON image_layers(diff_id);
    """,
    """
    -- Layers a container stacks between its image and its writable layer,
    -- top first (position 0): what ForkContainer froze of its writable layer.
    -- A layer is in use while an image or a container stacks it.
    CREATE TABLE container_layers (
        container_id TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        diff_id TEXT NOT NULL REFERENCES layers(diff_id),
        PRIMARY KEY (container_id, position)
    );
    CREATE INDEX container_layers_diff_id ON container_layers(diff_id);
    -- An image CommitContainer made over an image of one directory stacks
    -- that directory: the base cannot be removed while such an image exists.
    CREATE TABLE image_bases (
        image TEXT PRIMARY KEY REFERENCES images(name) ON DELETE CASCADE,
        base TEXT NOT NULL REFERENCES images(name)
    );
    CREATE INDEX image_bases_base ON image_bases(base);
    """,
)

_CONTAINER_COLUMNS = (
    "id", "name", "image", "image_id", "command", "spec", "state", "reason", "pid", "pid_starttime",
    "exit_code", "created_usec", "started_usec", "finished_usec", "userns_base", "started_boot_usec",
    "pool",
)


BUSY_TIMEOUT_MS = 1000
# By stored value: a dict lookup per row, where State(value) costs a call into enum's machinery.
_STATES = {state.value: state for state in State}
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL = 5, 6, 13


def unavailable(e: sqlite3.OperationalError) -> Busy | NoSpace | None:
    """The named error for a database that cannot be written now, or None for other failures."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(e)
    if primary in (SQLITE_BUSY, SQLITE_LOCKED) or "database is locked" in text:
        return Busy(f"the state database is locked by another process ({text}); nothing was "
                    "changed, try again")
    if primary == SQLITE_FULL or "disk is full" in text:
        return NoSpace(f"the state directory's filesystem is full ({text}); nothing was changed")
    return None


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        self._db.row_factory = sqlite3.Row
        # find_container's answers by the ref asked for, and the refs that
        # found each id: a status call asks by ref again and again, and a
        # query and a row made into a record cost it more than all else. This
        # process is the only writer: every write of a row drops what was
        # found of it, and a rolled-back transaction drops everything.
        self._found: dict[str, Container] = {}
        self._refs: dict[str, set[str]] = {}
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # quiltd is the only writer; only another process (sqlite3 in a
        # shell, a backup) can hold the lock. The wait blocks the event loop,
        # so it is short: past it the call fails with Busy.
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        with self.transaction():
            version = self.schema_version
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; a locked database is Busy and a full disk NoSpace."""
        try:
            # IMMEDIATE takes the write lock up front, so a transaction never
            # fails half-way for want of it.
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            named = unavailable(e)
            if named is None:
                raise
            raise named from e
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as e:
            self._forget_all()  # what was read inside may be what is rolled back
            # SQLite may have rolled back already (a full disk does).
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            named = unavailable(e) if isinstance(e, sqlite3.OperationalError) else None
            if named is None:
                raise
            raise named from e

    def integrity_check(self) -> str:
        result: str = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        return result

    # Containers

    def _forget(self, *refs: str) -> None:
        """Drops what find_container found by these refs, and by every ref that found these ids."""
        for ref in refs:
            for found_by in self._refs.pop(ref, ()):
                self._found.pop(found_by, None)
            self._found.pop(ref, None)

    def _forget_all(self) -> None:
        self._found.clear()
        self._refs.clear()

    def insert_container(self, c: Container) -> None:
        self._forget(c.id, c.name)  # either may have found another row by name or by id
        row = _container_row(c)
        marks = ", ".join("?" for _ in _CONTAINER_COLUMNS)
        # One past the highest on record: above every row there is, so the
        # order of creation holds whatever the wall clock said.
        self._db.execute(
            f"INSERT INTO containers ({', '.join(_CONTAINER_COLUMNS)}, seq) VALUES ({marks}, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM containers))",
            [row[k] for k in _CONTAINER_COLUMNS],
        )

    def update_container(self, c: Container) -> None:
        self._forget(c.id, c.name)
        row = _container_row(c)
        columns = [k for k in _CONTAINER_COLUMNS if k != "id"]
        self._db.execute(
            f"UPDATE containers SET {', '.join(f'{k} = ?' for k in columns)} WHERE id = ?",
            [row[k] for k in columns] + [c.id],
        )

    def delete_container(self, container_id: str) -> None:
        self._forget(container_id)
        self._db.execute("DELETE FROM containers WHERE id = ?", (container_id,))

    def find_container(self, ref: str) -> Container | None:
        found = self._found.get(ref)
        if found is not None:
            return found
        # A name may look like another container's id: the id wins.
        row = self._db.execute(
            "SELECT * FROM containers WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1", (ref,)
        ).fetchone()
        if row is None:
            return None
        c = _container_from_row(row)
        self._found[ref] = c
        self._refs.setdefault(c.id, set()).add(ref)
        return c

    def container_named(self, name: str) -> str | None:
        """The id of the container of that name, if one is on record (by name only, never by id)."""
        row = self._db.execute("SELECT id FROM containers WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def userns_bases(self) -> list[int]:
        """The user namespace ranges in use, by their first host id."""
        rows = self._db.execute("SELECT userns_base FROM containers WHERE userns_base > 0")
        return [row[0] for row in rows]

    def list_containers(self) -> list[Container]:
        rows = self._db.execute("SELECT * FROM containers ORDER BY seq").fetchall()
        return [_container_from_row(r) for r in rows]

    def list_container_listings(self, state: str | None = None, name: str | None = None,
                                image: str | None = None) -> list[ContainerListing]:
        """The listing columns only, filtered in SQL: no spec is decoded, so a thousand rows stay cheap."""
        wanted = [(column, value) for column, value in (("state", state), ("name", name), ("image", image))
                  if value is not None]
        where = " WHERE " + " AND ".join(["pool = ''", *(f"{column} = ?" for column, _ in wanted)])
        rows = self._db.execute(f"SELECT id, name, image, state FROM containers{where} "
                                "ORDER BY seq", [value for _, value in wanted])
        states = _STATES
        return [ContainerListing(r[0], r[1], r[2], states[r[3]]) for r in rows]

    def claimed_limits(self, states: Collection[State]) -> tuple[float, int]:
        """cpu_quota and memory_max summed over the containers in these states (warm pools' too).

        Summed by SQLite from the stored spec: GetSystemInfo asks for this, and
        decoding every row for it cost 13 ms with a thousand containers.
        """
        marks = ", ".join("?" * len(states))
        cpu, memory = self._db.execute(
            "SELECT TOTAL(json_extract(spec, '$.cpu_quota')), TOTAL(json_extract(spec, '$.memory_max')) "
            f"FROM containers WHERE state IN ({marks})", [s.value for s in states]).fetchone()
        return float(cpu), int(memory)

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM containers WHERE pool = '' "
                                "GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def containers_using_image(self, image: str) -> list[str]:
        rows = self._db.execute("SELECT name FROM containers WHERE image = ? AND pool = ''",
                                (image,)).fetchall()
        return [r[0] for r in rows]

    def pool_members(self) -> list[Container]:
        """The containers made ready for a warm pool and not claimed."""
        rows = self._db.execute("SELECT * FROM containers WHERE pool != '' ORDER BY seq").fetchall()
        return [_container_from_row(r) for r in rows]

    def claim_container(self, c: Container) -> None:
        """Writes c over its pool member's row: from now on it is listed, last in the order of creation."""
        self.update_container(c)
        self._db.execute("UPDATE containers SET seq = (SELECT MAX(seq) + 1 FROM containers) WHERE id = ?",
                         (c.id,))

    # Warm pools

    def set_warm_pool(self, pool: WarmPool) -> None:
        self._db.execute("INSERT INTO warm_pools (id, image, options, size) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (id) DO UPDATE SET size = excluded.size",
                         (pool.id, pool.image, pool.options, pool.size))

    def delete_warm_pool(self, pool_id: str) -> None:
        self._db.execute("DELETE FROM warm_pools WHERE id = ?", (pool_id,))

    def list_warm_pools(self) -> list[WarmPool]:
        rows = self._db.execute("SELECT id, image, options, size FROM warm_pools ORDER BY image, options")
        return [WarmPool(r[0], r[1], r[2], r[3]) for r in rows]

    # Execs (background ones; a container's go with it)

    def insert_exec(self, e: Exec) -> None:
        marks = ", ".join("?" for _ in _EXEC_COLUMNS)
        self._db.execute(f"INSERT INTO execs ({', '.join(_EXEC_COLUMNS)}) VALUES ({marks})", _exec_row(e))

    def update_exec(self, e: Exec) -> None:
        columns = ", ".join(f"{k} = ?" for k in _EXEC_COLUMNS[1:])
        self._db.execute(f"UPDATE execs SET {columns} WHERE id = ?", [*_exec_row(e)[1:], e.id])

    def find_exec(self, exec_id: str) -> Exec | None:
        row = self._db.execute("SELECT * FROM execs WHERE id = ?", (exec_id,)).fetchone()
        return _exec_from_row(row) if row else None

    def list_execs(self, container_id: str | None = None) -> list[Exec]:
        if container_id is None:
            rows = self._db.execute("SELECT * FROM execs ORDER BY created_usec, id")
        else:
            rows = self._db.execute(
                "SELECT * FROM execs WHERE container_id = ? ORDER BY created_usec, id", (container_id,)
            )
        return [_exec_from_row(r) for r in rows]

    # Images

    def insert_image(self, image: Image, layers: tuple[tuple[str, int], ...] = ()) -> None:
        """Records image; layers, (diff_id, size) base first, are those it stacks (image.layers)."""
        self._db.execute(
            "INSERT INTO images (name, id, path, size_bytes, created_usec, config) VALUES (?, ?, ?, ?, ?, ?)",
            (image.name, image.id, image.path, image.size_bytes, image.created_usec,
             json.dumps(asdict(image.config))),
        )

        for position, (diff_id, size) in enumerate(layers):
            self._db.execute("INSERT OR IGNORE INTO layers (diff_id, size_bytes) VALUES (?, ?)",
                             (diff_id, size))
            self._db.execute("INSERT INTO image_layers (image, position, diff_id) VALUES (?, ?, ?)",
                             (image.name, position, diff_id))

    def find_image(self, name: str) -> Image | None:
        row = self._db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
        return self._with_layers(_image_from_row(row)) if row else None

    def list_images(self) -> list[Image]:
        return [self._with_layers(_image_from_row(r))
                for r in self._db.execute("SELECT * FROM images ORDER BY name").fetchall()]

    def _with_layers(self, image: Image) -> Image:
        rows = self._db.execute("SELECT diff_id FROM image_layers WHERE image = ? ORDER BY position",
                                (image.name,)).fetchall()
        return replace(image, layers=tuple(r[0] for r in rows)) if rows else image

    def delete_image(self, name: str) -> None:
        self._db.execute("DELETE FROM images WHERE name = ?", (name,))

    def layer_sizes(self) -> dict[str, int]:
        """Every layer on record: diff_id -> bytes of file content."""
        return dict(self._db.execute("SELECT diff_id, size_bytes FROM layers").fetchall())

    def unused_layers(self) -> list[str]:
        """Layers on record that no image and no container stacks any more."""
        rows = self._db.execute("SELECT diff_id FROM layers WHERE diff_id NOT IN "
                                "(SELECT diff_id FROM image_layers) AND diff_id NOT IN "
                                "(SELECT diff_id FROM container_layers) ORDER BY diff_id").fetchall()
        return [r[0] for r in rows]

    def set_image_base(self, image: str, base: str) -> None:
        self._db.execute("INSERT INTO image_bases (image, base) VALUES (?, ?)", (image, base))

    def images_based_on(self, base: str) -> list[str]:
        """The images committed over base's own directory."""
        rows = self._db.execute("SELECT image FROM image_bases WHERE base = ? ORDER BY image", (base,))
        return [r[0] for r in rows]

    def insert_layer(self, diff_id: str, size_bytes: int) -> None:
        self._db.execute("INSERT INTO layers (diff_id, size_bytes) VALUES (?, ?)", (diff_id, size_bytes))

    def container_layers(self, container_id: str) -> tuple[str, ...]:
        """The layers a container stacks over its image, top first."""
        rows = self._db.execute("SELECT diff_id FROM container_layers WHERE container_id = ? "
                                "ORDER BY position", (container_id,)).fetchall()
        return tuple(r[0] for r in rows)

    def set_container_layers(self, container_id: str, diff_ids: tuple[str, ...]) -> None:
        """Replaces the layers a container stacks over its image (top first)."""
        self._db.execute("DELETE FROM container_layers WHERE container_id = ?", (container_id,))
        for position, diff_id in enumerate(diff_ids):
            self._db.execute("INSERT INTO container_layers (container_id, position, diff_id) "
                             "VALUES (?, ?, ?)", (container_id, position, diff_id))

    def delete_layer(self, diff_id: str) -> None:
        self._db.execute("DELETE FROM layers WHERE diff_id = ?", (diff_id,))

    # Networks and leases

    def insert_network(self, n: Network) -> None:
        self._db.execute(
            "INSERT INTO networks (name, bridge, subnet, gateway, egress, created_usec) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (n.name, n.bridge, n.subnet, n.gateway, n.egress, n.created_usec),
        )

    def find_network(self, name: str) -> Network | None:
        row = self._db.execute("SELECT * FROM networks WHERE name = ?", (name,)).fetchone()
        return Network(**dict(row)) if row else None

    def list_networks(self) -> list[Network]:
        return [Network(**dict(r)) for r in self._db.execute("SELECT * FROM networks ORDER BY name")]

    def delete_network(self, name: str) -> None:
        self._db.execute("DELETE FROM networks WHERE name = ?", (name,))

    def insert_lease(self, lease: Lease) -> None:
        self._db.execute(
            "INSERT INTO leases (network, address, container_id) VALUES (?, ?, ?)",
            (lease.network, lease.address, lease.container_id),
        )

    def find_lease(self, container_id: str) -> Lease | None:
        row = self._db.execute("SELECT * FROM leases WHERE container_id = ?", (container_id,)).fetchone()
        return Lease(**dict(row)) if row else None

    def containers_on_network(self, network: str) -> list[str]:
        rows = self._db.execute("SELECT name, spec FROM containers ORDER BY name").fetchall()
        return [r[0] for r in rows if json.loads(r[1]).get("network") == network]

    def lease_addresses(self, network: str) -> set[str]:
        rows = self._db.execute("SELECT address FROM leases WHERE network = ?", (network,))
        return {row[0] for row in rows}

    def leases(self, network: str | None = None) -> list[Lease]:
        if network is None:
            rows = self._db.execute("SELECT * FROM leases ORDER BY network, address")
        else:
            rows = self._db.execute("SELECT * FROM leases WHERE network = ? ORDER BY address", (network,))
        return [Lease(**dict(r)) for r in rows]


    # Volumes

    def insert_volume(self, v: Volume) -> bool:
        """Records a volume unless one of that name exists; True if it was new."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO volumes (name, path, created_usec) VALUES (?, ?, ?)",
            (v.name, v.path, v.created_usec),
        )
        return cur.rowcount == 1

    def find_volume(self, name: str) -> Volume | None:
        row = self._db.execute("SELECT * FROM volumes WHERE name = ?", (name,)).fetchone()
        return Volume(**dict(row)) if row else None

    def list_volumes(self) -> list[Volume]:
        return [Volume(**dict(r)) for r in self._db.execute("SELECT * FROM volumes ORDER BY name")]

    def delete_volume(self, name: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    def use_volume(self, container_id: str, volume: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO container_volumes (container_id, volume) VALUES (?, ?)",
                         (container_id, volume))

    def containers_using_volume(self, volume: str) -> list[str]:
        rows = self._db.execute(
            "SELECT c.name FROM container_volumes v JOIN containers c ON c.id = v.container_id "
            "WHERE v.volume = ? ORDER BY c.name", (volume,)
        ).fetchall()
        return [r[0] for r in rows]

    # Cleanup tasks

    def add_cleanup(self, kind: str, target: str) -> int:
        """Queues a task (once: the same leftover is never queued twice); returns its id."""
        self._db.execute("INSERT OR IGNORE INTO cleanup_tasks (kind, target) VALUES (?, ?)", (kind, target))
        row = self._db.execute(
            "SELECT id FROM cleanup_tasks WHERE kind = ? AND target = ?", (kind, target)
        ).fetchone()
        task_id: int = row[0]
        return task_id

    def list_cleanups(self) -> list[CleanupTask]:
        rows = self._db.execute("SELECT * FROM cleanup_tasks ORDER BY id").fetchall()
        return [CleanupTask(**{**dict(r), "kind": CleanupKind(r["kind"])}) for r in rows]

    def defer_cleanup(self, task_id: int, attempts: int, next_usec: int, error: str) -> None:
        self._db.execute(
            "UPDATE cleanup_tasks SET attempts = ?, next_usec = ?, last_error = ? WHERE id = ?",
            (attempts, next_usec, error, task_id),
        )

    def finish_cleanup(self, task_id: int) -> None:
        self._db.execute("DELETE FROM cleanup_tasks WHERE id = ?", (task_id,))


# The table's pid columns date from when each exec had a supervisor of its
# own on the host; execs are now children of the container's init.
_EXEC_COLUMNS = ("id", "container_id", "command", "state", "exit_code", "created_usec", "finished_usec")


def _exec_row(e: Exec) -> list[Any]:
    row = asdict(e)
    row["command"] = json.dumps(list(e.command))
    row["state"] = e.state.value
    return [row[k] for k in _EXEC_COLUMNS]


def _exec_from_row(row: sqlite3.Row) -> Exec:
    raw = {k: row[k] for k in _EXEC_COLUMNS}
    return Exec(**{**raw, "command": tuple(json.loads(raw["command"])), "state": ExecState(raw["state"])})


def _image_from_row(row: sqlite3.Row) -> Image:
    raw = dict(row)
    c = json.loads(raw.pop("config"))
    config = ImageConfig(env=tuple(c.get("env", ())), workdir=c.get("workdir", ""),
                         entrypoint=tuple(c.get("entrypoint", ())), cmd=tuple(c.get("cmd", ())),
                         user=c.get("user", ""),
                         labels=tuple((k, v) for k, v in c.get("labels", ())))
    return Image(**raw, config=config)


def _container_row(c: Container) -> dict[str, Any]:
    # Shallow on purpose: asdict copies every nested tuple, and rows are
    # written on every create and state change. json writes tuples as lists.
    row = _fields(c)
    row["command"] = json.dumps(c.command)
    row["spec"] = json.dumps(_fields(c.spec))
    row["state"] = c.state.value
    return row


def _container_from_row(row: sqlite3.Row) -> Container:
    raw = dict(row)
    del raw["seq"]  # the store's own: only the order of rows
    return Container(
        **{
            **raw,
            "command": _command_from_json(raw["command"]),
            "spec": _spec_from_json(raw["spec"]),
            "state": State(raw["state"]),
        }
    )


# A container's command and spec never change once recorded, and every call
# about a container reads its row: parsed once, not on every read (as many
# as a host runs containers).
@functools.lru_cache(maxsize=1024)
def _command_from_json(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


@functools.lru_cache(maxsize=1024)
def _spec_from_json(text: str) -> ContainerSpec:
    spec = json.loads(text)
    spec["env"] = tuple(spec["env"])
    spec["labels"] = tuple(tuple(pair) for pair in spec["labels"])
    spec["mounts"] = tuple((s, t, ro) for s, t, ro in spec.get("mounts", ()))
    spec["tmpfs"] = tuple((t, size) for t, size in spec.get("tmpfs", ()))
    if "publish" in spec:
        spec["publish"] = tuple(tuple(entry) for entry in spec["publish"])
    spec["volumes"] = tuple((n, t, ro) for n, t, ro in spec.get("volumes", ()))
    return ContainerSpec(**spec)


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}
