"""sessionmgr.integrations.pipecat against pipecat-ai 1.14.0 itself: the real
``LemonSliceTransport`` / ``LemonSliceTransportClient`` code paths against FakeLemonSlice
(``_initialize()`` creates; ``_end_session()``, which ``stop()``, ``cleanup()`` and ``setup()``'s
error path call, ends), with and without the recording proxy, and the activity observer inside a
real pipecat pipeline. Nothing of pipecat is faked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pipecat.frames.frames import (
    BotSpeakingFrame,
    EndFrame,
    TextFrame,
    UserStartedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.lemonslice.transport import (
    LemonSliceNewSessionRequest,
    LemonSliceTransport,
)
from pipecat.workers.runner import WorkerRunner

from sessionmgr import proxy
from sessionmgr.clock import FakeClock
from sessionmgr.errors import ClientRequestError, IntegrationError
from sessionmgr.integrations.pipecat import (
    BUILT_AGAINST,
    ManagedLemonSliceApi,
    SessionActivityObserver,
    manage_transport,
)
from sessionmgr.manager import SessionManager
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault
from sessionmgr.web import create_app

from .helpers import FAKE_API_KEY, make_manager

DAILY_TOKEN = "daily-secret-token-81c2"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def managed(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> AsyncIterator[SessionManager]:
    async with make_manager(lemon, clock, migrated_url) as mgr:
        yield mgr


def transport(http: aiohttp.ClientSession, **request: object) -> LemonSliceTransport:
    return LemonSliceTransport(
        "support-bot",
        http,
        FAKE_API_KEY,
        session_request=LemonSliceNewSessionRequest(**request),  # type: ignore[arg-type]
    )


async def test_the_transport_clients_create_and_end_go_through_the_manager(
    managed: SessionManager, lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    t = transport(
        http,
        agent_id="agent_pc",
        agent_prompt="Be brief.",
        idle_timeout=45,
        daily_room_url="https://x.daily.co/room",
        daily_token=DAILY_TOKEN,
    )
    api = manage_transport(t, managed, metadata={"user": "alice"})
    room_url = await t._client._initialize()  # what setup() runs first
    assert room_url == "https://x.daily.co/room"
    sid = t._client._session_id
    assert sid is not None
    assert api.session_id == sid
    record = await managed.get(sid)
    assert record.status is SessionStatus.ACTIVE
    assert record.metadata == {"via": "pipecat", "bot": "support-bot", "user": "alice"}
    assert (record.agent_id, record.agent_prompt, record.idle_timeout) == (
        "agent_pc",
        "Be brief.",
        45,
    )
    assert DAILY_TOKEN not in json.dumps(record.to_dict())
    payload = lemon.requests[0].json
    assert payload["audio_sample_rate"] == 24000  # pipecat 1.14's default, sent as pipecat does
    assert payload["properties"] == {
        "daily_url": "https://x.daily.co/room",
        "daily_token": DAILY_TOKEN,
    }

    # the end path: stop(), cleanup() and setup()'s error path all call _end_session()
    await t._client._end_session()
    record = await managed.get(sid)
    assert (record.status, record.end_reason) == (SessionStatus.ENDED, EndReason.MANUAL)
    events = await managed.repository.events(record.id)
    assert any("pipecat end_session" in (e.detail or "") for e in events)
    assert t._client._session_id is None
    assert api.session_id is None
    assert lemon.creates == 1
    assert lemon.terminate_counts == {sid: 1}
    await t._client._end_session()  # idempotent, as pipecat's own
    assert lemon.terminate_requests == {sid: 1}


async def test_the_plain_transport_pointed_at_the_proxy_is_recorded_and_ended(
    managed: SessionManager, lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    app = create_app(managed, admin_token=None)
    proxy.add_routes(app, managed)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url(proxy.COLLECTION))
        t = transport(http, agent_id="agent_px", api_url=url)  # the one-line change
        await t._client._initialize()
        sid = t._client._session_id
        assert sid is not None
        assert t._client._control_url == f"{url}/{sid}/control"
        assert (await managed.get(sid)).status is SessionStatus.ACTIVE
        await t._client._end_session()
    record = await managed.get(sid)
    assert (record.status, record.end_reason) == (SessionStatus.ENDED, EndReason.MANUAL)
    events = await managed.repository.events(record.id)
    assert any("client terminate via proxy" in (e.detail or "") for e in events)
    assert lemon.creates == 1
    assert lemon.terminate_counts == {sid: 1}


async def test_manage_transport_checks_pipecats_private_attribute(
    managed: SessionManager, http: aiohttp.ClientSession
) -> None:
    t = transport(http, agent_id="a")
    del t._client._api
    with pytest.raises(IntegrationError, match=rf"pipecat-ai 1\.14\.0 .*{BUILT_AGAINST}"):
        manage_transport(t, managed)
    t = transport(http, agent_id="a")
    t._client._api = object()  # type: ignore[assignment]
    with pytest.raises(IntegrationError, match="LemonSliceApi"):
        manage_transport(t, managed)
    t = transport(http, agent_id="a")
    t._client._session_id = "sess_already"
    with pytest.raises(IntegrationError, match="before the pipeline runs"):
        manage_transport(t, managed)


async def test_a_rejected_create_raises_and_is_recorded_failed(
    managed: SessionManager, lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    t = transport(http, agent_id="a", idle_timeout=10)
    manage_transport(t, managed)
    lemon.inject("create", Fault.status(402, '{"detail": "no credits"}'))
    with pytest.raises(ClientRequestError, match="402"):
        await t._client._initialize()  # setup() ends what it can and re-raises, as with pipecat's
    assert t._client._session_id is None
    [record] = (await managed.repository.list(limit=5)).items
    assert (record.status, record.end_reason) == (SessionStatus.FAILED, EndReason.CREATE_REJECTED)


class Speaker(FrameProcessor):
    """Passes every frame on (so the pipeline's observers see each push)."""

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


async def test_observer_touches_push_the_deadline_with_no_io_on_the_frame_path(
    managed: SessionManager, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    api = ManagedLemonSliceApi(managed)
    answer = await api.create_session(agent_id="a")
    sid = answer["session_id"]
    start = await managed.get(sid)
    observer = SessionActivityObserver(managed, api)
    clock.advance(40)  # 40 s of the 60 s idle window gone
    task = PipelineWorker(Pipeline([Speaker()]), observers=[observer], enable_rtvi=False)
    await task.queue_frames(
        [TextFrame("hello"), UserStartedSpeakingFrame(), BotSpeakingFrame(), EndFrame()]
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    await runner.run()
    assert observer.touches == 1  # two speaking frames within TOUCH_EVERY: one touch
    assert (await managed.get(sid)).last_activity_at == start.last_activity_at  # nothing written
    await managed.repository.flush_touches()
    touched = await managed.get(sid)
    assert touched.last_activity_at == start.last_activity_at + (
        clock.now() - start.last_activity_at
    )
    assert touched.deadline is not None
    assert start.deadline is not None
    assert (touched.deadline - start.deadline).total_seconds() == pytest.approx(40)
    clock.advance(30)  # past the first deadline, inside the pushed one
    await managed.reaper.run_once()
    assert (await managed.get(sid)).status is SessionStatus.ACTIVE
    clock.advance(40)
    await managed.reaper.run_once()
    assert (await managed.get(sid)).end_reason is EndReason.IDLE


async def test_observer_follows_the_current_session_and_ignores_other_frames(
    managed: SessionManager, clock: FakeClock
) -> None:
    seen: list[str | None] = [None]
    observer = SessionActivityObserver(managed, lambda: seen[0], every=0.0)
    proc = FrameProcessor()

    def pushed(frame: object) -> FramePushed:
        return FramePushed(proc, proc, frame, FrameDirection.DOWNSTREAM, 0)  # type: ignore[arg-type]

    await observer.on_push_frame(pushed(UserStartedSpeakingFrame()))
    assert observer.touches == 0  # no session yet
    record = await ManagedLemonSliceApi(managed).create_session(agent_id="a")
    seen[0] = record["session_id"]
    await observer.on_push_frame(pushed(TextFrame("not speech")))
    assert observer.touches == 0
    await observer.on_push_frame(pushed(UserStartedSpeakingFrame()))
    await observer.on_push_frame(pushed(BotSpeakingFrame()))
    assert observer.touches == 2
