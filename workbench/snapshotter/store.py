"""The snapshotter's metadata: snapshots and attached devices, in one SQLite file.

Tables (``ROOT/metadata.db``)::

    snapshots  id        integer, never reused (the snapshot's folder is ROOT/snapshots/ID)
               name      the key of an active or view snapshot, the name of a committed one
               parent    name of the parent ('' for none); always a committed snapshot
               kind      1 view, 2 active, 3 committed (containerd's snapshots.Kind)
               storage   what the folder holds (`Storage`)
               labels    JSON object of string labels
               created, updated   nanoseconds since the epoch
               size, inodes       usage measured at commit (committed snapshots)
    devices    owner     id of the snapshot whose folder holds the mount point
               writable  0 for an image's read-only device, 1 for a container's writable one
               mountpoint
               users     JSON list of the snapshot names using it (a read-only device)

Every change is one transaction, durable when the call returns (WAL, synchronous=FULL), so
the state a restarted snapshotter finds is the state the last answered call left.

Caveats:
- one process per store: the snapshotter holds a lock around every call, SQLite's own
  locking only keeps a second process from corrupting it.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Device", "Kind", "MetadataStore", "Snapshot", "Storage"]


class Kind(enum.IntEnum):
    """containerd's snapshot kinds, with the protobuf enum's numbers."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class Storage(enum.StrEnum):
    """What a snapshot's folder holds."""

    OVERLAY = "overlay"
    """fs/ is an overlayfs layer (unpacked files, or a container's upper); work/ beside it."""
    REMOTE_BLOCK = "remote-block"
    """An OverlayBD layer left in the registry: labels name blob, size and image."""
    LOCAL_BLOCK = "local-block"
    """An OverlayBD layer unpacked as a file: fs/overlaybd.commit."""
    WRITABLE_BLOCK = "writable-block"
    """A container on a writable block device (rwMode dir): block/writable holds its layer."""


@dataclass
class Snapshot:
    id: int
    name: str
    parent: str
    kind: Kind
    storage: Storage
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0
    updated: int = 0
    size: int = 0
    inodes: int = 0

    @property
    def is_block(self) -> bool:
        """A read-only OverlayBD layer (its data is a block layer, not files)."""
        return self.storage in (Storage.REMOTE_BLOCK, Storage.LOCAL_BLOCK)


@dataclass
class Device:
    owner: int
    writable: bool
    mountpoint: str
    users: list[str] = field(default_factory=list)


_SCHEMA = """
create table if not exists snapshots (
    id integer primary key autoincrement,
    name text not null unique,
    parent text not null default '',
    kind integer not null,
    storage text not null,
    labels text not null default '{}',
    created integer not null,
    updated integer not null,
    size integer not null default 0,
    inodes integer not null default 0
);
create index if not exists snapshots_parent on snapshots (parent);
create table if not exists devices (
    owner integer primary key,
    writable integer not null,
    mountpoint text not null,
    users text not null default '[]'
);
"""

_COLUMNS = "id, name, parent, kind, storage, labels, created, updated, size, inodes"


class MetadataStore:
    """Snapshots and devices in ``ROOT/metadata.db``; every method is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode = wal")
        self._db.execute("pragma synchronous = full")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Snapshots

    def get(self, name: str) -> Snapshot | None:
        row = self._query_one(f"select {_COLUMNS} from snapshots where name = ?", (name,))
        return _snapshot(row) if row else None

    def get_by_id(self, snapshot_id: int) -> Snapshot | None:
        row = self._query_one(f"select {_COLUMNS} from snapshots where id = ?", (snapshot_id,))
        return _snapshot(row) if row else None

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"select {_COLUMNS} from snapshots order by id").fetchall()
        return [_snapshot(row) for row in rows]

    def children(self, name: str) -> int:
        row = self._query_one("select count(*) from snapshots where parent = ?", (name,))
        return int(row[0]) if row else 0

    def insert(
        self,
        name: str,
        parent: str,
        kind: Kind,
        storage: Storage,
        labels: dict[str, str],
    ) -> Snapshot:
        now = time.time_ns()
        with self._lock:
            cursor = self._db.execute(
                "insert into snapshots (name, parent, kind, storage, labels, created, updated)"
                " values (?, ?, ?, ?, ?, ?, ?)",
                (name, parent, int(kind), str(storage), json.dumps(labels), now, now),
            )
            snapshot_id = cursor.lastrowid
        assert snapshot_id is not None
        return Snapshot(snapshot_id, name, parent, kind, storage, dict(labels), now, now)

    def save(self, snapshot: Snapshot) -> None:
        """Write back every field of `snapshot` (found by id); `updated` is set to now."""
        snapshot.updated = time.time_ns()
        with self._lock:
            self._db.execute(
                "update snapshots set name = ?, parent = ?, kind = ?, storage = ?, labels = ?,"
                " updated = ?, size = ?, inodes = ? where id = ?",
                (
                    snapshot.name,
                    snapshot.parent,
                    int(snapshot.kind),
                    str(snapshot.storage),
                    json.dumps(snapshot.labels),
                    snapshot.updated,
                    snapshot.size,
                    snapshot.inodes,
                    snapshot.id,
                ),
            )

    def delete(self, snapshot_id: int) -> None:
        with self._lock:
            self._db.execute("delete from snapshots where id = ?", (snapshot_id,))

    # Devices

    def device(self, owner: int) -> Device | None:
        row = self._query_one(
            "select owner, writable, mountpoint, users from devices where owner = ?", (owner,)
        )
        return _device(row) if row else None

    def devices(self) -> list[Device]:
        with self._lock:
            rows = self._db.execute(
                "select owner, writable, mountpoint, users from devices order by owner"
            ).fetchall()
        return [_device(row) for row in rows]

    def put_device(self, device: Device) -> None:
        with self._lock:
            self._db.execute(
                "insert or replace into devices (owner, writable, mountpoint, users)"
                " values (?, ?, ?, ?)",
                (device.owner, int(device.writable), device.mountpoint, json.dumps(device.users)),
            )

    def delete_device(self, owner: int) -> None:
        with self._lock:
            self._db.execute("delete from devices where owner = ?", (owner,))

    def _query_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.all())


def _snapshot(row: tuple[Any, ...]) -> Snapshot:
    snapshot_id, name, parent, kind, storage, labels, created, updated, size, inodes = row
    return Snapshot(
        snapshot_id,
        name,
        parent,
        Kind(kind),
        Storage(storage),
        json.loads(labels),
        created,
        updated,
        size,
        inodes,
    )


def _device(row: tuple[Any, ...]) -> Device:
    owner, writable, mountpoint, users = row
    return Device(owner, bool(writable), mountpoint, json.loads(users))
