"""Revision 0002 on a database made at 0001, with rows in it: nothing is lost, old rows read as
the daily sessions they were, and new rows keep model and transport (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import Connection, text

from sessionmgr import db
from sessionmgr.clock import FakeClock
from sessionmgr.repository import SessionRepository
from sessionmgr.states import EndReason, SessionStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _fill_at_0001(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Rows written by 0001-era code (raw SQL: today's models know columns 0001 lacks); the
    database numbers them 1, 2, 3."""
    await db.upgrade(url, "0001")
    engine = db.create_engine(url)
    try:
        async with engine.begin() as conn:
            for pk, (sid, status, reason) in enumerate(
                [("sess_a", "active", None), ("sess_b", "ended", "idle"), (None, "pending", None)],
                start=1,
            ):
                ended = T0 + timedelta(minutes=5) if status == "ended" else None
                await conn.execute(
                    text(
                        "INSERT INTO sessions (session_id, status, agent_id, idle_window,"
                        " max_age, created_at, updated_at, last_activity_at, deadline, ended_at,"
                        " end_reason, attempts, metadata, control_url)"
                        " VALUES (:sid, :status, 'agent_1', 60, 3600, :t, :t, :t, :d, :e,"
                        " :r, :attempts, :m, :c)"
                    ),
                    {
                        "sid": sid,
                        "status": status,
                        "t": _bind(url, T0),
                        "d": _bind(url, T0 + timedelta(minutes=1)) if status != "pending" else None,
                        "e": _bind(url, ended) if ended else None,
                        "r": reason,
                        "attempts": 1 if status == "ended" else 0,
                        "m": json.dumps({"bot": f"b{pk}"}),
                        "c": f"https://x/{sid}/control" if sid else None,
                    },
                )
                await conn.execute(
                    text(
                        "INSERT INTO session_events (session_pk, at, from_status, to_status,"
                        " reason) VALUES (:pk, :t, NULL, 'pending', 'intent')"
                    ),
                    {"pk": pk, "t": _bind(url, T0)},
                )
        async with engine.connect() as conn:
            before = {
                "sessions": [
                    tuple(r)
                    for r in await conn.execute(
                        text(
                            "SELECT id, session_id, status, agent_id, end_reason, attempts,"
                            " control_url FROM sessions ORDER BY id"
                        )
                    )
                ],
                "events": [
                    tuple(r)
                    for r in await conn.execute(
                        text("SELECT id, session_pk, to_status, reason FROM session_events")
                    )
                ],
            }
    finally:
        await engine.dispose()
    return before


def _bind(url: str, moment: datetime) -> object:
    """How each backend stores a time (SQLite: naive UTC text; PostgreSQL: timestamptz)."""
    if url.startswith("sqlite"):
        return moment.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return moment


async def test_upgrade_from_0001_keeps_every_row(repo_url: str):
    before = await _fill_at_0001(repo_url)
    assert await db.current(repo_url) == "0001"
    await db.upgrade(repo_url)
    assert await db.current(repo_url) == db.head_revision() == "0002"
    assert await db.check(repo_url) == []

    async with await SessionRepository.open(repo_url, clock=FakeClock(T0)) as repo:
        engine = repo.engine
        async with engine.connect() as conn:
            after_sessions = [
                tuple(r)
                for r in await conn.execute(
                    text(
                        "SELECT id, session_id, status, agent_id, end_reason, attempts,"
                        " control_url FROM sessions ORDER BY id"
                    )
                )
            ]
            after_events = [
                tuple(r)
                for r in await conn.execute(
                    text("SELECT id, session_pk, to_status, reason FROM session_events")
                )
            ]
        assert after_sessions == before["sessions"]
        assert after_events == before["events"]
        a = await repo.get("sess_a")
        assert (a.status, a.model, a.transport_type) == (SessionStatus.ACTIVE, None, "daily")
        assert a.metadata == {"bot": "b1"}
        assert a.created_at == T0
        b = await repo.get("sess_b")
        assert b.end_reason is EndReason.IDLE
        # the old rows still move through the state machine, and new rows keep the new fields
        assert await repo.begin_end(a.id, owner="me", lease=60, reason=EndReason.MANUAL)
        new = await repo.record_intent(
            idle_window=60, max_age=None, model="m2", transport_type="livekit"
        )
        assert (new.model, new.transport_type) == ("m2", "livekit")
        assert new.id == 4


async def test_downgrade_to_0001_and_back(repo_url: str):
    await db.upgrade(repo_url)

    def down(conn: Connection) -> None:
        command.downgrade(db.alembic_config(conn), "0001")

    engine = db.migration_engine(repo_url)
    try:
        await db.run_migrations(engine, down)
    finally:
        await engine.dispose()
    assert await db.current(repo_url) == "0001"
    await db.upgrade(repo_url)
    assert await db.check(repo_url) == []
