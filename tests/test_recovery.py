"""Recovery never ends a session a live process still holds (issue 12, "what goes wrong today").

The race: an old lost intent is pending; another process's create is in flight (LemonSlice has
started and lists its session, the answer has not arrived); reconcile runs meanwhile. Matching by
time alone gave the in-flight session to the old intent and terminated it.
"""

from __future__ import annotations

import asyncio

import pytest

from sessionmgr import CreateOutcomeUnknown, EndReason, IntentTakenOver, SessionStatus
from sessionmgr.clock import FakeClock
from sessionmgr.reconcile import PENDING_GRACE
from sessionmgr.repository import COST_HORIZON
from sessionmgr.testing import FakeLemonSlice, Fault
from sessionmgr.transitions import COST_DELAY

from .helpers import make_manager, wait_for


async def test_reconcile_never_ends_a_session_whose_create_is_in_flight(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with (
        make_manager(lemon, clock, migrated_url) as lost,
        make_manager(lemon, clock, migrated_url, slow=True) as busy,
    ):
        lemon.inject("create", Fault.drop())  # sent, never answered, nothing started
        with pytest.raises(CreateOutcomeUnknown):
            await lost.create_session(agent_id="agent_lost")
        clock.advance(115)
        lemon.hold_answers("create", 60)
        creating = asyncio.create_task(busy.create_session(agent_id="agent_busy"))
        await wait_for(lambda: lemon.live_count == 1)  # started and listed, answer held
        [in_flight] = list(lemon.sessions)
        clock.advance(6)
        report = await lost.reconcile()
        assert report.adopted == []
        assert lemon.terminate_requests == {}
        lemon.release_answers("create")
        record = await creating
        assert record.session_id == in_flight
        assert record.status is SessionStatus.ACTIVE
        assert lemon.sessions[in_flight].status == "ACTIVE"


async def test_a_create_killed_mid_flight_is_ended_on_the_next_tick_after_its_lease(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    """A creator that stops renewing (killed) loses its intent one lease later; any reaper's
    tick then adopts and ends the session: seconds, not a reconcile settle."""
    async with (
        make_manager(lemon, clock, migrated_url, slow=True) as creator,
        make_manager(lemon, clock, migrated_url) as serve,
    ):
        lemon.hold_answers("create", 60)
        creating = asyncio.create_task(creator.create_session(agent_id="agent_dying"))
        await wait_for(lambda: lemon.live_count == 1)
        [sid] = list(lemon.sessions)
        assert creator._intents is not None
        await creator._intents.close()  # the creator dies: no more renewals
        await serve.reaper.run_once()
        assert lemon.terminate_requests == {}  # its lease still runs
        clock.advance(creator.intent_lease + 0.1)
        await serve.reaper.run_once()
        assert lemon.sessions[sid].status == "COMPLETED"
        assert lemon.terminate_counts == {sid: 1}
        [row] = (await serve.repository.list()).items
        assert row.session_id == sid
        assert row.status is SessionStatus.ENDED
        assert row.end_reason is EndReason.CREATE_UNKNOWN
        lemon.release_answers("create")
        with pytest.raises(IntentTakenOver) as taken:
            await creating
        assert taken.value.record.session_id == sid  # type: ignore[attr-defined]


async def test_a_renewed_intent_is_never_resolved_however_slow_its_create(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with (
        make_manager(lemon, clock, migrated_url, slow=True) as creator,
        make_manager(lemon, clock, migrated_url) as serve,
    ):
        lemon.hold_answers("create", 60)
        creating = asyncio.create_task(creator.create_session(agent_id="agent_slow"))
        await wait_for(lambda: lemon.live_count == 1)
        assert creator._intents is not None
        keeper = creator._intents
        for _ in range(12):  # 60 s of a slow create, three lease periods
            before = keeper.renewals
            clock.advance(5.0)
            await wait_for(lambda b=before: keeper.renewals > b)  # type: ignore[misc]
            await serve.reaper.run_once()
        assert (await serve.reconcile()).adopted == []
        assert lemon.terminate_requests == {}
        lemon.release_answers("create")
        record = await creating
        assert record.status is SessionStatus.ACTIVE


async def test_recovery_costs_no_list_when_no_intent_is_expired(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as serve:
        await serve.create_session(agent_id="agent_1")
        lists = sum(r.endpoint == "list" for r in lemon.requests)
        for _ in range(3):
            clock.advance(5)
            await serve.reaper.run_once()
        assert sum(r.endpoint == "list" for r in lemon.requests) == lists == 0


async def test_an_unmatched_expired_intent_is_retried_then_failed(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        lemon.inject("create", Fault.drop())  # nothing started
        with pytest.raises(CreateOutcomeUnknown):
            await mgr.create_session(agent_id="agent_1")
        await mgr.reaper.run_once()
        [intent] = (await mgr.repository.list()).items
        assert intent.status is SessionStatus.PENDING
        assert intent.next_attempt_at is not None  # backing off, not listing every tick
        lists = sum(r.endpoint == "list" for r in lemon.requests)
        await mgr.reaper.run_once()
        assert sum(r.endpoint == "list" for r in lemon.requests) == lists
        clock.advance(PENDING_GRACE)
        await mgr.reaper.run_once()
        failed = await mgr.get(intent.id)
        assert failed.status is SessionStatus.FAILED
        assert failed.end_reason is EndReason.CREATE_UNKNOWN


async def test_an_adopt_that_finds_the_session_recorded_never_ends_it(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        lemon.inject("create", Fault.lost_answer())
        with pytest.raises(CreateOutcomeUnknown):
            await mgr.create_session(agent_id="agent_1")
        [sid] = list(lemon.sessions)
        [intent] = (await mgr.repository.list()).items
        # someone records that very session (e.g. `sessionmgr adopt`) before recovery runs
        await mgr.adopt_session(sid)
        await mgr.reaper.run_once()
        assert lemon.terminate_requests == {}
        assert (await mgr.get(sid)).status is SessionStatus.ACTIVE
        assert (await mgr.get(intent.id)).status is SessionStatus.PENDING


async def test_a_touch_buffered_elsewhere_wins_over_a_claim(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    """A backend touches just before the deadline; serve ticks before the backend's flush:
    the row is not claimed until one flush interval past the stored deadline, and the flush
    (on its own loop, reaper or not) lands first."""
    async with (
        make_manager(lemon, clock, migrated_url) as backend,
        make_manager(lemon, clock, migrated_url) as serve,
    ):
        record = await backend.create_session(agent_id="agent_1")
        assert record.session_id
        clock.advance(59.9)
        backend.touch(record.session_id)  # buffered in the backend
        clock.advance(0.2)  # the stored deadline has passed
        assert (await serve.reaper.run_once()).ended == []
        clock.advance(0.8)  # the backend's flush loop writes the touch
        await wait_for(lambda: not backend.repository._touches)
        assert (await serve.reaper.run_once()).ended == []
        assert (await serve.get(record.id)).status is SessionStatus.ACTIVE


async def test_a_takeover_asks_lemonslice_first_and_sends_no_second_terminate(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        record = await mgr.create_session(agent_id="agent_1")
        assert record.session_id
        # a process claims it, terminates it, and dies before recording the end
        claimed = await mgr.repository.begin_end(
            record.id, owner="dead", lease=60, reason=EndReason.MANUAL
        )
        assert claimed is not None
        assert await mgr.client.end_session(record.session_id, claimed.control_url)
        clock.advance(61)
        result = await mgr.reaper.run_once()
        assert [r.id for r in result.ended] == [record.id]
        assert lemon.terminate_requests == {record.session_id: 1}  # only the dead one's
        row = await mgr.get(record.id)
        assert row.status is SessionStatus.ENDED
        assert row.end_reason is EndReason.MANUAL  # kept
        assert row.remote_status == "COMPLETED"
        assert row.cost is not None


async def test_the_heartbeat_follows_a_long_drain(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url, reaper_concurrency=1) as mgr:
        for n in range(4):
            await mgr.create_session(agent_id=f"agent_{n}")
        clock.advance(120)
        lemon.set_latency("terminate", 0.05)
        beats = []
        mgr.reaper.on_ended = None
        tick = asyncio.create_task(mgr.reaper.run_once())
        while not tick.done():
            beats.append(mgr.reaper.heartbeat.last_progress_at)
            clock.advance(1)
            await asyncio.sleep(0.02)
        await tick
        assert mgr.reaper.heartbeat.last_tick_at is not None
        progress = [b for b in beats if b is not None]
        assert len(set(progress)) >= 3  # moved mid-tick, with the ends, not only at its end


async def test_the_cost_of_a_session_ended_here_is_fetched_after_the_end(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        record = await mgr.create_session(agent_id="agent_1")
        clock.advance(60)
        await mgr.end_session(record.id)
        assert (await mgr.get(record.id)).cost is None
        clock.advance(COST_DELAY)
        await mgr.reaper.run_once()
        row = await mgr.get(record.id)
        assert row.cost == 1.0
        assert row.next_attempt_at is None
        gets = sum(r.endpoint == "get" for r in lemon.requests)
        clock.advance(COST_DELAY)
        await mgr.reaper.run_once()
        assert sum(r.endpoint == "get" for r in lemon.requests) == gets  # asked once


async def test_pending_cannot_become_ending_or_ended() -> None:
    from sessionmgr.states import TRANSITIONS

    assert TRANSITIONS[SessionStatus.PENDING] == {SessionStatus.ACTIVE, SessionStatus.FAILED}


async def test_hosts_whose_clocks_differ_by_30s_never_hold_one_row_at_once(
    migrated_url: str,
) -> None:
    """On PostgreSQL leases are stamped and compared on the server's now(): a reaper whose
    clock runs 30 s ahead neither claims nor ends a row another holds, nor takes an intent."""
    from sessionmgr.clock import SkewedClock
    from sessionmgr.repository import SessionRepository

    slow_host = await SessionRepository.open(migrated_url, clock=SkewedClock(0))
    fast_host = await SessionRepository.open(migrated_url, clock=SkewedClock(30))
    try:
        if not migrated_url.startswith("postgresql"):  # one host: its one clock is the truth
            assert not slow_host.database_clock
            return
        assert slow_host.database_clock
        assert fast_host.database_clock
        pks = []
        for n in range(20):
            intent = await slow_host.record_intent(idle_window=0.001, max_age=None)
            active = await slow_host.mark_active(
                intent.id, session_id=f"s{n}", room_url=None, control_url="c"
            )
            assert active is not None
            pks.append(active.id)
        held = await slow_host.record_intent(idle_window=60, max_age=None, owner="slow", lease=10)
        await asyncio.sleep(0.01)  # every deadline has passed on both clocks
        mine = await slow_host.claim_due(owner="slow", limit=10, lease=10)
        assert len(mine) == 10
        theirs = await fast_host.claim_due(owner="fast", limit=100, lease=10)
        assert {r.id for r in theirs}.isdisjoint(r.id for r in mine)
        assert len(theirs) == 10  # only the rows nobody held
        for record in mine:
            assert (
                await fast_host.begin_end(record.id, owner="fast", lease=10, reason=EndReason.IDLE)
                is None
            )
            assert await fast_host.mark_ended(record.id, owner=None) is None
        assert not await fast_host.has_due_intents()
        assert await fast_host.claim_intents(owner="fast", lease=10, limit=10) == []
        assert await slow_host.renew_leases([held.id], owner="slow", lease=10) == 1
    finally:
        await slow_host.close()
        await fast_host.close()


async def test_stats_show_credits_known_and_sessions_still_without_a_cost(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        first = await mgr.create_session(agent_id="agent_1")
        second = await mgr.create_session(agent_id="agent_2")
        clock.advance(120)
        await mgr.end_session(first.id)
        await mgr.end_session(second.id)
        stats = await mgr.repository.stats(days=1)
        assert (stats.credits_known, stats.cost_unknown) == (0.0, 2)
        clock.advance(COST_DELAY)
        await mgr.reaper.run_once()  # both costs fetched after the end
        stats = await mgr.repository.stats(days=1)
        assert (stats.credits_known, stats.cost_unknown) == (4.0, 0)
        assert stats.to_dict()["credits_known"] == 4.0


async def test_a_cost_no_longer_worth_asking_for_is_dropped_without_a_request(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> None:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        record = await mgr.create_session(agent_id="agent_1")
        lemon.inject("get", Fault.status(500), times=1000)  # LemonSlice cannot say for an hour
        await mgr.end_session(record.id)
        for _ in range(4):
            clock.advance(COST_HORIZON / 3)
            await mgr.reaper.run_once()
        row = await mgr.get(record.id)
        assert (row.cost, row.next_attempt_at) == (None, None)  # given up, not asked forever
        gets = sum(r.endpoint == "get" for r in lemon.requests)
        clock.advance(COST_HORIZON)
        await mgr.reaper.run_once()
        assert sum(r.endpoint == "get" for r in lemon.requests) == gets
