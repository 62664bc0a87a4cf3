"""The metadata store's connection layer: SQLite in WAL mode, driven from trio.

Every call runs a function `fn(conn, *args)` inside one transaction on a worker thread:
`write` serializes writers on one connection (BEGIN IMMEDIATE; the COMMIT is durable —
synchronous=FULL — before `write` returns); `read` takes a connection from a small pool
and sees one consistent snapshot. sqlite3 errors are translated to StoreError here and
nowhere else; ApiError raised by `fn` rolls the transaction back and passes through.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from server.errors import StoreError
from server.schema import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

READERS = 4


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Brings the schema to the newest version; returns that version."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for version in range(current, len(MIGRATIONS)):
        log.info("migrating metadata schema to version %d", version + 1)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class Database:
    """The SQLite metadata store of one server process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._writer = _connect(path)
            migrate(self._writer)
            self._readers = [_connect(path) for _ in range(READERS)]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open metadata store {path}: {exc}") from exc
        self._write_lock = trio.Lock()
        self._reader_sem = trio.Semaphore(READERS)

    def close(self) -> None:
        for conn in [self._writer, *self._readers]:
            conn.close()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._write_lock:
            return await trio.to_thread.run_sync(
                self._in_tx, self._writer, "BEGIN IMMEDIATE", fn, args
            )

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._reader_sem:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(self._in_tx, conn, "BEGIN", fn, args)
            finally:
                self._readers.append(conn)

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """For start-up only, before the app serves requests."""
        return self._in_tx(self._writer, "BEGIN IMMEDIATE", fn, args)

    @staticmethod
    def _in_tx(
        conn: sqlite3.Connection, begin: str, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> T:
        started = time.monotonic()
        try:
            conn.execute(begin)
        except sqlite3.Error as exc:
            raise StoreError(f"metadata store: {exc}") from exc
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise StoreError(f"metadata store: {exc}") from exc
        except BaseException:
            _rollback(conn)
            raise
        elapsed = time.monotonic() - started
        if elapsed > 1.0:
            log.warning("slow metadata transaction %s: %.2f s", fn.__name__, elapsed)
        return result


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
