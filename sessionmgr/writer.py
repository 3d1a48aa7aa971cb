"""Group commit: the transitions of many concurrent tasks share one transaction, in one hop.

One transaction per write costs a BEGIN, a COMMIT and several driver round trips; with SQLAlchemy
async on SQLite that caps a process near 1,400 writes/s. Instead every transition is an ``Op``
queued to one ``GroupWriter`` task, which takes everything queued, and in one transaction:

1. loads every row the ops name, with one SELECT (``FOR UPDATE`` on PostgreSQL; SQLite's
   ``BEGIN IMMEDIATE`` already holds the write lock); a *blind* op (``Op.blind``: a transition
   computed from what its caller holds, such as ``mark_active``) loads nothing,
2. applies the ops in submission order to those rows in memory (``UnitOfWork``): each op checks
   the status it expects and records its changes and its event,
3. writes back with one multi-row INSERT ... RETURNING, one executemany UPDATE per set of changed
   columns (each still ``WHERE id = ? AND status = <status read>``), one executemany per set of
   blind changes (``WHERE id = ? AND status = <status expected>``; on PostgreSQL one
   ``UPDATE ... FROM unnest(...) RETURNING id``, which says how many matched), one executemany
   of events,
4. commits, and only then resolves each caller's future.

A failing batch is retried op by op (blind ops then load their rows), so one bad op fails alone;
"database is locked" (and PostgreSQL deadlocks) are retried with backoff inside the writer and
never reach callers unless they outlast ``LOCK_RETRY_TOTAL``.

**One hop per batch.** The unit of work is synchronous code over a ``sqlalchemy.Connection``,
written once for both backends:

- SQLite: the batch runs *inline on the event-loop thread*, on a synchronous connection (the
  stdlib ``sqlite3`` driver, on the same file, same pragmas) that the writer owns. A thread hop
  costs more than the work: with WAL and ``synchronous=NORMAL`` a commit never fsyncs, so a batch
  is pure CPU of about a millisecond, while CPython's sqlite3 releases the GIL around every
  ``sqlite3_step`` (every row of an executemany), so a writer *thread* convoys behind a busy
  event loop, waiting up to the 5 ms switch interval at each reacquire (aiosqlite did exactly
  that, several times per batch). Two things could still block the loop, and neither may:

  - locks: the connection has ``busy_timeout=0``; "database is locked" on ``BEGIN IMMEDIATE``
    (or any statement) rolls back and is retried after ``await asyncio.sleep`` (from
    ``LOCK_RETRY_BASE``, doubling to ``LOCK_RETRY_CAP``, for ``LOCK_RETRY_TOTAL``);
  - checkpoints: the connection has ``wal_autocheckpoint=0``; a ``PRAGMA wal_checkpoint(PASSIVE)``
    runs off the loop (``asyncio.to_thread``, its own short-lived connection) every
    ``CHECKPOINT_COMMITS`` commits or once the WAL file outgrows ``CHECKPOINT_BYTES``, never two
    at once; ``journal_size_limit`` lets the WAL shrink back once it has been checkpointed.

- PostgreSQL: the very same function runs through ``AsyncConnection.run_sync`` (asyncpg under
  SQLAlchemy's greenlet): one pooled connection, one transaction, no thread.

``GroupWriter.run(fn)`` gives a single-statement write (claims, lease renewals, prune) the same
transaction, lock retry and hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Update,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .db import is_locked, map_error, write_engine
from .errors import DatabaseError
from .models import UTCDateTime, session_events, sessions

logger = logging.getLogger(__name__)

MAX_BATCH = 500  # ops per transaction
GATHER_TURNS = 4  # loop turns a woken writer waits while more ops keep coming
GATHER_WAIT = 0.001  # seconds at most: on a busy loop a turn is long, and every write waits it
LOAD_CHUNK = 500  # keys per SELECT ... IN (...)
LOCK_RETRY_BASE = 0.001  # seconds before retrying a locked batch; doubles each time
LOCK_RETRY_CAP = 0.1  # seconds, the longest pause between retries (SQLite's busy handler's)
LOCK_RETRY_TOTAL = 60.0  # seconds of retrying a locked database before giving up
LOCK_RETRY_QUIET = 5.0  # seconds of waiting for a lock before it is worth a warning (once)
CHECKPOINT_COMMITS = 1000  # SQLite commits between two WAL checkpoints (off the loop)
CHECKPOINT_BYTES = 4 << 20  # a WAL file past this size is checkpointed sooner (and shrinks back)
INTEGRITY_RETRIES = 1  # a lone op that hit a unique constraint reloads and tries again (races)

Row = dict[str, Any]
Thunk = Callable[[], Any]  # builds an op's result once the batch has committed
T = TypeVar("T")

INSERT_COLUMNS = tuple(c.name for c in sessions.columns if c.name != "id")


class _StaleRead(DatabaseError):
    """An UPDATE matched fewer rows than were read: someone wrote without the lock."""


@dataclasses.dataclass(slots=True, eq=False)
class Op:
    """One caller's write: ``apply`` changes the unit of work and returns its result thunk."""

    apply: Callable[[UnitOfWork], Thunk]
    pks: Sequence[int] = ()
    sids: Sequence[str] = ()
    future: asyncio.Future[Any] | None = None
    # the same op computed without loading (``UnitOfWork.blind_change``), used in batches where
    # the backend reports executemany rowcounts; ``apply`` is the fallback that loads its rows
    blind: Callable[[UnitOfWork], Thunk] | None = None


class UnitOfWork:
    """The rows one batch touches: loaded once, changed in order, written back in bulk."""

    def __init__(self, *, lock_rows: bool) -> None:
        self._lock_rows = lock_rows
        # the database server's now() in this transaction, when leases follow its clock
        # (PostgreSQL shared by several hosts); None: lease times come from the caller's clock
        self.lease_now: datetime | None = None
        self._by_pk: dict[int, Row] = {}
        self._by_sid: dict[str, Row] = {}
        self._read_status: dict[int, str] = {}
        self._changed: dict[int, set[str]] = {}
        self._new: list[Row] = []
        self._new_given: dict[int, set[str]] = {}  # id(row) -> columns set (the rest: NULL)
        self._new_snapshots: list[tuple[Row, Row]] = []
        self._events: list[tuple[Row, Row]] = []
        self._blind: dict[frozenset[str], list[tuple[int, str, Row]]] = {}

    # --- reading ---------------------------------------------------------------------------------

    def load(self, conn: Connection, pks: Iterable[int], sids: Iterable[str]) -> None:
        pk_list = sorted(set(pks))
        sid_list = sorted(set(sids))
        while pk_list or sid_list:
            pk_chunk, pk_list = pk_list[:LOAD_CHUNK], pk_list[LOAD_CHUNK:]
            sid_chunk, sid_list = sid_list[:LOAD_CHUNK], sid_list[LOAD_CHUNK:]
            conds = []
            if pk_chunk:
                conds.append(sessions.c.id.in_(pk_chunk))
            if sid_chunk:
                conds.append(sessions.c.session_id.in_(sid_chunk))
            stmt = select(sessions).where(or_(*conds)).order_by(sessions.c.id)
            if self._lock_rows:
                stmt = stmt.with_for_update()
            for mapping in conn.execute(stmt).mappings():
                row = dict(mapping)
                self._by_pk[row["id"]] = row
                self._read_status[row["id"]] = row["status"]
                if row["session_id"] is not None:
                    self._by_sid[row["session_id"]] = row

    def get(self, key: int | str) -> Row | None:
        """The row as changed so far in this batch (int: local id; str: session_id)."""
        if isinstance(key, int):
            return self._by_pk.get(key)
        return self._by_sid.get(key)

    # --- changing --------------------------------------------------------------------------------

    def insert(self, values: Row, *, at: Any, reason: str | None, detail: str | None) -> Row:
        row: Row = dict.fromkeys(INSERT_COLUMNS)
        row.update(values)
        row["id"] = None
        self._new.append(row)
        self._new_given[id(row)] = {k for k in values if k != "id"}
        if row["session_id"] is not None:
            self._by_sid[row["session_id"]] = row
        self._event(row, at, None, row["status"], reason, detail)
        return row

    def change(
        self,
        row: Row,
        changes: Row,
        *,
        at: Any = None,
        reason: str | None = None,
        detail: str | None = None,
        event: bool = True,
    ) -> None:
        """Apply ``changes`` to ``row``; ``event`` appends a lifecycle event (a transition)."""
        before = row["status"]
        old_sid = row["session_id"]
        row.update(changes)
        if row["id"] is None:  # inserted earlier in this batch: the INSERT carries the change
            self._new_given[id(row)].update(changes)
        else:
            self._changed.setdefault(row["id"], set()).update(changes)
        if row["session_id"] != old_sid and row["session_id"] is not None:
            self._by_sid[row["session_id"]] = row
        if event:
            self._event(row, at, before, row["status"], reason, detail)

    def blind_change(
        self,
        pk: int,
        expect: str,
        changes: Row,
        *,
        at: Any,
        reason: str | None,
        detail: str | None,
    ) -> None:
        """Change row ``pk`` if its status is still ``expect``, without loading it: the batch
        fails (and is redone op by op, loading) unless every blind change matched its row."""
        self._blind.setdefault(frozenset(changes), []).append((pk, expect, changes))
        self._event({"id": pk}, at, expect, changes.get("status", expect), reason, detail)

    def snapshot(self, row: Row) -> Row:
        """The row as it is now (later ops of the batch do not show through)."""
        snap = dict(row)
        if row["id"] is None:
            self._new_snapshots.append((row, snap))
        return snap

    def _event(
        self, row: Row, at: Any, src: str | None, dst: str, reason: str | None, detail: str | None
    ) -> None:
        self._events.append(
            (
                row,
                {
                    "at": at,
                    "from_status": src,
                    "to_status": dst,
                    "reason": reason,
                    "detail": detail,
                },
            )
        )

    # --- writing ---------------------------------------------------------------------------------

    def flush(self, conn: Connection) -> None:
        self._insert_new(conn)
        self._update_changed(conn)
        self._update_blind(conn)
        insert_events(conn, [{"session_pk": row["id"], **event} for row, event in self._events])

    def _insert_new(self, conn: Connection) -> None:
        """One multi-row INSERT per set of columns given (NULLs need no binding)."""
        by_columns: dict[tuple[str, ...], list[Row]] = {}
        for row in self._new:
            by_columns.setdefault(tuple(sorted(self._new_given[id(row)])), []).append(row)
        for given, rows in by_columns.items():
            params = [{k: row[k] for k in given} for row in rows]
            if conn.dialect.name == "sqlite":
                # one INSERT per row on the driver (microseconds each), its lastrowid the id
                ids = _insert_rows(conn, given, params)
            else:
                stmt = insert(sessions).returning(sessions.c.id, sort_by_parameter_order=True)
                ids = list(conn.execute(stmt, params).scalars().all())
            for row, pk in zip(rows, ids, strict=True):
                row["id"] = pk
        for row, snap in self._new_snapshots:
            snap["id"] = row["id"]

    def _update_changed(self, conn: Connection) -> None:
        """One executemany UPDATE per set of changed columns, each row still conditional on the
        status it was read with."""
        groups: dict[frozenset[str], list[Row]] = {}
        for pk, changed in self._changed.items():
            groups.setdefault(frozenset(changed), []).append(self._by_pk[pk])
        for columns, rows in groups.items():
            params = [
                {"_pk": row["id"], "_read_status": self._read_status[row["id"]]}
                | {f"v_{c}": row[c] for c in columns}
                for row in rows
            ]
            count = _executemany(conn, _update_statement(columns), params)
            if conn.dialect.supports_sane_multi_rowcount and count != len(rows):
                raise _StaleRead(f"updated {count} of {len(rows)} rows read")

    def _update_blind(self, conn: Connection) -> None:
        """One executemany per set of blind changes; a short rowcount (a row no longer in the
        status expected) fails the batch, which is then redone op by op."""
        for columns, items in self._blind.items():
            if conn.dialect.name == "postgresql":
                count = _update_arrays(conn, columns, items)
            else:
                params = [
                    {"_pk": pk, "_read_status": expect} | {f"v_{c}": changes[c] for c in columns}
                    for pk, expect, changes in items
                ]
                count = _executemany(conn, _update_statement(columns), params)
            if count != len(items):
                raise _StaleRead(f"changed {count} of {len(items)} rows blind")


_EVENT_INSERT = insert(session_events)
_SESSION_INSERT = insert(sessions)


class _Compiled:
    """A statement compiled once for SQLite's driver: its SQL, and how each ``?`` is bound.

    Binding is most of a write's Python (several parameters per row, a handful of them times),
    so it is planned once per statement: the values taken in one ``itemgetter`` call, the
    processors run only where there are any, and each time object formatted once per row (an
    intent binds the same ``now`` to three columns and its event)."""

    __slots__ = ("_get", "_others", "_times", "defaults", "names", "sql")

    def __init__(
        self,
        sql: str,
        names: tuple[str, ...],
        processors: tuple[Callable[[Any], Any] | None, ...],
        defaults: dict[str, Any],
        times: frozenset[str],
    ) -> None:
        self.sql = sql
        self.names = names
        self.defaults = defaults  # scalar column defaults for columns the parameters leave out
        get = operator.itemgetter(*names) if names else (lambda _params: ())
        self._get = get if len(names) != 1 else (lambda params: (get(params),))
        planned = list(zip(range(len(names)), names, processors, strict=True))
        self._times = tuple((i, p) for i, n, p in planned if p is not None and n in times)
        self._others = tuple((i, p) for i, n, p in planned if p is not None and n not in times)

    def bind(self, params: Row) -> list[Any]:
        try:
            values = list(self._get(params))
        except KeyError:  # a column left to its default
            values = [params[n] if n in params else self.defaults[n] for n in self.names]
        for i, process in self._others:
            values[i] = process(values[i])
        if self._times:
            formatted: dict[int, Any] = {}
            for i, process in self._times:
                value = values[i]
                if value is not None:
                    key = id(value)  # the same object, formatted once (alive in params)
                    shown = formatted.get(key)
                    if shown is None:
                        shown = formatted[key] = process(value)
                    values[i] = shown
        return values


@functools.lru_cache(maxsize=512)
def _compiled(stmt: Any, dialect: Any, keys: tuple[str, ...] | None) -> _Compiled:
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys else None)
    names = tuple(compiled.positiontup or ())
    processors = compiled._bind_processors
    defaults: dict[str, Any] = {}
    for name in names:
        if keys is None:  # a literal the statement carries ('ending', a CASE's 'active')
            if not compiled.binds[name].required:
                defaults[name] = compiled.binds[name].effective_value
        elif name not in keys:
            default = stmt.table.c[name].default
            if default is None or not default.is_scalar:
                raise AssertionError(f"{name} needs a default computed per row")
            defaults[name] = default.arg
    times = frozenset(n for n in names if isinstance(compiled.binds[n].type, UTCDateTime))
    return _Compiled(
        compiled.string, names, tuple(processors.get(n) for n in names), defaults, times
    )


def _executemany(
    conn: Connection, stmt: Any, params: list[Row], keys: tuple[str, ...] | None = None
) -> int:
    """Run ``stmt`` once per parameter set; returns the rows changed. On SQLite straight on the
    driver, the statement compiled once (SQLAlchemy's per-execution work costs more than
    SQLite's own); elsewhere through SQLAlchemy."""
    if conn.dialect.name != "sqlite":
        return int(conn.execute(stmt, params).rowcount)
    compiled = _compiled(stmt, conn.dialect, keys)
    rows = [compiled.bind(p) for p in params]
    with _driver_errors(compiled.sql):
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(compiled.sql, rows)
            return int(cursor.rowcount)
        finally:
            cursor.close()


def fetch_rows(conn: Connection, stmt: Any, params: Row) -> list[Any]:
    """SQLite: ``stmt`` (its RETURNING rows, say) run once on the driver, compiled once; the
    driver's rows (SQLAlchemy would set up its result machinery per execution)."""
    compiled = _compiled(stmt, conn.dialect, None)
    with _driver_errors(compiled.sql):
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            rows: list[Any] = cursor.execute(compiled.sql, compiled.bind(params)).fetchall()
            return rows
        finally:
            cursor.close()


def insert_events(conn: Connection, events: list[Row]) -> None:
    """One executemany of lifecycle event rows (every row with the same keys), on SQLite
    straight on the driver."""
    if events:
        _executemany(conn, _EVENT_INSERT, events, tuple(events[0]))


def _insert_rows(conn: Connection, given: tuple[str, ...], params: list[Row]) -> list[int]:
    """SQLite: one INSERT per row on the driver; the new ids in the rows' order."""
    compiled = _compiled(_SESSION_INSERT, conn.dialect, given)
    ids: list[int] = []
    with _driver_errors(compiled.sql):
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for p in params:
                cursor.execute(compiled.sql, compiled.bind(p))
                assert cursor.lastrowid is not None
                ids.append(cursor.lastrowid)
        finally:
            cursor.close()
    return ids


@contextlib.contextmanager
def _driver_errors(sql: str) -> Iterator[None]:
    """sqlite3's errors as SQLAlchemy's (IntegrityError, OperationalError, ...), parameters
    hidden, as if SQLAlchemy had run the statement."""
    try:
        yield
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True) from exc


def _update_arrays(
    conn: Connection, columns: frozenset[str], items: list[tuple[int, str, Row]]
) -> int:
    """PostgreSQL's blind changes: one ``UPDATE ... FROM unnest(arrays) ... RETURNING id`` for
    all rows (asyncpg reports no executemany rowcount; the ids returned are the count)."""
    ordered = sorted(columns)
    params: Row = {"_pk": [pk for pk, _, _ in items], "_read_status": [e for _, e, _ in items]}
    for c in ordered:
        params[f"v_{c}"] = [changes[c] for _, _, changes in items]
    return len(conn.execute(_array_update(tuple(ordered)), params).all())


@functools.lru_cache(maxsize=64)
def _array_update(columns: tuple[str, ...]) -> Any:
    c = sessions.c
    typed = {"_pk": c.id.type, "_read_status": c.status.type} | {
        f"v_{name}": c[name].type for name in columns
    }
    arrays = ", ".join(f"CAST(:{name} AS {_pg_type(kind)}[])" for name, kind in typed.items())
    sql = (
        f"UPDATE sessions SET {', '.join(f'{n} = v.v_{n}' for n in columns)}"
        f" FROM unnest({arrays}) AS v({', '.join(typed)})"
        " WHERE sessions.id = v._pk AND sessions.status = v._read_status RETURNING sessions.id"
    )
    return text(sql).bindparams(
        *(bindparam(name, type_=ARRAY(kind)) for name, kind in typed.items())
    )


_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _pg_type(kind: Any) -> str:
    return str(kind.compile(dialect=_PG))


@functools.lru_cache(maxsize=256)
def _update_statement(columns: frozenset[str]) -> Update:
    return (
        update(sessions)
        .where(sessions.c.id == bindparam("_pk"), sessions.c.status == bindparam("_read_status"))
        .values({c: bindparam(f"v_{c}") for c in sorted(columns)})
    )


class GroupWriter:
    """The one task that writes transitions, a batch per transaction (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, *, max_batch: int = MAX_BATCH, database_clock: bool = False
    ) -> None:
        """``database_clock``: every transaction reads the server's ``now()`` first
        (``UnitOfWork.lease_now``), so leases are stamped and compared on one clock."""
        self._engine = write_engine(engine)
        self.database_clock = database_clock
        self._url = engine.url
        self._lock_rows = engine.dialect.name == "postgresql"
        # SQLite: the writer's own synchronous connection, used inline on the loop (see above)
        self._sync: Engine | None = None
        self._wal: str | None = None
        if engine.dialect.name == "sqlite":
            self._sync = db.inline_sqlite_engine(engine.url, wal_limit=CHECKPOINT_BYTES)
            self._wal = f"{db.sqlite_path(engine.url)}-wal"
        self._conn: Connection | None = None
        self._since_checkpoint = 0
        self._wal_mark = 0  # the WAL's size when it was last checkpointed
        self.checkpointing: asyncio.Task[None] | None = None  # the checkpoint running, if any
        # Writers in this process that use the async engine's pool (none of the writer's own)
        # take turns on an asyncio lock, an instant hand-over, instead of on SQLite's busy
        # handler, which polls in sleeps of up to 100 ms.
        self.lock: asyncio.Lock | None = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        self._max_batch = max_batch
        self._queue: list[Op] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # transactions committed, for tests and benchmarks
        self.ops = 0  # ops committed
        self.checkpoints = 0  # WAL checkpoints run off the loop (SQLite)

    @property
    def sync_engine(self) -> Engine:
        """The engine whose connections run the writes (for SQLAlchemy event listeners)."""
        return self._sync if self._sync is not None else self._engine.sync_engine

    async def submit(self, op: Op) -> Any:
        """Queue ``op`` and wait until its transaction has committed; returns its result."""
        if self._closed:
            raise DatabaseError("the session repository is closed")
        loop = asyncio.get_running_loop()
        op.future = loop.create_future()
        self._queue.append(op)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="sessionmgr-writer")
        return await op.future

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in one short write transaction of its own (a claim, a lease renewal, a
        prune step), with the batches' hop and lock retry; returns what ``fn`` returns."""
        if self._closed:
            raise DatabaseError("the session repository is closed")
        return await self._retrying(fn, 1)

    async def close(self) -> None:
        """Write what is queued, then stop (and wait for a checkpoint running)."""
        self._closed = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
                self._task = None
        finally:
            if self.checkpointing is not None:
                with contextlib.suppress(Exception):
                    await self.checkpointing
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._sync is not None:
                self._sync.dispose()

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                await self._gather()
                self._wakeup.clear()
                while self._queue:
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                    batch = [op for op in batch if op.future is not None and not op.future.done()]
                    if batch:
                        await self._execute(batch)
                if self._closed:
                    return
        except BaseException as exc:
            failure = DatabaseError(f"the session writer stopped: {exc!r}")
            for op in self._queue:
                if op.future is not None and not op.future.done():
                    op.future.set_exception(failure)
            self._queue.clear()
            raise

    async def _gather(self) -> None:
        """Let more ops join the batch: yield to the loop while each turn brings new ones, up
        to ``GATHER_TURNS`` turns. Callers woken by the same burst of I/O then share one
        BEGIN and COMMIT, whose cost is per transaction (P1: ~9 ops per transaction without,
        ~18 with); an op that comes alone waits one loop turn, and none waits past
        ``GATHER_WAIT`` (a busy loop's turns are long: P1b, latency-bound, lost ~3% to four
        of them per write)."""
        give_up = time.monotonic() + GATHER_WAIT
        for _ in range(GATHER_TURNS):
            queued = len(self._queue)
            if queued >= self._max_batch or self._closed:
                return
            await asyncio.sleep(0)
            if len(self._queue) == queued or time.monotonic() >= give_up:
                return

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[object]:
        """This process's turn at the write lock for a write through the async engine's pool (a
        no-op where the database has row locks; the writer's own transactions need no turn:
        they run to their commit without yielding)."""
        return self.lock if self.lock is not None else contextlib.nullcontext()

    async def _execute(
        self, batch: list[Op], retries: int = INTEGRITY_RETRIES, *, blind: bool = True
    ) -> None:
        try:
            outcomes = await self._retrying(
                functools.partial(self._transaction, batch, blind), len(batch)
            )
        except Exception as exc:
            if is_locked(exc):  # retried for LOCK_RETRY_TOTAL already: every op fails alike
                error = map_error(exc, self._url)
                for op in batch:
                    _resolve(op, exc=error)
                return
            if len(batch) > 1:
                logger.debug("batch of %d failed (%s); retrying op by op", len(batch), exc)
                for op in batch:
                    await self._execute([op], blind=False)
                return
            if blind and batch[0].blind is not None:
                await self._execute(batch, retries, blind=False)  # learn why: load the row
                return
            if retries > 0 and isinstance(exc, IntegrityError | _StaleRead):
                await self._execute(batch, retries - 1, blind=False)  # a racing writer won
                return
            _resolve(batch[0], exc=map_error(exc, self._url))
            return
        self.batches += 1
        self.ops += len(batch)
        for op, outcome in outcomes:
            if isinstance(outcome, BaseException):
                _resolve(op, exc=outcome)
            else:
                try:
                    _resolve(op, result=outcome())
                except Exception as exc:  # a bug building the result: that caller only
                    _resolve(op, exc=exc)

    async def _retrying(self, fn: Callable[[Connection], T], ops: int) -> T:
        """``fn`` in a write transaction, retried with backoff while the database is locked."""
        delay = LOCK_RETRY_BASE
        started = time.monotonic()
        warned = False
        while True:
            try:
                return await self._attempt(fn)
            except SQLAlchemyError as exc:
                waited = time.monotonic() - started
                if not is_locked(exc) or waited >= LOCK_RETRY_TOTAL:
                    raise
                if waited >= LOCK_RETRY_QUIET and not warned:
                    warned = True
                    what = f"{ops} writes" if ops > 1 else "a write"
                    logger.warning(
                        "database busy for %.0fs (another process holds a long write"
                        " transaction); still retrying %s",
                        waited,
                        what,
                    )
                await asyncio.sleep(delay)  # real time: lock contention is not simulated time
                delay = min(delay * 2, LOCK_RETRY_CAP)

    async def _attempt(self, fn: Callable[[Connection], T]) -> T:
        if self._sync is None:
            async with self._engine.begin() as pooled:
                return await pooled.run_sync(fn)
        conn = self._connection()
        try:
            with conn.begin():
                result = fn(conn)
        except BaseException:
            self._discard_transaction(conn)
            raise
        self._committed()
        return result

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            assert self._sync is not None
            self._conn = self._sync.connect()
        return self._conn

    def _discard_transaction(self, conn: Connection) -> None:
        """Leave no transaction open after a failure (a BEGIN that failed leaves SQLAlchemy's
        and sqlite3's views apart): roll back, or drop the connection if that fails."""
        try:
            if conn.in_transaction():
                conn.rollback()
            raw = conn.connection.dbapi_connection
            if isinstance(raw, sqlite3.Connection) and raw.in_transaction:
                raw.rollback()
        except Exception:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()
            self._conn = None

    def _transaction(self, batch: list[Op], blind: bool, conn: Connection) -> list[Outcome]:
        # blind where the count of rows changed is known: SQLite's executemany rowcount,
        # PostgreSQL's RETURNING (see _update_arrays)
        blind = blind and (
            conn.dialect.supports_sane_multi_rowcount or conn.dialect.name == "postgresql"
        )
        uow = UnitOfWork(lock_rows=self._lock_rows)
        outcomes: list[Outcome] = []
        if self.database_clock:
            uow.lease_now = database_now(conn)
        loaded = [op for op in batch if not (blind and op.blind is not None)]
        uow.load(
            conn, (pk for op in loaded for pk in op.pks), (s for op in loaded for s in op.sids)
        )
        for op in batch:
            apply = op.blind if blind and op.blind is not None else op.apply
            try:
                outcomes.append((op, apply(uow)))
            except Exception as exc:  # ops validate before changing anything
                outcomes.append((op, exc))
        uow.flush(conn)
        return outcomes

    # --- WAL checkpoints (SQLite), off the loop ---------------------------------------------------

    def _committed(self) -> None:
        """After each commit: start a checkpoint when enough has been written since the last."""
        self._since_checkpoint += 1
        if self.checkpointing is not None and not self.checkpointing.done():
            return
        assert self._wal is not None
        if self._since_checkpoint < CHECKPOINT_COMMITS:
            try:
                size = os.stat(self._wal).st_size
            except OSError:
                return
            if size < CHECKPOINT_BYTES or size <= self._wal_mark:
                return
            self._wal_mark = size
        self._since_checkpoint = 0
        self.checkpointing = asyncio.get_running_loop().create_task(
            self._checkpoint(), name="sessionmgr-checkpoint"
        )

    async def _checkpoint(self) -> None:
        assert self._wal is not None
        path = self._wal.removesuffix("-wal")
        try:
            await asyncio.to_thread(_checkpoint, path)
            self.checkpoints += 1
        except sqlite3.Error as exc:  # the next one tries again; the WAL only grows meanwhile
            logger.warning("WAL checkpoint of %s failed: %s", path, exc)


Outcome = tuple[Op, Thunk | Exception]


def _checkpoint(path: str) -> None:
    """``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of its own (it never waits for locks:
    it copies what no reader still needs)."""
    with contextlib.closing(sqlite3.connect(path, timeout=db.BUSY_TIMEOUT)) as conn:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def database_now(conn: Connection) -> datetime:
    """The database server's clock (PostgreSQL's ``now()``: this transaction's start); async
    callers use ``await conn.run_sync(database_now)``."""
    value = conn.execute(select(func.now())).scalar_one()
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise DatabaseError(f"the database's now() is not a timezone-aware time: {value!r}")
    return value.astimezone(UTC)


def _resolve(op: Op, *, result: Any = None, exc: BaseException | None = None) -> None:
    if op.future is None or op.future.done():
        return
    if exc is not None:
        op.future.set_exception(exc)
    else:
        op.future.set_result(result)
