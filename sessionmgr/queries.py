"""``SessionQueries``: the admin reads of the repository (lookups, listings with cursors, stats).

A mixin that ``SessionRepository`` inherits, rather than an object it holds and delegates to:
every caller keeps calling ``repo.list(...)``, ``repo.stats(...)``, ``repo.get(...)`` with no
forwarding method per read, and the reads share the repository's engine, clock and dialect as
plain attributes. Nothing here writes; the transitions, claims and leases stay in
sessionmgr/repository.py, cleanup in sessionmgr/cleanup.py.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import json.scanner
import math
import operator
import sqlite3
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import UTC, date, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Date,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    extract,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .checks import (
    BIGINT,
    DEFAULT_PAGE,
    MAX_PAGE,
    check_days,
    check_seconds,
    check_text,
)
from .checks import aware as _aware
from .clock import Clock
from .errors import InvalidArgument, SessionNotFound
from .models import (
    DEFAULT_TRANSPORT,
    NAME_LENGTH,
    SESSION_ID_LENGTH,
    UTCDateTime,
    session_events,
    sessions,
)
from .reader import Reader
from .records import (
    DayStats,
    Page,
    SessionEvent,
    SessionFilter,
    SessionRecord,
    Stats,
    build_record,
)
from .states import LIVE_STATUSES, EndReason, SessionStatus
from .transitions import intent_due_sql
from .writer import database_now

LOOKUP_CHUNK = 500  # ids per SELECT ... IN (...) of known_session_ids()

P = ParamSpec("P")
T = TypeVar("T")
Q = TypeVar("Q", bound="SessionQueries")

_PENDING = SessionStatus.PENDING.value
_ACTIVE = SessionStatus.ACTIVE.value
_ENDED = SessionStatus.ENDED.value
_LIVE = tuple(s.value for s in SessionStatus if s in LIVE_STATUSES)
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_STATUS_VALUES = tuple(s.value for s in SessionStatus)


def _db_errors(
    fn: Callable[Concatenate[Q, P], Awaitable[T]],
) -> Callable[Concatenate[Q, P], Awaitable[T]]:
    """Driver failures leave as sessionmgr's typed one-line errors."""

    @functools.wraps(fn)
    async def wrapper(self: Q, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(self, *args, **kwargs)
        except (SQLAlchemyError, OSError) as exc:
            raise db.map_error(exc, self._engine.url) from exc

    return wrapper


def _record(row: Mapping[str, Any]) -> SessionRecord:
    """The record of a row as the writer holds it (Python values, status as text)."""
    values = list(_row_values(row))
    values[_METADATA] = dict(values[_METADATA] or {})
    return _finish(values)


# The record's fields as columns, in the record's order: a row of them is the record's arguments.
RECORD_COLUMNS = tuple(sessions.c[name] for name in _RECORD_FIELDS)
_row_values = operator.itemgetter(*_RECORD_FIELDS)
_STATUSES = {s.value: s for s in SessionStatus}
_END_REASONS = {r.value: r for r in EndReason}
_STATUS, _END_REASON, _METADATA, _TRANSPORT = (
    _RECORD_FIELDS.index(name) for name in ("status", "end_reason", "metadata", "transport_type")
)
_CREATED = _RECORD_FIELDS.index("created_at")
_LATER_TIMES = tuple(
    i
    for i, column in enumerate(RECORD_COLUMNS)
    if isinstance(column.type, UTCDateTime) and i != _CREATED
)
_time = datetime.fromisoformat
_UTC = "+00:00"  # what SQLite's naive UTC text lacks (see models.parse_sqlite_time)


def record_from_row(row: Sequence[Any]) -> SessionRecord:
    """The record of a row of ``RECORD_COLUMNS`` as SQLAlchemy returns it, built once (what
    ``_record`` gives for the same row as a mapping: a test holds both equal)."""
    values = list(row)
    values[_METADATA] = dict(values[_METADATA] or {})
    return _finish(values)


def record_from_sqlite(row: Sequence[Any]) -> SessionRecord:
    """The record of a raw SQLite row of ``RECORD_COLUMNS`` (times as naive UTC text, metadata
    as JSON text), converted as ``models.UTCDateTime`` and SQLAlchemy's JSON type do, in one
    call per row (a test holds the result equal to the ORM's for the same rows)."""
    values = list(row)
    created_text = values[_CREATED]
    created = values[_CREATED] = _time(created_text + _UTC)
    for i in _LATER_TIMES:
        text = values[i]
        if text is not None:
            # the same text is the same (immutable) time: an untouched session has three
            values[i] = created if text == created_text else _time(text + _UTC)
    meta = values[_METADATA]
    values[_METADATA] = {} if meta is None or meta == "{}" else _json_object(meta)
    return _finish(values)


_scan_json = json.scanner.make_scanner(cast(Any, json.JSONDecoder()))  # json.loads without wrapping


def _json_object(text: str) -> dict[str, Any]:
    """``dict(json.loads(text) or {})``, ~3x cheaper for the JSON text SQLAlchemy writes (no
    surrounding whitespace): the decoder's C scanner straight; anything else through
    ``json.loads`` itself, so the result and the errors are json.loads's."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        value, end = None, -1
    if end != len(text):
        value = json.loads(text)
    return value if type(value) is dict else dict(value or {})


def _finish(values: list[Any]) -> SessionRecord:
    values[_STATUS] = _STATUSES[values[_STATUS]]
    values[_END_REASON] = _END_REASONS[values[_END_REASON]] if values[_END_REASON] else None
    # a row inserted without it took the column's server default, which the snapshot lacks
    values[_TRANSPORT] = values[_TRANSPORT] or DEFAULT_TRANSPORT
    return build_record(values)


def _records(stmt: Select[Any]) -> Callable[[Connection], list[SessionRecord]]:
    """A read of ``stmt`` (selecting ``RECORD_COLUMNS``) returning its records. On SQLite the
    driver's rows are taken as they are (``CursorResult.cursor``) and converted once, here."""

    def read(conn: Connection) -> list[SessionRecord]:
        return records_of(conn, conn.execute(stmt))

    return read


def records_of(conn: Connection, result: Any) -> list[SessionRecord]:
    """The records of a result whose columns are ``RECORD_COLUMNS`` (a SELECT, or a write's
    ``RETURNING``), each built once: on SQLite from the driver's rows as they are, with no
    per-column result processing first."""
    if conn.dialect.name != "sqlite":
        return [record_from_row(r) for r in result.all()]
    try:
        rows = result.cursor.fetchall()
    finally:
        result.close()
    return [record_from_sqlite(r) for r in rows]


class SessionQueries:
    """The reads of ``SessionRepository`` (see the module docstring); it sets these attributes."""

    _engine: AsyncEngine
    _reader: Reader
    clock: Clock
    dialect: str
    database_clock: bool

    @_db_errors
    async def has_due_intents(self) -> bool:
        """Whether any pending intent is free to resolve (one indexed read, no write lock)."""
        now = self.clock.now()
        async with self._engine.connect() as conn:
            at = await conn.run_sync(database_now) if self.database_clock else now
            stmt = select(sessions.c.id).where(intent_due_sql(now, at)).limit(1)
            return (await conn.execute(stmt)).first() is not None

    @_db_errors
    async def costs_due(self, *, limit: int) -> list[SessionRecord]:
        """Ended sessions whose cost is still to be asked for (``next_attempt_at`` come): the
        index range (status, lease_until, next_attempt_at), free when there are none."""
        now = self.clock.now()
        c = sessions.c
        stmt = (
            select(*RECORD_COLUMNS)
            .where(
                c.status == _ENDED,
                c.lease_until.is_(None),
                c.next_attempt_at <= now,
                c.cost.is_(None),
            )
            .order_by(c.next_attempt_at, c.id)
            .limit(limit)
        )
        return await self._read(_records(stmt))

    # --- admin reads ----------------------------------------------------------------------------

    async def _read(self, read: Callable[[Connection], T]) -> T:
        """``read`` in one hop (see sessionmgr/reader.py); driver failures as typed errors."""
        try:
            return await self._reader.run(read)
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            raise db.map_error(exc, self._engine.url) from exc

    async def _select_records(
        self, shape: Hashable, build: Callable[[], Select[Any]], params: Mapping[str, Any]
    ) -> list[SessionRecord]:
        """The records of the prepared SELECT of ``shape`` (``build()`` selects
        ``RECORD_COLUMNS`` with ``p_...`` binds) for ``params``: one hop, see
        sessionmgr/reader.py; driver failures as typed errors."""
        try:
            return await self._reader.select(
                shape, build, params, raw=record_from_sqlite, row=record_from_row
            )
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            raise db.map_error(exc, self._engine.url) from exc

    async def find(self, key: int | str) -> SessionRecord | None:
        """The session with this local id (int or digit string) or session_id, or None."""
        key = _key(key)
        params: dict[str, Any]
        if isinstance(key, int):
            shape, params = "find id", {"p_id": key}
        elif (local := _local_id(key)) is not None:
            shape, params = "find either", {"p_id": local, "p_session_id": key}
        else:
            shape, params = "find session_id", {"p_session_id": key}
        records = await self._select_records(("find", shape), _find_statement(shape), params)
        if not records:
            return None
        # a digit string matching both a local id and another row's session_id means the id
        return next((r for r in records if str(r.id) == str(key)), records[0])

    async def get(self, key: int | str) -> SessionRecord:
        """Like ``find``, but a missing session raises ``SessionNotFound``."""
        record = await self.find(key)
        if record is None:
            raise not_found(key)
        return record

    async def iter_live(
        self,
        *,
        statuses: Iterable[SessionStatus] = (SessionStatus.ACTIVE, SessionStatus.ENDING),
        batch: int = 500,
    ) -> AsyncIterator[SessionRecord]:
        """Every session in ``statuses``, by id, ``batch`` rows per short query (no long read
        transaction holds back SQLite's WAL checkpoints)."""
        wanted = [SessionStatus(s).value for s in statuses]
        if not wanted:
            return  # no status: no session (an empty filter shape would mean any status)
        params: dict[str, Any] = {f"p_status_{i}": s for i, s in enumerate(wanted)}
        params["p_limit"] = batch
        filters = _FilterShape(len(wanted), False, False, False, (), False)

        def build() -> Select[Any]:
            c = sessions.c
            return (
                select(*RECORD_COLUMNS)
                .where(*filters.conditions(), c.id > bindparam("p_after_id", type_=Integer))
                .order_by(c.id)
                .limit(bindparam("p_limit", type_=Integer))
            )

        last = 0
        while True:
            params["p_after_id"] = last
            records = await self._select_records(("iter_live", filters), build, dict(params))
            for record in records:
                yield record
            if len(records) < batch:
                return
            last = records[-1].id

    async def ping(self) -> None:
        """One round trip to the database (health checks)."""
        await self._read(lambda conn: conn.execute(select(1)).all())

    async def count_live(self) -> dict[SessionStatus, int]:
        """Sessions per live status: one grouped COUNT on the status index, cheap enough for
        every metrics scrape however long the history (``stats`` reads far more)."""
        c = sessions.c
        stmt = select(c.status, func.count()).where(c.status.in_(_LIVE)).group_by(c.status)
        rows = await self._read(lambda conn: conn.execute(stmt).all())
        counts: dict[str, int] = {s: n for s, n in rows}
        return {s: int(counts.get(s.value, 0)) for s in SessionStatus if s in LIVE_STATUSES}

    async def pending_intents(self) -> list[SessionRecord]:
        """Intents whose create outcome is not recorded, oldest first (for reconcile)."""
        stmt = (
            select(*RECORD_COLUMNS)
            .where(sessions.c.status == _PENDING)
            .order_by(sessions.c.created_at, sessions.c.id)
        )
        return await self._read(_records(stmt))

    async def _chunked(
        self, session_ids: Iterable[str], statement: Callable[[list[str]], Select[Any]]
    ) -> list[Any]:
        """The rows of ``statement(chunk)`` for each ``LOOKUP_CHUNK`` of the ids, in one read."""
        wanted = sorted(set(session_ids))

        def read(conn: Connection) -> list[Any]:
            rows: list[Any] = []
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                rows += conn.execute(statement(wanted[start : start + LOOKUP_CHUNK])).all()
            return rows

        return await self._read(read) if wanted else []

    async def known_session_ids(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these LemonSlice ids have a row (one query per chunk, for reconcile)."""
        c = sessions.c
        rows = await self._chunked(
            session_ids, lambda chunk: select(c.session_id).where(c.session_id.in_(chunk))
        )
        return {r[0] for r in rows}

    async def active_control_urls(self, session_ids: Iterable[str]) -> dict[str, str]:
        """session_id -> control_url of those that are active (one query per chunk: what the
        keep-alive reads once per round)."""
        c = sessions.c
        rows = await self._chunked(
            session_ids,
            lambda chunk: select(c.session_id, c.control_url).where(
                c.session_id.in_(chunk), c.status == _ACTIVE
            ),
        )
        return {r[0]: r[1] for r in rows if r[1]}

    async def ended_before(
        self, session_ids: Iterable[str], before: datetime
    ) -> list[SessionRecord]:
        """Which of these LemonSlice ids this database ended before ``before`` (for reconcile:
        ended here, yet listed live by LemonSlice)."""
        before = _aware(before, "before")
        c = sessions.c
        rows = await self._chunked(
            session_ids,
            lambda chunk: (
                select(*RECORD_COLUMNS)
                .where(c.session_id.in_(chunk), c.status == _ENDED, c.ended_at <= before)
                .order_by(c.id)
            ),
        )
        return [record_from_row(r) for r in rows]

    async def ended_without_cost(self, session_ids: Iterable[str]) -> list[SessionRecord]:
        """Which of these LemonSlice ids ended here with no cost recorded (for reconcile)."""
        c = sessions.c
        rows = await self._chunked(
            session_ids,
            lambda chunk: (
                select(*RECORD_COLUMNS)
                .where(c.session_id.in_(chunk), c.status == _ENDED, c.cost.is_(None))
                .order_by(c.id)
            ),
        )
        return [record_from_row(r) for r in rows]

    @_db_errors
    async def lease_now(self) -> datetime:
        """The time leases are compared on: the database's clock when ``database_clock``."""
        if not self.database_clock:
            return self.clock.now()
        async with self._engine.connect() as conn:
            return await conn.run_sync(database_now)

    async def events(self, key: int | str) -> list[SessionEvent]:
        """The lifecycle of one session, oldest first."""
        record = await self.get(key)
        e = session_events.c
        stmt = (
            select(e.id, e.session_pk, e.at, e.from_status, e.to_status, e.reason, e.detail)
            .where(e.session_pk == record.id)
            .order_by(e.id)
        )
        rows = await self._read(lambda conn: conn.execute(stmt).all())
        return [
            SessionEvent(
                id, pk, at, SessionStatus(src) if src else None, SessionStatus(dst), reason, detail
            )
            for id, pk, at, src, dst, reason, detail in rows
        ]

    async def stats(self, *, days: int = 7, now: datetime | None = None) -> Stats:
        """Counts per status, live sessions, per-day activity over the last ``days`` UTC days,
        duration percentiles and end reasons of sessions ended in that window; all in SQL, in
        one read off the event loop (on SQLite: see sessionmgr/reader.py)."""
        check_days(days)
        now = _aware(now, "now") if now is not None else self.clock.now()
        first_day = now.date() - timedelta(days=days - 1)
        start = datetime.combine(first_day, datetime.min.time(), tzinfo=UTC)
        c = sessions.c
        day_created = self._day(c.created_at).label("day")
        day_ended = self._day(c.ended_at).label("day")
        duration = self._seconds(c.created_at, c.ended_at).label("duration")
        ended_in_window = and_(c.status == _ENDED, c.ended_at >= start)

        def read(conn: Connection) -> Stats:
            def rows(stmt: Any) -> list[Any]:
                return list(conn.execute(stmt).all())

            by_status = {s.value: 0 for s in SessionStatus}
            for status, count in rows(select(c.status, func.count()).group_by(c.status)):
                by_status[status] = count
            oldest: list[SessionRecord] = []  # one index probe per live status: cheap always
            for status in _LIVE:
                oldest += [
                    record_from_row(r)
                    for r in rows(
                        select(*RECORD_COLUMNS)
                        .where(c.status == status)
                        .order_by(c.created_at, c.id)
                        .limit(1)
                    )
                ]
            oldest.sort(key=lambda r: (r.created_at, r.id))
            created = dict(
                (_as_date(day), n)
                for day, n in rows(
                    select(day_created, func.count())
                    .where(c.created_at >= start)
                    .group_by(day_created)
                )
            )
            ended: dict[date, tuple[int, float | None, int]] = {
                _as_date(day): (n, credits, known)
                for day, n, credits, known in rows(
                    select(day_ended, func.count(), func.sum(c.cost), func.count(c.cost))
                    .where(ended_in_window)
                    .group_by(day_ended)
                )
            }
            reasons = {
                reason: n
                for reason, n in rows(
                    select(c.end_reason, func.count())
                    .where(c.ended_at >= start, c.end_reason.is_not(None))
                    .group_by(c.end_reason)
                )
            }
            n_ended = sum(n for n, _, _ in ended.values())
            p50 = p95 = None
            if n_ended:
                ranks = {_rank(0.5, n_ended), _rank(0.95, n_ended)}
                ranked = (
                    select(duration, func.row_number().over(order_by=duration).label("rn"))
                    .where(ended_in_window)
                    .subquery()
                )
                picked = dict(
                    (rn, round(float(d), 3))  # milliseconds: SQLite's julianday precision
                    for d, rn in rows(
                        select(ranked.c.duration, ranked.c.rn).where(ranked.c.rn.in_(sorted(ranks)))
                    )
                )
                p50, p95 = picked.get(_rank(0.5, n_ended)), picked.get(_rank(0.95, n_ended))
            per_day = []
            for i in range(days):
                day = first_day + timedelta(days=i)
                n, credits, known = ended.get(day, (0, None, 0))
                per_day.append(
                    DayStats(
                        day=day,
                        created=int(created.get(day, 0)),
                        ended=int(n),
                        credits=float(credits) if known and credits is not None else None,
                    )
                )
            return Stats(
                by_status=by_status,
                live=sum(by_status[s] for s in _LIVE),
                oldest_live=oldest[0] if oldest else None,
                per_day=per_day,
                duration_p50=p50,
                duration_p95=p95,
                end_reasons=reasons,
                credits_known=float(sum(c for _, c, k in ended.values() if k and c is not None)),
                cost_unknown=int(sum(n - k for n, _, k in ended.values())),
            )

        return await self._read(read)

    def _day(self, col: Any) -> ColumnElement[Any]:
        """The UTC calendar day of a time column (a date on PostgreSQL, 'YYYY-MM-DD' on SQLite)."""
        if self.dialect == "postgresql":
            return func.timezone("UTC", col).cast(Date)
        return func.date(col)

    def _seconds(self, start: Any, end: Any) -> ColumnElement[Any]:
        if self.dialect == "postgresql":
            return extract("epoch", end - start)
        return (func.julianday(end) - func.julianday(start)) * 86400.0

    def _filter_shape(self, flt: SessionFilter) -> tuple[_FilterShape, dict[str, Any]]:
        """``flt`` checked: its shape (which filters, how many statuses, which tag names) and
        the bind values of the conditions ``_FilterShape.conditions`` builds."""
        if isinstance(flt.statuses, str):
            raise InvalidArgument(
                "statuses must be a list of statuses, e.g. ['active'], not a string"
            )
        params: dict[str, Any] = {}
        for i, status in enumerate(flt.statuses or ()):
            params[f"p_status_{i}"] = _status(status)
        if flt.agent_id is not None:
            check_text("agent_id", flt.agent_id, max_chars=NAME_LENGTH)
            params["p_agent_id"] = flt.agent_id
        if flt.created_after is not None:
            params["p_created_after"] = _aware(flt.created_after, "created_after")
        if flt.created_before is not None:
            params["p_created_before"] = _aware(flt.created_before, "created_before")
        if not isinstance(flt.meta, Mapping):
            raise InvalidArgument(f"meta must be a mapping of tags, not {type(flt.meta).__name__}")
        names = []
        for i, (name, value) in enumerate(flt.meta.items()):
            names.append(check_text("a meta tag name", name))
            params[f"p_meta_{i}"] = check_text("a meta value", str(value), allow_empty=True)
        if flt.idle_for is not None:
            idle_for = check_seconds("idle_for", flt.idle_for, positive=False)
            params["p_idle_since"] = self.clock.now() - timedelta(seconds=idle_for)
        shape = _FilterShape(
            statuses=len(flt.statuses or ()),
            agent_id=flt.agent_id is not None,
            created_after=flt.created_after is not None,
            created_before=flt.created_before is not None,
            meta=tuple(names),
            idle=flt.idle_for is not None,
        )
        return shape, params

    async def list(
        self,
        flt: SessionFilter | None = None,
        *,
        limit: int = DEFAULT_PAGE,
        after: str | None = None,
        sort: str = "-created_at",
    ) -> Page:
        """One page of sessions matching ``flt``, in ``sort`` order (a field, ``-`` for
        descending: see ``SORTS``); pass the page's ``next_cursor`` as ``after`` for the next."""
        spec = _sort_spec(sort)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        filters, params = self._filter_shape(flt or SessionFilter())
        params["p_limit"] = limit + 1  # one more: whether there is a next page, same statement
        cursor_kind: str | None = None  # where the cursor is: None (first page), "null", "value"
        if after is not None:
            value, pk = _decode_cursor(after, sort)
            cursor_kind = "null" if value is None else "value"
            params["p_after_id"] = pk
            if value is not None:
                params["p_after_value"] = value

        def build() -> Select[Any]:
            stmt = select(*RECORD_COLUMNS).where(*filters.conditions())
            if cursor_kind is not None:
                stmt = stmt.where(spec.after(null=cursor_kind == "null"))
            return stmt.order_by(*spec.order_by()).limit(bindparam("p_limit", type_=Integer))

        shape = ("list", sort, filters, cursor_kind)
        records = await self._select_records(shape, build, params)
        if len(records) <= limit:
            return Page(items=records, next_cursor=None)
        last = records[limit - 1]
        cursor = _encode_cursor(sort, spec.value(last), last.id)
        return Page(items=records[:limit], next_cursor=cursor)


# --- helpers ---------------------------------------------------------------------------------


def _key(key: int | str) -> int | str:
    """Local ids may come as ints or digit strings; session_ids are strings."""
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise InvalidArgument(
            f"a session key is a local id or a session_id, not {type(key).__name__}"
        )
    if isinstance(key, int):
        if not 0 < key < BIGINT:
            raise InvalidArgument(f"a local session id is a positive 64-bit integer, got {key}")
        return key
    check_text("session key", key, max_chars=max(SESSION_ID_LENGTH, len(str(BIGINT))))
    return key


def _status(value: object) -> str:
    if isinstance(value, str) and value in _STATUS_VALUES:
        return value
    raise InvalidArgument(f"unknown status {value!r}: use one of {', '.join(_STATUS_VALUES)}")


def _local_id(key: str) -> int | None:
    """The local id a string of ASCII digits names (None: not one, or out of range)."""
    if key.isascii() and key.isdigit() and int(key) < BIGINT:
        return int(key)
    return None


def _rank(p: float, n: int) -> int:
    """Nearest-rank percentile position (1-based) among ``n`` sorted values."""
    return max(1, math.ceil(p * n))


@dataclasses.dataclass(frozen=True, slots=True)
class _Sort:
    column: str | None  # None: the id
    descending: bool
    nullable: bool

    def value(self, record: SessionRecord) -> datetime | None:
        return None if self.column is None else cast(datetime | None, getattr(record, self.column))

    def order_by(self) -> list[Any]:
        pk = sessions.c.id
        keys: list[Any] = []
        if self.column is not None:
            col = sessions.c[self.column]
            if self.nullable:
                keys.append(col.is_(None))  # nulls last, on both backends
            keys.append(col.desc() if self.descending else col.asc())
        keys.append(pk.desc() if self.descending else pk.asc())
        return keys

    def after(self, *, null: bool) -> ColumnElement[bool]:
        """Rows strictly after the cursor's (``p_after_value``, ``p_after_id``) in this order;
        ``null``: the cursor's value is NULL (no ``p_after_value``)."""
        pk = sessions.c.id
        pk_value = bindparam("p_after_id", type_=Integer)
        if self.column is None:
            return pk < pk_value if self.descending else pk > pk_value
        col = sessions.c[self.column]
        if null:  # already among the nulls, which come last
            return and_(col.is_(None), pk < pk_value if self.descending else pk > pk_value)
        row_key = tuple_(col, pk)
        value = tuple_(bindparam("p_after_value", type_=col.type), pk_value)
        cond = row_key < value if self.descending else row_key > value
        return or_(cond, col.is_(None)) if self.nullable else cond


@dataclasses.dataclass(frozen=True, slots=True)
class _FilterShape:
    """Which of ``SessionFilter``'s conditions a listing has: with the sort and the cursor, the
    shape its statement is prepared for (sessionmgr/reader.py), the values bound per call."""

    statuses: int  # how many
    agent_id: bool
    created_after: bool
    created_before: bool
    meta: tuple[str, ...]  # the tag names, in order
    idle: bool

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions, their values as ``p_...`` binds (see ``_filter_shape``)."""
        c = sessions.c
        conds: list[ColumnElement[bool]] = []
        if self.statuses:
            status = c.status.type
            wanted = [bindparam(f"p_status_{i}", type_=status) for i in range(self.statuses)]
            conds.append(c.status.in_(wanted))
        if self.agent_id:
            conds.append(c.agent_id == bindparam("p_agent_id", type_=c.agent_id.type))
        if self.created_after:
            conds.append(c.created_at >= bindparam("p_created_after", type_=c.created_at.type))
        if self.created_before:
            conds.append(c.created_at < bindparam("p_created_before", type_=c.created_at.type))
        for i, name in enumerate(self.meta):
            conds.append(c.metadata[name].as_string() == bindparam(f"p_meta_{i}", type_=String))
        if self.idle:
            since = bindparam("p_idle_since", type_=c.last_activity_at.type)
            conds.append(c.last_activity_at <= since)
        return conds


def _find_statement(shape: str) -> Callable[[], Select[Any]]:
    """The builder of ``find``'s statement: by local id, by session_id, or either."""

    def build() -> Select[Any]:
        c = sessions.c
        by_id = c.id == bindparam("p_id", type_=Integer)
        by_session_id = c.session_id == bindparam("p_session_id", type_=c.session_id.type)
        cond = {"find id": by_id, "find session_id": by_session_id}.get(shape)
        where = or_(by_id, by_session_id) if cond is None else cond
        return select(*RECORD_COLUMNS).where(where).order_by(c.id)

    return build


SORTS: dict[str, _Sort] = {
    "created_at": _Sort("created_at", False, False),
    "-created_at": _Sort("created_at", True, False),
    "deadline": _Sort("deadline", False, True),  # soonest due first
    "-deadline": _Sort("deadline", True, True),
    "last_activity_at": _Sort("last_activity_at", False, False),  # idle longest first
    "-last_activity_at": _Sort("last_activity_at", True, False),
    "ended_at": _Sort("ended_at", False, True),
    "-ended_at": _Sort("ended_at", True, True),
    "id": _Sort(None, False, False),
    "-id": _Sort(None, True, False),
}


def _sort_spec(sort: str) -> _Sort:
    try:
        return SORTS[sort]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}") from None


def _encode_cursor(sort: str, value: datetime | None, pk: int) -> str:
    payload = json.dumps([sort, value.isoformat() if value else None, pk], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str) -> tuple[datetime | None, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, value, pk = json.loads(raw)
        when = datetime.fromisoformat(value) if value is not None else None
        if not isinstance(pk, int) or (when is not None and when.tzinfo is None):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            f"invalid cursor {cursor[:40]!r}: pass the next_cursor of the previous page"
            " unchanged, or leave it out to start from the first page"
        ) from None
    if made_for != sort:
        raise InvalidArgument(
            f"this cursor belongs to a listing sorted by {made_for!r}, not {sort!r}: keep the"
            " sort between pages, or leave the cursor out to start over"
        )
    return when, pk


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def not_found(key: int | str) -> SessionNotFound:
    """The one-line error for a session reference nothing matches."""
    return SessionNotFound(f"no session with id or session_id {str(key)!r}: see `sessionmgr list`")
