"""sessionmgr.integrations.livekit against livekit-plugins-lemonslice 1.8.9 itself: the plugin's
real ``AvatarSession.start()`` (token minting, audio rebinding, its ``LemonSliceAPI`` POST) and
``aclose()`` against FakeLemonSlice; no LiveKit server is needed for the LemonSlice side.

Faked: only what a LiveKit worker's job would provide, the job context (``get_job_context()``:
the job's room sid, the local participant's identity, shutdown callbacks) and the name of the room
it joined. The room is otherwise a real, unconnected ``rtc.Room``, the agent session a real
``AgentSession`` with nothing attached, and the job a real protobuf ``Job``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.job import _JobContextVar
from livekit.agents.voice.events import AgentStateChangedEvent, UserStateChangedEvent
from livekit.protocol import agent, models

from sessionmgr.clock import FakeClock
from sessionmgr.errors import ClientRequestError, CreateOutcomeUnknown
from sessionmgr.integrations.livekit import ManagedAvatarSession, touch_on_activity
from sessionmgr.manager import SessionManager
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault

from .helpers import FAKE_API_KEY, make_manager

LIVEKIT = {
    "livekit_url": "wss://lk.example",
    "livekit_api_key": "APIfake",
    "livekit_api_secret": "livekit-api-secret-0123456789abcdef",
}
ROOM_SID = "RM_fake123"


@dataclasses.dataclass
class FakeJobContext:
    """What ``AvatarSession.start`` reads of LiveKit's ``JobContext``."""

    job: agent.Job
    local_participant_identity: str = "agent-local"
    shutdown_callbacks: list[Callable[..., Any]] = dataclasses.field(default_factory=list)

    def add_shutdown_callback(self, callback: Callable[..., Any]) -> None:
        self.shutdown_callbacks.append(callback)


class JoinedRoom(rtc.Room):
    """A real ``rtc.Room`` that is not connected, with the name a joined room has."""

    @property
    def name(self) -> str:
        return "support"


@pytest.fixture
def job() -> Iterator[FakeJobContext]:
    ctx = FakeJobContext(job=agent.Job(id="AJ_1", room=models.Room(sid=ROOM_SID, name="support")))
    token = _JobContextVar.set(ctx)  # type: ignore[arg-type]
    try:
        yield ctx
    finally:
        _JobContextVar.reset(token)


@pytest.fixture
async def managed(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> AsyncIterator[SessionManager]:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        yield mgr


def avatar(manager: SessionManager, lemon: FakeLemonSlice, **kw: Any) -> ManagedAvatarSession:
    kw.setdefault("agent_id", "agent_lk")
    return ManagedAvatarSession(manager, api_url=lemon.url, api_key=FAKE_API_KEY, **kw)


async def test_start_records_the_session_and_aclose_terminates_it(
    managed: SessionManager, lemon: FakeLemonSlice, job: FakeJobContext
) -> None:
    av = avatar(
        managed,
        lemon,
        agent_prompt="Smile.",
        idle_timeout=30,
        model="lemon-2",
        metadata={"bot": "lk"},
    )
    sid = await av.start(AgentSession(), JoinedRoom(), **LIVEKIT)
    assert sid == av.session_id  # the plugin's own attribute
    record = await managed.get(sid)
    assert record.status is SessionStatus.ACTIVE
    assert (record.agent_id, record.agent_prompt, record.idle_timeout) == ("agent_lk", "Smile.", 30)
    assert record.control_url == f"{lemon.url}/{sid}/control"  # derived: LiveKit's answer has none
    assert record.metadata == {"via": "livekit", "room": "support", "bot": "lk"}
    assert (record.transport_type, record.model) == ("livekit", "lemon-2")
    payload = lemon.requests[0].json
    assert payload["transport_type"] == "livekit"
    assert payload["properties"]["livekit_session_id"] == ROOM_SID
    minted = payload["properties"]["livekit_token"]  # the JWT the plugin minted for the avatar
    assert minted.count(".") == 2
    stored = json.dumps(record.to_dict()) + json.dumps(
        [e.to_dict() for e in await managed.repository.events(record.id)]
    )
    assert minted not in stored
    assert LIVEKIT["livekit_api_secret"] not in stored
    assert job.shutdown_callbacks == [av.aclose]  # the job's shutdown will close it

    await av.aclose()  # what the job's shutdown runs
    record = await managed.get(sid)
    assert (record.status, record.end_reason) == (SessionStatus.ENDED, EndReason.MANUAL)
    events = await managed.repository.events(record.id)
    assert any("livekit AvatarSession.aclose" in (e.detail or "") for e in events)
    assert lemon.creates == 1
    assert lemon.terminate_counts == {sid: 1}
    await av.aclose()  # a second close sends nothing
    assert lemon.terminate_requests == {sid: 1}


async def test_the_reaper_guards_it_until_aclose(
    managed: SessionManager, lemon: FakeLemonSlice, clock: FakeClock, job: FakeJobContext
) -> None:
    av = avatar(managed, lemon, idle_window=20)
    sid = await av.start(AgentSession(), JoinedRoom(), **LIVEKIT)
    clock.advance(25)
    await managed.reaper.run_once()
    assert (await managed.get(sid)).end_reason is EndReason.IDLE
    await av.aclose()  # already ended: no second terminate
    assert lemon.terminate_requests == {sid: 1}


async def test_agent_and_user_activity_touch_the_session(
    managed: SessionManager, lemon: FakeLemonSlice, clock: FakeClock, job: FakeJobContext
) -> None:
    session: AgentSession[Any] = AgentSession()
    av = avatar(managed, lemon)
    touch_on_activity(managed, av, session)
    sid = await av.start(session, JoinedRoom(), **LIVEKIT)
    start = await managed.get(sid)
    clock.advance(50)
    session.emit(
        "user_state_changed", UserStateChangedEvent(old_state="listening", new_state="away")
    )
    await managed.repository.flush_touches()
    assert (await managed.get(sid)).last_activity_at == start.last_activity_at  # away: not activity
    session.emit(
        "agent_state_changed", AgentStateChangedEvent(old_state="listening", new_state="speaking")
    )
    await managed.repository.flush_touches()
    touched = await managed.get(sid)
    assert touched.deadline is not None
    assert start.deadline is not None
    assert (touched.deadline - start.deadline).total_seconds() == pytest.approx(50)
    clock.advance(30)  # past the first deadline, inside the pushed one
    await managed.reaper.run_once()
    assert (await managed.get(sid)).status is SessionStatus.ACTIVE
    await av.aclose()


async def test_a_rejected_create_is_recorded_failed(
    managed: SessionManager, lemon: FakeLemonSlice, job: FakeJobContext
) -> None:
    lemon.inject("create", Fault.status(402, '{"detail": "no credits"}'))
    with pytest.raises(ClientRequestError, match="402"):
        await avatar(managed, lemon).start(AgentSession(), JoinedRoom(), **LIVEKIT)
    [record] = (await managed.repository.list(limit=5)).items
    assert (record.status, record.end_reason) == (SessionStatus.FAILED, EndReason.CREATE_REJECTED)


async def test_a_lost_answer_is_not_retried_and_stays_pending_for_reconcile(
    managed: SessionManager, lemon: FakeLemonSlice, job: FakeJobContext
) -> None:
    lemon.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await avatar(managed, lemon).start(AgentSession(), JoinedRoom(), **LIVEKIT)
    assert lemon.creates == 1  # the plugin's own retry would have started a second session
    [intent] = await managed.repository.pending_intents()
    assert intent.agent_id == "agent_lk"


async def test_missing_livekit_credentials_fail_before_anything_is_sent(
    managed: SessionManager,
    lemon: FakeLemonSlice,
    job: FakeJobContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ClientRequestError, match="livekit_url"):
        await avatar(managed, lemon).start(AgentSession(), JoinedRoom())
    assert lemon.requests == []
    [record] = (await managed.repository.list(limit=5)).items
    assert record.status is SessionStatus.FAILED
