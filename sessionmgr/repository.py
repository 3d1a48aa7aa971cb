"""``SessionRepository``: every session as a durable record, on SQLite or PostgreSQL.

The repository is the only writer of ``status``. Each transition checks the condition
sessionmgr/transitions.py writes for it (a lost race returns "not applied", never corrupts) and
appends an event row in the same transaction. Transitions from concurrent tasks are
group-committed by one writer task (sessionmgr/writer.py); claims and lease bookkeeping run as
single statements of their own.

Sections: opening, transitions, claims and leases. The admin reads are in sessionmgr/queries.py
and cleanup in sessionmgr/cleanup.py: mixins this class inherits, so callers keep one object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import operator
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar, cast

from sqlalchemy import (
    Integer,
    String,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .checks import (
    INT32,
    check_seconds,
    check_session_id,
    check_text,
    check_windows,
)
from .checks import aware as _aware
from .checks import check_remote as _check_remote
from .checks import metadata_tags as _metadata
from .checks import optional_text as _optional_text
from .cleanup import SessionCleanup
from .clock import SYSTEM_CLOCK, Clock, is_simulated
from .errors import InvalidArgument, SessionNotFound
from .models import (
    DEFAULT_TRANSPORT,
    NAME_LENGTH,
    format_sqlite_time,
    parse_sqlite_time,
    sessions,
)
from .queries import (
    LOOKUP_CHUNK,
    RECORD_COLUMNS,
    _db_errors,
    _key,
    _local_id,
    _record,
    not_found,
    record_from_sqlite,
    records_of,
)
from .reader import Reader
from .records import (
    SessionRecord,
    build_record,
    iso_utc,
)
from .resources import AsyncResource
from .states import EndReason, SessionStatus
from .transitions import (
    CLAIM_END_GUARD,
    COST_DELAY,
    END_GUARD,
    check_transition,
    claim_changes,
    claim_due_sql,
    claim_reason_sql,
    deadline,
    ended_changes,
    intent_due_sql,
    may_activate,
    may_claim_end,
    may_control,
    may_end,
    may_end_remote,
    may_fail,
    may_record_cost,
    may_reschedule,
    may_resolve_intent,
)
from .writer import (
    GroupWriter,
    Op,
    Row,
    Thunk,
    UnitOfWork,
    database_now,
    fetch_rows,
    insert_events,
)

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000  # characters of a terminate error kept in last_error
COST_HORIZON = 3600.0  # seconds after an end past which a missing cost is no longer asked for
TRANSPORT_TYPES = (DEFAULT_TRANSPORT, "livekit")  # what a session may have been created on

P = ParamSpec("P")
T = TypeVar("T")

_PENDING = SessionStatus.PENDING.value
_ACTIVE = SessionStatus.ACTIVE.value
_ENDING = SessionStatus.ENDING.value
_ENDED = SessionStatus.ENDED.value
_FAILED = SessionStatus.FAILED.value


def _check_create_fields(model: object, transport_type: object) -> None:
    _optional_text("model", model, max_chars=NAME_LENGTH)
    if transport_type not in TRANSPORT_TYPES:
        raise InvalidArgument(
            f"transport_type must be one of {', '.join(TRANSPORT_TYPES)}, not {transport_type!r}"
        )


# A transition's decision on the row as it is: (changes, event reason, event detail), or None
# when the row is not in a state the transition applies to.
Decision = tuple[Row, str | None, str | None] | None


@dataclasses.dataclass(frozen=True, slots=True)
class EndClaim:
    """What ``claim_end`` found: the session as it is after the attempt, and whether the claim
    was taken (else ``record`` says why not: ended, failed, pending, or leased to someone)."""

    record: SessionRecord
    claimed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class EndRequest:
    """One terminated session's end, for ``end_many``: ``reason=None`` keeps the reason stamped
    when it was claimed; without a ``cost`` its fetch is scheduled (see ``mark_ended``)."""

    pk: int
    reason: EndReason | None = None
    remote_status: str | None = None
    cost: float | None = None


class SessionRepository(SessionCleanup, AsyncResource):
    """Sessions and their lifecycle events in one database (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, *, clock: Clock | None = None, database_clock: bool | None = None
    ) -> None:
        """``database_clock``: stamp and compare leases on the database server's ``now()``
        instead of ``clock``. Default: on PostgreSQL (several hosts, several clocks) unless
        ``clock`` is simulated (a ``FakeClock``, which no server clock can follow); SQLite is
        one host, whose clock all its processes share."""
        self._engine = engine
        self._reader = Reader(engine)
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.dialect: str = engine.dialect.name
        if database_clock is None:
            database_clock = self.dialect == "postgresql" and not is_simulated(self.clock)
        self.database_clock = database_clock
        self._writer = GroupWriter(engine, database_clock=database_clock)
        self._touches: dict[str, datetime] = {}
        self._closed = False
        # blind manual-end claims waiting for their shared transaction (see ``claim_end``)
        self._claims: list[tuple[_BlindClaim, asyncio.Future[SessionRecord | None]]] = []
        self._claiming: asyncio.Task[None] | None = None

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
                try:
                    await self._reader.close()
                finally:
                    await self._engine.dispose()

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
            if row is None or not _apply(uow, row, decide, now, event=event):
                return lambda: None
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
        check_transition(_PENDING, _ACTIVE)
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
            if row is None or not may_activate(row) or uow.get(session_id) is not None:
                return lambda: None  # resolved elsewhere, or that session is recorded already
            due = deadline(now, row["idle_window"], row["expires_at"])
            uow.change(row, changes | {"deadline": due}, at=now, reason="created", detail=None)
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
            due = deadline(now, known.idle_window, expires)

            def blind(uow: UnitOfWork) -> Thunk:
                # a row no longer pending, or a session_id recorded already (unique index),
                # fails the batch, which is then redone op by op through ``apply``
                full = changes | {"deadline": due}
                uow.blind_change(pk, _PENDING, full, at=now, reason="created", detail=None)
                return lambda: _replaced(known, full, status=SessionStatus.ACTIVE)

        op = Op(apply, pks=(pk,), sids=(session_id,), blind=blind)
        return cast(SessionRecord | None, await self._submit(op))

    async def mark_failed(self, pk: int, *, reason: EndReason, error: str | None = None) -> bool:
        """pending -> failed (the create was rejected, or its outcome never learned)."""
        now = self.clock.now()
        reason = EndReason(reason)

        def decide(row: Row) -> Decision:
            if not may_fail(row):
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
                "deadline": deadline(now, idle_window, expires_at),
                "updated_at": now,
            }

        def apply(uow: UnitOfWork) -> Thunk:
            existing = uow.get(session_id)
            if existing is not None:
                snap = uow.snapshot(existing)
                return lambda: (_record(snap), False)
            intent = uow.get(pending_pk) if pending_pk is not None else None
            if intent is not None and may_activate(intent):
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

    @_db_errors
    async def _write_touches(self, times: Mapping[str, datetime]) -> tuple[set[str], int]:
        """Write the latest touch per session, ``LOOKUP_CHUNK`` sessions per transaction: one
        lean read of the active sessions' windows (4 columns; FOR UPDATE on PostgreSQL), then
        one blind conditional UPDATE of the chunk (``WHERE status = 'active' AND
        last_activity_at < at``; SQLite: see ``_sqlite_touches``). An older touch never moves
        activity back, so a chunk written again after a later one failed changes nothing; a
        touch of a session that is not active is dropped. Chunked, yielding to the loop between
        chunks, because SQLite writes run on the event loop (see writer.py): a flush of 10,000
        sessions in one go would hold it 0.1-0.2 s.
        Returns (the sessions found active, the rows updated)."""
        now = self.clock.now()
        lock = self.dialect == "postgresql"
        sqlite_now = None if lock else format_sqlite_time(now)

        def run(chunk: Sequence[str], conn: Connection) -> tuple[set[str], int]:
            if sqlite_now is not None:
                return _sqlite_touches(conn, chunk, times, sqlite_now)
            active: set[str] = set()
            params: list[Row] = []
            for sid, window, expires_at, last in _touch_windows(conn, chunk):
                active.add(sid)
                at = times[sid]
                if at > last:
                    due = deadline(at, window, expires_at)
                    params.append({"sid": sid, "at": at, "deadline": due, "now": now})
            if params:
                _execute_touches(conn, params)
            return active, len(params)

        active: set[str] = set()
        updated = 0
        for n, chunk in enumerate(_chunks(sorted(times), LOOKUP_CHUNK)):
            if n:  # a SQLite write never suspends: let the loop run between transactions
                await asyncio.sleep(0)
            found, written = await self._writer.run(functools.partial(run, chunk))
            active |= found
            updated += written
        return active, updated

    async def claim_end(
        self,
        session_ref: int | str,
        *,
        owner: str,
        lease: float,
        reason: EndReason,
        detail: str | None = None,
    ) -> EndClaim:
        """End one session now (manual, shutdown, orphan): an active session, or an ending one
        whose lease ran out, becomes ``ending`` leased to ``owner``, in one write transaction
        that also returns what it found when it did not apply (so callers read nothing before
        or after). An unknown ``session_ref`` raises ``SessionNotFound``.

        The claim is tried blind first: one conditional ``UPDATE ... RETURNING`` (the
        ``CLAIM_END_GUARD``) and its event, no load (loading the row through the unit of work
        cost more than the rest of a manual end); the blind claims that arrive together share
        one transaction, as group commit's ops do. Only when it claims nothing (or its shared
        transaction failed) does the loading path run, as an op of its own: to say what it
        found, to claim a row that changed in between, or to fail alone."""
        key = _key(session_ref)
        reason = EndReason(reason)
        now = self.clock.now()
        pk = key if isinstance(key, int) else _local_id(key)
        claimed = await self._claim_blind(
            _BlindClaim(pk if pk is not None else key, owner, lease, reason, detail, now)
        )
        if claimed is not None:
            return EndClaim(claimed, True)
        decide = _end_decision(owner, lease, reason, detail)

        def apply(uow: UnitOfWork) -> Thunk:
            row = _lookup(uow, key)
            if row is None:
                raise not_found(key)
            claimed = _apply(uow, row, decide, now)
            snap = uow.snapshot(row)
            return lambda: EndClaim(_record(snap), claimed)

        pks, sids = _key_parts(key)
        return cast(EndClaim, await self._submit(Op(apply, pks=pks, sids=sids)))

    async def _claim_blind(self, claim: _BlindClaim) -> SessionRecord | None:
        """``claim`` in the next shared transaction of blind claims: its record, or None when
        it claimed nothing or the transaction failed (the caller's loading op then decides)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SessionRecord | None] = loop.create_future()
        self._claims.append((claim, future))
        if self._claiming is None or self._claiming.done():
            self._claiming = loop.create_task(self._run_claims(), name="blind end claims")
        return await future

    async def _run_claims(self) -> None:
        while self._claims:
            batch, self._claims = self._claims, []
            batch = [(claim, future) for claim, future in batch if not future.done()]
            if not batch:  # every caller gave up (cancelled) before its claim ran: none applied
                continue
            claims = [claim for claim, _ in batch]
            try:
                found = await self._writer.run(functools.partial(self._claim_ends_blind, claims))
            except Exception:  # nothing applied (rolled back): each caller's own op decides
                logger.debug("a shared blind claim failed; claiming one by one", exc_info=True)
                found = [None] * len(batch)
            except BaseException:  # cancelled (the loop is shutting down): no waiter hangs
                for _, future in batch + self._claims:
                    future.cancel()
                self._claims = []
                raise
            for (_, future), record in zip(batch, found, strict=True):
                if not future.done():
                    future.set_result(record)

    def _claim_ends_blind(
        self, claims: Sequence[_BlindClaim], conn: Connection
    ) -> list[SessionRecord | None]:
        """The blind claims in one transaction, each one conditional UPDATE ... RETURNING on
        its key (a local id, or a session_id), their events in one executemany: each claimed
        record, or None where the row is missing or not claimable."""
        at = database_now(conn) if self.database_clock else None
        found: list[SessionRecord | None] = []
        events: list[Row] = []
        for claim in claims:
            lease_at = at or claim.now
            params: Row = {
                "key": claim.key,
                "reason": claim.reason.value,
                "owner": claim.owner,
                "until": lease_at + timedelta(seconds=claim.lease),
                "now": claim.now,
                "at": lease_at,
            }
            stmt = _claim_end_statement(isinstance(claim.key, int))
            records = _returned(conn, stmt, params)
            record = records[0] if records else None
            found.append(record)
            if record is not None:
                events.append(_claim_event(record, claim))
        insert_events(conn, events)
        return found

    async def begin_end(
        self,
        key: int | str,
        *,
        owner: str,
        lease: float,
        reason: EndReason,
        detail: str | None = None,
    ) -> SessionRecord | None:
        """``claim_end``'s claimed record, or None when the session is unknown or not in a state
        to claim (pending: its creator holds it; already ended; another process holds it)."""
        try:
            found = await self.claim_end(
                key, owner=owner, lease=lease, reason=reason, detail=detail
            )
        except SessionNotFound:
            return None
        return found.record if found.claimed else None

    async def reschedule(self, pk: int, *, owner: str, error: str, retry_at: datetime) -> bool:
        """A terminate failed: release the lease and retry at ``retry_at`` (``owner`` only)."""
        return (
            await self.reschedule_record(pk, owner=owner, error=error, retry_at=retry_at)
            is not None
        )

    async def reschedule_record(
        self, pk: int, *, owner: str, error: str, retry_at: datetime
    ) -> SessionRecord | None:
        """``reschedule``, returning the rescheduled record (None: not ``owner``'s ending row)."""
        retry_at = _aware(retry_at, "retry_at")

        def decide(row: Row) -> Decision:
            if not may_reschedule(row, owner):
                return None
            changes = {
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": retry_at,
                "last_error": _clip(error),
            }
            return changes, "retry", _clip(error)

        return await self._transition(pk, decide)

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
            if not may_end(row, owner, at):
                return None
            changes = ended_changes(row, now, reason, remote_status, cost)
            return changes, changes["end_reason"], remote_status

        return await self._lease_transition(pk, decide)

    @_db_errors
    async def end_many(self, ends: Sequence[EndRequest], *, owner: str) -> dict[int, SessionRecord]:
        """ending -> ended for terminated sessions ``owner`` holds, in one transaction: one
        ``UPDATE ... WHERE id IN (...) AND status = 'ending' AND lease_owner = :owner RETURNING``
        per kind of end plus one executemany of their events. Returns the ended records by id;
        a row missing from the answer was taken over by another process and is left alone."""
        if not ends:
            return {}
        check_transition(_ENDING, _ENDED)
        now = self.clock.now()
        kinds: dict[tuple[str | None, str | None, float | None], list[int]] = {}
        for end in ends:
            reason = EndReason(end.reason).value if end.reason is not None else None
            cost = float(end.cost) if end.cost is not None else None
            kinds.setdefault((reason, end.remote_status, cost), []).append(end.pk)
        later = now + timedelta(seconds=COST_DELAY)
        sqlite = self.dialect == "sqlite"
        statements: list[tuple[Any, Row, str | None]] = []
        for (reason, remote, cost), pks in kinds.items():
            stmt = _end_statement(reason is None, remote is not None, cost is not None, sqlite)
            given: Row = {"owner": owner, "now": now}
            if reason is not None:
                given["reason"] = reason
            if remote is not None:
                given["remote_status"] = remote
            given |= {"cost": cost} if cost is not None else {"later": later}
            for chunk in _chunks(sorted(set(pks)), LOOKUP_CHUNK):
                ids = json.dumps(chunk) if sqlite else list(chunk)
                statements.append((stmt, given | {"pks": ids}, remote))

        def run(conn: Connection) -> dict[int, SessionRecord]:
            ended: dict[int, SessionRecord] = {}
            events: list[Row] = []
            for stmt, params, remote in statements:
                for record in _returned(conn, stmt, params):
                    ended[record.id] = record
                    events.append(
                        {
                            "session_pk": record.id,
                            "at": now,
                            "from_status": _ENDING,
                            "to_status": _ENDED,
                            "reason": _value(record.end_reason),
                            "detail": remote,
                        }
                    )
            insert_events(conn, events)
            return ended

        return await self._writer.run(run)

    async def mark_ended_remote(
        self, pk: int, *, reason: EndReason, remote_status: str, cost: float | None
    ) -> bool:
        """LemonSlice already finished it (reconcile): active, or ending with no live lease,
        -> ended."""
        now = self.clock.now()
        reason = EndReason(reason)

        def decide(row: Row, at: datetime) -> Decision:
            if not may_end_remote(row, at):
                return None
            return ended_changes(row, now, reason, remote_status, cost), reason.value, remote_status

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
            if row is None or not may_control(row):
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
            params = {
                "now": now,
                "due_before": now - timedelta(seconds=grace),
                "at": at,
                "until": at + timedelta(seconds=lease),
                "owner": owner,
                "limit": limit,
            }
            return self._claimed(conn, _claim_due_statement(self.dialect), params, owner, now)

        return await self._writer.run(run)

    @staticmethod
    def _claimed(
        conn: Connection, stmt: Any, params: Row, owner: str, now: datetime
    ) -> list[SessionRecord]:
        """Run a claim statement and append its events."""
        records = _returned(conn, stmt, params)
        if not records:
            return []
        events = [
            {
                "session_pk": r.id,
                "at": now,
                # attempts is 0 until a session is first claimed (a CHECK guarantees it)
                "from_status": _ACTIVE if r.attempts == 1 else _ENDING,
                "to_status": _ENDING,
                "reason": _value(r.end_reason),
                "detail": f"claimed by {owner} (attempt {r.attempts})",
            }
            for r in records
        ]
        insert_events(conn, events)
        far = datetime.max.replace(tzinfo=UTC)
        records.sort(key=lambda r: (r.deadline or far, r.id))
        return records

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
                .where(intent_due_sql(now, at))
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
            if not may_resolve_intent(row, owner):
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
            if row is None or not may_resolve_intent(row, owner) or uow.get(session_id) is not None:
                return lambda: None
            check_transition(row["status"], _ACTIVE)
            changes = {
                "status": _ACTIVE,
                "session_id": session_id,
                "control_url": control_url,
                "last_activity_at": now,
                "deadline": deadline(now, row["idle_window"], row["expires_at"]),
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
            if not may_record_cost(row):
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


# --- helpers ---------------------------------------------------------------------------------


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


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


def _apply(
    uow: UnitOfWork,
    row: Row,
    decide: Callable[[Row, datetime], Decision],
    now: datetime,
    *,
    event: bool = True,
) -> bool:
    """Apply ``decide``'s decision on ``row`` to the unit of work; False: it did not apply."""
    decision = decide(row, uow.lease_now or now)
    if decision is None:
        return False
    changes, reason, detail = decision
    check_transition(row["status"], changes.get("status") or row["status"])
    uow.change(
        row, changes | {"updated_at": now}, at=now, reason=reason, detail=detail, event=event
    )
    return True


def _end_decision(
    owner: str, lease: float, reason: EndReason, detail: str | None
) -> Callable[[Row, datetime], Decision]:
    """The claim of a manual/shutdown/orphan end: an active row, or an ending one whose lease
    ran out, leased to ``owner``."""

    def decide(row: Row, at: datetime) -> Decision:
        if not may_claim_end(row, at):
            return None
        lease_changes = claim_changes(row, owner, at + timedelta(seconds=lease))
        if row["status"] == _ACTIVE:
            changes = {"status": _ENDING, "end_reason": reason.value, **lease_changes}
            why = f"{detail}; lease {owner}" if detail else f"lease {owner}"
            return changes, reason.value, _clip(why)
        return lease_changes, row["end_reason"], f"lease taken over by {owner}"

    return decide


@dataclasses.dataclass(frozen=True, slots=True)
class _BlindClaim:
    """One ``claim_end`` waiting for its blind attempt (``key``: a local id or a session_id)."""

    key: int | str
    owner: str
    lease: float
    reason: EndReason
    detail: str | None
    now: datetime


def _claim_event(record: SessionRecord, claim: _BlindClaim) -> Row:
    """The event of a blind claim, as ``_end_decision`` words it."""
    reason: str | None
    # attempts is 0 until a session is first claimed (a CHECK guarantees it)
    if record.attempts == 1:
        why = f"{claim.detail}; lease {claim.owner}" if claim.detail else f"lease {claim.owner}"
        src, reason = _ACTIVE, claim.reason.value
    else:
        why, src, reason = f"lease taken over by {claim.owner}", _ENDING, _value(record.end_reason)
    return {
        "session_pk": record.id,
        "at": claim.now,
        "from_status": src,
        "to_status": _ENDING,
        "reason": reason,
        "detail": _clip(why),
    }


@functools.lru_cache(maxsize=2)
def _claim_end_statement(by_id: bool) -> Any:
    """The blind manual-end claim: ``_end_decision`` in SQL, built once (bound: ``key``,
    ``reason``, ``owner``, ``until``, ``now``, ``at``). An active row becomes ending with
    ``reason``; an ending one keeps its reason; both get ``transitions.claim_changes``."""
    check_transition(_ACTIVE, _ENDING)
    check_transition(_ENDING, _ENDING)
    c = sessions.c
    match = c.id == bindparam("key") if by_id else c.session_id == bindparam("key")
    changes = claim_changes({"attempts": c.attempts}, "", datetime.now(UTC))
    values: dict[str, Any] = {
        "status": _ENDING,
        "end_reason": case(
            (c.status == _ACTIVE, bindparam("reason", type_=c.end_reason.type)),
            else_=c.end_reason,
        ),
        "lease_owner": bindparam("owner", type_=c.lease_owner.type),
        "lease_until": bindparam("until", type_=c.lease_until.type),
        "attempts": changes["attempts"],
        "next_attempt_at": changes["next_attempt_at"],
        "updated_at": bindparam("now", type_=c.updated_at.type),
    }
    assert set(changes) <= set(values)  # every change a claim makes is in the statement
    return update(sessions).where(match, CLAIM_END_GUARD).values(values).returning(*RECORD_COLUMNS)


@functools.lru_cache(maxsize=1)
def _touch_read() -> Any:
    """PostgreSQL: the windows of the active sessions among ``sids`` (what a touch's deadline
    needs), locked until the UPDATE. SQLite reads them in ``_sqlite_touches``."""
    c = sessions.c
    stmt = select(c.session_id, c.idle_window, c.expires_at, c.last_activity_at).where(
        c.session_id.in_(bindparam("sids", expanding=True)), c.status == _ACTIVE
    )
    return stmt.with_for_update()


def _touch_windows(conn: Connection, sids: Sequence[str]) -> Sequence[Any]:
    """``_touch_read``'s rows for ``sids``."""
    return conn.execute(_touch_read(), {"sids": list(sids)}).all()


# a touch: later activity and its deadline, blind but for the status and the activity it moves on
_TOUCH_UPDATE = (
    update(sessions)
    .where(
        sessions.c.session_id == bindparam("sid"),
        sessions.c.status == _ACTIVE,
        sessions.c.last_activity_at < bindparam("at", type_=sessions.c.last_activity_at.type),
    )
    .values(
        last_activity_at=bindparam("at", type_=sessions.c.last_activity_at.type),
        deadline=bindparam("deadline", type_=sessions.c.deadline.type),
        updated_at=bindparam("now", type_=sessions.c.updated_at.type),
    )
)


def _execute_touches(conn: Connection, params: Sequence[Row]) -> None:
    """PostgreSQL: ``_TOUCH_UPDATE`` for every row (each row is locked by the read, so each
    UPDATE applies)."""
    conn.execute(_TOUCH_UPDATE, list(params))


# SQLite: a chunk's read by session_id (the unique index) with ``+status``, which no index
# serves: given ``status = 'active'`` the planner chose the (status, created_at) index and
# scanned every active row for each chunk of ids (88 ms for 10,000 touches, against 14 ms).
# ``id`` is the rowid, so the UPDATE finds each row without a second index probe.
_SQLITE_TOUCH_READ = (
    "SELECT id, session_id, idle_window, expires_at, last_activity_at FROM sessions"
    " WHERE session_id IN ({}) AND +status = '" + _ACTIVE + "'"
)
# One UPDATE for a chunk's touches (SQLite >= 3.33): ``?`` x3 per touch (id, at, deadline),
# then ``now``. Not a ``WITH``: the stdlib driver counts rows only for statements it sees start
# with UPDATE.
_SQLITE_TOUCH_FROM = (
    "UPDATE sessions SET last_activity_at = t.column2, deadline = t.column3, updated_at = ?"
    " FROM (VALUES {}) AS t WHERE sessions.id = t.column1"
    " AND sessions.status = '" + _ACTIVE + "' AND sessions.last_activity_at < t.column2"
)
# The same per touch, for an older SQLite (executemany: at, deadline, now, id, at).
_SQLITE_TOUCH = (
    "UPDATE sessions SET last_activity_at = ?, deadline = ?, updated_at = ?"
    " WHERE id = ? AND status = '" + _ACTIVE + "' AND last_activity_at < ?"
)
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)


@functools.lru_cache(maxsize=32)
def _sqlite_touch_sql(kind: str, n: int) -> str:
    """A chunk's read (``kind`` "read") or UPDATE ("write") for ``n`` sessions, built once per
    size: most chunks are ``LOOKUP_CHUNK`` long and most of their rows are written."""
    if kind == "read":
        return _SQLITE_TOUCH_READ.format(",".join("?" * n))
    return _SQLITE_TOUCH_FROM.format(",".join(("(?,?,?)",) * n))


def _sqlite_touches(
    conn: Connection, sids: Sequence[str], times: Mapping[str, datetime], now: str
) -> tuple[set[str], int]:
    """A chunk of touches on SQLite, on the driver: one read of the windows, then one UPDATE
    of the rows whose activity moves on (``UPDATE ... FROM (VALUES ...)`` by rowid: ~20% less
    of SQLite's time than an executemany by session_id). Times stay text: SQLite compares
    them as text (lexical order is time order), so ``at > last`` is the UPDATE's own test.
    Returns (the sessions found active, the rows updated)."""
    result = conn.exec_driver_sql(_sqlite_touch_sql("read", len(sids)), tuple(sids))
    try:
        rows = result.cursor.fetchall()
    finally:
        result.close()
    active = {row[1] for row in rows}
    params: list[Any] = []
    text = format_sqlite_time
    for pk, sid, window, expires_at, last in rows:
        at = times[sid]
        at_text = text(at)
        if at_text > last:
            params += (pk, at_text, text(deadline(at, window, parse_sqlite_time(expires_at))))
    if not params:
        return active, 0
    if _UPDATE_FROM:
        params.insert(0, now)
        sql = _sqlite_touch_sql("write", len(params) // 3)
        return active, conn.exec_driver_sql(sql, tuple(params)).rowcount
    each = [
        (params[i + 1], params[i + 2], now, params[i], params[i + 1])
        for i in range(0, len(params), 3)
    ]
    return active, conn.exec_driver_sql(_SQLITE_TOUCH, each).rowcount


def _returned(conn: Connection, stmt: Any, params: Row) -> list[SessionRecord]:
    """The records a write returns (``RETURNING RECORD_COLUMNS``), each built once; on SQLite
    the statement runs on the driver, compiled once (``writer.fetch_rows``)."""
    if conn.dialect.name == "sqlite":
        return [record_from_sqlite(r) for r in fetch_rows(conn, stmt, params)]
    return records_of(conn, conn.execute(stmt, params))


@functools.lru_cache(maxsize=2)
def _claim_due_statement(dialect: str) -> Any:
    """``claim_due``'s one UPDATE, built and compiled once (bound: ``now``, the claimer's clock
    for deadlines and retries; ``due_before``, now less the grace; ``at``, the lease clock;
    ``until``, ``owner``, ``limit``); on PostgreSQL rows another claimer holds are skipped."""
    c = sessions.c
    now = bindparam("now", type_=c.updated_at.type)
    due = claim_due_sql(
        now,
        bindparam("at", type_=c.lease_until.type),
        bindparam("due_before", type_=c.deadline.type),
    )
    limit = bindparam("limit", type_=Integer)
    picked = select(c.id).where(due).order_by(c.deadline, c.id).limit(limit)
    if dialect == "postgresql":
        picked = picked.with_for_update(skip_locked=True)
    return (
        update(sessions)
        .where(c.id.in_(picked.scalar_subquery()))
        .values(
            status=_ENDING,
            end_reason=claim_reason_sql(now),
            lease_owner=bindparam("owner", type_=c.lease_owner.type),
            lease_until=bindparam("until", type_=c.lease_until.type),
            attempts=c.attempts + 1,
            updated_at=now,
        )
        .returning(*RECORD_COLUMNS)
    )


@functools.lru_cache(maxsize=16)
def _end_statement(keep_reason: bool, with_remote: bool, with_cost: bool, sqlite: bool) -> Any:
    """``end_many``'s UPDATE for one kind of end: ``transitions.ended_changes`` in SQL, built
    once per kind (bound: ``pks``, ``owner``, ``now``, ``later``, ``reason``, ``remote_status``,
    ``cost``). On SQLite ``pks`` is one JSON array (``json_each``), so the statement is one
    string run on the driver whatever the number of rows (an expanding IN went through
    SQLAlchemy's execution for each call, compiled again for each count: 199 against 137 us
    for a bulk end of 4 rows); elsewhere an expanding list."""
    c = sessions.c
    if sqlite:
        each = func.json_each(bindparam("pks", type_=String)).table_valued("value")
        rows = c.id.in_(select(each.c.value))
    else:
        rows = c.id.in_(bindparam("pks", expanding=True))
    values: dict[str, Any] = {
        "status": _ENDED,
        "ended_at": bindparam("now", type_=c.ended_at.type),
        "end_reason": c.end_reason if keep_reason else bindparam("reason", type_=c.end_reason.type),
        "lease_until": None,
        "updated_at": bindparam("now", type_=c.updated_at.type),
    }
    if with_cost:
        values |= {"cost": bindparam("cost", type_=c.cost.type), "next_attempt_at": None}
    else:
        later = bindparam("later", type_=c.next_attempt_at.type)
        values["next_attempt_at"] = case((c.cost.is_(None), later), else_=None)
    if with_remote:
        values["remote_status"] = bindparam("remote_status", type_=c.remote_status.type)
    return update(sessions).where(rows, END_GUARD).values(values).returning(*RECORD_COLUMNS)


_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_field_values = operator.attrgetter(*_FIELDS)


def _replaced(record: SessionRecord, changes: Row, **typed: Any) -> SessionRecord:
    """``dataclasses.replace(record, **changes, **typed)``, in a fraction of its time (it checks
    every field's ``init``, passes keywords and sets each frozen field; a create pays it once)."""
    values = list(_field_values(record))
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    for name, value in typed.items():
        values[_FIELD_INDEX[name]] = value
    return build_record(values)


def _value(reason: EndReason | None) -> str | None:
    return reason.value if reason is not None else None


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
