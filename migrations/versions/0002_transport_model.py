"""Which transport a session used and which LemonSlice model it runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Both columns are added in place (no table rebuild, so a large SQLite file migrates in
milliseconds): ``model`` is nullable (the server's default model when not given) and
``transport_type`` has a server default, so every row written before this revision reads as the
``daily`` session it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("model", sa.String(length=255), nullable=True))
    op.add_column(
        "sessions",
        sa.Column("transport_type", sa.String(length=32), server_default="daily", nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("transport_type")
        batch.drop_column("model")
