"""Reconcile: remote status, lost creates matched to intents, orphans, expired intents."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sessionmgr import CreateOutcomeUnknown, EndReason, SessionStatus
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.reconcile import PENDING_GRACE, SETTLE
from sessionmgr.testing import FakeLemonSlice, Fault

from .helpers import wait_for


async def test_finished_remote_sessions_are_ended_with_cost(
    manager: SessionManager, lemon: FakeLemonSlice
):
    done = await manager.create_session(agent_id="agent_done")
    live = await manager.create_session(agent_id="agent_live")
    assert done.session_id
    assert live.session_id
    lemon.set_status(done.session_id, "COMPLETED", cost=12.5)
    report = await manager.reconcile()
    assert report.checked == 2
    assert [r.id for r in report.ended_remote] == [done.id]
    row = await manager.get(done.id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.REMOTE_COMPLETED
    assert row.cost == 12.5
    assert row.remote_status == "COMPLETED"
    live_row = await manager.get(live.id)
    assert live_row.status is SessionStatus.ACTIVE
    assert live_row.remote_status == "ACTIVE"
    assert lemon.terminate_counts == {}  # nothing needed terminating


@pytest.mark.parametrize(
    ("remote", "reason"),
    [("TIMED_OUT", EndReason.REMOTE_TIMED_OUT), ("FAILED", EndReason.REMOTE_FAILED)],
)
async def test_other_remote_endings(
    manager: SessionManager, lemon: FakeLemonSlice, remote: str, reason: EndReason
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id
    lemon.set_status(record.session_id, remote)
    await manager.reconcile()
    assert (await manager.get(record.id)).end_reason is reason


async def test_lost_create_is_matched_adopted_and_ended(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    lemon.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await manager.create_session(agent_id="agent_1", metadata={"bot": "b"})
    [intent] = (await manager.repository.list()).items
    [remote_id] = list(lemon.sessions)
    # the creator gave its lease up with the unknown outcome: resolved at once, no settle wait
    report = await manager.reconcile()
    assert [r.session_id for r in report.adopted] == [remote_id]
    assert report.orphans == []
    row = await manager.get(intent.id)
    assert row.session_id == remote_id
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.CREATE_UNKNOWN
    assert row.metadata == {"bot": "b"}
    assert lemon.terminate_counts == {remote_id: 1}
    assert lemon.live_count == 0


async def test_an_intent_with_no_remote_session_fails_after_the_grace(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    lemon.inject("create", Fault.drop())  # dropped after sending: outcome unknown, none created
    with pytest.raises(CreateOutcomeUnknown):
        await manager.create_session(agent_id="agent_1")
    [intent] = (await manager.repository.list()).items
    clock.advance(SETTLE + 1)
    assert (await manager.reconcile()).intents_failed == []  # within the grace: wait
    assert (await manager.get(intent.id)).status is SessionStatus.PENDING
    clock.advance(PENDING_GRACE)
    report = await manager.reconcile()
    assert [r.id for r in report.intents_failed] == [intent.id]
    row = await manager.get(intent.id)
    assert row.status is SessionStatus.FAILED
    assert row.end_reason is EndReason.CREATE_UNKNOWN


async def test_orphans_are_reported_and_ended_only_when_asked(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    answer = await manager.client.create_session(agent_id="someone_elses")
    orphan_id = answer["session_id"]
    clock.advance(SETTLE + 1)
    report = await manager.reconcile()
    assert [o.session_id for o in report.orphans] == [orphan_id]
    assert report.orphans_ended == []
    assert lemon.live_count == 1
    assert await manager.repository.find(orphan_id) is None
    dry = await manager.reconcile(dry_run=True, end_orphans=True)
    assert dry.orphans_ended == []
    assert lemon.live_count == 1
    report = await manager.reconcile(end_orphans=True)
    assert report.orphans_ended == [orphan_id]
    row = await manager.get(orphan_id)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.ORPHAN
    assert lemon.terminate_counts == {orphan_id: 1}


async def test_dry_run_changes_nothing(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id
    lemon.set_status(record.session_id, "COMPLETED", cost=1.0)
    report = await manager.reconcile(dry_run=True)
    assert [r.id for r in report.ended_remote] == [record.id]
    assert (await manager.get(record.id)).status is SessionStatus.ACTIVE


async def test_remote_gone_session_is_ended_as_gone(manager: SessionManager, lemon: FakeLemonSlice):
    record = await manager.adopt_session("sess_never_existed")
    report = await manager.reconcile()
    assert [r.id for r in report.ended_remote] == [record.id]
    assert (await manager.get(record.id)).end_reason is EndReason.GONE


async def test_api_errors_are_reported_not_raised(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    await manager.create_session(agent_id="agent_1")
    lemon.inject("get", Fault.status(500), times=100)
    lemon.inject("list", Fault.status(500), times=100)
    report = await manager.reconcile()
    assert len(report.errors) == 2
    assert all("500" in e for e in report.errors)


async def test_a_session_ended_here_but_still_live_there_is_terminated_again(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    """A terminate answered 404 by something that was not LemonSlice (the row ends ``gone``)
    leaves a live, billing session; once it has settled, reconcile sends the terminate again."""
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id
    lemon.inject("terminate", Fault.status(404))
    result = await manager.end_session(record.id)
    assert result.record.end_reason is EndReason.GONE
    assert lemon.live_count == 1  # the lie: it still runs

    fresh = await manager.reconcile()  # just ended: the remote list may lag, leave it
    assert fresh.still_live == []
    clock.advance(SETTLE + 1)
    dry = await manager.reconcile(dry_run=True)
    assert [r.id for r in dry.still_live] == [record.id]
    assert dry.terminated_again == []
    assert lemon.live_count == 1
    report = await manager.reconcile()
    assert report.terminated_again == [record.session_id]
    assert lemon.live_count == 0
    assert lemon.terminate_counts == {record.session_id: 1}
    row = await manager.get(record.id)
    assert (row.status, row.end_reason) == (SessionStatus.ENDED, EndReason.GONE)  # unchanged
    assert (await manager.reconcile()).still_live == []  # and only once


# --- issue 12: leases wherever taken, a list read only as far as it matters -----------------------


async def test_end_session_keeps_its_lease_renewed_while_the_terminate_is_slow(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    """A lease taken outside the reaper's tick (end_session) is renewed too, so a slow
    terminate is never joined by a second one from another process."""
    import asyncio

    record = await manager.create_session(agent_id="agent_1")
    lemon.hold_answers("terminate", 30)
    ending = asyncio.create_task(manager.end_session(record.id))
    await wait_for(lambda: len(lemon.terminate_requests_total()) == 1)
    first = await manager.get(record.id)
    assert first.lease_until is not None
    for _ in range(3):  # three lease periods, each renewed before it runs out
        clock.advance(manager.reaper.lease / 3 + 1)
        taken = await manager.repository.begin_end(
            record.id, owner="other", lease=60, reason=EndReason.IDLE
        )
        assert taken is None
    lemon.release_answers("terminate")
    result = await ending
    assert result.record.end_reason is EndReason.MANUAL
    assert lemon.terminate_requests == {record.session_id: 1}


async def test_reconcile_reads_the_list_only_back_to_what_can_matter(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    lemon.seed_history(2_000, before=clock.now() - timedelta(hours=2))
    for n in range(3):
        await manager.create_session(agent_id=f"agent_{n}")
    before = len(lemon.requests)
    report = await manager.reconcile()
    sent = lemon.requests[before:]
    assert [r.endpoint for r in sent] == ["list"]  # one page; status from the list, no GETs
    assert report.checked == 3


async def test_a_list_that_is_not_newest_first_is_read_whole(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    import logging

    import sessionmgr.reconcile as reconcile_module

    logged: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record)

    handler = Keep(logging.WARNING)
    reconcile_logger = logging.getLogger(reconcile_module.__name__)
    # a CLI test earlier in the run may have configured logging (disabling existing loggers)
    was = reconcile_logger.disabled, reconcile_logger.level
    reconcile_logger.disabled = False
    reconcile_logger.setLevel(logging.WARNING)  # setLevel: it also clears the level cache
    reconcile_logger.addHandler(handler)
    try:
        lemon.seed_history(250, before=clock.now() - timedelta(hours=2))
        lemon.list_newest_first = False  # not as documented: the live session comes last
        reconcile_module._unordered_logged = False
        await manager.create_session(agent_id="agent_1")
        for _ in range(2):
            before = len(lemon.requests)
            report = await manager.reconcile()
            sent = lemon.requests[before:]
            assert [r.endpoint for r in sent] == ["list"] * 3  # all 251 sessions
            assert report.checked == 1
    finally:
        reconcile_logger.removeHandler(handler)
        reconcile_logger.disabled = was[0]
        reconcile_logger.setLevel(was[1])
    unordered = [r for r in logged if "not newest-first" in r.getMessage()]
    assert len(unordered) == 1  # logged once


async def test_a_queued_cold_start_whose_answer_was_lost_is_recovered(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    lemon.configure_realism(queue_seconds=150)  # a cold start: QUEUED for 2.5 minutes
    lemon.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await manager.create_session(agent_id="agent_1")
    [sid] = list(lemon.sessions)
    assert lemon.sessions[sid].status == "QUEUED"
    await manager.reaper.run_once()  # the creator gave the lease up: recovered on this tick
    assert lemon.terminate_counts == {sid: 1}
    row = await manager.get(sid)
    assert row.status is SessionStatus.ENDED
    assert row.end_reason is EndReason.CREATE_UNKNOWN


async def test_sessions_the_server_ends_by_itself_are_ended_with_the_lists_cost(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
):
    lemon.configure_realism(server_timeouts=True)
    idle = await manager.create_session(agent_id="agent_idle", idle_timeout=60)
    capped = await manager.create_session(agent_id="agent_capped", idle_timeout=-1)
    clock.advance(61)
    report = await manager.reconcile()
    assert [r.id for r in report.ended_remote] == [idle.id]
    row = await manager.get(idle.id)
    assert row.end_reason is EndReason.REMOTE_TIMED_OUT
    assert row.cost is not None  # the list's credits_used (a GET has none for TIMED_OUT)
    assert report.get_requests == 0
    clock.advance(1800)
    await manager.reconcile()
    row = await manager.get(capped.id)
    assert row.end_reason is EndReason.REMOTE_COMPLETED
    assert row.cost == 30.0  # billed to the 30-minute cap
    assert lemon.terminate_requests == {}
