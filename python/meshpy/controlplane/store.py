"""Where the control plane keeps the mesh: a small key-value store with revisions and leases.

Two implementations share this interface: `SqliteStore`, embedded in one data directory, the
default; and `EtcdStore` (etcd.py), which lets several control-plane replicas serve one mesh.
The model is etcd's: every change bumps one store-wide revision, `wait` wakes when the
revision passes a given one, and keys written with a lease vanish when the lease expires.
Keys are plain strings such as ``resources/services/shop/payments``; values are JSON objects.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Entry", "SqliteStore", "Store", "StoreError", "open_store"]

log = logging.getLogger("meshpy.controlplane")

_SWEEP_INTERVAL = 0.25  # seconds between looks for expired leases


class StoreError(Exception):
    """The store cannot be reached or refused an operation."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict[str, Any]
    revision: int  # the store revision of the entry's last change
    lease: int | None = None


class Store(abc.ABC):
    """An async key-value store with a store-wide revision, change notification and leases."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and start background work; called once before any other method."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with `prefix`, sorted by key."""

    @abc.abstractmethod
    async def put_all(
        self,
        puts: Iterable[tuple[str, dict[str, Any]]],
        deletes: Iterable[str] = (),
        *,
        lease: int | None = None,
    ) -> int:
        """Write and delete keys in one atomic step; returns the new revision."""

    async def put(self, key: str, value: dict[str, Any], *, lease: int | None = None) -> int:
        return await self.put_all([(key, value)], lease=lease)

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete `key`; False when it was not there."""

    @abc.abstractmethod
    async def revision(self) -> int: ...

    @abc.abstractmethod
    async def wait(self, after: int, timeout: float) -> int:
        """Return the current revision as soon as it is above `after`, or after `timeout`."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """A new lease of `ttl` seconds; keys put with it are deleted when it expires."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> bool:
        """Renew `lease` for its full ttl; False when it has already expired."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End `lease` now, deleting its keys."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, revision INTEGER NOT NULL, lease INTEGER
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, ttl REAL NOT NULL, expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


class SqliteStore(Store):
    """The embedded store: one SQLite file, every change committed (fsync) before it returns.

    One process owns the file. Leases survive a restart: on start every lease gets its
    full ttl again, so sidecars that keep heartbeating to the restarted process keep
    their endpoints.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._changed: asyncio.Condition | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # acknowledged writes survive a crash
            db.executescript(_SCHEMA)
            now = time.time()
            db.execute("UPDATE leases SET expires = ? + ttl", (now,))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None
        self._db = db
        self._changed = asyncio.Condition()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not started")
        return self._db

    async def get(self, key: str) -> Entry | None:
        row = self._conn.execute(
            "SELECT key, value, revision, lease FROM kv WHERE key = ?", (key,)
        ).fetchone()
        return _entry(row) if row else None

    async def list(self, prefix: str) -> list[Entry]:
        rows = self._conn.execute(
            "SELECT key, value, revision, lease FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        ).fetchall()
        return [_entry(row) for row in rows]

    async def put_all(
        self,
        puts: Iterable[tuple[str, dict[str, Any]]],
        deletes: Iterable[str] = (),
        *,
        lease: int | None = None,
    ) -> int:
        puts, deletes = list(puts), list(deletes)
        with self._transaction() as db:
            live = "SELECT 1 FROM leases WHERE id = ? AND expires >= ?"
            if lease is not None and not db.execute(live, (lease, time.time())).fetchone():
                raise StoreError(f"lease {lease} has expired")
            revision = self._bump(db)
            db.executemany(
                "INSERT OR REPLACE INTO kv (key, value, revision, lease) VALUES (?, ?, ?, ?)",
                [(key, json.dumps(value), revision, lease) for key, value in puts],
            )
            db.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in deletes])
        await self._notify()
        return revision

    async def delete(self, key: str) -> bool:
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                return False
            self._bump(db)
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        await self._notify()
        return True

    async def revision(self) -> int:
        return int(
            self._conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        )

    async def wait(self, after: int, timeout: float) -> int:
        assert self._changed is not None
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while await self.revision() <= after:
                        await self._changed.wait()
        return await self.revision()

    async def grant_lease(self, ttl: float) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, time.time() + ttl)
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def keepalive(self, lease: int) -> bool:
        with self._transaction() as db:
            now = time.time()  # a lease past its expiry is gone, even before the sweep
            cursor = db.execute(
                "UPDATE leases SET expires = ? + ttl WHERE id = ? AND expires >= ?",
                (now, lease, now),
            )
        return cursor.rowcount == 1

    async def revoke(self, lease: int) -> None:
        if self._expire([lease]):
            await self._notify()

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        db = self._conn
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    def _expire(self, leases: Sequence[int]) -> bool:
        """Delete `leases` and their keys; True when any key went."""
        if not leases:
            return False
        marks = ",".join("?" * len(leases))
        with self._transaction() as db:
            held = db.execute(f"SELECT 1 FROM kv WHERE lease IN ({marks})", leases).fetchone()
            if held:
                self._bump(db)
                db.execute(f"DELETE FROM kv WHERE lease IN ({marks})", leases)
            db.execute(f"DELETE FROM leases WHERE id IN ({marks})", leases)
        return bool(held)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            try:
                rows = self._conn.execute(
                    "SELECT id FROM leases WHERE expires < ?", (time.time(),)
                ).fetchall()
                if self._expire([row[0] for row in rows]):
                    await self._notify()
            except (StoreError, sqlite3.Error) as exc:  # tried again at the next sweep
                log.warning("expiring leases failed: %s", exc)


def _entry(row: tuple[str, str, int, int | None]) -> Entry:
    key, value, revision, lease = row
    return Entry(key, json.loads(value), revision, lease)


def open_store(url: str | None, data_dir: str | Path) -> Store:
    """The store a ``--store`` value names: none for the embedded one, or ``etcd://h:p,...``."""
    if not url or url in ("sqlite", "embedded"):
        return SqliteStore(Path(data_dir) / "store.sqlite3")
    if url.startswith("sqlite://"):
        return SqliteStore(url.removeprefix("sqlite://"))
    if url.startswith("etcd://"):
        from .etcd import EtcdStore

        return EtcdStore.from_url(url)
    raise StoreError(f"unknown store {url!r}: expected etcd://host:port[,host:port...] or sqlite")
