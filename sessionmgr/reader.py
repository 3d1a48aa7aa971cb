"""``Reader``: runs each admin read whole, off the event loop where the driver would block it.

Two kinds of read:

- ``select``: one SELECT of a *shape* (e.g. a listing's sort and which filters it has) built
  once as a SQLAlchemy Core statement with named bind parameters, then run with each call's
  values. On a SQLite file the statement is also compiled once, and each call runs its SQL text
  on the worker thread's own stdlib connection, in autocommit (one SELECT is its own snapshot),
  with the call's values bound in the compiled order through the columns' bind processors:
  none of SQLAlchemy's per-execution work, no pool checkout, no BEGIN/ROLLBACK, and the rows
  converted to their final objects in the thread. Values are always bound, never formatted in.
- ``run``: a function of a synchronous SQLAlchemy ``Connection``, in one read transaction
  (SQLite ``BEGIN DEFERRED``), so a read of several statements (``stats``) sees one snapshot.

On SQLite both run in one hop to a worker thread, each thread with one read-only connection of
its own (db.sqlite_read_connection: the pragmas of every sessionmgr connection, ``query_only``).
On PostgreSQL (or a SQLite URI) they run on the async engine: asyncpg, one round trip per
statement, no thread, the same cached statements.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Row, Select, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool

from . import db
from .errors import DatabaseError

T = TypeVar("T")

READ_THREADS = 2  # SQLite reads in flight at once: a long stats never holds up a listing
MAX_SHAPES = 256  # prepared statements kept (metadata tag names are part of a listing's shape)
PARAM_PREFIX = "p_"  # the names of a prepared statement's per-call bind parameters

Trace = Callable[[str, Sequence[Any]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """One shape's statement; on SQLite also its compiled text and how to bind a call's values:
    per placeholder, the parameter's name and bind processor, or (name None) a constant."""

    statement: Select[Any]
    sql: str | None = None
    binds: tuple[tuple[str | None, Callable[[Any], Any] | None, Any], ...] = ()

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The call's values in placeholder order, processed as SQLAlchemy would."""
        return [
            constant if name is None else params[name] if process is None else process(params[name])
            for name, process, constant in self.binds
        ]


def compile_for(statement: Select[Any], dialect: Dialect) -> Prepared:
    """``statement`` compiled once for a positional (qmark) dialect: its SQL text and binds.
    Parameters named ``p_...`` take each call's values; any other bind (a JSON path, say) is a
    constant of the shape, processed here once."""
    compiled = statement.compile(dialect=dialect)
    if "POSTCOMPILE" in compiled.string:
        raise TypeError("a prepared read cannot have expanding parameters (IN of a list)")
    binds: list[tuple[str | None, Callable[[Any], Any] | None, Any]] = []
    for key in compiled.positiontup or ():
        bind = compiled.binds[key]
        process = bind.type._cached_bind_processor(dialect)
        if key.startswith(PARAM_PREFIX):
            binds.append((key, process, None))
        else:
            value = bind.effective_value
            binds.append((None, None, process(value) if process else value))
    return Prepared(statement, compiled.string, tuple(binds))


class Reader:
    """Where ``SessionQueries`` runs its reads (see the module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sync: Engine | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._shapes: dict[Hashable, Prepared] = {}
        self._closed = False
        self.trace: Trace | None = None  # called with each prepared SELECT run on SQLite (bench)
        path = db.sqlite_path(engine.url)
        if path is not None and not engine.url.query.get("uri"):
            self._path: Path | None = path
        else:
            self._path = None  # PostgreSQL, or a SQLite URI: the async engine's own way

    @property
    def threaded(self) -> bool:
        """Whether reads run in the reader's worker threads (SQLite files)."""
        return self._path is not None

    @property
    def sync_engine(self) -> Engine | None:
        """The SQLite read engine of ``run`` (None on PostgreSQL), created by the first read."""
        return self._sync

    async def run(self, read: Callable[[Connection], T]) -> T:
        """``read(conn)`` in one read transaction; its result."""
        self._check_open()
        if self._path is None:
            async with self._engine.connect() as conn:
                return await conn.run_sync(read)
        pool = self._pool or self._start()
        return await asyncio.get_running_loop().run_in_executor(pool, self._in_thread, read)

    async def select(
        self,
        shape: Hashable,
        build: Callable[[], Select[Any]],
        params: Mapping[str, Any],
        *,
        raw: Callable[[Sequence[Any]], T],
        row: Callable[[Row[Any]], T],
    ) -> list[T]:
        """The rows of ``shape``'s statement (``build()``, called once per shape) with ``params``
        (its ``p_...`` bind values), each converted by ``raw`` (a stdlib sqlite3 row: SQLite
        files) or ``row`` (a SQLAlchemy row: elsewhere)."""
        self._check_open()
        prepared = self._shapes.get(shape)
        if self._path is None:
            if prepared is None:
                prepared = self._remember(shape, Prepared(build()))
            async with self._engine.connect() as conn:
                result = await conn.execute(prepared.statement, dict(params))
                return [row(r) for r in result.all()]
        pool = self._pool or self._start()
        if prepared is None:
            assert self._sync is not None
            prepared = self._remember(shape, compile_for(build(), self._sync.dialect))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, self._select_in_thread, prepared, params, raw)

    def _remember(self, shape: Hashable, prepared: Prepared) -> Prepared:
        if len(self._shapes) >= MAX_SHAPES:
            del self._shapes[next(iter(self._shapes))]  # the oldest shape
        self._shapes[shape] = prepared
        return prepared

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseError("the session repository is closed")

    def _select_in_thread(
        self, prepared: Prepared, params: Mapping[str, Any], raw: Callable[[Sequence[Any]], T]
    ) -> list[T]:
        assert prepared.sql is not None
        arguments = prepared.arguments(params)
        if self.trace is not None:
            self.trace(prepared.sql, arguments)
        rows = self._connection().execute(prepared.sql, arguments).fetchall()
        return [raw(r) for r in rows]

    def _in_thread(self, read: Callable[[Connection], T]) -> T:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return read(conn)

    def _connection(self) -> sqlite3.Connection:
        """This worker thread's read connection (opened by its first read)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self._check_open()
            assert self._path is not None
            conn = self._local.conn = db.sqlite_read_connection(self._path)
            with self._lock:
                self._connections.append(conn)
        return conn

    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._sync = self._run_engine()
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sessionmgr-read")
            return self._pool

    def _run_engine(self) -> Engine:
        """``run``'s engine: SQLAlchemy over each worker thread's own connection."""
        engine = create_engine(
            "sqlite://",
            creator=self._connection,
            poolclass=SingletonThreadPool,
            pool_size=READ_THREADS,
            hide_parameters=True,
        )

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN DEFERRED")

        return engine

    async def close(self) -> None:
        """Refuse new reads, wait for those in flight, then close the read connections."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)
        if self._sync is not None:
            self._sync.dispose()
            self._sync = None
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
