"""The admin reads: records built once from rows equal what the ORM types give, and the reads
run off the event loop on SQLite (the loop stays free while a slow read runs)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from sessionmgr import queries
from sessionmgr.models import sessions
from sessionmgr.queries import _record
from sessionmgr.reader import Reader
from sessionmgr.records import SessionFilter, SessionRecord
from sessionmgr.repository import SessionRepository
from sessionmgr.states import SessionStatus

T0 = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


def _rows() -> list[dict[str, Any]]:
    """Rows covering every column's shapes: NULLs, nested JSON, microseconds, the defaults."""
    base: dict[str, Any] = {
        "idle_window": 60.0,
        "created_at": T0,
        "updated_at": T0 + timedelta(microseconds=1),
        "last_activity_at": T0 + timedelta(seconds=2, microseconds=3),
    }
    return [
        {**base, "id": 1, "status": "pending", "metadata": {}},
        {
            **base,
            "id": 2,
            "status": "active",
            "session_id": "sess_a",
            "agent_id": "agent",
            "agent_image_url": "https://img.example/a.png",
            "agent_prompt": "be kind",
            "idle_timeout": -1,
            "room_url": "https://room.example/a",
            "control_url": "https://control.example/a",
            "max_age": 3600.5,
            "deadline": T0 + timedelta(minutes=1, microseconds=7),
            "expires_at": T0 + timedelta(hours=1),
            "metadata": {"user": "u1", "nested": {"list": [1, 2.5, None, "x"]}, "é": "ü"},
            "model": "lemon-2",
            "transport_type": "livekit",
            "updated_at": T0,  # equal to created_at: the builder shares the time
            "last_activity_at": T0,
        },
        {
            **base,
            "id": 3,
            "status": "ending",
            "session_id": "sess_b",
            "control_url": "https://control.example/b",
            "deadline": T0,
            "attempts": 2,
            "next_attempt_at": T0 + timedelta(seconds=9, microseconds=999999),
            "last_error": "timeout",
            "lease_owner": "host:1",
            "lease_until": T0 + timedelta(seconds=30),
            "metadata": None,
        },
        {
            **base,
            "id": 4,
            "status": "ended",
            "session_id": "sess_c",
            "ended_at": T0 + timedelta(minutes=5, microseconds=5),
            "end_reason": "idle",
            "remote_status": "completed",
            "cost": 0.125,
            "attempts": 1,
            "metadata": {"k": ""},
        },
    ]


async def _insert(repo: SessionRepository) -> None:
    async with repo.engine.begin() as conn:
        for row in _rows():  # one by one: each row names only the columns it sets
            await conn.execute(insert(sessions).values(row))


async def _orm_records(repo: SessionRepository) -> list[SessionRecord]:
    """What the ORM types give for every row, through the async engine (the old read path)."""
    async with repo.engine.connect() as conn:
        result = await conn.execute(select(sessions).order_by(sessions.c.id))
        return [_record(dict(row)) for row in result.mappings()]


async def test_records_built_from_rows_equal_the_orm_types(repo: SessionRepository) -> None:
    await _insert(repo)
    expected = await _orm_records(repo)
    assert [r.id for r in expected] == [1, 2, 3, 4]
    assert expected[1].metadata["nested"] == {"list": [1, 2.5, None, "x"]}
    assert expected[2].metadata == {}
    assert expected[0].transport_type == "daily"
    assert expected[1].deadline == T0 + timedelta(minutes=1, microseconds=7)

    page = await repo.list(limit=10, sort="id")
    assert page.items == expected
    assert [await repo.get(r.id) for r in expected] == expected
    assert await repo.get("sess_a") == expected[1]
    live = [r async for r in repo.iter_live(statuses=list(SessionStatus))]
    assert live == expected
    assert await repo.pending_intents() == [expected[0]]
    assert await repo.ended_without_cost(["sess_a", "sess_c"]) == []
    assert await repo.ended_before(["sess_c"], T0 + timedelta(days=1)) == [expected[3]]
    stats = await repo.stats(now=T0 + timedelta(days=1))
    assert stats.oldest_live == expected[0]  # the live row created first (id order on ties)
    # every field compared, times down to the microsecond and with their zone
    for got, want in zip(page.items, expected, strict=True):
        for name in queries._RECORD_FIELDS:
            assert getattr(got, name) == getattr(want, name), name
            if isinstance(getattr(want, name), datetime):
                assert getattr(got, name).utcoffset() == timedelta(0)
    # the records are separate objects: changing one's metadata changes no other
    page.items[1].metadata["user"] = "changed"
    assert (await repo.get(2)).metadata["user"] == "u1"


async def test_listing_by_filter_and_cursor_reads_the_same_records(
    repo: SessionRepository,
) -> None:
    await _insert(repo)
    expected = await _orm_records(repo)
    first = await repo.list(
        SessionFilter(statuses=[SessionStatus.ACTIVE, SessionStatus.ENDING]), limit=1, sort="id"
    )
    assert first.items == [expected[1]]
    assert first.next_cursor is not None
    rest = await repo.list(
        SessionFilter(statuses=[SessionStatus.ACTIVE, SessionStatus.ENDING]),
        limit=1,
        after=first.next_cursor,
        sort="id",
    )
    assert rest.items == [expected[2]]
    assert rest.next_cursor is None
    tagged = await repo.list(SessionFilter(meta={"user": "u1"}))
    assert tagged.items == [expected[1]]


@pytest.fixture
async def sqlite_repo(tmp_path: Path) -> AsyncIterator[SessionRepository]:
    repo = await SessionRepository.open(f"sqlite+aiosqlite:///{tmp_path}/s.db", upgrade=True)
    try:
        yield repo
    finally:
        await repo.close()


@pytest.fixture
def read_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of every read the repository's Reader runs in a worker."""
    seen: list[int] = []
    original = Reader._in_thread

    def spy(self: Reader, read: Any) -> Any:
        seen.append(threading.get_ident())
        return original(self, read)

    monkeypatch.setattr(Reader, "_in_thread", spy)
    return seen


async def test_sqlite_reads_run_off_the_event_loop_thread(
    sqlite_repo: SessionRepository, read_threads: list[int]
) -> None:
    """(PostgreSQL reads await asyncpg on the loop, one round trip per statement.)"""
    repo = sqlite_repo
    await _insert(repo)
    loop_thread = threading.get_ident()
    await repo.list(limit=5)
    await repo.stats(days=30, now=T0)
    await repo.get(2)
    await repo.count_live()
    await repo.known_session_ids(["sess_a"])
    assert len(read_threads) == 5
    assert loop_thread not in read_threads


async def test_the_loop_stays_responsive_while_a_slow_read_runs(
    sqlite_repo: SessionRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that cannot finish until the loop has run something else: it would hang (and
    fail the wait) if the read blocked the loop."""
    repo = sqlite_repo
    await _insert(repo)
    loop_ran = threading.Event()
    original = queries.record_from_sqlite

    def slow(row: Any) -> SessionRecord:
        assert loop_ran.wait(timeout=10), "the event loop did not run during the read"
        return original(row)

    monkeypatch.setattr(queries, "record_from_sqlite", slow)

    async def meanwhile() -> None:
        await asyncio.sleep(0)
        loop_ran.set()

    page, _ = await asyncio.gather(repo.list(limit=5), meanwhile())
    assert len(page.items) == 4
