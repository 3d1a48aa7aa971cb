"""SessionRepository on SQLite and PostgreSQL: every transition (and lost races), claims and
leases, admin reads, prune, and secrets that never reach the database."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, func, select

from sessionmgr.clock import FakeClock
from sessionmgr.errors import DatabaseError, InvalidArgument, SessionNotFound
from sessionmgr.models import session_events
from sessionmgr.queries import SORTS
from sessionmgr.records import SessionFilter, SessionRecord
from sessionmgr.repository import SessionRepository
from sessionmgr.states import EndReason, SessionStatus

ACTIVE, ENDING, ENDED = SessionStatus.ACTIVE, SessionStatus.ENDING, SessionStatus.ENDED
PENDING, FAILED = SessionStatus.PENDING, SessionStatus.FAILED
IDLE = 60.0  # seconds, the idle window of most test sessions
LEASE = 30.0  # seconds


def clock_of(repo: SessionRepository) -> FakeClock:
    return cast(FakeClock, repo.clock)


async def started(
    repo: SessionRepository, sid: str, *, idle: float = IDLE, max_age: float | None = 3600.0, **kw
) -> SessionRecord:
    """A session through its normal start: intent, then active."""
    intent = await repo.record_intent(idle_window=idle, max_age=max_age, **kw)
    record = await repo.mark_active(intent.id, session_id=sid, room_url="r", control_url="c")
    assert record is not None
    return record


def database_bytes(directory: Path, name: str) -> bytes:
    """The database file and its WAL/SHM companions, as the disk holds them."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob(f"{name}*")))


async def event_trail(repo: SessionRepository, key: int | str) -> list[tuple[str | None, str]]:
    return [
        (e.from_status.value if e.from_status else None, e.to_status.value)
        for e in await repo.events(key)
    ]


# --- transitions ---------------------------------------------------------------------------------


async def test_intent_is_pending_with_redacted_metadata(repo: SessionRepository):
    intent = await repo.record_intent(
        agent_id="a1",
        agent_prompt="be nice",
        idle_timeout=120,
        idle_window=IDLE,
        max_age=600,
        metadata={"user": "ada", "daily_token": "tok-123"},
    )
    assert intent.status is PENDING
    assert intent.session_id is None
    assert intent.deadline is None
    assert intent.created_at == repo.clock.now() == intent.last_activity_at
    assert (intent.agent_id, intent.idle_timeout, intent.max_age) == ("a1", 120, 600.0)
    assert intent.metadata == {"user": "ada", "daily_token": "***"}
    assert await repo.get(intent.id) == intent
    assert await event_trail(repo, intent.id) == [(None, "pending")]


async def test_mark_active_sets_activity_and_deadline(repo: SessionRepository):
    intent = await repo.record_intent(idle_window=IDLE, max_age=3600)
    clock_of(repo).advance(2)
    record = await repo.mark_active(intent.id, session_id="s1", room_url="r", control_url="c")
    assert record is not None
    assert record.status is ACTIVE
    assert record.session_id == "s1"
    assert record.control_url == "c"
    assert record.room_url == "r"
    assert record.last_activity_at == repo.clock.now()
    assert record.deadline == repo.clock.now() + timedelta(seconds=IDLE)
    assert await repo.get("s1") == record
    assert await event_trail(repo, "s1") == [(None, "pending"), ("pending", "active")]


async def test_deadline_is_capped_by_max_age(repo: SessionRepository):
    intent = await repo.record_intent(idle_window=IDLE, max_age=100)
    clock_of(repo).advance(70)
    record = await repo.mark_active(intent.id, session_id="s1", room_url=None, control_url="c")
    assert record is not None
    assert record.deadline == intent.created_at + timedelta(seconds=100)


async def test_mark_active_loses_to_an_earlier_transition(repo: SessionRepository):
    intent = await repo.record_intent(idle_window=IDLE, max_age=None)
    assert await repo.mark_failed(intent.id, reason=EndReason.CREATE_UNKNOWN, error="timeout")
    late = await repo.mark_active(intent.id, session_id="s1", room_url=None, control_url="c")
    assert late is None
    assert (await repo.get(intent.id)).status is FAILED
    assert await repo.mark_active(9999, session_id="s2", room_url=None, control_url="c") is None


async def test_mark_failed_only_from_pending(repo: SessionRepository):
    intent = await repo.record_intent(idle_window=IDLE, max_age=None)
    assert await repo.mark_failed(intent.id, reason=EndReason.CREATE_REJECTED, error="HTTP 400")
    failed = await repo.get(intent.id)
    assert failed.status is FAILED
    assert failed.end_reason is EndReason.CREATE_REJECTED
    assert failed.ended_at == repo.clock.now()
    assert failed.last_error == "HTTP 400"
    assert not await repo.mark_failed(intent.id, reason=EndReason.CREATE_REJECTED)
    record = await started(repo, "s1")
    assert not await repo.mark_failed(record.id, reason=EndReason.CREATE_REJECTED)


async def test_concurrent_actors_exactly_one_wins(repo: SessionRepository, migrated_url: str):
    """Two repositories (two processes' worth of connections) race on every intent."""
    other = await SessionRepository.open(migrated_url, clock=repo.clock)
    try:
        intents = [await repo.record_intent(idle_window=IDLE, max_age=None) for _ in range(10)]
        results = await asyncio.gather(
            *(
                repo.mark_active(i.id, session_id=f"s{i.id}", room_url=None, control_url="c")
                for i in intents
            ),
            *(other.mark_failed(i.id, reason=EndReason.CREATE_UNKNOWN) for i in intents),
        )
    finally:
        await other.close()
    activated, failed = results[:10], results[10:]
    for intent, won_active, won_failed in zip(intents, activated, failed, strict=True):
        assert (won_active is not None) != bool(won_failed), intent.id
        trail = await event_trail(repo, intent.id)
        assert len(trail) == 2  # one transition recorded, never both


async def test_adopt_inserts_once_then_returns_the_existing_row(repo: SessionRepository):
    first, created = await repo.adopt(
        session_id="x1", control_url="c", idle_window=IDLE, max_age=600, metadata={"k": "v"}
    )
    assert created
    assert first.status is ACTIVE
    assert first.session_id == "x1"
    assert first.deadline == repo.clock.now() + timedelta(seconds=IDLE)
    again, created_again = await repo.adopt(
        session_id="x1", control_url="other", idle_window=5, max_age=None
    )
    assert not created_again
    assert again == first
    both = await asyncio.gather(
        *(
            repo.adopt(session_id="x2", control_url="c", idle_window=IDLE, max_age=None)
            for _ in "ab"
        )
    )
    assert sorted(created for _, created in both) == [False, True]
    assert both[0][0].id == both[1][0].id


async def test_adopt_resolves_a_pending_intent_in_place(repo: SessionRepository):
    intent = await repo.record_intent(idle_window=IDLE, max_age=600, metadata={"user": "ada"})
    clock_of(repo).advance(5)
    record, created = await repo.adopt(
        session_id="x1",
        control_url="c",
        idle_window=IDLE,
        max_age=600,
        metadata={"found": "reconcile"},
        pending_pk=intent.id,
    )
    assert created
    assert record.id == intent.id
    assert record.status is ACTIVE
    assert record.created_at == intent.created_at
    assert record.metadata == {"user": "ada", "found": "reconcile"}
    assert await event_trail(repo, intent.id) == [(None, "pending"), ("pending", "active")]
    # the intent is no longer pending: adopting another session for it inserts a new row
    other, created = await repo.adopt(
        session_id="x2", control_url="c", idle_window=IDLE, max_age=None, pending_pk=intent.id
    )
    assert created
    assert other.id != intent.id


async def test_adopt_of_an_old_session_is_due_for_max_age(repo: SessionRepository):
    long_ago = repo.clock.now() - timedelta(hours=2)
    record, _ = await repo.adopt(
        session_id="old", control_url="c", idle_window=IDLE, max_age=3600, created_at=long_ago
    )
    assert record.created_at == long_ago
    assert record.deadline == long_ago + timedelta(hours=1)
    [claimed] = await repo.claim_due(owner="r", limit=10, lease=LEASE)
    assert claimed.end_reason is EndReason.MAX_AGE


async def test_touches_are_buffered_and_written_once_per_session(repo: SessionRepository):
    a, b = await started(repo, "a"), await started(repo, "b")
    clock = clock_of(repo)
    for _ in range(100):
        clock.advance(0.1)
        repo.touch("a")
    repo.touch("b", at=clock.now() - timedelta(seconds=5))
    repo.touch("unknown")
    assert (await repo.get("a")).last_activity_at == a.last_activity_at  # nothing written yet
    assert await repo.flush_touches() == 2
    assert await repo.flush_touches() == 0
    touched = await repo.get("a")
    assert touched.last_activity_at == clock.now()
    assert touched.deadline == clock.now() + timedelta(seconds=IDLE)
    assert (await repo.get("b")).last_activity_at == b.last_activity_at + timedelta(seconds=5)
    assert await event_trail(repo, "a") == [(None, "pending"), ("pending", "active")]


async def test_a_touch_never_moves_activity_back_or_touches_ended(repo: SessionRepository):
    record = await started(repo, "a")
    clock_of(repo).advance(10)
    repo.touch("a")
    repo.touch("a", at=record.created_at)  # older: ignored
    assert await repo.flush_touches() == 1
    assert (await repo.get("a")).last_activity_at == repo.clock.now()
    await repo.claim_due(owner="r", limit=1, lease=LEASE, now=repo.clock.now() + timedelta(hours=2))
    repo.touch("a")
    assert await repo.flush_touches() == 0


async def test_touch_many_reports_only_active_sessions(repo: SessionRepository):
    await started(repo, "a")
    await started(repo, "b")
    await repo.begin_end("b", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    clock_of(repo).advance(3)
    assert await repo.touch_many(["a", "b", "nope"]) == {"a"}
    assert (await repo.get("a")).last_activity_at == repo.clock.now()
    assert await repo.touch_many([]) == set()


async def test_a_big_flush_is_written_a_chunk_per_transaction(
    repo: SessionRepository, monkeypatch: pytest.MonkeyPatch
):
    """SQLite writes run on the event loop: a flush of many sessions must not hold it for its
    whole length, yet every touch is written."""
    import sessionmgr.repository as repository_module

    for sid in "abcde":
        await started(repo, sid)
    clock_of(repo).advance(7)
    for sid in "abcde":
        repo.touch(sid)
    monkeypatch.setattr(repository_module, "LOOKUP_CHUNK", 2)
    order: list[str] = []
    real_run = repo.writer.run

    async def counting(fn: Any) -> Any:
        order.append("chunk")
        return await real_run(fn)

    monkeypatch.setattr(repo.writer, "run", counting)
    asyncio.get_running_loop().call_soon(order.append, "other task")
    assert await repo.flush_touches() == 5
    # three transactions, and the loop ran other work before the last (a write never suspends)
    assert order.count("chunk") == 3
    assert order.index("other task") < len(order) - 1
    for sid in "abcde":
        assert (await repo.get(sid)).last_activity_at == repo.clock.now()


async def test_failed_flush_keeps_touches_for_the_next_one(
    repo: SessionRepository, monkeypatch: pytest.MonkeyPatch
):
    await started(repo, "a")
    clock_of(repo).advance(7)
    repo.touch("a")
    real_run = repo.writer.run

    async def broken(fn: Any) -> Any:
        raise DatabaseError("disk on fire")

    monkeypatch.setattr(repo.writer, "run", broken)
    with pytest.raises(DatabaseError):
        await repo.flush_touches()
    monkeypatch.setattr(repo.writer, "run", real_run)
    assert await repo.flush_touches() == 1
    assert (await repo.get("a")).last_activity_at == repo.clock.now()


@pytest.mark.parametrize("migrated_url", ["sqlite"], indirect=True)  # the choice is SQLite's
@pytest.mark.parametrize("update_from", [True, False], ids=["update-from", "executemany"])
async def test_a_flush_moves_only_active_rows_forward_on_either_sqlite_statement(
    repo: SessionRepository, monkeypatch: pytest.MonkeyPatch, update_from: bool
):
    """SQLite >= 3.33 writes a chunk as one UPDATE ... FROM (VALUES ...); older ones by
    executemany. Both write the same rows and count only the rows they changed."""
    import sessionmgr.repository as repository_module

    assert repo.dialect == "sqlite"
    monkeypatch.setattr(repository_module, "_UPDATE_FROM", update_from)
    monkeypatch.setattr(repository_module, "LOOKUP_CHUNK", 3)
    for sid in ("a", "b", "c", "d", "e"):
        await started(repo, sid, max_age=100.0 if sid == "e" else None)
    await repo.begin_end("c", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    clock = clock_of(repo)
    clock.advance(90)
    repo.touch("b", at=clock.now() - timedelta(seconds=95))  # before its last activity: ignored
    for sid in ("a", "c", "d", "e"):
        repo.touch(sid)
    assert await repo.flush_touches() == 3  # a, d, e: b is older, c is ending
    for sid in ("a", "d"):
        touched = await repo.get(sid)
        assert (touched.last_activity_at, touched.deadline) == (
            clock.now(),
            clock.now() + timedelta(seconds=IDLE),
        )
        assert touched.updated_at == clock.now()
    capped = await repo.get("e")
    assert capped.deadline == capped.created_at + timedelta(seconds=100)
    assert (await repo.get("b")).last_activity_at == capped.created_at
    assert (await repo.get("c")).last_activity_at == capped.created_at
    assert await repo.touch_many(["a", "b", "c"]) == {"a", "b"}


async def test_a_flush_finds_rows_by_index_never_by_scan(tmp_path: Path):
    """A touch flush's cost does not grow with the table: the read goes by the session_id
    index (not the status index, which scanned every active row per chunk) and the UPDATE by
    rowid."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'plan.db'}"
    async with await SessionRepository.open(url, clock=FakeClock(), upgrade=True) as repo:
        await started(repo, "a")
        clock_of(repo).advance(1)
        seen: list[tuple[str, Any]] = []

        def capture(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.startswith(("SELECT", "UPDATE")):
                seen.append((statement, params))

        event.listen(repo.writer.sync_engine, "before_cursor_execute", capture)
        repo.touch("a")
        assert await repo.flush_touches() == 1
    assert [statement.split()[0] for statement, _ in seen] == ["SELECT", "UPDATE"]
    with sqlite3.connect(tmp_path / "plan.db") as conn:
        read, write = (
            [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            for sql, params in seen
        )
    assert not [step for step in read + write if step.startswith("SCAN sessions")], read + write
    assert any("ix_sessions_session_id" in step for step in read), read
    assert any("INTEGER PRIMARY KEY" in step for step in write), write


# --- claims and leases ---------------------------------------------------------------------------


async def test_claim_takes_due_sessions_once_with_the_right_reason(repo: SessionRepository):
    idle = await started(repo, "idle", idle=30, max_age=3600)
    old = await started(repo, "old", idle=600, max_age=40)
    fresh = await started(repo, "fresh", idle=600, max_age=None)
    clock_of(repo).advance(45)
    claimed = await repo.claim_due(owner="r1", limit=10, lease=LEASE)
    by_sid = {r.session_id: r for r in claimed}
    assert set(by_sid) == {"idle", "old"}
    assert by_sid["idle"].end_reason is EndReason.IDLE
    assert by_sid["old"].end_reason is EndReason.MAX_AGE
    for record in claimed:
        assert record.status is ENDING
        assert record.attempts == 1
        assert record.lease_owner == "r1"
        assert record.lease_until == repo.clock.now() + timedelta(seconds=LEASE)
    assert await repo.claim_due(owner="r2", limit=10, lease=LEASE) == []
    assert (await repo.get(fresh.id)).status is ACTIVE
    assert await event_trail(repo, idle.id) == [
        (None, "pending"),
        ("pending", "active"),
        ("active", "ending"),
    ]
    assert (await repo.events(old.id))[-1].reason == "max_age"


async def test_claim_respects_the_limit_most_overdue_first(repo: SessionRepository):
    for i in range(5):
        await started(repo, f"s{i}", idle=10 + i)
    clock_of(repo).advance(100)
    first = await repo.claim_due(owner="r", limit=2, lease=LEASE)
    assert [r.session_id for r in first] == ["s0", "s1"]
    rest = await repo.claim_due(owner="r", limit=10, lease=LEASE)
    assert [r.session_id for r in rest] == ["s2", "s3", "s4"]
    assert await repo.claim_due(owner="r", limit=0, lease=LEASE) == []


async def test_an_expired_lease_is_taken_over(repo: SessionRepository):
    record = await started(repo, "s")
    clock = clock_of(repo)
    clock.advance(IDLE + 1)
    [mine] = await repo.claim_due(owner="dead", limit=5, lease=LEASE)
    clock.advance(LEASE - 1)
    assert await repo.claim_due(owner="heir", limit=5, lease=LEASE) == []
    clock.advance(1)
    [taken] = await repo.claim_due(owner="heir", limit=5, lease=LEASE)
    assert taken.id == record.id
    assert taken.lease_owner == "heir"
    assert taken.attempts == 2
    assert taken.end_reason is mine.end_reason
    assert not await repo.mark_ended(record.id, owner="dead")  # the dead owner lost it
    assert await repo.mark_ended(record.id, owner="heir")
    assert await event_trail(repo, record.id) == [
        (None, "pending"),
        ("pending", "active"),
        ("active", "ending"),
        ("ending", "ending"),
        ("ending", "ended"),
    ]


async def test_reschedule_releases_the_lease_until_the_retry_time(repo: SessionRepository):
    record = await started(repo, "s")
    clock = clock_of(repo)
    clock.advance(IDLE)
    await repo.claim_due(owner="r1", limit=5, lease=LEASE)
    retry_at = clock.now() + timedelta(seconds=10)
    assert not await repo.reschedule(record.id, owner="r2", error="nope", retry_at=retry_at)
    assert await repo.reschedule(record.id, owner="r1", error="HTTP 503", retry_at=retry_at)
    row = await repo.get(record.id)
    assert row.lease_owner is None
    assert row.lease_until is None
    assert row.next_attempt_at == retry_at
    assert row.last_error == "HTTP 503"
    clock.advance(9)
    assert await repo.claim_due(owner="r2", limit=5, lease=LEASE) == []
    clock.advance(1)
    [again] = await repo.claim_due(owner="r2", limit=5, lease=LEASE)
    assert again.attempts == 2
    assert again.lease_owner == "r2"


async def test_mark_ended_by_owner_or_with_no_live_lease(repo: SessionRepository):
    a, b = await started(repo, "a"), await started(repo, "b")
    clock = clock_of(repo)
    clock.advance(IDLE)
    await repo.claim_due(owner="r", limit=5, lease=LEASE)
    assert not await repo.mark_ended(a.id, owner=None)  # the lease is live
    assert await repo.mark_ended(a.id, owner="r", remote_status="COMPLETED", cost=1.25)
    ended = await repo.get(a.id)
    assert ended.status is ENDED
    assert ended.end_reason is EndReason.IDLE
    assert (ended.remote_status, ended.cost, ended.ended_at) == ("COMPLETED", 1.25, clock.now())
    assert not await repo.mark_ended(a.id, owner="r")  # once
    clock.advance(LEASE)
    assert await repo.mark_ended(b.id, owner=None, reason=EndReason.GONE)
    assert (await repo.get(b.id)).end_reason is EndReason.GONE
    active = await started(repo, "c")
    assert not await repo.mark_ended(active.id, owner=None)  # not ending


async def test_begin_end_from_every_state(repo: SessionRepository):
    active = await started(repo, "active")
    pending = await repo.record_intent(idle_window=IDLE, max_age=None)
    manual = await repo.begin_end("active", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert manual is not None
    assert manual.status is ENDING
    assert manual.id == active.id
    assert manual.end_reason is EndReason.MANUAL
    assert manual.attempts == 1
    assert (
        await repo.begin_end(active.id, owner="you", lease=LEASE, reason=EndReason.MANUAL) is None
    )
    # a pending intent has no session to end: its creator (or recovery) resolves it
    assert (
        await repo.begin_end(str(pending.id), owner="me", lease=LEASE, reason=EndReason.ORPHAN)
        is None
    )
    assert (await repo.get(pending.id)).status is SessionStatus.PENDING
    clock_of(repo).advance(LEASE)
    taken = await repo.begin_end(active.id, owner="you", lease=LEASE, reason=EndReason.SHUTDOWN)
    assert taken is not None
    assert taken.lease_owner == "you"
    assert taken.end_reason is EndReason.MANUAL  # kept from the first claim
    assert await repo.mark_ended(active.id, owner="you")
    assert await repo.begin_end(active.id, owner="me", lease=LEASE, reason=EndReason.MANUAL) is None
    assert await repo.begin_end("nope", owner="me", lease=LEASE, reason=EndReason.MANUAL) is None


async def test_renew_and_release_leases(repo: SessionRepository):
    for sid in "abc":
        await started(repo, sid)
    clock = clock_of(repo)
    clock.advance(IDLE)
    mine = await repo.claim_due(owner="me", limit=2, lease=LEASE)
    theirs = await repo.claim_due(owner="them", limit=2, lease=LEASE)
    clock.advance(LEASE - 1)
    pks = [r.id for r in mine + theirs]
    assert await repo.renew_leases(pks, owner="me", lease=LEASE) == 2
    assert await repo.renew_leases([], owner="me", lease=LEASE) == 0
    clock.advance(2)
    assert [r.lease_owner for r in await repo.claim_due(owner="x", limit=5, lease=1)] == ["x"]
    assert await repo.release_leases("me") == 2
    taken = await repo.claim_due(owner="x", limit=5, lease=LEASE)
    assert {r.id for r in taken} == {r.id for r in mine}  # at once, no lease to wait out


async def test_mark_ended_remote_and_record_remote(repo: SessionRepository):
    a, b = await started(repo, "a"), await started(repo, "b")
    await repo.record_remote(a.id, remote_status="ACTIVE", cost=0.5)
    noted = await repo.get(a.id)
    assert (noted.status, noted.remote_status, noted.cost) == (ACTIVE, "ACTIVE", 0.5)
    assert await repo.mark_ended_remote(
        a.id, reason=EndReason.REMOTE_COMPLETED, remote_status="COMPLETED", cost=None
    )
    ended = await repo.get(a.id)
    assert ended.status is ENDED
    assert ended.cost == 0.5
    assert ended.remote_status == "COMPLETED"
    await repo.begin_end(b.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert not await repo.mark_ended_remote(
        b.id, reason=EndReason.REMOTE_TIMED_OUT, remote_status="TIMED_OUT", cost=2.0
    )  # someone holds a live lease on it
    clock_of(repo).advance(LEASE)
    assert await repo.mark_ended_remote(
        b.id, reason=EndReason.REMOTE_TIMED_OUT, remote_status="TIMED_OUT", cost=2.0
    )
    assert (await repo.get(b.id)).cost == 2.0


async def test_claim_reads_only_index_ranges(tmp_path: Path):
    """The claim's cost does not grow with the table: SQLite's plan has no table scan."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'plan.db'}"
    async with await SessionRepository.open(url, clock=FakeClock(), upgrade=True) as repo:
        seen: list[str] = []
        # the claim runs on the writer's driver connection: SQLite's own trace sees it, with
        # its parameters in place
        raw = repo.writer._connection().connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        raw.set_trace_callback(lambda sql: seen.append(sql) if sql.startswith("UPDATE") else None)
        await repo.claim_due(owner="r", limit=10, lease=LEASE)
    with sqlite3.connect(tmp_path / "plan.db") as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + seen[0])]
    assert not [step for step in plan if step.startswith("SCAN")], plan
    assert sum("ix_sessions_status_deadline" in s for s in plan) == 1
    assert sum("ix_sessions_status_lease_until" in s for s in plan) == 3


# --- group commit --------------------------------------------------------------------------------


async def test_concurrent_writes_share_transactions_and_are_durable(
    repo: SessionRepository, migrated_url: str
):
    before = repo.writer.batches
    intents = await asyncio.gather(
        *(repo.record_intent(idle_window=IDLE, max_age=None) for _ in range(200))
    )
    assert len({i.id for i in intents}) == 200
    assert repo.writer.batches - before < 20  # far fewer transactions than writes
    async with await SessionRepository.open(migrated_url) as reader:  # committed for everyone
        assert len((await reader.list(limit=1000)).items) == 200


async def test_ops_on_a_row_inserted_in_the_same_batch(repo: SessionRepository):
    before = repo.writer.batches
    (adopted, created), ending = await asyncio.gather(
        repo.adopt(session_id="x", control_url="c", idle_window=IDLE, max_age=None),
        repo.begin_end("x", owner="me", lease=LEASE, reason=EndReason.ORPHAN),
    )
    # the claim is tried blind in its own transaction; where the adopt had not committed yet
    # (PostgreSQL: another connection) it joins the unit of work in the next batch
    assert repo.writer.batches in (before + 1, before + 2)
    assert created
    assert adopted.status is ACTIVE  # each caller sees the row as its own op left it
    assert ending is not None
    assert ending.id == adopted.id
    assert ending.status is ENDING
    stored = await repo.get("x")
    assert (stored.status, stored.lease_owner, stored.attempts) == (ENDING, "me", 1)
    assert await event_trail(repo, "x") == [(None, "active"), ("active", "ending")]


async def test_a_session_id_answered_twice_loses_cleanly(repo: SessionRepository):
    """Two answers naming one session: the second is "not applied" (None), never an integrity
    error, and the batch it shared with others is unharmed."""
    intents = [await repo.record_intent(idle_window=IDLE, max_age=None) for _ in range(6)]
    results = await asyncio.gather(
        *(
            repo.mark_active(
                i.id, session_id="same" if n in (1, 4) else f"s{n}", room_url=None, control_url="c"
            )
            for n, i in enumerate(intents)
        ),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert results.count(None) == 1
    assert sum(isinstance(r, SessionRecord) for r in results) == 5
    assert (await repo.get("same")).status is ACTIVE


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.record_intent(idle_window=0, max_age=None),
        lambda r: r.record_intent(idle_window=IDLE, max_age=-1),
        lambda r: r.record_intent(idle_window=IDLE, max_age=None, metadata={"x": object()}),
        lambda r: r.claim_due(owner="r", limit=1, lease=1, now=datetime(2026, 1, 1)),
        lambda r: r.list(sort="colour"),
        lambda r: r.list(limit=0),
        lambda r: r.prune(older_than=datetime(2026, 1, 1)),
    ],
    ids=["idle0", "max_age<0", "metadata", "naive-now", "sort", "limit", "naive-cutoff"],
)
async def test_bad_arguments_are_value_errors(repo: SessionRepository, call: Any):
    with pytest.raises(ValueError, match=r"\w+"):
        await call(repo)


# --- admin reads ---------------------------------------------------------------------------------


async def test_get_by_id_digit_string_or_session_id(repo: SessionRepository):
    record = await started(repo, "sess_abc")
    assert await repo.get(record.id) == record
    assert await repo.get(str(record.id)) == record
    assert await repo.get("sess_abc") == record
    assert await repo.find("missing") is None
    with pytest.raises(SessionNotFound) as info:
        await repo.get("missing")
    assert str(info.value) == "no session with id or session_id 'missing': see `sessionmgr list`"


async def test_list_filters(repo: SessionRepository):
    clock = clock_of(repo)
    a = await started(repo, "a", agent_id="bot", metadata={"user": "ada"})
    clock.advance(100)
    b = await started(repo, "b", agent_id="bot", metadata={"user": "bob"})
    c = await repo.record_intent(idle_window=IDLE, max_age=None, agent_id="other")
    clock.advance(50)

    async def ids(**kw: Any) -> list[int]:
        return sorted(r.id for r in (await repo.list(SessionFilter(**kw))).items)

    assert await ids() == [a.id, b.id, c.id]
    assert await ids(statuses=[ACTIVE]) == [a.id, b.id]
    assert await ids(statuses=[PENDING, ENDED]) == [c.id]
    assert await ids(agent_id="bot") == [a.id, b.id]
    assert await ids(meta={"user": "bob"}) == [b.id]
    assert await ids(meta={"user": "bob", "x": "y"}) == []
    assert await ids(created_after=b.created_at) == [b.id, c.id]
    assert await ids(created_before=b.created_at) == [a.id]
    assert await ids(idle_for=120, statuses=[ACTIVE]) == [a.id]


@pytest.mark.parametrize("sort", list(SORTS))
async def test_keyset_pages_cover_every_row_once_in_order(repo: SessionRepository, sort: str):
    clock = clock_of(repo)
    for i in range(7):
        await started(repo, f"s{i}", idle=IDLE + 10 * (i % 3))  # equal deadlines tie on id
        await repo.record_intent(idle_window=IDLE, max_age=None)  # no deadline: last
        clock.advance(1 if i % 2 else 0)  # equal created_at too
    seen: list[SessionRecord] = []
    cursor = None
    while True:
        page = await repo.list(limit=3, after=cursor, sort=sort)
        seen += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == 14
    assert len({r.id for r in seen}) == 14
    field, descending = sort.lstrip("-"), sort.startswith("-")
    keys = [(getattr(r, field) is None, getattr(r, field), r.id) for r in seen]
    if field == "id":
        keys = [(False, r.id, r.id) for r in seen]
    present = [k for k in keys if not k[0]]
    assert present == sorted(present, reverse=descending)
    assert keys == present + [k for k in keys if k[0]]  # nulls last either way


async def test_bad_cursors_are_refused_with_a_fix(repo: SessionRepository):
    for i in range(3):
        await started(repo, f"s{i}")
    page = await repo.list(limit=1, sort="created_at")
    assert page.next_cursor
    with pytest.raises(ValueError, match="keep the sort between pages"):
        await repo.list(limit=1, sort="deadline", after=page.next_cursor)
    with pytest.raises(ValueError, match="invalid cursor"):
        await repo.list(after="garbage!!")
    with pytest.raises(ValueError, match="unknown sort 'colour': use one of created_at"):
        await repo.list(sort="colour")


async def test_iter_live_and_pending_intents(repo: SessionRepository):
    live = [await started(repo, f"s{i}") for i in range(7)]
    await repo.begin_end("s0", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    clock_of(repo).advance(1)
    intents = [await repo.record_intent(idle_window=IDLE, max_age=None) for _ in range(2)]
    got = [r.id async for r in repo.iter_live(batch=3)]
    assert got == [r.id for r in live]
    only_ending = [r.id async for r in repo.iter_live(statuses=[ENDING])]
    assert only_ending == [live[0].id]
    assert [r.id for r in await repo.pending_intents()] == [i.id for i in intents]


async def test_count_live_agrees_with_stats_and_ping_answers(repo: SessionRepository):
    """What a metrics scrape and /healthz read, on both backends."""
    await repo.ping()
    assert await repo.count_live() == {SessionStatus.PENDING: 0, ACTIVE: 0, ENDING: 0}
    a = await started(repo, "a")
    await started(repo, "b")
    await repo.record_intent(idle_window=IDLE, max_age=None)
    await repo.begin_end(a.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
    counts = await repo.count_live()
    assert counts == {SessionStatus.PENDING: 1, ACTIVE: 1, ENDING: 1}
    by_status = (await repo.stats()).by_status
    assert {s.value: n for s, n in counts.items()} == {
        k: v for k, v in by_status.items() if k in ("pending", "active", "ending")
    }


async def test_stats_counts_days_durations_and_reasons(repo: SessionRepository):
    clock = clock_of(repo)
    clock.advance(-2 * 86400)  # two days before the FakeClock's start
    durations = [10.0, 20.0, 30.0, 40.0, 100.0]
    for n, seconds in enumerate(durations):
        record = await started(repo, f"e{n}")
        clock.advance(seconds)
        await repo.begin_end(record.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
        await repo.mark_ended(record.id, owner="me", cost=0.25)
        clock.advance(-seconds)
    clock.advance(86400)
    intent = await repo.record_intent(idle_window=IDLE, max_age=None)
    await repo.mark_failed(intent.id, reason=EndReason.CREATE_REJECTED)
    clock.advance(86400)
    oldest_live = await started(repo, "live1")
    clock.advance(5)
    await started(repo, "live2")
    await repo.record_intent(idle_window=IDLE, max_age=None)

    stats = await repo.stats(days=3)
    assert stats.by_status == {"pending": 1, "active": 2, "ending": 0, "ended": 5, "failed": 1}
    assert stats.live == 3
    assert stats.oldest_live is not None
    assert stats.oldest_live.id == oldest_live.id
    day0 = clock.now().date() - timedelta(days=2)
    assert [(d.day, d.created, d.ended, d.credits) for d in stats.per_day] == [
        (day0, 5, 5, 1.25),
        (day0 + timedelta(days=1), 1, 0, None),
        (day0 + timedelta(days=2), 3, 0, None),
    ]
    assert stats.duration_p50 == pytest.approx(30.0, abs=0.01)
    assert stats.duration_p95 == pytest.approx(100.0, abs=0.01)
    assert stats.end_reasons == {"manual": 5, "create_rejected": 1}
    json.dumps(stats.to_dict())
    narrow = await repo.stats(days=1)
    assert narrow.duration_p50 is None
    assert narrow.end_reasons == {}
    assert [d.created for d in narrow.per_day] == [3]


async def test_events_of_a_whole_life(repo: SessionRepository):
    record = await started(repo, "s")
    await repo.begin_end("s", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    await repo.reschedule(
        record.id, owner="me", error="HTTP 502", retry_at=repo.clock.now() + timedelta(seconds=1)
    )
    clock_of(repo).advance(1)
    await repo.claim_due(owner="me", limit=1, lease=LEASE)
    await repo.mark_ended(record.id, owner="me")
    events = await repo.events("s")
    assert [(e.from_status, e.to_status, e.reason) for e in events] == [
        (None, PENDING, "intent"),
        (PENDING, ACTIVE, "created"),
        (ACTIVE, ENDING, "manual"),
        (ENDING, ENDING, "retry"),
        (ENDING, ENDING, "manual"),
        (ENDING, ENDED, "manual"),
    ]
    assert events[3].detail == "HTTP 502"
    assert all(e.session_pk == record.id for e in events)
    with pytest.raises(SessionNotFound):
        await repo.events("nope")


# --- cleanup -------------------------------------------------------------------------------------


async def test_prune_deletes_only_old_finished_sessions_and_their_events(repo: SessionRepository):
    clock = clock_of(repo)
    old_ended = []
    for i in range(5):
        record = await started(repo, f"old{i}")
        await repo.begin_end(record.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
        await repo.mark_ended(record.id, owner="me")
        old_ended.append(record.id)
    old_failed = await repo.record_intent(idle_window=IDLE, max_age=None)
    await repo.mark_failed(old_failed.id, reason=EndReason.CREATE_REJECTED)
    old_live = await started(repo, "old-but-live")
    old_pending = await repo.record_intent(idle_window=IDLE, max_age=None)
    clock.advance(10 * 86400)
    recent = await started(repo, "recent")
    await repo.begin_end(recent.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
    await repo.mark_ended(recent.id, owner="me")
    cutoff = clock.now() - timedelta(days=1)

    assert await repo.prune(older_than=cutoff, dry_run=True) == 6
    assert await repo.find(old_ended[0]) is not None  # a dry run deletes nothing
    progress: list[int] = []
    # the loop runs other work between the batches (a SQLite write never suspends)
    asyncio.get_running_loop().call_soon(progress.append, -1)
    assert await repo.prune(older_than=cutoff, batch_size=4, progress=progress.append) == 6
    assert [n for n in progress if n != -1] == [4, 6]
    assert progress.index(-1) < progress.index(6)  # before the prune was over
    remaining = {r.id for r in (await repo.list(limit=100)).items}
    assert remaining == {old_live.id, old_pending.id, recent.id}
    async with repo.engine.connect() as conn:
        orphans = await conn.scalar(
            select(func.count()).where(session_events.c.session_pk.in_(old_ended))
        )
    assert orphans == 0
    assert await repo.prune(older_than=cutoff) == 0


# --- secrets -------------------------------------------------------------------------------------


async def test_secrets_never_reach_the_database_file(tmp_path: Path, fake: Any, client: Any):
    """A session created with a daily_token and token-like properties, through the manager:
    none of the secret values appears anywhere in the database files."""
    from sessionmgr.manager import SessionManager

    url = f"sqlite+aiosqlite:///{tmp_path / 'secrets.db'}"
    secrets = ["tok-DAILY-123", "sk-PROP-456", "pw-META-789", "shh-NESTED-000"]
    async with (
        await SessionRepository.open(url, upgrade=True) as repo,
        SessionManager(repository=repo, client=client, reaper=False) as manager,
    ):
        record = await manager.create_session(
            agent_id="agent",
            daily_room_url="https://example.daily.co/room",
            daily_token=secrets[0],
            extra_properties={"api_key": secrets[1], "voice": "calm"},
            metadata={"user": "ada", "Password_Token": secrets[2], "deep": {"secret": secrets[3]}},
        )
        await repo.adopt(
            session_id="adopted",
            control_url="c",
            idle_window=IDLE,
            max_age=None,
            metadata={"client_secret": secrets[2]},
        )
        assert record.metadata["Password_Token"] == "***"
        await manager.end_session(record.id)
    blob = database_bytes(tmp_path, "secrets.db")
    assert b"ada" in blob
    assert b"***" in blob
    for secret in secrets:
        assert secret.encode() not in blob


async def test_known_session_ids_finds_only_recorded_ids(repo: SessionRepository) -> None:
    for i in range(3):
        await repo.adopt(
            session_id=f"sess_{i}", control_url="http://x", idle_window=60, max_age=None
        )
    asked = [f"sess_{i}" for i in range(1200)]  # more than one chunk
    assert await repo.known_session_ids(asked) == {"sess_0", "sess_1", "sess_2"}
    assert await repo.known_session_ids([]) == set()


async def test_windows_too_long_for_a_date_are_refused(repo: SessionRepository) -> None:
    """1e308 seconds used to raise OverflowError from ``now + timedelta(...)``."""
    for idle_window, max_age in ((1e308, None), (60.0, 1e308), (60.0, float("inf"))):
        with pytest.raises(InvalidArgument, match="100 years"):
            await repo.record_intent(idle_window=idle_window, max_age=max_age)
    with pytest.raises(InvalidArgument, match="idle_for"):
        await repo.list(SessionFilter(idle_for=1e308))
    assert (await repo.list()).items == []
    ten_years = 10 * 365 * 86400.0
    kept = await repo.record_intent(idle_window=ten_years, max_age=ten_years)
    active = await repo.mark_active(
        kept.id, session_id="sess_decade", room_url=None, control_url="http://fake/control"
    )
    assert active is not None
    assert active.deadline == kept.created_at + timedelta(seconds=ten_years)


# --- issue 15: claims that say what they found, bulk ends --------------------------------------


async def test_claim_end_says_what_it_found_when_it_did_not_apply(repo: SessionRepository):
    from sessionmgr.repository import EndClaim

    a, b = await started(repo, "a"), await started(repo, "b")
    intent = await repo.record_intent(idle_window=IDLE, max_age=None)
    first = await repo.claim_end("a", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert first.claimed
    assert first.record.status is ENDING
    assert first.record.lease_owner == "me"
    again = await repo.claim_end(a.id, owner="other", lease=LEASE, reason=EndReason.IDLE)
    assert again == EndClaim(await repo.get(a.id), False)  # leased: found as it is
    pending = await repo.claim_end(str(intent.id), owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert (pending.claimed, pending.record.status) == (False, PENDING)
    assert await repo.end_many([_end(first.record.id)], owner="me")
    ended = await repo.claim_end(a.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert (ended.claimed, ended.record.status) == (False, ENDED)
    with pytest.raises(SessionNotFound, match="sessionmgr list"):
        await repo.claim_end("nope", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert await repo.begin_end("nope", owner="me", lease=LEASE, reason=EndReason.MANUAL) is None
    clock_of(repo).advance(LEASE + 1)  # a lapsed lease is taken over, reason kept
    assert (await repo.claim_end(b.id, owner="me", lease=LEASE, reason=EndReason.MANUAL)).claimed
    taken = await repo.claim_end(b.id, owner="new", lease=LEASE, reason=EndReason.IDLE)
    assert taken.claimed is False  # b's lease is live (just taken)
    clock_of(repo).advance(LEASE + 1)
    taken = await repo.claim_end(b.id, owner="new", lease=LEASE, reason=EndReason.IDLE)
    assert taken.claimed
    assert taken.record.lease_owner == "new"
    assert taken.record.end_reason is EndReason.MANUAL
    assert await event_trail(repo, b.id) == [
        (None, "pending"),
        ("pending", "active"),
        ("active", "ending"),
        ("ending", "ending"),
    ]


async def test_a_blind_claim_writes_what_the_loading_claim_wrote(repo: SessionRepository):
    """The manual-end claim is one conditional UPDATE ... RETURNING: its record is the stored
    row, its events say who took the lease and why, exactly as the loading path did."""
    a, b = await started(repo, "a"), await started(repo, "b")
    now = repo.clock.now()
    first = await repo.claim_end(
        "a", owner="me", lease=LEASE, reason=EndReason.SHUTDOWN, detail="stopping"
    )
    assert first.claimed
    assert first.record == await repo.get(a.id)  # the returned record is the row as stored
    assert (first.record.status, first.record.end_reason) == (ENDING, EndReason.SHUTDOWN)
    assert (first.record.lease_owner, first.record.attempts) == ("me", 1)
    assert first.record.lease_until == now + timedelta(seconds=LEASE)
    assert first.record.next_attempt_at is None
    by_pk = await repo.claim_end(str(b.id), owner="me", lease=LEASE, reason=EndReason.MANUAL)
    assert by_pk.claimed
    assert by_pk.record.id == b.id  # a digit string names the local id
    await repo.reschedule(a.id, owner="me", error="boom", retry_at=now)  # ending, lease dropped
    taken = await repo.claim_end(a.id, owner="new", lease=LEASE, reason=EndReason.IDLE)
    assert taken.claimed
    assert taken.record == await repo.get(a.id)
    assert (taken.record.end_reason, taken.record.attempts) == (EndReason.SHUTDOWN, 2)
    assert taken.record.next_attempt_at is None  # the retry time a claim clears
    claims = [(e.reason, e.detail) for e in await repo.events(a.id) if e.to_status is ENDING]
    assert claims == [
        ("shutdown", "stopping; lease me"),
        ("retry", "boom"),
        ("shutdown", "lease taken over by new"),
    ]


async def test_blind_claims_that_arrive_together_share_one_transaction(
    repo: SessionRepository, monkeypatch: pytest.MonkeyPatch
):
    """Twenty manual ends at once: one transaction for their claims, and the same row asked
    twice is claimed once (the second finds it leased, as it would one at a time)."""
    from sqlalchemy import event

    rows = [await started(repo, f"s{i}") for i in range(6)]
    begins: list[object] = []
    # a transaction's start (the writer's BEGIN goes straight to the driver)
    event.listen(repo.writer.sync_engine, "begin", begins.append)
    keys: list[int | str] = [r.id for r in rows] + ["s0"]  # s0: rows[0] again
    found = await asyncio.gather(
        *(repo.claim_end(k, owner="me", lease=LEASE, reason=EndReason.MANUAL) for k in keys)
    )
    assert [f.claimed for f in found] == [True] * 6 + [False]
    assert found[-1].record == await repo.get(rows[0].id)  # leased to me: found as it is
    for record in rows:
        assert await event_trail(repo, record.id) == [
            (None, "pending"),
            ("pending", "active"),
            ("active", "ending"),
        ]
    if repo.dialect == "sqlite":
        # the six claims, then the duplicate's loading op
        assert len(begins) == 2, begins

    # a shared transaction that fails applies nothing; each claim then runs as its own op
    def broken(*args: object) -> object:
        raise RuntimeError("boom")

    more = [await started(repo, f"t{i}") for i in range(3)]
    monkeypatch.setattr(repo, "_claim_ends_blind", broken)
    found = await asyncio.gather(
        *(repo.claim_end(r.id, owner="me", lease=LEASE, reason=EndReason.MANUAL) for r in more)
    )
    assert all(f.claimed for f in found)
    assert [(await repo.get(r.id)).status for r in more] == [ENDING] * 3


def _end(pk: int, **kw: Any) -> Any:
    from sessionmgr.repository import EndRequest

    return EndRequest(pk, **kw)


async def test_end_many_ends_the_slice_but_not_a_row_taken_over(repo: SessionRepository):
    rows = [await started(repo, sid, max_age=None) for sid in ("a", "b", "c", "d")]
    clock = clock_of(repo)
    clock.advance(IDLE + 1)
    claimed = await repo.claim_due(owner="me", limit=10, lease=LEASE)
    assert sorted(r.id for r in claimed) == [r.id for r in rows]
    clock.advance(LEASE + 1)  # my lease lapsed (say, renewals failed); another process took b
    taken = await repo.claim_end("b", owner="other", lease=LEASE, reason=EndReason.IDLE)
    assert taken.claimed
    a, b, c, d = rows
    ended = await repo.end_many(
        [
            _end(a.id),
            _end(b.id),
            _end(c.id, reason=EndReason.GONE),
            _end(d.id, remote_status="ENDED", cost=1.5),
        ],
        owner="me",
    )
    assert sorted(ended) == [a.id, c.id, d.id]  # b is not returned: LOST, left alone
    for pk, record in ended.items():
        assert record == await repo.get(pk)  # built from the RETURNING, as stored
        assert record.status is ENDED
        assert record.ended_at == clock.now()
        assert record.lease_until is None
    assert ended[a.id].end_reason is EndReason.IDLE  # the reason stamped when claimed
    assert ended[a.id].next_attempt_at is not None  # cost fetched later
    assert ended[c.id].end_reason is EndReason.GONE
    assert (ended[d.id].cost, ended[d.id].remote_status) == (1.5, "ENDED")
    assert ended[d.id].next_attempt_at is None
    still = await repo.get(b.id)
    assert (still.status, still.lease_owner) == (ENDING, "other")
    assert [t for _, t in await event_trail(repo, b.id)].count("ended") == 0
    for pk in (a.id, c.id, d.id):
        assert [t for _, t in await event_trail(repo, pk)].count("ended") == 1
    # ending -> ended only: a second end of the same rows changes nothing
    assert await repo.end_many([_end(a.id), _end(b.id)], owner="me") == {}
    assert await repo.end_many([], owner="me") == {}


async def test_a_flushed_touch_moves_the_deadline_but_never_past_max_age(repo: SessionRepository):
    record = await started(repo, "a", idle=IDLE, max_age=100.0)
    await started(repo, "b", idle=IDLE, max_age=None)
    await started(repo, "c")
    await repo.begin_end("c", owner="me", lease=LEASE, reason=EndReason.MANUAL)
    clock = clock_of(repo)
    clock.advance(20)
    repo.touch("a")
    repo.touch("b")
    repo.touch("c")  # ending: dropped
    assert await repo.flush_touches() == 2
    assert (await repo.get("a")).deadline == clock.now() + timedelta(seconds=IDLE)
    assert (await repo.get("b")).deadline == clock.now() + timedelta(seconds=IDLE)
    clock.advance(50)  # 70 s old: idle deadline 130 s, past its max age of 100 s
    repo.touch("a")
    assert await repo.flush_touches() == 1
    touched = await repo.get("a")
    assert touched.last_activity_at == clock.now()
    assert touched.deadline == record.created_at + timedelta(seconds=100)
    ending = await repo.get("c")
    assert ending.last_activity_at == record.last_activity_at  # never touched once ending
    assert await repo.touch_many(["a", "b", "c", "nope"]) == {"a", "b"}
