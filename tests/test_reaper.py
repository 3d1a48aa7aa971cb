"""Reaper: idle and max-age reaping with an injected clock, retries, leases, auth failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from sessionmgr import EndReason, SessionStatus
from sessionmgr.clock import FakeClock
from sessionmgr.errors import ConfigurationError
from sessionmgr.manager import SessionManager
from sessionmgr.models import sessions
from sessionmgr.reaper import Outcome, Reaper, TickResult
from sessionmgr.reconcile import ReconcileReport
from sessionmgr.records import SessionRecord
from sessionmgr.testing import FakeLemonSlice, Fault

from .helpers import TEST_RETRY, fast_client, make_manager, wait_for


async def test_idle_sessions_end_and_touched_ones_live(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    busy = await manager.create_session(agent_id="agent_busy")
    idle = await manager.create_session(agent_id="agent_idle")
    assert busy.session_id
    assert idle.session_id
    clock.advance(50)
    manager.touch(busy.session_id)
    clock.advance(20)  # idle is 70 s past its last activity, busy 20 s
    result = await manager.reaper.run_once()
    assert [r.id for r in result.ended] == [idle.id]
    assert (await manager.get(busy.id)).status is SessionStatus.ACTIVE
    row = await manager.get(idle.id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.IDLE
    assert row.ended_at == clock.now()
    assert lemon.terminate_counts == {idle.session_id: 1}


async def test_nothing_is_reaped_before_its_deadline(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    await manager.create_session(agent_id="agent_1")
    clock.advance(59)
    result = await manager.reaper.run_once()
    assert result.ended == []
    assert lemon.terminate_counts == {}


async def test_max_age_ends_a_busy_session(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1", max_age=100)
    assert record.session_id
    for _ in range(3):
        clock.advance(30)
        manager.touch(record.session_id)
        assert (await manager.reaper.run_once()).ended == []
    clock.advance(11)  # 101 s old, touched 11 s ago
    result = await manager.reaper.run_once()
    assert [r.id for r in result.ended] == [record.id]
    assert (await manager.get(record.id)).end_reason is EndReason.MAX_AGE


async def test_transient_failures_are_retried_with_backoff_never_dropped(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id
    lemon.inject("terminate", Fault.status(503), times=2 * TEST_RETRY.attempts)  # 2 ticks
    clock.advance(61)
    first = await manager.reaper.run_once()
    assert [r.id for r in first.outcomes[Outcome.RESCHEDULED]] == [record.id]
    row = await manager.get(record.id)
    assert row.status is SessionStatus.ENDING
    assert row.lease_owner is None
    assert "503" in (row.last_error or "")
    assert row.next_attempt_at is not None
    first_delay = (row.next_attempt_at - clock.now()).total_seconds()
    assert first_delay > 0
    # not retried before its time
    assert (await manager.reaper.run_once()).ended == []
    clock.advance(first_delay)
    second = await manager.reaper.run_once()
    assert [r.id for r in second.outcomes[Outcome.RESCHEDULED]] == [record.id]
    row = await manager.get(record.id)
    assert row.attempts == 2
    assert row.next_attempt_at is not None
    clock.advance(1000)
    third = await manager.reaper.run_once()
    assert [r.id for r in third.ended] == [record.id]
    row = await manager.get(record.id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.IDLE  # the reason decided at the first claim
    assert lemon.terminate_counts[record.session_id] == 1


async def test_terminate_404_ends_the_row_as_gone(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.adopt_session("sess_unknown_to_server", idle_window=10)
    clock.advance(11)
    result = await manager.reaper.run_once()
    assert [r.id for r in result.outcomes[Outcome.GONE]] == [record.id]
    row = await manager.get(record.id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.GONE


async def test_auth_failure_stops_the_tick_without_burning_the_queue(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock, caplog
):
    records = [await manager.create_session(agent_id=f"agent_{i}") for i in range(5)]
    lemon.inject("terminate", Fault.status(401), times=100)
    reaper = Reaper(manager.repository, manager.client, concurrency=1, clock=clock)
    clock.advance(61)
    result = await reaper.run_once()
    assert result.auth_failed
    assert len(lemon.terminate_requests_total()) == 1  # one try, then the rest given back
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "LEMONSLICE_API_KEY" in errors[0].getMessage()
    rows = [await manager.get(r.id) for r in records]
    assert {r.status for r in rows} <= {SessionStatus.ENDING, SessionStatus.ACTIVE}
    assert all(r.lease_owner is None for r in rows)


async def test_a_dead_reapers_leases_are_taken_over(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id
    clock.advance(61)
    claimed = await manager.repository.claim_due(owner="dead-reaper", limit=10, lease=30)
    assert [r.id for r in claimed] == [record.id]
    survivor = Reaper(manager.repository, manager.client, clock=clock, lease=30)
    assert (await survivor.run_once()).ended == []  # lease still held by the dead one
    clock.advance(31)
    result = await survivor.run_once()
    assert [r.id for r in result.ended] == [record.id]
    assert lemon.terminate_counts[record.session_id] == 1


async def test_dry_run_lists_due_sessions_without_ending_them(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    a = await manager.create_session(agent_id="agent_a")
    clock.advance(30)
    b = await manager.create_session(agent_id="agent_b")
    clock.advance(40)  # a is due, b is not
    result = await manager.reaper.run_once(dry_run=True)
    assert [r.id for r in result.due] == [a.id]
    assert lemon.terminate_counts == {}
    assert (await manager.get(a.id)).status is SessionStatus.ACTIVE
    assert (await manager.get(b.id)).status is SessionStatus.ACTIVE


async def test_many_due_sessions_end_exactly_once_with_bounded_concurrency(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    records = [await manager.create_session(agent_id=f"agent_{i}") for i in range(60)]
    reaper = Reaper(manager.repository, manager.client, concurrency=7, batch=5, clock=clock)
    clock.advance(61)
    result = await reaper.run_once()
    assert len(result.ended) == 60
    assert lemon.max_in_flight("terminate") <= 7
    assert all(lemon.terminate_counts[r.session_id or ""] == 1 for r in records)
    assert reaper.heartbeat.ticks == 1
    assert reaper.heartbeat.ended == 60


async def test_the_loop_ticks_on_the_injected_clock_and_stops_cleanly(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    async with fast_client(lemon) as client:
        reaper = Reaper(manager.repository, client, interval=5, clock=clock)
        parked = clock.sleepers  # the manager's own touch flusher
        reaper.start()
        await wait_for(lambda: reaper.heartbeat.ticks == 1 and clock.sleepers == parked + 1)
        clock.advance(61)
        await wait_for(lambda: reaper.heartbeat.ticks == 2)
        await reaper.stop()
        assert not reaper.running
    assert (await manager.get(record.id)).status is SessionStatus.ENDED


@pytest.mark.parametrize("concurrency", [0])
def test_bad_settings_are_refused(manager: SessionManager, concurrency: int):
    with pytest.raises(
        ConfigurationError, match="Reaper concurrency must be a whole number of at least 1"
    ):
        Reaper(manager.repository, manager.client, concurrency=concurrency)


async def test_a_slow_terminate_keeps_its_lease_renewed(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    import asyncio

    record = await manager.create_session(agent_id="agent_1")
    # the terminate's answer is held until the renewal is seen: the request stays in flight
    # however slowly a loaded machine runs the renewer (a fixed 0.5 s latency raced it)
    lemon.hold_answers("terminate", 30)
    reaper = Reaper(manager.repository, manager.client, clock=clock, lease=30)
    clock.advance(61)
    tick = asyncio.create_task(reaper.run_once())
    await wait_for(lambda: len(lemon.terminate_requests_total()) == 1)
    claimed = await manager.get(record.id)
    assert claimed.lease_until is not None
    clock.advance(11)  # past lease / 3: the renewer extends the lease from the new now
    renewed_by = claimed.lease_until + timedelta(seconds=11)

    async def renewed() -> bool:
        row = await manager.get(record.id)
        return row.lease_until is not None and row.lease_until >= renewed_by

    async with asyncio.timeout(10):
        while not await renewed():
            await asyncio.sleep(0.01)
    lemon.release_answers("terminate")
    result = await tick
    assert [r.id for r in result.ended] == [record.id]


async def test_tick_and_reconcile_hooks_report_and_cannot_break_them(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    ticks: list[tuple[int, int]] = []

    def on_tick(result: TickResult) -> None:
        ticks.append((result.claimed, len(result.ended)))
        raise RuntimeError("hook bug")

    def on_reconciled(report: ReconcileReport) -> None:
        raise RuntimeError("hook bug")

    manager.reaper.on_tick = on_tick
    manager.on_reconciled = on_reconciled
    record = await manager.create_session(agent_id="agent_1")
    clock.advance(61)
    result = await manager.reaper.run_once()
    assert [r.id for r in result.ended] == [record.id]
    assert ticks == [(1, 1)]
    assert (await manager.reconcile()).checked == 0
    assert (await manager.reaper.run_once(dry_run=True)).due == []
    assert ticks == [(1, 1)]  # dry runs claim nothing and report nothing


# --- issue 15: a slice's ends recorded together ------------------------------------------------


@pytest.fixture
async def any_manager(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> AsyncIterator[SessionManager]:
    """A manager on each backend, its reaper driven by hand."""
    async with make_manager(lemon, clock, migrated_url) as mgr:
        yield mgr


async def test_a_row_taken_over_mid_slice_is_lost_and_the_others_end_together(
    any_manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    manager = any_manager
    rows = [await manager.create_session(agent_id=f"agent_{i}") for i in range(4)]
    ended: list[SessionRecord] = []

    async def hook(record: SessionRecord) -> None:
        ended.append(record)

    manager.reaper.on_ended = hook
    lemon.hold_answers("terminate", 30)
    clock.advance(61 + manager.reaper.touch_grace)
    tick = asyncio.create_task(manager.reaper.run_once())
    await wait_for(lambda: len(lemon.terminate_requests_total()) == 4)
    taken = rows[1]
    async with manager.repository.engine.begin() as conn:  # another process took it over
        await conn.execute(
            update(sessions).where(sessions.c.id == taken.id).values(lease_owner="other")
        )
    statements = manager.reaper.ends.statements
    lemon.release_answers("terminate")
    result = await tick
    assert sorted(r.id for r in result.outcomes[Outcome.ENDED]) == [
        r.id for r in rows if r.id != taken.id
    ]
    assert [r.id for r in result.outcomes[Outcome.LOST]] == [taken.id]
    assert manager.reaper.ends.statements - statements <= 2  # a slice per statement, not a row
    row = await manager.get(taken.id)
    assert (row.status, row.lease_owner) == (SessionStatus.ENDING, "other")
    assert SessionStatus.ENDED not in [e.to_status for e in await manager.repository.events(row.id)]
    # the hook got each ended record as stored, built from the bulk end's RETURNING
    assert sorted(r.id for r in ended) == [r.id for r in rows if r.id != taken.id]
    for record in ended:
        assert record == await manager.get(record.id)
        events = await manager.repository.events(record.id)
        assert [e.to_status for e in events].count(SessionStatus.ENDED) == 1


async def test_claims_refill_in_slices_not_a_row_per_sent_terminate(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    reaper = manager.reaper
    reaper.concurrency = 4
    reaper._slots = asyncio.Semaphore(4)
    for i in range(40):
        await manager.create_session(agent_id=f"agent_{i}")
    clock.advance(61 + reaper.touch_grace)
    claims: list[int] = []
    real = manager.repository.claim_due

    async def counted(**kw: Any) -> list[SessionRecord]:
        got = await real(**kw)
        claims.append(len(got))
        return got

    manager.repository.claim_due = counted  # type: ignore[method-assign]
    result = await reaper.run_once()
    assert len(result.ended) == 40
    # the first claim fills 2 x concurrency; each refill waits for the unsent to fall to the
    # concurrency and brings back at least that many
    assert claims[0] == 8
    assert all(n >= 4 for n in claims[:-1]), claims
    assert len(claims) <= 1 + 40 // 4, claims
