"""A session's life: its statuses, the reasons it ends, and the transitions allowed between them.

::

    pending ──create ok──> active ──due / end()──> ending ──terminate ok, 404/410──> ended
       │ 4xx ──> failed       │ remote finished ──> ended      │ transient failure: stays ending,
       │ unknown: stays pending (its creator's lease held)     │ lease released, retried later
       │ lease expired: recovery adopts the session (-> active -> ending) or fails it

A pending intent never becomes ``ending`` or ``ended`` directly: it has no session id to end.

The repository is the only writer of ``status`` and enforces ``TRANSITIONS`` with one conditional
UPDATE per transition (``WHERE status = <expected>``), so two actors can never both win. When each
transition applies (leases, due times, owners) and what it changes is in sessionmgr/transitions.py,
the one place those rules are written; this module only names the states and their order.
"""

from __future__ import annotations

import enum


class SessionStatus(enum.StrEnum):
    PENDING = "pending"  # intent recorded, create POST not (yet) answered
    ACTIVE = "active"  # LemonSlice said yes; the reaper guards it
    ENDING = "ending"  # claimed for termination (by the reaper, end() or shutdown)
    ENDED = "ended"  # terminated, found gone, or finished remotely
    FAILED = "failed"  # never started: create rejected, or unresolved intent


LIVE_STATUSES = frozenset({SessionStatus.PENDING, SessionStatus.ACTIVE, SessionStatus.ENDING})
FINAL_STATUSES = frozenset({SessionStatus.ENDED, SessionStatus.FAILED})


class EndReason(enum.StrEnum):
    IDLE = "idle"  # no activity for idle_window
    MAX_AGE = "max_age"  # alive longer than max_age
    MANUAL = "manual"  # end_session() / `sessionmgr end`
    SHUTDOWN = "shutdown"  # the owning process ended it on exit
    REMOTE_COMPLETED = "remote_completed"  # LemonSlice reports COMPLETED
    REMOTE_TIMED_OUT = "remote_timed_out"  # LemonSlice reports TIMED_OUT
    REMOTE_FAILED = "remote_failed"  # LemonSlice reports FAILED
    GONE = "gone"  # terminate answered 404/410
    ORPHAN = "orphan"  # found remotely, unknown locally, ended by reconcile
    CREATE_REJECTED = "create_rejected"  # create answered 4xx
    CREATE_UNKNOWN = "create_unknown"  # create outcome never learned; intent expired


# What a person or caller may give `end` (the CLI's --reason, the API's "reason"); the rest are
# the reaper's, reconcile's and LemonSlice's to record.
MANUAL_REASONS = (EndReason.MANUAL, EndReason.SHUTDOWN, EndReason.ORPHAN)

# status -> statuses it may move to
TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.PENDING: frozenset({SessionStatus.ACTIVE, SessionStatus.FAILED}),
    SessionStatus.ACTIVE: frozenset({SessionStatus.ENDING, SessionStatus.ENDED}),
    SessionStatus.ENDING: frozenset({SessionStatus.ENDING, SessionStatus.ENDED}),
    SessionStatus.ENDED: frozenset(),
    SessionStatus.FAILED: frozenset(),
}

# What the remote status of a finished session means locally.
REMOTE_FINAL: dict[str, EndReason] = {
    "COMPLETED": EndReason.REMOTE_COMPLETED,
    "TIMED_OUT": EndReason.REMOTE_TIMED_OUT,
    "FAILED": EndReason.REMOTE_FAILED,
}
REMOTE_LIVE = frozenset({"QUEUED", "ACTIVE"})


def can_transition(src: SessionStatus, dst: SessionStatus) -> bool:
    return dst in TRANSITIONS[src]
