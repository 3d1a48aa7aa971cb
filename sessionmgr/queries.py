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
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Date,
    Select,
    and_,
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
from .models import DEFAULT_TRANSPORT, NAME_LENGTH, SESSION_ID_LENGTH, session_events, sessions
from .records import (
    DayStats,
    Page,
    SessionEvent,
    SessionFilter,
    SessionRecord,
    Stats,
)
from .states import LIVE_STATUSES, EndReason, SessionStatus
from .writer import Row, database_now

LOOKUP_CHUNK = 500  # ids per SELECT ... IN (...) of known_session_ids()
LEGACY_INTENT_SETTLE = 120.0  # seconds: an intent written without a lease counts as held this long

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
    values = {name: row[name] for name in _RECORD_FIELDS}
    values["status"] = SessionStatus(row["status"])
    values["end_reason"] = EndReason(row["end_reason"]) if row["end_reason"] else None
    values["metadata"] = dict(row["metadata"] or {})
    # a row inserted without it took the column's server default, which the snapshot lacks
    values["transport_type"] = row["transport_type"] or DEFAULT_TRANSPORT
    return SessionRecord(**values)


def _event(row: Mapping[str, Any]) -> SessionEvent:
    return SessionEvent(
        id=row["id"],
        session_pk=row["session_pk"],
        at=row["at"],
        from_status=SessionStatus(row["from_status"]) if row["from_status"] else None,
        to_status=SessionStatus(row["to_status"]),
        reason=row["reason"],
        detail=row["detail"],
    )


class SessionQueries:
    """The reads of ``SessionRepository`` (see the module docstring); it sets these attributes."""

    _engine: AsyncEngine
    clock: Clock
    dialect: str
    database_clock: bool

    def _intent_due(self, now: datetime, at: datetime) -> ColumnElement[bool]:
        """Pending intents nobody holds: lease expired (and retry time come), or written without
        a lease and older than ``LEGACY_INTENT_SETTLE``. Index ranges on (status, lease_until,
        next_attempt_at): free when there are none."""
        c = sessions.c
        retry_due = or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)
        legacy = now - timedelta(seconds=LEGACY_INTENT_SETTLE)
        return or_(
            and_(c.status == _PENDING, c.lease_until <= at, retry_due),
            and_(c.status == _PENDING, c.lease_until.is_(None), c.created_at <= legacy),
        )

    @_db_errors
    async def has_due_intents(self) -> bool:
        """Whether any pending intent is free to resolve (one indexed read, no write lock)."""
        now = self.clock.now()
        async with self._engine.connect() as conn:
            at = await database_now(conn) if self.database_clock else now
            stmt = select(sessions.c.id).where(self._intent_due(now, at)).limit(1)
            return (await conn.execute(stmt)).first() is not None

    @_db_errors
    async def costs_due(self, *, limit: int) -> list[SessionRecord]:
        """Ended sessions whose cost is still to be asked for (``next_attempt_at`` come): the
        index range (status, lease_until, next_attempt_at), free when there are none."""
        now = self.clock.now()
        c = sessions.c
        stmt = (
            select(sessions)
            .where(
                c.status == _ENDED,
                c.lease_until.is_(None),
                c.next_attempt_at <= now,
                c.cost.is_(None),
            )
            .order_by(c.next_attempt_at, c.id)
            .limit(limit)
        )
        return [_record(r) for r in await self._fetch(stmt)]

    # --- admin reads ----------------------------------------------------------------------------

    async def _fetch(self, stmt: Select[Any]) -> list[Row]:
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings()]

    @_db_errors
    async def find(self, key: int | str) -> SessionRecord | None:
        """The session with this local id (int or digit string) or session_id, or None."""
        key = _key(key)
        c = sessions.c
        if isinstance(key, int):
            cond: ColumnElement[bool] = c.id == key
        elif (local := _local_id(key)) is not None:
            cond = or_(c.id == local, c.session_id == key)
        else:
            cond = c.session_id == key
        rows = await self._fetch(select(sessions).where(cond).order_by(sessions.c.id))
        if not rows:
            return None
        # a digit string matching both a local id and another row's session_id means the id
        return _record(next((r for r in rows if str(r["id"]) == str(key)), rows[0]))

    async def get(self, key: int | str) -> SessionRecord:
        """Like ``find``, but a missing session raises ``SessionNotFound``."""
        record = await self.find(key)
        if record is None:
            raise SessionNotFound(
                f"no session with id or session_id {str(key)!r}: see `sessionmgr list`"
            )
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
        last = 0
        while True:
            stmt = (
                select(sessions)
                .where(sessions.c.status.in_(wanted), sessions.c.id > last)
                .order_by(sessions.c.id)
                .limit(batch)
            )
            try:
                rows = await self._fetch(stmt)
            except (SQLAlchemyError, OSError) as exc:
                raise db.map_error(exc, self._engine.url) from exc
            for row in rows:
                yield _record(row)
            if len(rows) < batch:
                return
            last = rows[-1]["id"]

    @_db_errors
    async def ping(self) -> None:
        """One round trip to the database (health checks)."""
        async with self._engine.connect() as conn:
            await conn.execute(select(1))

    @_db_errors
    async def count_live(self) -> dict[SessionStatus, int]:
        """Sessions per live status: one grouped COUNT on the status index, cheap enough for
        every metrics scrape however long the history (``stats`` reads far more)."""
        c = sessions.c
        stmt = select(c.status, func.count()).where(c.status.in_(_LIVE)).group_by(c.status)
        async with self._engine.connect() as conn:
            counts: dict[str, int] = {s: n for s, n in (await conn.execute(stmt)).all()}
        return {s: int(counts.get(s.value, 0)) for s in SessionStatus if s in LIVE_STATUSES}

    @_db_errors
    async def pending_intents(self) -> list[SessionRecord]:
        """Intents whose create outcome is not recorded, oldest first (for reconcile)."""
        stmt = (
            select(sessions)
            .where(sessions.c.status == _PENDING)
            .order_by(sessions.c.created_at, sessions.c.id)
        )
        return [_record(r) for r in await self._fetch(stmt)]

    @_db_errors
    async def known_session_ids(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these LemonSlice ids have a row (one query per chunk, for reconcile)."""
        wanted = sorted(set(session_ids))
        known: set[str] = set()
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            stmt = select(sessions.c.session_id).where(sessions.c.session_id.in_(chunk))
            known.update(r["session_id"] for r in await self._fetch(stmt))
        return known

    @_db_errors
    async def active_control_urls(self, session_ids: Iterable[str]) -> dict[str, str]:
        """session_id -> control_url of those that are active (one query per chunk: what the
        keep-alive reads once per round)."""
        wanted = sorted(set(session_ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            stmt = select(sessions.c.session_id, sessions.c.control_url).where(
                sessions.c.session_id.in_(chunk), sessions.c.status == _ACTIVE
            )
            found.update(
                (r["session_id"], r["control_url"])
                for r in await self._fetch(stmt)
                if r["control_url"]
            )
        return found

    @_db_errors
    async def ended_before(
        self, session_ids: Iterable[str], before: datetime
    ) -> list[SessionRecord]:
        """Which of these LemonSlice ids this database ended before ``before`` (for reconcile:
        ended here, yet listed live by LemonSlice)."""
        wanted = sorted(set(session_ids))
        before = _aware(before, "before")
        found: list[SessionRecord] = []
        c = sessions.c
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            stmt = select(sessions).where(
                c.session_id.in_(chunk), c.status == _ENDED, c.ended_at <= before
            )
            found += [_record(r) for r in await self._fetch(stmt.order_by(c.id))]
        return found

    @_db_errors
    async def ended_without_cost(self, session_ids: Iterable[str]) -> list[SessionRecord]:
        """Which of these LemonSlice ids ended here with no cost recorded (for reconcile)."""
        wanted = sorted(set(session_ids))
        found: list[SessionRecord] = []
        c = sessions.c
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            stmt = select(sessions).where(
                c.session_id.in_(chunk), c.status == _ENDED, c.cost.is_(None)
            )
            found += [_record(r) for r in await self._fetch(stmt.order_by(c.id))]
        return found

    @_db_errors
    async def lease_now(self) -> datetime:
        """The time leases are compared on: the database's clock when ``database_clock``."""
        if not self.database_clock:
            return self.clock.now()
        async with self._engine.connect() as conn:
            return await database_now(conn)

    @_db_errors
    async def events(self, key: int | str) -> list[SessionEvent]:
        """The lifecycle of one session, oldest first."""
        record = await self.get(key)
        stmt = (
            select(session_events)
            .where(session_events.c.session_pk == record.id)
            .order_by(session_events.c.id)
        )
        return [_event(r) for r in await self._fetch(stmt)]

    @_db_errors
    async def stats(self, *, days: int = 7, now: datetime | None = None) -> Stats:
        """Counts per status, live sessions, per-day activity over the last ``days`` UTC days,
        duration percentiles and end reasons of sessions ended in that window; all in SQL."""
        check_days(days)
        now = _aware(now, "now") if now is not None else self.clock.now()
        first_day = now.date() - timedelta(days=days - 1)
        start = datetime.combine(first_day, datetime.min.time(), tzinfo=UTC)
        c = sessions.c
        day_created = self._day(c.created_at).label("day")
        day_ended = self._day(c.ended_at).label("day")
        duration = self._seconds(c.created_at, c.ended_at).label("duration")
        ended_in_window = and_(c.status == _ENDED, c.ended_at >= start)
        async with self._engine.connect() as conn:

            async def rows(stmt: Any) -> list[Any]:
                return list((await conn.execute(stmt)).all())

            by_status = {s.value: 0 for s in SessionStatus}
            for status, count in await rows(select(c.status, func.count()).group_by(c.status)):
                by_status[status] = count
            oldest = []  # one index probe per live status: cheap however long the history
            for status in _LIVE:
                oldest += await rows(
                    select(sessions).where(c.status == status).order_by(c.created_at, c.id).limit(1)
                )
            oldest.sort(key=lambda r: (r.created_at, r.id))
            created = dict(
                (_as_date(day), n)
                for day, n in await rows(
                    select(day_created, func.count())
                    .where(c.created_at >= start)
                    .group_by(day_created)
                )
            )
            ended: dict[date, tuple[int, float | None, int]] = {
                _as_date(day): (n, credits, known)
                for day, n, credits, known in await rows(
                    select(day_ended, func.count(), func.sum(c.cost), func.count(c.cost))
                    .where(ended_in_window)
                    .group_by(day_ended)
                )
            }
            reasons = {
                reason: n
                for reason, n in await rows(
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
                    for d, rn in await rows(
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
            oldest_live=_record(oldest[0]._mapping) if oldest else None,
            per_day=per_day,
            duration_p50=p50,
            duration_p95=p95,
            end_reasons=reasons,
            credits_known=float(sum(c for _, c, k in ended.values() if k and c is not None)),
            cost_unknown=int(sum(n - k for n, _, k in ended.values())),
        )

    def _day(self, col: Any) -> ColumnElement[Any]:
        """The UTC calendar day of a time column (a date on PostgreSQL, 'YYYY-MM-DD' on SQLite)."""
        if self.dialect == "postgresql":
            return func.timezone("UTC", col).cast(Date)
        return func.date(col)

    def _seconds(self, start: Any, end: Any) -> ColumnElement[Any]:
        if self.dialect == "postgresql":
            return extract("epoch", end - start)
        return (func.julianday(end) - func.julianday(start)) * 86400.0

    def _filters(self, flt: SessionFilter) -> list[ColumnElement[bool]]:
        c = sessions.c
        conds: list[ColumnElement[bool]] = []
        if isinstance(flt.statuses, str):
            raise InvalidArgument(
                "statuses must be a list of statuses, e.g. ['active'], not a string"
            )
        if flt.statuses:
            conds.append(c.status.in_([_status(s) for s in flt.statuses]))
        if flt.agent_id is not None:
            check_text("agent_id", flt.agent_id, max_chars=NAME_LENGTH)
            conds.append(c.agent_id == flt.agent_id)
        if flt.created_after is not None:
            conds.append(c.created_at >= _aware(flt.created_after, "created_after"))
        if flt.created_before is not None:
            conds.append(c.created_at < _aware(flt.created_before, "created_before"))
        if not isinstance(flt.meta, Mapping):
            raise InvalidArgument(f"meta must be a mapping of tags, not {type(flt.meta).__name__}")
        for name, value in flt.meta.items():
            check_text("a meta tag name", name)
            wanted = check_text("a meta value", str(value), allow_empty=True)
            conds.append(c.metadata[name].as_string() == wanted)
        if flt.idle_for is not None:
            idle_for = check_seconds("idle_for", flt.idle_for, positive=False)
            idle_since = self.clock.now() - timedelta(seconds=idle_for)
            conds.append(c.last_activity_at <= idle_since)
        return conds

    @_db_errors
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
        stmt = select(sessions).where(*self._filters(flt or SessionFilter()))
        if after is not None:
            stmt = stmt.where(spec.after(*_decode_cursor(after, sort)))
        rows = await self._fetch(stmt.order_by(*spec.order_by()).limit(limit + 1))
        more = len(rows) > limit
        items = [_record(r) for r in rows[:limit]]
        cursor = (
            _encode_cursor(sort, spec.value(rows[limit - 1]), rows[limit - 1]["id"])
            if more
            else None
        )
        return Page(items=items, next_cursor=cursor)


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

    def value(self, row: Row) -> datetime | None:
        return None if self.column is None else cast(datetime | None, row[self.column])

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

    def after(self, value: datetime | None, pk_value: int) -> ColumnElement[bool]:
        """Rows strictly after (value, pk_value) in this order."""
        pk = sessions.c.id
        if self.column is None:
            return pk < pk_value if self.descending else pk > pk_value
        col = sessions.c[self.column]
        if value is None:  # already among the nulls, which come last
            return and_(col.is_(None), pk < pk_value if self.descending else pk > pk_value)
        row_key = tuple_(col, pk)
        cond = (
            row_key < tuple_(value, pk_value)
            if self.descending
            else row_key > tuple_(value, pk_value)
        )
        return or_(cond, col.is_(None)) if self.nullable else cond


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
