"""Who may move a session row, written once: every transition's condition and its changes.

``states`` names the statuses and which may follow which (``TRANSITIONS``); this module says when
each action applies to a row, as pure functions over a row mapping (column name -> value) and the
lease clock ``at`` (the database's when ``database_clock``), and what it changes. Where a rule is
also run as SQL (the reaper's claim, recovery's intent claim, the bulk end's guard), its SQL form
sits next to its Python form, so the two are read and changed together. The repository, reaper,
CLI output, web and manager call these and never restate them.

A separate module, not ``states``: the SQL forms need the ``sessions`` table, and ``models``
imports ``states`` for its CHECK constraints (which stay there, the database's own guard, spelled
with the constants below).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, or_

from .models import sessions
from .states import EndReason, SessionStatus, can_transition

Row = Mapping[str, Any]

PENDING = SessionStatus.PENDING.value
ACTIVE = SessionStatus.ACTIVE.value
ENDING = SessionStatus.ENDING.value
ENDED = SessionStatus.ENDED.value
FAILED = SessionStatus.FAILED.value

COST_DELAY = 5.0  # seconds after an end before its cost is asked for (the server bills first)
LEGACY_INTENT_SETTLE = 120.0  # seconds: an intent written without a lease counts as held this long


def check_transition(src: str, dst: str) -> None:
    """Every status change must be one that ``states.TRANSITIONS`` declares (a bug otherwise)."""
    if src != dst and not can_transition(SessionStatus(src), SessionStatus(dst)):
        raise AssertionError(f"{src} -> {dst} is not a transition of the session state machine")


def as_row(record: Any) -> dict[str, Any]:
    """A ``SessionRecord`` as the row mapping the conditions below take. A record does not carry
    ``expires_at``: the column is always ``created_at + max_age`` (``record_intent``, ``adopt``)."""
    row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    max_age = row["max_age"]
    row["expires_at"] = None if max_age is None else row["created_at"] + timedelta(seconds=max_age)
    return row


def lease_free(row: Row, at: datetime) -> bool:
    """Nobody holds the row: no lease, or one that ran out by ``at``."""
    return row["lease_until"] is None or row["lease_until"] <= at


def deadline(last_activity: datetime, idle_window: float, expires_at: datetime | None) -> datetime:
    """When an active session is due: idle for ``idle_window``, or at ``expires_at`` if sooner."""
    idle_deadline = last_activity + _window(idle_window)
    return idle_deadline if expires_at is None else min(idle_deadline, expires_at)


@functools.lru_cache(maxsize=64)
def _window(seconds: float) -> timedelta:
    """An idle window as a timedelta, made once per value: a touch flush computes a deadline
    per session, nearly all with the same few windows (0.1 against 0.4 us)."""
    return timedelta(seconds=seconds)


# --- conditions: when each action applies to a row ------------------------------------------


def may_activate(row: Row) -> bool:
    """pending -> active (the create answered, or ``adopt`` matched the intent)."""
    return bool(row["status"] == PENDING)


def may_fail(row: Row) -> bool:
    """pending -> failed (the create was rejected, or its outcome never learned)."""
    return bool(row["status"] == PENDING)


def may_claim_end(row: Row, at: datetime) -> bool:
    """A manual/shutdown/orphan end's claim: an active row, or an ending one nobody holds. A
    pending row never: its creator holds it (``still_creating``). SQL form: ``CLAIM_END_GUARD``."""
    return row["status"] == ACTIVE or (row["status"] == ENDING and lease_free(row, at))


# ``may_claim_end`` as a WHERE (bound: ``at``, the lease clock), for the blind manual-end claim
CLAIM_END_GUARD: ColumnElement[bool] = or_(
    sessions.c.status == ACTIVE,
    and_(
        sessions.c.status == ENDING,
        or_(
            sessions.c.lease_until.is_(None),
            sessions.c.lease_until <= bindparam("at", type_=sessions.c.lease_until.type),
        ),
    ),
)


def may_reschedule(row: Row, owner: str) -> bool:
    """A failed terminate gives the row back: only its lease owner, only while ending."""
    return bool(row["status"] == ENDING and row["lease_owner"] == owner)


def may_end(row: Row, owner: str | None, at: datetime) -> bool:
    """ending -> ended after a terminate: by the lease owner (``owner=None``: only when no lease
    is live). SQL form for a known owner: ``END_GUARD``."""
    if row["status"] != ENDING:
        return False
    return lease_free(row, at) if owner is None else bool(row["lease_owner"] == owner)


# ``may_end`` with an owner, as the bulk end's WHERE (bound: ``owner``); the statement adds
# which rows it ends
END_GUARD: ColumnElement[bool] = and_(
    sessions.c.status == ENDING,
    sessions.c.lease_owner == bindparam("owner", type_=sessions.c.lease_owner.type),
)


def ended_changes(
    row: Row, now: datetime, reason: EndReason | None, remote_status: str | None, cost: float | None
) -> dict[str, Any]:
    """What an end changes (``may_end``, ``may_end_remote``): ended now, the lease dropped, the
    reason given (None: the one stamped at the claim), the cost when known, else its fetch
    scheduled ``COST_DELAY`` on. SQL form: the repository's ``_end_statement`` (the bulk end)."""
    changes: dict[str, Any] = {
        "status": ENDED,
        "ended_at": now,
        "end_reason": reason.value if reason is not None else row["end_reason"],
        "lease_until": None,
    }
    if cost is not None:
        changes |= {"cost": float(cost), "next_attempt_at": None}
    elif row["cost"] is not None:
        changes["next_attempt_at"] = None
    else:
        changes["next_attempt_at"] = now + timedelta(seconds=COST_DELAY)
    if remote_status is not None:
        changes["remote_status"] = remote_status
    return changes


def may_end_remote(row: Row, at: datetime) -> bool:
    """LemonSlice finished it (reconcile): active, or ending with no live lease, -> ended."""
    return may_claim_end(row, at)


def may_control(row: Row) -> bool:
    """A control event goes only to an active session (one with a LemonSlice id)."""
    return bool(row["status"] == ACTIVE and row["session_id"] is not None)


def may_resolve_intent(row: Row, owner: str) -> bool:
    """Recovery's release or adoption of an intent: still pending, its lease ``owner``'s."""
    return bool(row["status"] == PENDING and row["lease_owner"] == owner)


def may_record_cost(row: Row) -> bool:
    """A cost is noted on an ended session only."""
    return bool(row["status"] == ENDED)


def still_creating(record_id: int) -> str:
    """Why a pending session cannot be ended yet (web's 409, the manager's refusal)."""
    return (
        f"session {record_id} is still being created (pending): retry shortly, or run "
        "`sessionmgr reconcile` if its creator died"
    )


# --- the reaper's claim: Python form and SQL form ---------------------------------------------


def claim_due(row: Row, now: datetime, at: datetime, grace: float = 0.0) -> bool:
    """Whether the reaper's claim takes the row: active past its deadline by ``grace`` seconds
    (``now``: the claimer's clock), or ending with its lease run out by ``at`` and its retry
    time (``next_attempt_at``) come. SQL form: ``claim_due_sql``."""
    if row["status"] == ACTIVE:
        due = row["deadline"]
        return due is not None and due <= now - timedelta(seconds=grace)
    if row["status"] != ENDING:
        return False
    if row["lease_until"] is not None and row["lease_until"] > at:
        return False
    return row["next_attempt_at"] is None or row["next_attempt_at"] <= now


def claim_due_sql(now: Any, at: Any, due_before: Any) -> ColumnElement[bool]:
    """``claim_due`` as a WHERE, spelled as disjoint index ranges so that only due rows are read:
    (status, deadline) for active rows; (status, lease_until, next_attempt_at) for ending ones.
    ``due_before`` is ``now`` less the grace; each is a time or a bound parameter."""
    c = sessions.c
    retry_due = or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)
    return or_(
        and_(c.status == ACTIVE, c.deadline <= due_before),
        and_(c.status == ENDING, c.lease_until <= at, retry_due),
        and_(c.status == ENDING, c.lease_until.is_(None), c.next_attempt_at.is_(None)),
        and_(c.status == ENDING, c.lease_until.is_(None), c.next_attempt_at <= now),
    )


def claim_reason(row: Row, now: datetime) -> str | None:
    """The end reason a claim stamps: an active row's max_age once expired, else idle; an ending
    row keeps its own. SQL form: ``claim_reason_sql``."""
    if row["status"] != ACTIVE:
        return row["end_reason"]  # type: ignore[no-any-return]
    expires_at = row["expires_at"]
    if expires_at is not None and expires_at <= now:
        return EndReason.MAX_AGE.value
    return EndReason.IDLE.value


def claim_reason_sql(now: Any) -> ColumnElement[Any]:
    c = sessions.c
    return case(
        (
            c.status == ACTIVE,
            case(
                (and_(c.expires_at.is_not(None), c.expires_at <= now), EndReason.MAX_AGE.value),
                else_=EndReason.IDLE.value,
            ),
        ),
        else_=c.end_reason,
    )


def claim_changes(row: Row, owner: str, until: datetime) -> dict[str, Any]:
    """What any claim to end changes: ``owner``'s lease until ``until``, one more attempt."""
    return {
        "lease_owner": owner,
        "lease_until": until,
        "attempts": row["attempts"] + 1,
        "next_attempt_at": None,
    }


# --- recovery's intent claim: Python form and SQL form ----------------------------------------


def intent_due(row: Row, now: datetime, at: datetime) -> bool:
    """A pending intent nobody holds: its lease expired by ``at`` (and its retry time come), or
    written without a lease and older than ``LEGACY_INTENT_SETTLE``. SQL: ``intent_due_sql``."""
    if row["status"] != PENDING:
        return False
    if row["lease_until"] is None:
        return bool(row["created_at"] <= now - timedelta(seconds=LEGACY_INTENT_SETTLE))
    retry = row["next_attempt_at"]
    return bool(row["lease_until"] <= at and (retry is None or retry <= now))


def intent_due_sql(now: datetime, at: datetime) -> ColumnElement[bool]:
    """``intent_due`` as a WHERE: index ranges on (status, lease_until, next_attempt_at)."""
    c = sessions.c
    retry_due = or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)
    legacy = now - timedelta(seconds=LEGACY_INTENT_SETTLE)
    return or_(
        and_(c.status == PENDING, c.lease_until <= at, retry_due),
        and_(c.status == PENDING, c.lease_until.is_(None), c.created_at <= legacy),
    )


# --- every action, for the table-driven test and readers ---------------------------------------


class Action(enum.StrEnum):
    """What may be done to a row; ``CONDITIONS`` says when each applies."""

    ACTIVATE = "activate"
    FAIL = "fail"
    CLAIM_END = "claim_end"
    RESCHEDULE = "reschedule"
    END = "end"  # by the lease owner
    END_UNLEASED = "end_unleased"  # owner=None: only with no live lease
    END_REMOTE = "end_remote"
    CONTROL = "control"
    RESOLVE_INTENT = "resolve_intent"
    RECORD_COST = "record_cost"
    CLAIM_DUE = "claim_due"
    CLAIM_INTENT = "claim_intent"


# action -> condition(row, owner, now, at); ``at`` is the lease clock
CONDITIONS: dict[Action, Callable[[Row, str, datetime, datetime], bool]] = {
    Action.ACTIVATE: lambda row, _o, _n, _a: may_activate(row),
    Action.FAIL: lambda row, _o, _n, _a: may_fail(row),
    Action.CLAIM_END: lambda row, _o, _n, at: may_claim_end(row, at),
    Action.RESCHEDULE: lambda row, owner, _n, _a: may_reschedule(row, owner),
    Action.END: lambda row, owner, _n, at: may_end(row, owner, at),
    Action.END_UNLEASED: lambda row, _o, _n, at: may_end(row, None, at),
    Action.END_REMOTE: lambda row, _o, _n, at: may_end_remote(row, at),
    Action.CONTROL: lambda row, _o, _n, _a: may_control(row),
    Action.RESOLVE_INTENT: lambda row, owner, _n, _a: may_resolve_intent(row, owner),
    Action.RECORD_COST: lambda row, _o, _n, _a: may_record_cost(row),
    Action.CLAIM_DUE: lambda row, _o, now, at: claim_due(row, now, at),
    Action.CLAIM_INTENT: lambda row, _o, now, at: intent_due(row, now, at),
}
