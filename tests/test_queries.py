"""The admin reads: records built once from rows equal what the ORM types give, and the reads
run off the event loop on SQLite (the loop stays free while a slow read runs)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from sessionmgr import queries, reader
from sessionmgr.clock import FakeClock
from sessionmgr.errors import DatabaseError
from sessionmgr.models import sessions
from sessionmgr.queries import _record
from sessionmgr.reader import Reader
from sessionmgr.records import SessionFilter, SessionRecord, build_record
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
    assert [r async for r in repo.iter_live(statuses=[])] == []
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
    for name in ("_in_thread", "_select_in_thread"):  # run(read) and prepared selects
        original = getattr(Reader, name)

        def spy(self: Reader, *args: Any, _original: Any = original) -> Any:
            seen.append(threading.get_ident())
            return _original(self, *args)

        monkeypatch.setattr(Reader, name, spy)
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


# --- prepared listings: one statement per shape, each call's values bound ------------------


def _many_rows() -> list[dict[str, Any]]:
    """24 rows with ties in created_at, NULL and equal deadlines and ended_at, three agents and
    two tag values: every sort and filter has ties and nulls to order."""
    rows = []
    for i in range(1, 25):
        status = ("active", "ending", "ended", "failed")[i % 4]
        created = T0 + timedelta(minutes=i // 2)  # pairs share a creation time
        final = status in ("ended", "failed")
        rows.append(
            {
                "id": i,
                "status": status,
                "session_id": f"sess_{i}",
                "agent_id": f"agent_{i % 3}",
                "idle_window": 60.0,
                "created_at": created,
                "updated_at": created,
                "last_activity_at": created + timedelta(seconds=i % 5),
                "deadline": None if i % 3 == 0 else T0 + timedelta(hours=i % 4),
                "ended_at": T0 + timedelta(hours=i % 3) if final else None,
                "end_reason": "idle" if final else None,
                "attempts": 1 if status in ("ending", "ended") else 0,
                "metadata": {"user": f"u{i % 2}"},
            }
        )
    return rows


def _in_order(records: list[SessionRecord], sort: str) -> list[int]:
    """The ids of ``records`` in ``sort``'s documented order: by the field (nulls last), then id;
    ``-`` reverses both but keeps the nulls last."""
    spec = queries.SORTS[sort]
    if spec.column is None:
        return sorted((r.id for r in records), reverse=spec.descending)
    field = spec.column
    valued = [r for r in records if getattr(r, field) is not None]
    nulls = [r for r in records if getattr(r, field) is None]
    valued.sort(key=lambda r: (getattr(r, field), r.id), reverse=spec.descending)
    nulls.sort(key=lambda r: r.id, reverse=spec.descending)
    return [r.id for r in valued + nulls]


async def _all_pages(repo: SessionRepository, flt: SessionFilter, sort: str) -> list[int]:
    ids: list[int] = []
    after = None
    for _ in range(30):
        page = await repo.list(flt, limit=4, after=after, sort=sort)
        ids += [r.id for r in page.items]
        if page.next_cursor is None:
            return ids
        after = page.next_cursor
    raise AssertionError("the pages never ended")


async def test_every_sort_filter_and_cursor_reads_the_right_pages(
    repo: SessionRepository, repo_clock: FakeClock
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(insert(sessions), _many_rows())
    everything = (await repo.list(limit=100, sort="id")).items
    assert [r.id for r in everything] == list(range(1, 25))
    repo_clock.advance((T0 + timedelta(minutes=8) - repo_clock.now()).total_seconds())
    idle_since = T0 + timedelta(minutes=8) - timedelta(seconds=200)
    filters: list[tuple[SessionFilter, Any]] = [
        (SessionFilter(), lambda r: True),
        (
            SessionFilter(statuses=[SessionStatus.ACTIVE, SessionStatus.ENDED]),
            lambda r: r.status in (SessionStatus.ACTIVE, SessionStatus.ENDED),
        ),
        (
            SessionFilter(statuses=[SessionStatus.ENDING]),
            lambda r: r.status is SessionStatus.ENDING,
        ),
        (SessionFilter(agent_id="agent_1"), lambda r: r.agent_id == "agent_1"),
        (
            SessionFilter(
                created_after=T0 + timedelta(minutes=3), created_before=T0 + timedelta(minutes=9)
            ),
            lambda r: T0 + timedelta(minutes=3) <= r.created_at < T0 + timedelta(minutes=9),
        ),
        (SessionFilter(meta={"user": "u1"}), lambda r: r.metadata["user"] == "u1"),
        (
            SessionFilter(agent_id="agent_2", meta={"user": "u0"}),
            lambda r: r.agent_id == "agent_2" and r.metadata["user"] == "u0",
        ),
        (SessionFilter(idle_for=200), lambda r: r.last_activity_at <= idle_since),
    ]
    for flt, wanted in filters:
        matching = [r for r in everything if wanted(r)]
        assert matching, flt
        for sort in queries.SORTS:
            assert await _all_pages(repo, flt, sort) == _in_order(matching, sort), (flt, sort)
    # the same shape with other values reads other rows
    for agent in ("agent_0", "agent_1", "agent_2"):
        page = await repo.list(SessionFilter(agent_id=agent), limit=100, sort="id")
        assert [r.id for r in page.items] == [r.id for r in everything if r.agent_id == agent]
    assert [r.id for r in (await repo.list(limit=3, sort="id")).items] == [1, 2, 3]
    assert [r.id for r in (await repo.list(limit=5, sort="id")).items] == [1, 2, 3, 4, 5]
    assert (await repo.get("sess_7")).id == 7
    assert (await repo.get("7")).id == 7
    assert await repo.find("sess_99") is None


async def test_reads_from_many_tasks_at_once_each_get_their_own_rows(
    repo: SessionRepository,
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(insert(sessions), _many_rows())

    async def one(i: int) -> tuple[int, list[int], int]:
        page = await repo.list(SessionFilter(agent_id=f"agent_{i % 3}"), limit=2, sort="id")
        record = await repo.get(i)
        return i, [r.id for r in page.items], record.id

    results = await asyncio.gather(*(one(i) for i in range(1, 25)))
    for i, listed, got in results:
        first = [n for n in range(1, 25) if n % 3 == i % 3][:2]
        assert (listed, got) == (first, i)


async def test_a_closed_repository_refuses_reads(repo: SessionRepository) -> None:
    await repo.list(limit=1)
    await repo.close()
    for read in (repo.list(limit=1), repo.get(1), repo.stats(), repo.count_live()):
        with pytest.raises(DatabaseError, match="closed"):
            await read


async def test_prepared_shapes_are_bounded(
    sqlite_repo: SessionRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tag names are part of a listing's shape: a caller inventing new ones cannot grow the
    cache without bound."""
    monkeypatch.setattr(reader, "MAX_SHAPES", 5)
    for i in range(12):
        assert (await sqlite_repo.list(SessionFilter(meta={f"tag{i}": "x"}))).items == []
    assert len(sqlite_repo._reader._shapes) == 5


def test_a_record_built_for_a_read_is_an_ordinary_record() -> None:
    values = [getattr(_SAMPLE, name) for name in queries._RECORD_FIELDS]
    built = build_record(values)
    assert type(built) is SessionRecord
    assert built == _SAMPLE
    assert repr(built) == repr(_SAMPLE)
    assert dataclasses.replace(built, id=9) == dataclasses.replace(_SAMPLE, id=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.id = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(built)  # as any record: its metadata is a dict
    with pytest.raises(ValueError, match="not enough values"):
        build_record(values[:-1])


_SAMPLE = SessionRecord(
    id=1,
    session_id="sess",
    status=SessionStatus.ACTIVE,
    agent_id="agent",
    agent_image_url=None,
    agent_prompt=None,
    idle_timeout=60,
    room_url=None,
    control_url="https://control.example/x",
    idle_window=60.0,
    max_age=None,
    created_at=T0,
    updated_at=T0,
    last_activity_at=T0,
    deadline=T0,
    ended_at=None,
    end_reason=None,
    remote_status=None,
    cost=None,
    attempts=0,
    next_attempt_at=None,
    last_error=None,
    lease_owner=None,
    lease_until=None,
    metadata={"user": "u"},
)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', ' {"a": 1} ', '{"a":[1,{"b":null}],"é":"\\u00fc"}', "[]", "null", "{}"],
)
def test_metadata_text_decodes_as_json_loads_does(text: str) -> None:
    assert queries._json_object(text) == dict(json.loads(text) or {})


@pytest.mark.parametrize("text", ["{", '{"a": 1}x', ""])
def test_bad_metadata_text_fails_as_json_loads_does(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        queries._json_object(text)
