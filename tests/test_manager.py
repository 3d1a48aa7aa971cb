"""SessionManager: crash-safe create, touch, end, adopt, hooks and exit policy."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from sessionmgr import (
    ClientRequestError,
    CreateOutcomeUnknown,
    EndReason,
    SessionNotFound,
    SessionRecord,
    SessionStatus,
)
from sessionmgr.clock import FakeClock
from sessionmgr.errors import ConfigurationError, InvalidArgument
from sessionmgr.manager import SessionManager
from sessionmgr.testing import FakeLemonSlice, Fault

from .helpers import make_manager


async def test_create_records_an_active_session(manager: SessionManager, lemon: FakeLemonSlice):
    record = await manager.create_session(
        agent_id="agent_1", idle_timeout=60, metadata={"bot": "b1"}
    )
    assert record.status is SessionStatus.ACTIVE
    assert record.session_id in lemon.sessions
    assert record.control_url == f"{lemon.url}/{record.session_id}/control"
    assert record.metadata == {"bot": "b1"}
    assert record.idle_timeout == 60
    events = await manager.repository.events(record.id)
    assert [(e.from_status, e.to_status) for e in events] == [
        (None, SessionStatus.PENDING),
        (SessionStatus.PENDING, SessionStatus.ACTIVE),
    ]


async def test_create_validates_agent_source_before_any_io(
    manager: SessionManager, lemon: FakeLemonSlice
):
    with pytest.raises(ValueError, match="exactly one"):
        await manager.create_session()
    with pytest.raises(ValueError, match="exactly one"):
        await manager.create_session(agent_id="a", agent_image_url="https://x/y.png")
    assert lemon.requests == []
    assert (await manager.repository.list()).items == []


async def test_rejected_create_marks_the_intent_failed(
    manager: SessionManager, lemon: FakeLemonSlice
):
    lemon.inject("create", Fault.status(400, body='{"error": "bad agent"}'))
    with pytest.raises(ClientRequestError):
        await manager.create_session(agent_id="agent_bad")
    [row] = (await manager.repository.list()).items
    assert row.status is SessionStatus.FAILED
    assert row.end_reason is EndReason.CREATE_REJECTED
    assert "400" in (row.last_error or "")
    assert lemon.creates == 0


async def test_lost_create_answer_stays_pending_and_never_posts_twice(
    manager: SessionManager, lemon: FakeLemonSlice
):
    lemon.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await manager.create_session(agent_id="agent_1")
    [row] = (await manager.repository.list()).items
    assert row.status is SessionStatus.PENDING
    assert row.session_id is None
    assert lemon.creates == 1  # taken once by the server, never re-posted
    assert lemon.live_count == 1


async def test_cancelled_create_does_not_leak_a_session(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock, db_url: str
):
    lemon.latency["create"] = 0.2
    task = asyncio.create_task(manager.create_session(agent_id="agent_1"))
    for _ in range(200):  # until the POST has reached the server
        if lemon.requests:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await manager.close()  # waits for the create and the end it spawns
    assert lemon.live_count == 0
    assert sum(lemon.terminate_counts.values()) == 1
    async with make_manager(lemon, clock, db_url) as again:
        [row] = (await again.repository.list()).items
    assert row.status is SessionStatus.ENDED


async def test_end_session_is_idempotent(manager: SessionManager, lemon: FakeLemonSlice):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id is not None
    first = await manager.end_session(record.session_id)
    assert first.changed
    assert first.record.status is SessionStatus.ENDED
    assert first.record.end_reason is EndReason.MANUAL
    second = await manager.end_session(record.session_id)
    assert not second.changed
    assert "already ended" in second.message
    assert lemon.terminate_counts[record.session_id] == 1


async def test_end_session_by_local_id(manager: SessionManager, lemon: FakeLemonSlice):
    record = await manager.create_session(agent_id="agent_1")
    result = await manager.end_session(record.id, reason="shutdown")
    assert result.record.end_reason is EndReason.SHUTDOWN


async def test_end_unknown_session_raises_not_found(manager: SessionManager):
    with pytest.raises(SessionNotFound):
        await manager.end_session("sess_nope")


async def test_end_failing_terminate_is_left_to_the_reaper(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id is not None
    lemon.inject("terminate", Fault.status(503), times=50)
    with pytest.raises(Exception, match="503"):
        await manager.end_session(record.session_id)
    row = await manager.get(record.id)
    assert row.status is SessionStatus.ENDING
    assert row.lease_owner is None
    assert row.next_attempt_at is not None
    assert row.next_attempt_at > clock.now()
    lemon.faults.clear()
    clock.advance(400)
    await manager.reaper.run_once()
    row = await manager.get(record.id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.MANUAL
    assert lemon.terminate_counts[record.session_id] == 1


async def test_adopt_guards_a_session_created_elsewhere(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    answer = await manager.client.create_session(agent_id="agent_pipecat")
    record = await manager.adopt_session(answer["session_id"], idle_window=30)
    assert record.status is SessionStatus.ACTIVE
    assert record.control_url == answer["control_url"]
    again = await manager.adopt_session(answer["session_id"])
    assert again.id == record.id
    clock.advance(31)
    result = await manager.reaper.run_once()
    assert [r.session_id for r in result.ended] == [answer["session_id"]]
    assert lemon.terminate_counts[answer["session_id"]] == 1


async def test_touch_pushes_the_deadline_out(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id is not None
    assert record.deadline is not None
    clock.advance(30)
    for _ in range(1000):  # cheap: coalesced into one write at the next flush
        manager.touch(record.session_id)
    await manager.repository.flush_touches()
    touched = await manager.get(record.id)
    assert touched.deadline is not None
    assert (touched.deadline - record.deadline).total_seconds() == pytest.approx(30)


async def test_hooks_fire_once_per_transition(lemon: FakeLemonSlice, clock: FakeClock, db_url):
    created: list[SessionRecord] = []
    ended: list[SessionRecord] = []

    async def on_created(r: SessionRecord) -> None:
        created.append(r)

    async def on_ended(r: SessionRecord) -> None:
        ended.append(r)

    async with make_manager(lemon, clock, db_url, on_created=on_created, on_ended=on_ended) as mgr:
        record = await mgr.create_session(agent_id="agent_1")
        await mgr.end_session(record.id)
        await mgr.end_session(record.id)  # a no-op: no second hook
    assert [r.id for r in created] == [record.id]
    assert [(r.id, r.status) for r in ended] == [(record.id, SessionStatus.ENDED)]


async def test_on_exit_end_ends_own_sessions(lemon: FakeLemonSlice, clock: FakeClock, db_url):
    async with make_manager(lemon, clock, db_url, on_exit="end") as mgr:
        a = await mgr.create_session(agent_id="agent_1")
        b = await mgr.create_session(agent_id="agent_2")
    async with make_manager(lemon, clock, db_url) as mgr:
        for r in (a, b):
            row = await mgr.get(r.id)
            assert row.status is SessionStatus.ENDED
            assert row.end_reason is EndReason.SHUTDOWN
    assert lemon.live_count == 0


async def test_manager_keeps_no_per_session_state_it_will_not_use(
    lemon: FakeLemonSlice, clock: FakeClock, db_url
):
    """A long-running backend must not grow per create (the memory benchmark's 100k cycles):
    only on_exit="end" remembers what it created, and forgets what it ended itself."""
    async with make_manager(lemon, clock, db_url) as mgr:
        await mgr.create_session(agent_id="agent_1")
        assert not mgr._created
    async with make_manager(lemon, clock, db_url, on_exit="end") as mgr:
        a = await mgr.create_session(agent_id="agent_1")
        b = await mgr.create_session(agent_id="agent_2")
        await mgr.end_session(a.id)
        assert mgr._created == {b.id}


async def test_on_exit_leave_keeps_sessions_for_the_reaper(
    lemon: FakeLemonSlice, clock: FakeClock, db_url
):
    async with make_manager(lemon, clock, db_url) as mgr:
        a = await mgr.create_session(agent_id="agent_1")
    assert lemon.live_count == 1
    async with make_manager(lemon, clock, db_url) as mgr:
        assert (await mgr.get(a.id)).status is SessionStatus.ACTIVE


@pytest.mark.parametrize(
    ("code", "status"), [(503, SessionStatus.FAILED), (500, SessionStatus.PENDING)]
)
async def test_server_errors_on_create_follow_the_clients_verdict(
    manager: SessionManager, lemon: FakeLemonSlice, code: int, status: SessionStatus
):
    """503 provably was not taken (retried, then failed); 500 might have been: left pending."""
    lemon.inject("create", Fault.status(code), times=50)
    with pytest.raises(Exception, match=str(code)):
        await manager.create_session(agent_id="agent_1")
    [row] = (await manager.repository.list()).items
    assert row.status is status


async def test_huge_windows_are_a_typed_error_not_an_overflow(
    manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    kws: list[dict[str, float]] = [{"max_age": 1e308}, {"idle_window": 1e308}, {"max_age": 1e999}]
    for kw in kws:
        with pytest.raises(InvalidArgument, match="100 years"):
            await manager.create_session(agent_id="a", **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await manager.adopt_session("sess_x", idle_window=1e300)
    assert lemon.creates == 0
    assert (await manager.repository.list()).items == []
    with pytest.raises(ConfigurationError):
        SessionManager(database_url="sqlite+aiosqlite://", max_age=1e308)


# --- issue 15: a manual end reads nothing around its write transactions -----------------------


def _statements(manager: SessionManager) -> list[str]:
    """Every SQL statement the manager's repository sends from now on."""
    from sqlalchemy import event

    seen: list[str] = []

    def note(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(" ".join(statement.split()).upper())

    repo = manager.repository
    engines = [repo.engine.sync_engine, repo._reader.sync_engine]
    assert engines[1] is not None or repo.dialect != "sqlite", "read once first: it starts lazily"
    if repo.dialect == "sqlite":
        # the writer runs most of its statements (and its BEGIN) on its driver connection:
        # SQLite's own trace sees every one, SQLAlchemy's events only some
        raw = repo.writer._connection().connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        raw.set_trace_callback(lambda sql: note(None, None, sql))
    else:
        engines.append(repo.writer.sync_engine)
    for engine in engines:
        if engine is not None:
            event.listen(engine, "before_cursor_execute", note)
            event.listen(engine, "begin", lambda conn: seen.append("BEGIN"))
    return seen


async def test_a_manual_end_is_one_claim_one_terminate_one_recorded_end(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="agent_1")
    await manager.get(record.id)  # the reader's engine exists, so its reads are seen too
    seen = _statements(manager)
    result = await manager.end_session(record.id)
    seen = list(seen)
    assert result.changed
    assert result.message == "ended"
    assert result.record == await manager.get(record.id)  # the record the end returned is true
    assert result.record.status is SessionStatus.ENDED
    # the claim is blind (a conditional UPDATE ... RETURNING) and the end reads nothing
    reads = [s for s in seen if s.startswith("SELECT") and "FROM SESSIONS" in s]
    assert reads == [], seen
    # two UPDATEs, each RETURNING what the next step needs: the claim's, the end's, in a write
    # transaction each
    writes = [s for s in seen if s.startswith("UPDATE SESSIONS") and "RETURNING" in s]
    assert len(writes) == 2, seen
    assert len([s for s in seen if s.startswith("BEGIN")]) == 2, seen


async def test_end_outcomes_come_from_the_claim_itself(
    manager: SessionManager, lemon: FakeLemonSlice
):
    """What the claim found when it did not apply: no read before or after it."""
    ended = await manager.create_session(agent_id="agent_1")
    await manager.end_session(ended.id)
    held = await manager.create_session(agent_id="agent_2")
    assert await manager.repository.begin_end(
        held.id, owner="other-host", lease=60, reason=EndReason.IDLE
    )
    intent = await manager.repository.record_intent(idle_window=60, max_age=None)
    await manager.get(intent.id)  # the reader's engine exists, so its reads are seen too
    rows = [await manager.get(r.id) for r in (ended, held, intent)]
    trails = [await manager.repository.events(r.id) for r in (ended, held, intent)]
    seen = _statements(manager)
    again = await manager.end_session(ended.id)
    assert (again.changed, again.message) == (False, "already ended (manual)")
    assert again.record.status is SessionStatus.ENDED
    busy = await manager.end_session(held.id)
    assert (busy.changed, busy.message) == (False, "being ended by other-host")
    assert busy.record.lease_owner == "other-host"
    with pytest.raises(Exception, match="still being created"):
        await manager.end_session(intent.id)
    with pytest.raises(SessionNotFound, match="sessionmgr list"):
        await manager.end_session("sess_nope")
    seen = list(seen)
    # nothing applied: the blind claim matched no row, and the loading path read each once
    assert [await manager.get(r.id) for r in (ended, held, intent)] == rows
    assert [await manager.repository.events(r.id) for r in (ended, held, intent)] == trails
    reads = [s for s in seen if s.startswith("SELECT") and "FROM SESSIONS" in s]
    assert len(reads) == 4, seen  # ended, held, intent, unknown: one load each, nothing after
    assert len(lemon.terminate_requests_total()) == 1  # only the first end terminated


async def test_a_create_builds_its_request_once_and_records_what_it_sent(
    manager: SessionManager, lemon: FakeLemonSlice, monkeypatch: pytest.MonkeyPatch
):
    """Validated before the intent is written, then sent as built: one build, one JSON text."""
    from sessionmgr import client as client_module

    built: list[client_module.CreateOptions] = []
    build = client_module._build_request

    def counting(options: client_module.CreateOptions) -> client_module.CreateRequest:
        built.append(options)
        return build(options)

    monkeypatch.setattr(client_module, "_build_request", counting)
    record = await manager.create_session(agent_id="agent_1", model="m1", agent_prompt="hi")
    assert len(built) == 1
    assert (record.agent_id, record.model, record.agent_prompt) == ("agent_1", "m1", "hi")
    assert record == await manager.repository.get(record.id)  # the blind result is the row
    with pytest.raises(ValueError, match="exactly one of"):
        await manager.create_session(agent_id="a", agent_image_url="https://x/y.png")
    assert len(built) == 2
    assert len((await manager.repository.list()).items) == 1  # no intent for a bad request
