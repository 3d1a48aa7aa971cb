"""The sessions and session_events tables.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Value lists are spelled out (not imported from sessionmgr.states) so this revision keeps meaning
what it meant when it shipped; a new status or end reason needs a new revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "('pending', 'active', 'ending', 'ended', 'failed')"
END_REASONS = (
    "('idle', 'max_age', 'manual', 'shutdown', 'remote_completed', 'remote_timed_out',"
    " 'remote_failed', 'gone', 'orphan', 'create_rejected', 'create_unknown')"
)
FINAL = "('ended', 'failed')"
UNSTARTED = "('pending', 'active')"

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _time(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=True),
        sa.Column("agent_image_url", sa.Text(), nullable=True),
        sa.Column("agent_prompt", sa.Text(), nullable=True),
        sa.Column("idle_timeout", sa.Integer(), nullable=True),
        sa.Column("room_url", sa.Text(), nullable=True),
        sa.Column("control_url", sa.Text(), nullable=True),
        sa.Column("idle_window", sa.Double(), nullable=False),
        sa.Column("max_age", sa.Double(), nullable=True),
        _time("created_at", nullable=False),
        _time("updated_at", nullable=False),
        _time("last_activity_at", nullable=False),
        _time("deadline"),
        _time("expires_at"),
        _time("ended_at"),
        sa.Column("end_reason", sa.String(length=32), nullable=True),
        sa.Column("remote_status", sa.String(length=32), nullable=True),
        sa.Column("cost", sa.Double(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        _time("next_attempt_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        _time("lease_until"),
        sa.Column("metadata", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.CheckConstraint(f"status IN {STATUSES}", name=op.f("ck_sessions_status")),
        sa.CheckConstraint(
            f"end_reason IS NULL OR end_reason IN {END_REASONS}",
            name=op.f("ck_sessions_end_reason"),
        ),
        sa.CheckConstraint(
            f"(status IN {FINAL} AND ended_at IS NOT NULL)"
            f" OR (status NOT IN {FINAL} AND ended_at IS NULL)",
            name=op.f("ck_sessions_ended_at"),
        ),
        sa.CheckConstraint(
            "status <> 'active' OR session_id IS NOT NULL",
            name=op.f("ck_sessions_active_session_id"),
        ),
        sa.CheckConstraint(
            f"attempts >= 0 AND (status NOT IN {UNSTARTED} OR attempts = 0)"
            " AND (status <> 'ending' OR attempts >= 1)",
            name=op.f("ck_sessions_attempts"),
        ),
        sa.CheckConstraint("idle_window > 0", name=op.f("ck_sessions_idle_window")),
        sa.CheckConstraint("max_age IS NULL OR max_age > 0", name=op.f("ck_sessions_max_age")),
    )
    op.create_index("ix_sessions_session_id", "sessions", ["session_id"], unique=True)
    op.create_index("ix_sessions_status_deadline", "sessions", ["status", "deadline"])
    op.create_index(
        "ix_sessions_status_lease_until", "sessions", ["status", "lease_until", "next_attempt_at"]
    )
    op.create_index("ix_sessions_status_created_at", "sessions", ["status", "created_at"])
    op.create_index("ix_sessions_created_at", "sessions", ["created_at", "id"])
    op.create_index("ix_sessions_ended_at", "sessions", ["ended_at"])

    op.create_table(
        "session_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("session_pk", BIG_ID, nullable=False),
        _time("at", nullable=False),
        sa.Column("from_status", sa.String(length=32), nullable=True),
        sa.Column("to_status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_events")),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["sessions.id"],
            name=op.f("fk_session_events_session_pk_sessions"),
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_session_events_session_pk", "session_events", ["session_pk"])


def downgrade() -> None:
    op.drop_table("session_events")
    op.drop_table("sessions")
