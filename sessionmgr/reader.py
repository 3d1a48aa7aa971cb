"""``Reader``: runs each admin read whole, off the event loop where the driver would block it.

A read is a plain function of a synchronous SQLAlchemy ``Connection`` (SQLAlchemy Core
statements, compiled once and cached by SQLAlchemy). On SQLite it runs in one hop to a worker
thread, on a read-only connection of the reader's own (WAL, the busy timeout of db.py): every
statement of the read and the building of its records happen there, instead of one aiosqlite
thread hop per statement with the rows built back on the loop. On PostgreSQL it runs on the async
engine through ``AsyncConnection.run_sync``: asyncpg, one round trip per statement, no thread.

Either way a read is one transaction (SQLite ``BEGIN DEFERRED``), so a read of several
statements (``stats``) sees one snapshot.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from . import db

T = TypeVar("T")

READ_THREADS = 2  # SQLite reads in flight at once: a long stats never holds up a listing


class Reader:
    """Where ``SessionQueries`` runs its reads (see the module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sync: Engine | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        path = db.sqlite_path(engine.url)
        if path is not None and not engine.url.query.get("uri"):
            self._path: str | None = str(path)
        else:
            self._path = None  # PostgreSQL, or a SQLite URI: the async engine's own way

    @property
    def threaded(self) -> bool:
        """Whether reads run in the reader's worker threads (SQLite files)."""
        return self._path is not None

    @property
    def sync_engine(self) -> Engine | None:
        """The SQLite read engine (None on PostgreSQL), created by the first read."""
        return self._sync

    async def run(self, read: Callable[[Connection], T]) -> T:
        """``read(conn)`` in one read transaction; its result."""
        if self._path is None:
            async with self._engine.connect() as conn:
                return await conn.run_sync(read)
        pool = self._pool or self._start()
        return await asyncio.get_running_loop().run_in_executor(pool, self._in_thread, read)

    def _in_thread(self, read: Callable[[Connection], T]) -> T:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return read(conn)

    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._sync = _sqlite_read_engine(str(self._path))
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sessionmgr-read")
            return self._pool

    async def close(self) -> None:
        """Wait for reads in flight, then close the read connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)
        if self._sync is not None:
            self._sync.dispose()
            self._sync = None


def _sqlite_read_engine(path: str) -> Engine:
    """Read-only connections to the file, shared by the worker threads (one at a time each)."""
    busy_ms = int(db.BUSY_TIMEOUT * 1000)
    uri = Path(path).resolve().as_uri() + "?mode=rw"

    def connect() -> sqlite3.Connection:
        # mode=rw: a file that has gone away is an error, never a new empty database
        conn = sqlite3.connect(uri, timeout=db.BUSY_TIMEOUT, check_same_thread=False, uri=True)
        conn.isolation_level = None  # the BEGIN below, not the driver's
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.execute("PRAGMA query_only = ON")
        return conn

    engine = create_engine(
        "sqlite://",
        creator=connect,
        poolclass=QueuePool,
        pool_size=READ_THREADS,
        max_overflow=0,
        hide_parameters=True,
    )

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN DEFERRED")

    return engine
