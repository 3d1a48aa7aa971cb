"""Recovery never ends a session a live process still holds (issue 12, "what goes wrong today").

The race: an old lost intent is pending; another process's create is in flight (LemonSlice has
started and lists its session, the answer has not arrived); reconcile runs meanwhile. Matching by
time alone gave the in-flight session to the old intent and terminated it.
"""

from __future__ import annotations

import asyncio

import pytest

from sessionmgr import CreateOutcomeUnknown, SessionStatus
from sessionmgr.clock import FakeClock
from sessionmgr.testing import FakeLemonSlice, Fault

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
