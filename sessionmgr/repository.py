"""``SessionRepository``: every session as a durable record, on SQLite or PostgreSQL.

The repository is the only writer of ``status``. Each transition checks the status it expects
(a lost race returns "not applied", never corrupts) and appends an event row in the same
transaction. Transitions from concurrent tasks are group-committed by one writer task
(sessionmgr/writer.py); claims and lease bookkeeping run as single statements of their own.

Sections: opening, transitions, claims and leases, admin reads, cleanup.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Date,
    Select,
    and_,
    case,
    delete,
    extract,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .checks import (
    BIGINT,
    DEFAULT_PAGE,
    INT32,
    MAX_PAGE,
    check_days,
    check_seconds,
    check_session_id,
    check_text,
    check_windows,
)
from .checks import aware as _aware
from .checks import check_remote as _check_remote
from .checks import metadata_tags as _metadata
from .checks import optional_text as _optional_text
from .clock import SYSTEM_CLOCK, Clock, is_simulated
from .errors import InvalidArgument, SessionNotFound
from .models import DEFAULT_TRANSPORT, NAME_LENGTH, SESSION_ID_LENGTH, session_events, sessions
from .records import (
    DayStats,
    Page,
    SessionEvent,
    SessionFilter,
    SessionRecord,
    Stats,
    iso_utc,
)
from .states import LIVE_STATUSES, EndReason, SessionStatus, can_transition
from .writer import GroupWriter, Op, Row, Thunk, UnitOfWork, database_now

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000  # characters of a terminate error kept in last_error
LOOKUP_CHUNK = 500  # ids per SELECT ... IN (...) of known_session_ids()
COST_DELAY = 5.0  # seconds after an end before its cost is asked for (the server bills first)
COST_HORIZON = 3600.0  # seconds after an end past which a missing cost is no longer asked for
LEGACY_INTENT_SETTLE = 120.0  # seconds: an intent written without a lease counts as held this long
TRANSPORT_TYPES = (DEFAULT_TRANSPORT, "livekit")  # what a session may have been created on

P = ParamSpec("P")
T = TypeVar("T")

_PENDING = SessionStatus.PENDING.value
_ACTIVE = SessionStatus.ACTIVE.value
_ENDING = SessionStatus.ENDING.value
_ENDED = SessionStatus.ENDED.value
_FAILED = SessionStatus.FAILED.value
_LIVE = tuple(s.value for s in SessionStatus if s in LIVE_STATUSES)
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_STATUS_VALUES = tuple(s.value for s in SessionStatus)


def _db_errors(
    fn: Callable[Concatenate[SessionRepository, P], Awaitable[T]],
) -> Callable[Concatenate[SessionRepository, P], Awaitable[T]]:
    """Driver failures leave as sessionmgr's typed one-line errors."""

    @functools.wraps(fn)
    async def wrapper(self: SessionRepository, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(self, *args, **kwargs)
        except (SQLAlchemyError, OSError) as exc:
            raise db.map_error(exc, self._engine.url) from exc

    return wrapper


def _deadline(last_activity: datetime, idle_window: float, expires_at: datetime | None) -> datetime:
    idle_deadline = last_activity + timedelta(seconds=idle_window)
    return idle_deadline if expires_at is None else min(idle_deadline, expires_at)


def _record(row: Mapping[str, Any]) -> SessionRecord:
    values = {name: row[name] for name in _RECORD_FIELDS}
    values["status"] = SessionStatus(row["status"])
    values["end_reason"] = EndReason(row["end_reason"]) if row["end_reason"] else None
    values["metadata"] = dict(row["metadata"] or {})
    # a row inserted without it took the column's server default, which the snapshot lacks
    values["transport_type"] = row["transport_type"] or DEFAULT_TRANSPORT
    return SessionRecord(**values)


def _check_create_fields(model: object, transport_type: object) -> None:
    _optional_text("model", model, max_chars=NAME_LENGTH)
    if transport_type not in TRANSPORT_TYPES:
        raise InvalidArgument(
            f"transport_type must be one of {', '.join(TRANSPORT_TYPES)}, not {transport_type!r}"
        )


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


# A transition's decision on the row as it is: (changes, event reason, event detail), or None
# when the row is not in a state the transition applies to.
Decision = tuple[Row, str | None, str | None] | None


class SessionRepository:
    """Sessions and their lifecycle events in one database (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, *, clock: Clock | None = None, database_clock: bool | None = None
    ) -> None:
        """``database_clock``: stamp and compare leases on the database server's ``now()``
        instead of ``clock``. Default: on PostgreSQL (several hosts, several clocks) unless
        ``clock`` is simulated (a ``FakeClock``, which no server clock can follow); SQLite is
        one host, whose clock all its processes share."""
        self._engine = engine
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.dialect: str = engine.dialect.name
        if database_clock is None:
            database_clock = self.dialect == "postgresql" and not is_simulated(self.clock)
        self.database_clock = database_clock
        self._writer = GroupWriter(engine, database_clock=database_clock)
        self._touches: dict[str, datetime] = {}
        self._closed = False

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        clock: Clock | None = None,
        upgrade: bool = False,
        database_clock: bool | None = None,
    ) -> SessionRepository:
        """A repository on ``url``; ``upgrade`` migrates first, else an old schema fails
        (``DatabaseNotMigrated``, naming `sessionmgr db upgrade`)."""
        if upgrade:
            await db.upgrade(url)
        engine = db.create_engine(url)
        try:
            await db.ensure_migrated(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, clock=clock, database_clock=database_clock)

    async def close(self) -> None:
        """Write buffered touches, stop the writer, release the connections."""
        if self._closed:
            return
        try:
            await self.flush_touches()
        finally:
            self._closed = True
            try:
                await self._writer.close()
            finally:
                await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def writer(self) -> GroupWriter:
        """The group-commit writer (its ``batches``/``ops`` counters show the batching)."""
        return self._writer

    def __repr__(self) -> str:
        return f"<SessionRepository {db.safe_url(self._engine.url)}>"

    # --- transitions -----------------------------------------------------------------------------

    async def _submit(self, op: Op) -> Any:
        try:
            return await self._writer.submit(op)
        except (SQLAlchemyError, OSError) as exc:
            raise db.map_error(exc, self._engine.url) from exc

    async def _transition(
        self, key: int | str, decide: Callable[[Row], Decision], *, event: bool = True
    ) -> SessionRecord | None:
        """Apply ``decide`` to the row ``key`` names, in the shared write transaction."""
        return await self._lease_transition(key, lambda row, _at: decide(row), event=event)

    async def _lease_transition(
        self,
        key: int | str,
        decide: Callable[[Row, datetime], Decision],
        *,
        event: bool = True,
        sids: tuple[str, ...] = (),
    ) -> SessionRecord | None:
        """``_transition`` for decisions about leases: ``decide(row, lease_now)`` gets the time
        leases are stamped and compared on (the database's, see ``database_clock``)."""
        now = self.clock.now()

        def apply(uow: UnitOfWork) -> Thunk:
            row = _lookup(uow, key)
            decision = decide(row, uow.lease_now or now) if row is not None else None
            if row is None or decision is None:
                return lambda: None
            changes, reason, detail = decision
            _check_transition(row["status"], changes.get("status") or row["status"])
            uow.change(
                row,
                changes | {"updated_at": now},
                at=now,
                reason=reason,
                detail=detail,
                event=event,
            )
            snap = uow.snapshot(row)
            return lambda: _record(snap)

        pks, key_sids = _key_parts(key)
        op = Op(apply, pks=pks, sids=key_sids + sids)
        return cast(SessionRecord | None, await self._submit(op))

    async def record_intent(
        self,
        *,
        agent_id: str | None = None,
        agent_image_url: str | None = None,
        agent_prompt: str | None = None,
        idle_timeout: int | None = None,
        idle_window: float,
        max_age: float | None,
        metadata: Mapping[str, Any] | None = None,
        owner: str | None = None,
        lease: float | None = None,
        model: str | None = None,
        transport_type: str = DEFAULT_TRANSPORT,
    ) -> SessionRecord:
        """Record a ``pending`` intent, before the create request is sent.

        ``owner`` and ``lease`` (seconds): the creator's intent lease, which it renews while its
        POST is in flight; until it expires nobody resolves the intent, nor ends a remote session
        it could own. Without them the intent counts as held ``LEGACY_INTENT_SETTLE`` seconds."""
        if (owner is None) != (lease is None):
            raise InvalidArgument("record_intent takes owner and lease together, or neither")
        if lease is not None:
            check_seconds("lease", lease)
        check_windows(idle_window, max_age)
        _optional_text("agent_id", agent_id, max_chars=NAME_LENGTH)
        _check_create_fields(model, transport_type)
        _optional_text("agent_image_url", agent_image_url)
        if agent_prompt is not None:
            check_text("agent_prompt", agent_prompt, allow_empty=True)
        if idle_timeout is not None and (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, int)
            or not -INT32 <= idle_timeout < INT32
        ):
            raise InvalidArgument(
                f"idle_timeout must be whole seconds between {-INT32} and {INT32 - 1} "
                f"(negative: never), got {idle_timeout!r}"
            )
        now = self.clock.now()
        values: Row = {
            "status": _PENDING,
            "agent_id": agent_id,
            "agent_image_url": _image_url(agent_image_url),
            "agent_prompt": agent_prompt,
            "idle_timeout": idle_timeout,
            "idle_window": float(idle_window),
            "max_age": None if max_age is None else float(max_age),
            "created_at": now,
            "updated_at": now,
            "last_activity_at": now,
            "expires_at": None if max_age is None else now + timedelta(seconds=max_age),
            "attempts": 0,
            "metadata": _metadata(metadata),
            "model": model,
            "transport_type": transport_type,
        }

        def apply(uow: UnitOfWork) -> Thunk:
            if owner is not None and lease is not None:
                values["lease_owner"] = owner
                values["lease_until"] = (uow.lease_now or now) + timedelta(seconds=lease)
            row = uow.insert(values, at=now, reason="intent", detail=None)
            snap = uow.snapshot(row)
            return lambda: _record(snap)

        return cast(SessionRecord, await self._submit(Op(apply)))

    async def mark_active(
        self,
        pk: int,
        *,
        session_id: str,
        room_url: str | None,
        control_url: str,
        intent: SessionRecord | None = None,
    ) -> SessionRecord | None:
        """pending -> active once LemonSlice answered; None if the intent was no longer pending
        (or that session is recorded already).

        ``intent``: the record ``record_intent`` returned for ``pk``: the change is then computed
        from it and written blind (one conditional UPDATE, no load), its result built from it."""
        _check_remote(session_id, control_url, room_url)
        now = self.clock.now()
        _check_transition(_PENDING, _ACTIVE)
        changes: Row = {
            "status": _ACTIVE,
            "session_id": session_id,
            "room_url": room_url,
            "control_url": control_url,
            "last_activity_at": now,
            "lease_owner": None,
            "lease_until": None,
            "next_attempt_at": None,
            "updated_at": now,
        }

        def apply(uow: UnitOfWork) -> Thunk:
            row = uow.get(pk)
            if row is None or row["status"] != _PENDING or uow.get(session_id) is not None:
                return lambda: None  # resolved elsewhere, or that session is recorded already
            deadline = _deadline(now, row["idle_window"], row["expires_at"])
            uow.change(row, changes | {"deadline": deadline}, at=now, reason="created", detail=None)
            snap = uow.snapshot(row)
            return lambda: _record(snap)

        blind: Callable[[UnitOfWork], Thunk] | None = None
        if intent is not None and intent.id == pk:
            known = intent
            # as record_intent wrote it: created_at + max_age
            expires = (
                None
                if known.max_age is None
                else known.created_at + timedelta(seconds=known.max_age)
            )
            deadline = _deadline(now, known.idle_window, expires)

            def blind(uow: UnitOfWork) -> Thunk:
                # a row no longer pending, or a session_id recorded already (unique index),
                # fails the batch, which is then redone op by op through ``apply``
                full = changes | {"deadline": deadline}
                uow.blind_change(pk, _PENDING, full, at=now, reason="created", detail=None)
                return lambda: dataclasses.replace(
                    known, **(full | {"status": SessionStatus.ACTIVE})
                )

        op = Op(apply, pks=(pk,), sids=(session_id,), blind=blind)
        return cast(SessionRecord | None, await self._submit(op))

    async def mark_failed(self, pk: int, *, reason: EndReason, error: str | None = None) -> bool:
        """pending -> failed (the create was rejected, or its outcome never learned)."""
        now = self.clock.now()
        reason = EndReason(reason)

        def decide(row: Row) -> Decision:
            if row["status"] != _PENDING:
                return None
            changes = {
                "status": _FAILED,
                "ended_at": now,
                "end_reason": reason.value,
                "last_error": _clip(error),
                "lease_until": None,
                "next_attempt_at": None,
            }
            return changes, reason.value, _clip(error)

        return await self._transition(pk, decide) is not None

    async def adopt(
        self,
        *,
        session_id: str,
        control_url: str,
        room_url: str | None = None,
        idle_window: float,
        max_age: float | None,
        agent_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        created_at: datetime | None = None,
        pending_pk: int | None = None,
        model: str | None = None,
        transport_type: str | None = None,
    ) -> tuple[SessionRecord, bool]:
        """Track a session created elsewhere: ``(record, True)`` when it is now recorded as
        active, ``(existing record, False)`` when that session_id was already known.

        With ``pending_pk``, the pending intent it answers becomes that active session (if the
        intent is no longer pending, a new row is inserted instead).
        """
        check_windows(idle_window, max_age)
        _check_remote(session_id, control_url, room_url)
        _optional_text("agent_id", agent_id, max_chars=NAME_LENGTH)
        _check_create_fields(model, transport_type or DEFAULT_TRANSPORT)
        now = self.clock.now()
        created = _aware(created_at, "created_at") if created_at is not None else now
        meta = _metadata(metadata)

        def activate(row: Row) -> Row:
            expires_at = None if max_age is None else row["created_at"] + timedelta(seconds=max_age)
            return {
                "status": _ACTIVE,
                "session_id": session_id,
                "control_url": control_url,
                "room_url": room_url,
                "idle_window": float(idle_window),
                "max_age": None if max_age is None else float(max_age),
                "expires_at": expires_at,
                "last_activity_at": now,
                "deadline": _deadline(now, idle_window, expires_at),
                "updated_at": now,
            }

        def apply(uow: UnitOfWork) -> Thunk:
            existing = uow.get(session_id)
            if existing is not None:
                snap = uow.snapshot(existing)
                return lambda: (_record(snap), False)
            intent = uow.get(pending_pk) if pending_pk is not None else None
            if intent is not None and intent["status"] == _PENDING:
                changes = activate(intent)
                if agent_id is not None and intent["agent_id"] is None:
                    changes["agent_id"] = agent_id
                if meta:
                    changes["metadata"] = {**(intent["metadata"] or {}), **meta}
                if model is not None and intent["model"] is None:
                    changes["model"] = model
                if transport_type is not None:
                    changes["transport_type"] = transport_type
                uow.change(intent, changes, at=now, reason="adopted", detail="matched intent")
                row = intent
            else:
                values = {
                    "created_at": created,
                    "agent_id": agent_id,
                    "attempts": 0,
                    "metadata": meta,
                    "model": model,
                    "transport_type": transport_type or DEFAULT_TRANSPORT,
                }
                values.update(activate(values))
                row = uow.insert(values, at=now, reason="adopted", detail=None)
            snap = uow.snapshot(row)
            return lambda: (_record(snap), True)

        pks = (pending_pk,) if pending_pk is not None else ()
        return cast(
            tuple[SessionRecord, bool],
            await self._submit(Op(apply, pks=pks, sids=(session_id,))),
        )

    def touch(self, session_id: str, at: datetime | None = None) -> None:
        """Note activity now (or at ``at``); no I/O. ``flush_touches`` writes the latest per
        session, so a thousand touches between flushes cost one write. A bad ``session_id``
        raises here: buffered, it would fail every later flush."""
        check_session_id(session_id)
        when = self.clock.now() if at is None else _aware(at, "at")
        previous = self._touches.get(session_id)
        if previous is None or when > previous:
            self._touches[session_id] = when

    async def flush_touches(self) -> int:
        """Write buffered touches (one UPDATE per session); returns the rows updated."""
        if not self._touches:
            return 0
        pending, self._touches = self._touches, {}
        try:
            _, updated = await self._write_touches(pending)
        except BaseException:
            for sid, at in pending.items():  # not lost: the next flush retries them
                self.touch(sid, at)
            raise
        return updated

    async def touch_many(self, session_ids: Iterable[str], at: datetime | None = None) -> set[str]:
        """Touch now, durably; returns the session_ids that were active (and so were touched)."""
        when = self.clock.now() if at is None else _aware(at, "at")
        wanted = [check_session_id(sid) for sid in session_ids]
        touched, _ = await self._write_touches(dict.fromkeys(wanted, when))
        return touched

    async def _write_touches(self, times: Mapping[str, datetime]) -> tuple[set[str], int]:
        if not times:
            return set(), 0
        now = self.clock.now()

        def apply(uow: UnitOfWork) -> Thunk:
            touched: set[str] = set()
            updated = 0
            for sid, at in times.items():
                row = uow.get(sid)
                if row is None or row["status"] != _ACTIVE:
                    continue
                touched.add(sid)
                if at > row["last_activity_at"]:
                    changes = {
                        "last_activity_at": at,
                        "deadline": _deadline(at, row["idle_window"], row["expires_at"]),
                        "updated_at": now,
                    }
                    uow.change(row, changes, event=False)
                    updated += 1
            return lambda: (touched, updated)

        return cast(tuple[set[str], int], await self._submit(Op(apply, sids=tuple(times))))

    async def begin_end(
        self,
        key: int | str,
        *,
        owner: str,
        lease: float,
        reason: EndReason,
        detail: str | None = None,
    ) -> SessionRecord | None:
        """End one session now (manual, shutdown, orphan): an active session, or an ending one
        whose lease ran out, becomes ``ending`` leased to ``owner``. None when the session is not
        in such a state (pending: its creator holds it; already ended; another process holds
        it)."""
        reason = EndReason(reason)

        def decide(row: Row, at: datetime) -> Decision:
            lease_changes = {
                "lease_owner": owner,
                "lease_until": at + timedelta(seconds=lease),
                "attempts": row["attempts"] + 1,
                "next_attempt_at": None,
            }
            if row["status"] == _ACTIVE:
                changes = {"status": _ENDING, "end_reason": reason.value, **lease_changes}
                why = f"{detail}; lease {owner}" if detail else f"lease {owner}"
                return changes, reason.value, _clip(why)
            if row["status"] == _ENDING and _lease_free(row, at):
                return lease_changes, row["end_reason"], f"lease taken over by {owner}"
            return None

        return await self._lease_transition(_key(key), decide)

    async def reschedule(self, pk: int, *, owner: str, error: str, retry_at: datetime) -> bool:
        """A terminate failed: release the lease and retry at ``retry_at`` (``owner`` only)."""
        retry_at = _aware(retry_at, "retry_at")

        def decide(row: Row) -> Decision:
            if row["status"] != _ENDING or row["lease_owner"] != owner:
                return None
            changes = {
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": retry_at,
                "last_error": _clip(error),
            }
            return changes, "retry", _clip(error)

        return await self._transition(pk, decide) is not None

    async def mark_ended(
        self,
        pk: int,
        *,
        owner: str | None,
        reason: EndReason | None = None,
        remote_status: str | None = None,
        cost: float | None = None,
    ) -> SessionRecord | None:
        """ending -> ended, by the lease owner (``owner=None``: only when no lease is live);
        the ended record, or None when not applied. ``reason=None`` keeps the reason stamped
        when the session was claimed. Without a ``cost`` its fetch is scheduled
        (``next_attempt_at``, see ``costs_due``)."""
        now = self.clock.now()
        reason = EndReason(reason) if reason is not None else None

        def decide(row: Row, at: datetime) -> Decision:
            if row["status"] != _ENDING:
                return None
            if owner is None and not _lease_free(row, at):
                return None
            if owner is not None and row["lease_owner"] != owner:
                return None
            changes: Row = {
                "status": _ENDED,
                "ended_at": now,
                "end_reason": reason.value if reason is not None else row["end_reason"],
                "lease_until": None,
                **_cost_changes(row, cost, now),
            }
            if remote_status is not None:
                changes["remote_status"] = remote_status
            return changes, changes["end_reason"], remote_status

        return await self._lease_transition(pk, decide)

    async def mark_ended_remote(
        self, pk: int, *, reason: EndReason, remote_status: str, cost: float | None
    ) -> bool:
        """LemonSlice already finished it (reconcile): active, or ending with no live lease,
        -> ended."""
        now = self.clock.now()
        reason = EndReason(reason)

        def decide(row: Row, at: datetime) -> Decision:
            if not (
                row["status"] == _ACTIVE or (row["status"] == _ENDING and _lease_free(row, at))
            ):
                return None
            changes: Row = {
                "status": _ENDED,
                "ended_at": now,
                "end_reason": reason.value,
                "remote_status": remote_status,
                "lease_until": None,
                **_cost_changes(row, cost, now),
            }
            return changes, reason.value, remote_status

        return await self._lease_transition(pk, decide) is not None

    async def record_remote(self, pk: int, *, remote_status: str, cost: float | None) -> None:
        """Note what LemonSlice reports about a session (no transition)."""

        def decide(row: Row) -> Decision:
            changes: Row = {"remote_status": remote_status}
            if cost is not None:
                changes["cost"] = float(cost)
            return changes, None, None

        await self._transition(pk, decide, event=False)

    async def record_control(self, pk: int, *, detail: str) -> SessionRecord | None:
        """Append a ``control`` event (active -> active, no transition) for a control event sent
        to an active session; None when the session is no longer active."""
        check_text("detail", detail)
        now = self.clock.now()

        def apply(uow: UnitOfWork) -> Thunk:
            row = uow.get(pk)
            if row is None or row["status"] != _ACTIVE:
                return lambda: None
            uow.change(row, {"updated_at": now}, at=now, reason="control", detail=_clip(detail))
            snap = uow.snapshot(row)
            return lambda: _record(snap)

        return cast(SessionRecord | None, await self._submit(Op(apply, pks=(pk,))))

    # --- claims and leases (single statements, outside the group commit) -----------------------

    @_db_errors
    async def claim_due(
        self,
        *,
        owner: str,
        limit: int,
        lease: float,
        now: datetime | None = None,
        grace: float = 0.0,
    ) -> list[SessionRecord]:
        """Claim up to ``limit`` sessions to end, in one statement: active sessions past their
        deadline (-> ending, end_reason max_age or idle) and ending sessions whose lease ran out
        and whose retry time has come (re-leased, end_reason kept). Each gets ``owner``'s lease
        for ``lease`` seconds and one more attempt. Only due rows are read (index ranges on
        (status, deadline) and (status, lease_until, next_attempt_at)), so the cost does not
        grow with the table. On PostgreSQL, rows another claimer holds are skipped.

        ``grace`` (seconds): an active row is claimed only once its deadline passed that long ago,
        so a touch still buffered in another process (flushed every touch-flush interval) is
        written before anyone may claim the row: a touch anywhere wins over a claim elsewhere.
        Leases are compared and stamped on the database's clock when ``database_clock``."""
        if limit <= 0:
            return []
        now = _aware(now, "now") if now is not None else self.clock.now()
        check_seconds("grace", grace, positive=False)

        def run(conn: Connection) -> list[SessionRecord]:
            at = database_now(conn) if self.database_clock else now
            stmt = self._claim_statement(owner, limit, lease, now, at, grace)
            return self._claimed(conn, stmt, owner, now)

        return await self._writer.run(run)

    def _claim_statement(
        self, owner: str, limit: int, lease: float, now: datetime, at: datetime, grace: float
    ) -> Any:
        """claim_due's one UPDATE; ``now``: the claimer's clock (deadlines), ``at``: the lease
        clock."""
        until = at + timedelta(seconds=lease)
        due_before = now - timedelta(seconds=grace)
        c = sessions.c
        # Spelled as disjoint index ranges so that only due rows are read: (status, deadline)
        # for active rows; (status, lease_until, next_attempt_at) for ending ones.
        retry_due = or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)
        due = or_(
            and_(c.status == _ACTIVE, c.deadline <= due_before),
            and_(c.status == _ENDING, c.lease_until <= at, retry_due),
            and_(c.status == _ENDING, c.lease_until.is_(None), c.next_attempt_at.is_(None)),
            and_(c.status == _ENDING, c.lease_until.is_(None), c.next_attempt_at <= now),
        )
        picked = select(c.id).where(due).order_by(c.deadline, c.id).limit(limit)
        if self.dialect == "postgresql":
            picked = picked.with_for_update(skip_locked=True)
        reason = case(
            (
                c.status == _ACTIVE,
                case(
                    (and_(c.expires_at.is_not(None), c.expires_at <= now), EndReason.MAX_AGE.value),
                    else_=EndReason.IDLE.value,
                ),
            ),
            else_=c.end_reason,
        )
        return (
            update(sessions)
            .where(c.id.in_(picked.scalar_subquery()))
            .values(
                status=_ENDING,
                end_reason=reason,
                lease_owner=owner,
                lease_until=until,
                attempts=c.attempts + 1,
                updated_at=now,
            )
            .returning(*sessions.columns)
        )

    @staticmethod
    def _claimed(conn: Connection, stmt: Any, owner: str, now: datetime) -> list[SessionRecord]:
        """Run a claim statement and append its events."""
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
        if not rows:
            return []
        events = [
            {
                "session_pk": r["id"],
                "at": now,
                # attempts is 0 until a session is first claimed (a CHECK guarantees it)
                "from_status": _ACTIVE if r["attempts"] == 1 else _ENDING,
                "to_status": _ENDING,
                "reason": r["end_reason"],
                "detail": f"claimed by {owner} (attempt {r['attempts']})",
            }
            for r in rows
        ]
        conn.execute(insert(session_events), events)
        far = datetime.max.replace(tzinfo=UTC)
        rows.sort(key=lambda r: (r["deadline"] or far, r["id"]))
        return [_record(r) for r in rows]

    @_db_errors
    async def renew_leases(self, pks: Sequence[int], *, owner: str, lease: float) -> int:
        """Extend ``owner``'s leases on these ending sessions and pending intents; returns how
        many it still held (a lease another process took over is not renewed)."""
        if not pks:
            return 0
        now = self.clock.now()
        c = sessions.c

        def run(conn: Connection) -> int:
            at = database_now(conn) if self.database_clock else now
            stmt = (
                update(sessions)
                .where(
                    c.id.in_(list(pks)),
                    c.status.in_((_ENDING, _PENDING)),
                    c.lease_owner == owner,
                    c.lease_until.is_not(None),
                )
                .values(lease_until=at + timedelta(seconds=lease), updated_at=now)
            )
            return conn.execute(stmt).rowcount

        return await self._writer.run(run)

    # --- intent leases: who may resolve a pending intent ----------------------------------------

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
            at = await conn.run_sync(database_now) if self.database_clock else now
            stmt = select(sessions.c.id).where(self._intent_due(now, at)).limit(1)
            return (await conn.execute(stmt)).first() is not None

    @_db_errors
    async def claim_intents(self, *, owner: str, lease: float, limit: int) -> list[SessionRecord]:
        """Take the lease of up to ``limit`` free pending intents (oldest first) for recovery:
        their creators' renewals then fail, and no other recoverer resolves them at once."""
        now = self.clock.now()
        c = sessions.c

        def run(conn: Connection) -> list[SessionRecord]:
            at = database_now(conn) if self.database_clock else now
            picked = (
                select(c.id)
                .where(self._intent_due(now, at))
                .order_by(c.created_at, c.id)
                .limit(limit)
            )
            if self.dialect == "postgresql":
                picked = picked.with_for_update(skip_locked=True)
            stmt = (
                update(sessions)
                .where(c.id.in_(picked.scalar_subquery()))
                .values(
                    lease_owner=owner,
                    lease_until=at + timedelta(seconds=lease),
                    next_attempt_at=None,
                    updated_at=now,
                )
                .returning(*sessions.columns)
            )
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
            rows.sort(key=lambda r: (r["created_at"], r["id"]))
            return [_record(r) for r in rows]

        return await self._writer.run(run)

    async def release_intent(
        self, pk: int, *, owner: str, retry_at: datetime | None = None
    ) -> bool:
        """Give up ``owner``'s lease on a pending intent now, so recovery resolves it on its next
        pass (at ``retry_at`` at the earliest, when given)."""
        retry_at = _aware(retry_at, "retry_at") if retry_at is not None else None

        def decide(row: Row, at: datetime) -> Decision:
            if row["status"] != _PENDING or row["lease_owner"] != owner:
                return None
            return {"lease_until": at, "next_attempt_at": retry_at}, None, None

        return await self._lease_transition(pk, decide, event=False) is not None

    async def adopt_intent(
        self, pk: int, *, owner: str, session_id: str, control_url: str, created_at: datetime
    ) -> SessionRecord | None:
        """Recovery: the pending intent ``pk`` (whose lease ``owner`` holds) is the create of
        remote session ``session_id``: it becomes that active session. None when the intent is
        no longer ``owner``'s pending one, or the session is recorded already (its creator's
        answer won): nothing is changed, and nobody should end the session on this account."""
        _check_remote(session_id, control_url, None)
        created_at = _aware(created_at, "created_at")
        now = self.clock.now()

        def apply(uow: UnitOfWork) -> Thunk:
            row = uow.get(pk)
            if (
                row is None
                or row["status"] != _PENDING
                or row["lease_owner"] != owner
                or uow.get(session_id) is not None
            ):
                return lambda: None
            _check_transition(row["status"], _ACTIVE)
            changes = {
                "status": _ACTIVE,
                "session_id": session_id,
                "control_url": control_url,
                "last_activity_at": now,
                "deadline": _deadline(now, row["idle_window"], row["expires_at"]),
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": None,
                "updated_at": now,
            }
            detail = f"matched by {owner}; remote created {iso_utc(created_at)}"
            uow.change(row, changes, at=now, reason="adopted", detail=detail)
            snap = uow.snapshot(row)
            return lambda: _record(snap)

        op = Op(apply, pks=(pk,), sids=(session_id,))
        return cast(SessionRecord | None, await self._submit(op))

    # --- cost after the end ---------------------------------------------------------------------

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

    async def record_cost(
        self,
        pk: int,
        *,
        cost: float | None,
        remote_status: str | None,
        retry_at: datetime | None,
    ) -> bool:
        """Note an ended session's cost (or that it is not known yet: asked again at
        ``retry_at``; None: never again)."""
        retry_at = _aware(retry_at, "retry_at") if retry_at is not None else None

        def decide(row: Row) -> Decision:
            if row["status"] != _ENDED:
                return None
            changes: Row = {"next_attempt_at": None if cost is not None else retry_at}
            if cost is not None:
                changes["cost"] = float(cost)
            if remote_status is not None:
                changes["remote_status"] = remote_status
            return changes, None, None

        return await self._transition(pk, decide, event=False) is not None

    @_db_errors
    async def release_leases(self, owner: str) -> int:
        """Give up ``owner``'s leases (graceful shutdown) so another process takes the sessions
        at once instead of after the lease runs out."""
        c = sessions.c
        stmt = (
            update(sessions)
            .where(c.status == _ENDING, c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None, updated_at=self.clock.now())
        )

        def run(conn: Connection) -> int:
            return conn.execute(stmt).rowcount

        return await self._writer.run(run)

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
            return await conn.run_sync(database_now)

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

    # --- cleanup ---------------------------------------------------------------------------------

    @_db_errors
    async def prune(
        self,
        *,
        older_than: datetime,
        batch_size: int = 1000,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete ended and failed sessions (and their events) that ended before
        ``older_than``, ``batch_size`` per transaction so writers never wait long. Returns the
        number deleted (``dry_run``: that would be)."""
        cutoff = _aware(older_than, "older_than")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}")
        c = sessions.c
        old = and_(c.status.in_((_ENDED, _FAILED)), c.ended_at < cutoff)
        if dry_run:
            async with self._engine.connect() as conn:
                total = int((await conn.execute(select(func.count()).where(old))).scalar_one())
            if progress is not None:
                progress(total)
            return total
        total = 0
        while True:
            ids = select(c.id).where(old).order_by(c.ended_at).limit(batch_size).scalar_subquery()

            def run(conn: Connection, ids: Any = ids) -> int:
                # events go by ON DELETE CASCADE
                return conn.execute(delete(sessions).where(c.id.in_(ids))).rowcount

            deleted = await self._writer.run(run)
            total += deleted
            if deleted and progress is not None:
                progress(total)
            if deleted < batch_size:
                return total


# --- helpers ---------------------------------------------------------------------------------


def _check_transition(src: str, dst: str) -> None:
    """Every status change must be one that ``states.TRANSITIONS`` declares (a bug otherwise)."""
    if src != dst and not can_transition(SessionStatus(src), SessionStatus(dst)):
        raise AssertionError(f"{src} -> {dst} is not a transition of the session state machine")


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


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


def _image_url(url: str | None) -> str | None:
    """The image's address, never its bytes: an inline ``data:`` URL is cut to its media type."""
    if url is None or not url.startswith("data:"):
        return url
    return f"{url.split(',', 1)[0]},… ({len(url)} characters not stored)"


def _key_parts(key: int | str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The local ids and session_ids a key may mean (a digit string may be either)."""
    if isinstance(key, int):
        return (key,), ()
    local = _local_id(key)
    return ((local,) if local is not None else ()), (key,)


def _lookup(uow: UnitOfWork, key: int | str) -> Row | None:
    """The row a key names; a digit string that is a local id means that id (as in ``find``)."""
    local = _local_id(key) if isinstance(key, str) else None
    if local is not None:
        return uow.get(local) or uow.get(key)
    return uow.get(key)


def _status(value: object) -> str:
    if isinstance(value, str) and value in _STATUS_VALUES:
        return value
    raise InvalidArgument(f"unknown status {value!r}: use one of {', '.join(_STATUS_VALUES)}")


def _local_id(key: str) -> int | None:
    """The local id a string of ASCII digits names (None: not one, or out of range)."""
    if key.isascii() and key.isdigit() and int(key) < BIGINT:
        return int(key)
    return None


def _lease_free(row: Row, now: datetime) -> bool:
    return row["lease_until"] is None or row["lease_until"] <= now


def _cost_changes(row: Row, cost: float | None, now: datetime) -> Row:
    """An end's cost columns: the cost when known, else its fetch scheduled ``COST_DELAY`` on."""
    if cost is not None:
        return {"cost": float(cost), "next_attempt_at": None}
    if row["cost"] is not None:
        return {"next_attempt_at": None}
    return {"next_attempt_at": now + timedelta(seconds=COST_DELAY)}


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
