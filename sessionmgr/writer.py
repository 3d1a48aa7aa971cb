"""Group commit: the transitions of many concurrent tasks share one transaction.

One transaction per write costs a BEGIN, a COMMIT and several driver round trips; with SQLAlchemy
async on SQLite that caps a process near 1,400 writes/s. Instead every transition is an ``Op``
queued to one ``GroupWriter`` task, which takes everything queued, and in one transaction:

1. loads every row the ops name, with one SELECT (``FOR UPDATE`` on PostgreSQL; SQLite's
   ``BEGIN IMMEDIATE`` already holds the write lock),
2. applies the ops in submission order to those rows in memory (``UnitOfWork``): each op checks
   the status it expects and records its changes and its event,
3. writes back with one multi-row INSERT ... RETURNING, one executemany UPDATE per set of changed
   columns (each still ``WHERE id = ? AND status = <status read>``), one executemany of events,
4. commits, and only then resolves each caller's future.

A failing batch is retried op by op, so one bad op fails alone; "database is locked" (and
PostgreSQL deadlocks) are retried with backoff inside the writer and never reach callers unless
they outlast ``LOCK_RETRY_TOTAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Update, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import is_locked, map_error, write_engine
from .errors import DatabaseError
from .models import session_events, sessions

logger = logging.getLogger(__name__)

MAX_BATCH = 500  # ops per transaction
LOAD_CHUNK = 500  # keys per SELECT ... IN (...)
LOCK_RETRY_BASE = 0.05  # seconds before retrying a locked batch; doubles each time
LOCK_RETRY_CAP = 2.0  # seconds, the longest pause between retries
LOCK_RETRY_TOTAL = 60.0  # seconds of retrying (on top of SQLite's busy timeout) before giving up
INTEGRITY_RETRIES = 1  # a lone op that hit a unique constraint reloads and tries again (races)

Row = dict[str, Any]
Thunk = Callable[[], Any]  # builds an op's result once the batch has committed

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

    # --- reading ---------------------------------------------------------------------------------

    async def load(self, conn: AsyncConnection, pks: Iterable[int], sids: Iterable[str]) -> None:
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
            for mapping in (await conn.execute(stmt)).mappings():
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

    async def flush(self, conn: AsyncConnection) -> None:
        await self._insert_new(conn)
        await self._update_changed(conn)
        if self._events:
            params = [{"session_pk": row["id"], **event} for row, event in self._events]
            await conn.execute(insert(session_events), params)

    async def _insert_new(self, conn: AsyncConnection) -> None:
        """One multi-row INSERT per set of columns given (NULLs need no binding)."""
        by_columns: dict[tuple[str, ...], list[Row]] = {}
        for row in self._new:
            by_columns.setdefault(tuple(sorted(self._new_given[id(row)])), []).append(row)
        for given, rows in by_columns.items():
            params = [{k: row[k] for k in given} for row in rows]
            if conn.dialect.name == "sqlite":
                # SQLAlchemy would fall back to one INSERT per row to keep RETURNING in parameter
                # order. Not needed: this transaction holds the write lock, and SQLite numbers
                # new rows max(id) + 1 in insertion order, so ascending ids follow the rows.
                result = await conn.execute(insert(sessions).returning(sessions.c.id), params)
                ids = sorted(result.scalars().all())
            else:
                stmt = insert(sessions).returning(sessions.c.id, sort_by_parameter_order=True)
                ids = list((await conn.execute(stmt, params)).scalars().all())
            for row, pk in zip(rows, ids, strict=True):
                row["id"] = pk
        for row, snap in self._new_snapshots:
            snap["id"] = row["id"]

    async def _update_changed(self, conn: AsyncConnection) -> None:
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
            result = await conn.execute(_update_statement(columns), params)
            if conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(rows):
                raise _StaleRead(f"updated {result.rowcount} of {len(rows)} rows read")


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
        # SQLite has one write lock per file. Within this process, writers take turns on an
        # asyncio lock (an instant hand-over) instead of on SQLite's busy handler, which polls
        # in sleeps of up to 100 ms; the busy timeout is left to contention between processes.
        self.lock: asyncio.Lock | None = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        self._max_batch = max_batch
        self._queue: list[Op] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # transactions committed, for tests and benchmarks
        self.ops = 0  # ops committed

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

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
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

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[object]:
        """This process's turn at the write lock (a no-op where the database has row locks)."""
        return self.lock if self.lock is not None else contextlib.nullcontext()

    async def _execute(self, batch: list[Op], retries: int = INTEGRITY_RETRIES) -> None:
        try:
            outcomes = await self._with_lock_retry(batch)
        except Exception as exc:
            if is_locked(exc):  # retried for LOCK_RETRY_TOTAL already: every op fails alike
                error = map_error(exc, self._url)
                for op in batch:
                    _resolve(op, exc=error)
                return
            if len(batch) > 1:
                logger.debug("batch of %d failed (%s); retrying op by op", len(batch), exc)
                for op in batch:
                    await self._execute([op])
                return
            if retries > 0 and isinstance(exc, IntegrityError | _StaleRead):
                await self._execute(batch, retries - 1)  # a racing writer won: reload and decide
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

    async def _with_lock_retry(self, batch: list[Op]) -> list[tuple[Op, Thunk | Exception]]:
        delay = LOCK_RETRY_BASE
        give_up = time.monotonic() + LOCK_RETRY_TOTAL
        while True:
            try:
                return await self._transaction(batch)
            except SQLAlchemyError as exc:
                if not is_locked(exc) or time.monotonic() >= give_up:
                    raise
                logger.warning(
                    "database busy, retrying %d writes in %.2fs: %s", len(batch), delay, exc
                )
                await asyncio.sleep(delay)  # real time: lock contention is not simulated time
                delay = min(delay * 2, LOCK_RETRY_CAP)

    async def _transaction(self, batch: list[Op]) -> list[tuple[Op, Thunk | Exception]]:
        uow = UnitOfWork(lock_rows=self._lock_rows)
        outcomes: list[tuple[Op, Thunk | Exception]] = []
        async with self.exclusive(), self._engine.begin() as conn:
            if self.database_clock:
                uow.lease_now = await database_now(conn)
            await uow.load(
                conn, (pk for op in batch for pk in op.pks), (s for op in batch for s in op.sids)
            )
            for op in batch:
                try:
                    outcomes.append((op, op.apply(uow)))
                except Exception as exc:  # ops validate before changing anything
                    outcomes.append((op, exc))
            await uow.flush(conn)
        return outcomes


async def database_now(conn: AsyncConnection) -> datetime:
    """The database server's clock (PostgreSQL's ``now()``: this transaction's start)."""
    value = (await conn.execute(select(func.now()))).scalar_one()
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
