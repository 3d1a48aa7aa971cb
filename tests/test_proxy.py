"""The recording proxy (sessionmgr/proxy.py) driven by the real clients that will point at it:
pipecat's ``LemonSliceApi`` (pipecat-ai 1.14.0) and the LiveKit plugin's ``LemonSliceAPI``
(livekit-plugins-lemonslice 1.8.9), with ``FakeLemonSlice`` upstream. The app runs in process on
a real socket; the manager's reaper is driven by hand on a FakeClock."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from livekit.agents import APIConnectOptions
from livekit.plugins.lemonslice.api import LemonSliceAPI
from PIL import Image
from pipecat.transports.lemonslice.api import LemonSliceApi

from sessionmgr import proxy
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault
from sessionmgr.web import create_app

from .helpers import FAKE_API_KEY, make_manager

DAILY_TOKEN = "daily-secret-token-81c2"
LIVEKIT_TOKEN = "livekit-jwt-secret-77ab"


@contextlib.asynccontextmanager
async def serving(manager: SessionManager) -> AsyncIterator[str]:
    """The app ``serve`` builds (admin API plus proxy); yields the proxy's collection URL."""
    app = create_app(manager, admin_token=None)
    proxy.add_routes(app, manager)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url(proxy.COLLECTION))
    finally:
        await server.close()


@pytest.fixture
async def proxied(
    lemon: FakeLemonSlice, clock: FakeClock, migrated_url: str
) -> AsyncIterator[tuple[SessionManager, str]]:
    async with make_manager(lemon, clock, migrated_url) as mgr, serving(mgr) as url:
        yield mgr, url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize(
    ("headers", "scheme"),
    [
        ({"X-Forwarded-Proto": "https"}, "https"),
        ({"X-Forwarded-Proto": "https, http"}, "https"),  # the first hop's
        ({"Forwarded": 'for=10.0.0.1;proto=https;host="api.example"'}, "https"),
        ({"X-Forwarded-Proto": "gopher"}, "http"),  # not a scheme a control URL may have
        ({}, "http"),
    ],
)
async def test_the_control_url_handed_back_keeps_the_scheme_the_caller_used(
    proxied: tuple[SessionManager, str],
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    scheme: str,
) -> None:
    """Behind a reverse proxy that terminates TLS, the caller's terminate must go to https."""
    _, url = proxied
    async with http.post(
        url,
        json={"agent_id": "a", "transport_type": "daily"},
        headers={"x-api-key": FAKE_API_KEY, **headers},
    ) as response:
        answer = await response.json()
    assert response.status == 200, answer
    here = url.removeprefix("http")
    assert answer["control_url"] == f"{scheme}{here}/{answer['session_id']}/control"


async def test_pipecat_api_creates_and_ends_through_the_proxy(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    api = LemonSliceApi(FAKE_API_KEY, http)
    answer = await api.create_session(
        agent_id="agent_pc",
        agent_prompt="Be brief.",
        idle_timeout=45,
        audio_sample_rate=24000,
        daily_room_url="https://x.daily.co/room",
        daily_token=DAILY_TOKEN,
        api_url=url,
    )
    sid = answer["session_id"]
    assert answer["room_url"] == "https://x.daily.co/room"
    assert answer["control_url"] == f"{url}/{sid}/control"  # the terminate comes back here
    # byte-for-byte what pipecat sent (aiohttp's json= is json.dumps of the payload)
    sent = {
        "transport_type": "daily",
        "agent_id": "agent_pc",
        "agent_prompt": "Be brief.",
        "idle_timeout": 45,
        "audio_sample_rate": 24000,
        "properties": {"daily_url": "https://x.daily.co/room", "daily_token": DAILY_TOKEN},
    }
    assert lemon.requests[0].body == json.dumps(sent).encode()
    record = await manager.get(sid)
    assert record.status is SessionStatus.ACTIVE
    assert (record.agent_id, record.agent_prompt, record.idle_timeout) == (
        "agent_pc",
        "Be brief.",
        45,
    )
    assert record.control_url == f"{lemon.url}/{sid}/control"  # LemonSlice's own
    assert record.metadata == {"via": "proxy"}
    assert (record.transport_type, record.model) == ("daily", None)
    assert DAILY_TOKEN not in json.dumps(record.to_dict())

    await api.end_session(sid, answer["control_url"])  # raise_for_status inside: a 2xx
    record = await manager.get(sid)
    assert record.status is SessionStatus.ENDED
    assert record.end_reason is EndReason.MANUAL
    events = await manager.repository.events(record.id)
    assert any("client terminate via proxy" in (e.detail or "") for e in events)
    assert DAILY_TOKEN not in json.dumps([e.to_dict() for e in events])
    assert lemon.creates == 1
    assert lemon.terminate_counts == {sid: 1}

    # a second terminate is what LemonSlice answers for an ended session: 404
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await api.end_session(sid, answer["control_url"])
    assert caught.value.status == 404
    assert lemon.terminate_counts == {sid: 1}


async def test_pipecat_image_upload_goes_through_as_multipart(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    image = Image.new("RGB", (4, 4), (200, 30, 30))
    answer = await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_image=image, api_url=url)
    form = lemon.requests[0].form
    assert form is not None
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert form["image"].data == png.getvalue()
    assert json.loads(form["payload"].data) == {"transport_type": "daily"}
    record = await manager.get(answer["session_id"])
    assert record.status is SessionStatus.ACTIVE
    assert record.metadata == {"via": "proxy", "agent_image": "upload"}


async def test_livekit_api_client_creates_through_the_proxy_and_its_terminate_is_recorded(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    async with LemonSliceAPI(api_key=FAKE_API_KEY, api_url=url, session=http) as api:
        sid = await api.start_agent_session(
            livekit_url="wss://lk.example",
            livekit_token=LIVEKIT_TOKEN,
            livekit_session_id="RM_abc",
            agent_id="agent_lk",
            audio_sample_rate=24000,
            model="lemon-2",
        )
    sent = lemon.requests[0].json
    assert sent["properties"]["livekit_token"] == LIVEKIT_TOKEN  # forwarded unchanged
    record = await manager.get(sid)
    assert record.status is SessionStatus.ACTIVE
    assert record.metadata == {"via": "proxy"}
    assert (record.transport_type, record.model) == ("livekit", "lemon-2")
    assert record.control_url == f"{lemon.url}/{sid}/control"  # derived: the answer has none
    assert LIVEKIT_TOKEN not in json.dumps(record.to_dict())
    # the plugin never terminates; a client that does uses the documented control URL
    resp = await http.post(
        f"{url}/{sid}/control", json={"event": "terminate"}, headers={"x-api-key": FAKE_API_KEY}
    )
    assert (resp.status, await resp.json()) == (200, {"success": True})
    assert (await manager.get(sid)).status is SessionStatus.ENDED
    assert lemon.creates == 1
    assert lemon.terminate_counts == {sid: 1}


@pytest.mark.parametrize("key", [None, "", "test-key-but-longer", "wrong"])
async def test_a_wrong_or_missing_key_is_401_in_lemonslice_shape(
    proxied: tuple[SessionManager, str],
    lemon: FakeLemonSlice,
    http: aiohttp.ClientSession,
    key: str | None,
) -> None:
    manager, url = proxied
    headers = {} if key is None else {"x-api-key": key}
    for method, path in (
        ("POST", ""),
        ("GET", ""),
        ("GET", "/sess_x"),
        ("POST", "/sess_x/control"),
    ):
        resp = await http.request(method, url + path, json={"agent_id": "a"}, headers=headers)
        assert resp.status == 401
        assert await resp.json() == {"detail": "invalid or missing X-API-Key"}
    assert lemon.requests == []
    assert (await manager.repository.list(limit=10)).items == []


async def test_a_lost_create_answer_is_504_and_the_intent_stays_pending(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    lemon.inject("create", Fault.lost_answer())
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_id="agent_lost", api_url=url)
    assert caught.value.status == 504
    assert lemon.creates == 1  # the session exists upstream
    [intent] = await manager.repository.pending_intents()
    assert intent.agent_id == "agent_lost"
    assert intent.metadata["via"] == "proxy"


@pytest.mark.parametrize(
    ("fault", "status", "final"),
    [
        (Fault.status(402, '{"detail": "not enough credits"}'), 402, SessionStatus.FAILED),
        (Fault.status(400, '{"detail": "bad agent"}'), 400, SessionStatus.FAILED),
        (Fault.status(500, '{"detail": "boom"}'), 500, SessionStatus.PENDING),
        (Fault.status(503, '{"detail": "busy"}'), 503, SessionStatus.FAILED),
    ],
)
async def test_upstream_errors_pass_back_with_status_and_body(
    proxied: tuple[SessionManager, str],
    lemon: FakeLemonSlice,
    http: aiohttp.ClientSession,
    fault: Fault,
    status: int,
    final: SessionStatus,
) -> None:
    manager, url = proxied
    lemon.inject("create", fault, times=10)  # 503 is retried: every attempt gets it
    resp = await http.post(url, json={"agent_id": "agent_x"}, headers={"x-api-key": FAKE_API_KEY})
    assert resp.status == status
    assert await resp.read() == (fault.body or "").encode()
    page = await manager.repository.list(limit=10)
    [record] = page.items
    assert record.status is final  # a 500 may have started a session: reconcile decides
    if final is SessionStatus.FAILED:
        assert record.end_reason is EndReason.CREATE_REJECTED


async def test_a_body_past_the_limit_is_413_and_nothing_is_sent(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    big = b'{"agent_id": "a", "agent_prompt": "' + b"x" * proxy.MAX_BODY + b'"}'
    resp = await http.post(
        url, data=big, headers={"x-api-key": FAKE_API_KEY, "Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert "detail" in await resp.json()
    assert lemon.requests == []
    assert (await manager.repository.list(limit=10)).items == []


async def test_a_body_that_is_not_a_create_is_400_before_anything_is_written(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    resp = await http.post(url, data=b"[1, 2]", headers={"x-api-key": FAKE_API_KEY})
    assert resp.status == 400
    assert "JSON object" in (await resp.json())["detail"]
    assert lemon.requests == []
    assert (await manager.repository.list(limit=10)).items == []


async def test_get_and_list_pass_through(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    _, url = proxied
    headers = {"x-api-key": FAKE_API_KEY}
    sid = (await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_id="a", api_url=url))[
        "session_id"
    ]
    resp = await http.get(f"{url}/{sid}", headers=headers)
    assert (resp.status, await resp.json()) == (200, {"session_status": "ACTIVE"})
    resp = await http.get(f"{url}?page=1&limit=5", headers=headers)
    body = await resp.json()
    assert [s["session_id"] for s in body["sessions"]] == [sid]
    assert body["pagination"]["limit"] == 5
    assert lemon.requests[-1].query == {"page": "1", "limit": "5"}
    resp = await http.get(f"{url}/sess_unknown", headers=headers)
    assert resp.status == 404


async def test_other_control_events_are_forwarded_recorded_and_count_as_activity(
    proxied: tuple[SessionManager, str],
    lemon: FakeLemonSlice,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    manager, url = proxied
    headers = {"x-api-key": FAKE_API_KEY}
    answer = await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_id="a", api_url=url)
    sid, control = answer["session_id"], answer["control_url"]
    before = await manager.get(sid)
    clock.advance(30)
    body = b'{"event": "update-agent-prompt",  "agent_prompt": "calm"}'
    resp = await http.post(control, data=body, headers=headers)
    assert (resp.status, await resp.json()) == (200, {"success": True})
    assert lemon.requests[-1].body == body  # byte-for-byte
    resp = await http.post(control, json={"event": "reset-idle-timeout"}, headers=headers)
    assert resp.status == 200
    assert [c["event"] for c in lemon.control_events(sid)] == [
        "update-agent-prompt",
        "reset-idle-timeout",
    ]
    await manager.repository.flush_touches()
    after = await manager.get(sid)
    assert after.status is SessionStatus.ACTIVE
    assert after.last_activity_at > before.last_activity_at  # a control is activity
    assert after.deadline is not None
    assert before.deadline is not None
    assert after.deadline > before.deadline
    details = [e.detail for e in await manager.repository.events(after.id) if e.reason == "control"]
    assert details == ["update-agent-prompt via proxy", "reset-idle-timeout via proxy"]
    # an event LemonSlice refuses comes back as it answered, and is not recorded
    resp = await http.post(control, json={"event": "dance"}, headers=headers)
    assert resp.status == 400
    assert len([e for e in await manager.repository.events(after.id) if e.reason == "control"]) == 2
    assert lemon.terminate_counts == {}


async def test_a_control_event_for_a_session_lemonslice_lost_ends_the_record_as_gone(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    answer = await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_id="a", api_url=url)
    sid = answer["session_id"]
    lemon.set_status(sid, "TIMED_OUT")
    resp = await http.post(
        answer["control_url"],
        json={"event": "reset-idle-timeout"},
        headers={"x-api-key": FAKE_API_KEY},
    )
    assert resp.status == 404
    record = await manager.get(sid)
    assert (record.status, record.end_reason) == (SessionStatus.ENDED, EndReason.GONE)


async def test_a_terminate_after_the_reaper_ended_it_is_404(
    proxied: tuple[SessionManager, str],
    lemon: FakeLemonSlice,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    manager, url = proxied
    api = LemonSliceApi(FAKE_API_KEY, http)
    answer = await api.create_session(agent_id="a", api_url=url)
    clock.advance(manager.idle_window + 5)
    await manager.reaper.run_once()
    record = await manager.get(answer["session_id"])
    assert (record.status, record.end_reason) == (SessionStatus.ENDED, EndReason.IDLE)
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await api.end_session(answer["session_id"], answer["control_url"])
    assert caught.value.status == 404
    assert lemon.terminate_counts == {answer["session_id"]: 1}


async def test_a_session_created_elsewhere_is_passed_through_untouched(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    manager, url = proxied
    direct = await LemonSliceApi(FAKE_API_KEY, http).create_session(agent_id="a", api_url=lemon.url)
    sid = direct["session_id"]
    resp = await http.post(
        f"{url}/{sid}/control", json={"event": "terminate"}, headers={"x-api-key": FAKE_API_KEY}
    )
    assert resp.status == 200
    assert lemon.terminate_counts == {sid: 1}
    assert await manager.repository.find(sid) is None


async def test_livekit_plugin_retry_on_a_lost_answer_is_refused_upstream_once(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    """The plugin retries a create whose answer was lost; each attempt is its own intent, so
    both possible sessions stay findable by reconcile (the proxy cannot merge them)."""
    manager, url = proxied
    lemon.inject("create", Fault.lost_answer())
    options = APIConnectOptions(max_retry=1, retry_interval=0.0, timeout=5.0)
    async with LemonSliceAPI(
        api_key=FAKE_API_KEY, api_url=url, session=http, conn_options=options
    ) as api:
        sid = await api.start_agent_session(
            livekit_url="wss://lk", livekit_token="t" * 8, livekit_session_id="RM", agent_id="a"
        )
    assert lemon.creates == 2
    assert (await manager.get(sid)).status is SessionStatus.ACTIVE
    assert len(await manager.repository.pending_intents()) == 1  # the lost one, for reconcile


async def test_a_pass_through_without_an_answer_is_a_gateway_error(
    proxied: tuple[SessionManager, str], lemon: FakeLemonSlice, http: aiohttp.ClientSession
) -> None:
    _, url = proxied
    headers = {"x-api-key": FAKE_API_KEY}
    lemon.inject("get", Fault.hang(5.0))  # past the client's 1 s attempt limit
    resp = await http.get(f"{url}/sess_x", headers=headers)
    assert resp.status == 504
    assert "no answer" in (await resp.json())["detail"]
    await lemon.stop()  # unreachable: nothing was answered
    resp = await http.get(f"{url}/sess_x", headers=headers)
    assert resp.status == 502
    assert "could not connect" in (await resp.json())["detail"]
