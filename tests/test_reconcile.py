"""Reconcile: remote status, lost creates matched to intents, orphans, expired intents."""

from __future__ import annotations

import pytest

from sessionmgr import CreateOutcomeUnknown, EndReason, SessionStatus
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.reconcile import PENDING_GRACE, SETTLE
from sessionmgr.testing import FakeLemonSlice, Fault


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
