"""The schema: ``sessions`` and ``session_events`` as typed SQLAlchemy 2 models.

The database enforces what it can (status and end_reason values, unique ``session_id``, the
bookkeeping invariants of each status) so a bug elsewhere fails loudly instead of storing a state
the state machine cannot reach. Alembic owns the schema (migrations/); a test proves the
migrations produce exactly these models.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from .states import FINAL_STATUSES, EndReason, SessionStatus

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SESSION_ID_LENGTH = 128  # characters; LemonSlice ids are far shorter
NAME_LENGTH = 255  # characters, agent ids and lease owners
CODE_LENGTH = 32  # characters, statuses, end reasons, remote statuses
DEFAULT_TRANSPORT = "daily"  # what every session before revision 0002 used

# the CHECK constraints below name statuses by these constants (never as literals)
FINAL = tuple(sorted(s.value for s in FINAL_STATUSES))  # ended, failed
_ACTIVE = SessionStatus.ACTIVE.value
_ENDING = SessionStatus.ENDING.value
UNSTARTED = (SessionStatus.PENDING.value, SessionStatus.ACTIVE.value)


def _in(values: tuple[str, ...] | list[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; naive ones are refused, never guessed.

    SQLite stores naive UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``: readable, and lexical order is
    time order); PostgreSQL stores ``TIMESTAMP WITH TIME ZONE``. Both read back as aware UTC.
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(DateTime(timezone=True))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} refused: pass a timezone-aware UTC datetime"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    # SQLite: one plain function each way, in SQLAlchemy's own text format. Same results as the
    # generic path, several times faster (every write binds a handful of times).

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        return format_sqlite_time

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        return parse_sqlite_time


_SQLITE_FORMAT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"  # what SQLAlchemy's SQLite DATETIME stores


def format_sqlite_time(value: datetime | None) -> str | None:
    """An aware time as SQLite holds it (naive UTC text); a naive one is refused. A time in
    ``UTC`` itself (the clock's, and every time read back) skips ``utcoffset()``: ~40% of the
    call, and a flush formats two times per session."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        offset = value.utcoffset()
        if offset is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} refused: pass a timezone-aware UTC datetime"
            )
        if offset:
            value = value - offset
    return _SQLITE_FORMAT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def parse_sqlite_time(value: str | None) -> datetime | None:
    """A time as SQLite holds it (naive UTC text), aware; the offset is parsed with it, which
    is several times cheaper than ``replace(tzinfo=...)`` afterwards."""
    return None if value is None else datetime.fromisoformat(value + "+00:00")


# JSON on SQLite (text), JSONB on PostgreSQL (compact, comparable).
JSONType = JSON().with_variant(JSONB(), "postgresql")
# 64-bit ids on PostgreSQL; on SQLite INTEGER PRIMARY KEY is the rowid (fastest).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRow(Base):
    """One LemonSlice session, from the intent to its end. See DESIGN.md, "The record"."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    session_id: Mapped[str | None] = mapped_column(String(SESSION_ID_LENGTH))
    status: Mapped[str] = mapped_column(String(CODE_LENGTH))
    agent_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    agent_image_url: Mapped[str | None] = mapped_column(Text)
    agent_prompt: Mapped[str | None] = mapped_column(Text)
    idle_timeout: Mapped[int | None] = mapped_column(Integer)
    room_url: Mapped[str | None] = mapped_column(Text)
    control_url: Mapped[str | None] = mapped_column(Text)
    idle_window: Mapped[float] = mapped_column(Double)  # seconds
    max_age: Mapped[float | None] = mapped_column(Double)  # seconds
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # min(last_activity_at + idle_window, expires_at); null while pending
    deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # created_at + max_age, so the claim tells max_age from idle without date arithmetic in SQL
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(CODE_LENGTH))
    remote_status: Mapped[str | None] = mapped_column(String(CODE_LENGTH))
    cost: Mapped[float | None] = mapped_column(Double)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # ``metadata`` is reserved on declarative classes; the column and the record field keep it.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    # revision 0002: the LemonSlice model asked for (None: the server's default) and the transport
    model: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    transport_type: Mapped[str] = mapped_column(
        String(CODE_LENGTH), default=DEFAULT_TRANSPORT, server_default=DEFAULT_TRANSPORT
    )

    __table_args__ = (
        CheckConstraint(f"status IN {_in([s.value for s in SessionStatus])}", name="status"),
        CheckConstraint(
            f"end_reason IS NULL OR end_reason IN {_in([r.value for r in EndReason])}",
            name="end_reason",
        ),
        # ended_at is set exactly when the session is over
        CheckConstraint(
            f"(status IN {_in(FINAL)} AND ended_at IS NOT NULL)"
            f" OR (status NOT IN {_in(FINAL)} AND ended_at IS NULL)",
            name="ended_at",
        ),
        CheckConstraint(
            f"status <> '{_ACTIVE}' OR session_id IS NOT NULL", name="active_session_id"
        ),
        # attempts counts claims: zero before ending, at least one while ending. The claim relies
        # on this to tell a fresh claim (attempts becomes 1) from a retry.
        CheckConstraint(
            f"attempts >= 0 AND (status NOT IN {_in(UNSTARTED)} OR attempts = 0)"
            f" AND (status <> '{_ENDING}' OR attempts >= 1)",
            name="attempts",
        ),
        CheckConstraint("idle_window > 0", name="idle_window"),
        CheckConstraint("max_age IS NULL OR max_age > 0", name="max_age"),
        Index("ix_sessions_session_id", "session_id", unique=True),
        # the reaper's claim: active rows by deadline, ending rows by lease expiry / retry time
        Index("ix_sessions_status_deadline", "status", "deadline"),
        Index("ix_sessions_status_lease_until", "status", "lease_until", "next_attempt_at"),
        # live sessions oldest first, status-filtered listings
        Index("ix_sessions_status_created_at", "status", "created_at"),
        # listings by creation time (keyset on created_at, id), per-day creation counts
        Index("ix_sessions_created_at", "created_at", "id"),
        # per-day end counts and durations, prune
        Index("ix_sessions_ended_at", "ended_at"),
    )


class SessionEventRow(Base):
    """One transition of one session, written in the transition's transaction."""

    __tablename__ = "session_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    session_pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("sessions.id", ondelete="CASCADE"),
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_status: Mapped[str | None] = mapped_column(String(CODE_LENGTH))
    to_status: Mapped[str] = mapped_column(String(CODE_LENGTH))
    reason: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_session_events_session_pk", "session_pk"),)


sessions = cast(Table, SessionRow.__table__)
session_events = cast(Table, SessionEventRow.__table__)
