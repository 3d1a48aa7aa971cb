"""``SessionCleanup``: deleting old sessions (``prune``), a mixin of ``SessionRepository``.

Inherited, like the reads (sessionmgr/queries.py), so callers keep ``repo.prune(...)``; it writes
through the repository's group writer (``GroupWriter.run``: one short, retried write transaction
per batch) and
so never holds the write lock long enough to stall the group writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, select
from sqlalchemy.engine import Connection

from .checks import aware as _aware
from .errors import InvalidArgument
from .models import sessions
from .queries import SessionQueries, _db_errors
from .states import SessionStatus
from .writer import GroupWriter

_ENDED = SessionStatus.ENDED.value
_FAILED = SessionStatus.FAILED.value


class SessionCleanup(SessionQueries):
    """``prune``; the repository supplies ``_writer``."""

    _writer: GroupWriter

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
            await asyncio.sleep(0)  # a SQLite write never suspends: the loop runs between batches
