"""FakeLemonSlice: the protocol it speaks, its fault injection, admin routes and `fake-server`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from sessionmgr.cli import cli
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.errors import CreateOutcomeUnknown, ServerError, TransportError
from sessionmgr.testing import (
    REDACTED,
    FakeLemonSlice,
    Fault,
    fake_server_process,
    fake_state,
)

from .helpers import FAKE_API_KEY, TEST_RETRY

KEY_HEADERS = {"x-api-key": FAKE_API_KEY}
START_TIMEOUT = 20.0  # seconds for the fake-server process to print its address


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", KEY_HEADERS)
    async with http.request(method, url, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def admin(fake: FakeLemonSlice, route: str) -> str:
    return fake.url.replace("/api/liveai/sessions", "/_fake/" + route)


# --- the protocol ------------------------------------------------------------------------------


async def test_every_call_needs_the_key(fake: FakeLemonSlice, http: aiohttp.ClientSession):
    for headers in ({}, {"x-api-key": "wrong"}):
        status, body = await call(http, "GET", fake.url, headers=headers)
        assert status == 401
        assert "X-API-Key" in body["error"]
    status, _ = await call(http, "GET", fake.url, headers={"X-API-KEY": FAKE_API_KEY})
    assert status == 200  # header names are case-insensitive


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"transport_type": "daily"}, "exactly one"),
        ({"transport_type": "daily", "agent_id": "a", "agent_image_url": "u"}, "exactly one"),
        ({"agent_id": "a"}, "transport_type"),
        ({"transport_type": "daily", "agent_id": "a", "idle_timeout": "60"}, "idle_timeout"),
        (["not", "an", "object"], "JSON object"),
    ],
)
async def test_create_validates_like_the_server(
    fake: FakeLemonSlice, http: aiohttp.ClientSession, payload: Any, message: str
):
    status, body = await call(http, "POST", fake.url, json=payload)
    assert status == 400
    assert message in body["error"]
    assert fake.sessions == {}


async def test_create_records_the_request_and_redacts_secrets(
    fake: FakeLemonSlice, http: aiohttp.ClientSession
):
    payload = {
        "transport_type": "daily",
        "agent_id": "agent_1",
        "idle_timeout": 30,
        "properties": {"daily_url": "https://x.daily.co/r", "daily_token": "tok-1", "Api_Key": "k"},
    }
    status, body = await call(http, "POST", fake.url, json=payload)
    assert status == 200
    sid = body["session_id"]
    assert sid.startswith("sess_")
    assert body == {
        "session_id": sid,
        "room_url": "https://x.daily.co/r",
        "control_url": f"{fake.url}/{sid}/control",
    }
    [req] = fake.requests
    assert req.json == payload  # what arrived, for wire tests
    assert req.headers["x-api-key"] == REDACTED
    session = fake.sessions[sid]
    assert session.payload["properties"] == {
        "daily_url": "https://x.daily.co/r",
        "daily_token": REDACTED,
        "Api_Key": REDACTED,
    }
    assert (session.status, session.idle_timeout, session.terminate_count) == ("ACTIVE", 30, 0)
    assert (fake.creates, fake.live_count) == (1, 1)


async def test_multipart_create_needs_a_png(fake: FakeLemonSlice, http: aiohttp.ClientSession):
    form = aiohttp.FormData()
    form.add_field(
        "payload", json.dumps({"transport_type": "daily"}), content_type="application/json"
    )
    form.add_field("image", b"GIF89a", filename="image.png", content_type="image/png")
    status, body = await call(http, "POST", fake.url, data=form)
    assert (status, body["error"]) == (400, "image must be a PNG")

    form = aiohttp.FormData()
    form.add_field(
        "payload", json.dumps({"transport_type": "daily"}), content_type="application/json"
    )
    form.add_field("image", b"\x89PNG\r\n\x1a\n...", filename="image.png", content_type="image/png")
    status, body = await call(http, "POST", fake.url, data=form)
    assert status == 200
    assert fake.requests[-1].payload == {"transport_type": "daily"}


async def test_get_list_and_terminate(fake: FakeLemonSlice, http: aiohttp.ClientSession):
    clock = FakeClock(datetime(2026, 4, 29, 20, 34, 56, tzinfo=UTC))
    fake.clock = clock
    _, created = await call(
        http, "POST", fake.url, json={"transport_type": "daily", "agent_id": "a"}
    )
    sid = created["session_id"]

    assert await call(http, "GET", f"{fake.url}/{sid}") == (200, {"session_status": "ACTIVE"})
    assert (await call(http, "GET", f"{fake.url}/sess_nope"))[0] == 404

    status, page = await call(http, "GET", f"{fake.url}?page=1&limit=25")
    assert status == 200
    assert page == {
        "sessions": [
            {
                "session_id": sid,
                "created_at": "2026-04-29T20:34:56.000Z",
                "session_status": "ACTIVE",
                "credits_used": None,
                "provider": "DAILY",
            }
        ],
        "pagination": {"page": 1, "limit": 25, "total": 1, "total_pages": 1, "has_more": False},
    }

    clock.advance(90)
    control = created["control_url"]
    assert await call(http, "POST", control, json={"event": "pause"}) == (
        400,
        {"error": "unknown control event 'pause'"},
    )
    assert await call(http, "POST", control, json=["terminate"]) == (
        400,
        {"error": 'the body must be {"event": "terminate"}'},
    )
    assert await call(http, "POST", control, json={"event": "terminate"}) == (
        200,
        {"success": True},
    )
    assert await call(http, "GET", f"{fake.url}/{sid}") == (
        200,
        {"session_status": "COMPLETED", "cost": 1.5},  # 90 s at 1 credit a minute
    )
    assert (await call(http, "POST", control, json={"event": "terminate"}))[0] == 404
    assert fake.terminate_counts == {sid: 1}
    assert fake.terminate_requests == {sid: 3}
    assert fake.sessions[sid].terminate_requests == 3
    assert len(fake.terminate_requests_total()) == 3
    assert fake.live_count == 0


async def test_list_pages_newest_first(fake: FakeLemonSlice, http: aiohttp.ClientSession):
    clock = FakeClock()
    fake.clock = clock
    ids = []
    for i in range(5):
        _, body = await call(
            http, "POST", fake.url, json={"transport_type": "daily", "agent_id": f"a{i}"}
        )
        ids.append(body["session_id"])
        clock.advance(1)
    _, page2 = await call(http, "GET", f"{fake.url}?page=2&limit=2")
    assert [s["session_id"] for s in page2["sessions"]] == [ids[2], ids[1]]
    assert page2["pagination"] == {
        "page": 2,
        "limit": 2,
        "total": 5,
        "total_pages": 3,
        "has_more": True,
    }
    _, page9 = await call(http, "GET", f"{fake.url}?page=9&limit=2")
    assert page9["sessions"] == []
    assert page9["pagination"]["has_more"] is False
    assert (await call(http, "GET", f"{fake.url}?page=0"))[0] == 400
    assert (await call(http, "GET", f"{fake.url}?limit=x"))[0] == 400
    _, clamped = await call(http, "GET", f"{fake.url}?limit=1000")
    assert clamped["pagination"]["limit"] == 100


async def test_expire_idle_follows_each_sessions_idle_timeout(
    fake: FakeLemonSlice, http: aiohttp.ClientSession
):
    clock = FakeClock()
    fake.clock = clock

    async def create(**extra: Any) -> str:
        body = {"transport_type": "daily", "agent_id": "a", **extra}
        return str((await call(http, "POST", fake.url, json=body))[1]["session_id"])

    short, default, never, touched = (
        await create(idle_timeout=10),
        await create(),
        await create(idle_timeout=-1),
        await create(idle_timeout=10),
    )
    clock.advance(9)
    fake.touch(touched)
    assert fake.expire_idle() == []
    clock.advance(1)
    assert fake.expire_idle() == [short]
    clock.advance(50)
    assert sorted(fake.expire_idle()) == sorted([default, touched])
    clock.advance(10**6)
    assert fake.expire_idle() == []
    assert fake.sessions[never].status == "ACTIVE"
    assert fake.sessions[short].status == "TIMED_OUT"
    assert (await call(http, "GET", f"{fake.url}/{short}"))[1] == {"session_status": "TIMED_OUT"}


async def test_set_status(fake: FakeLemonSlice, client: LemonSliceClient):
    sid = (await client.create_session(agent_id="a"))["session_id"]
    fake.set_status(sid, "QUEUED")
    assert fake.live_count == 1
    fake.set_status(sid, "COMPLETED", cost=10.5)
    assert await client.get_session(sid) == {"session_status": "COMPLETED", "cost": 10.5}
    assert fake.live_count == 0
    assert await client.end_session(sid) is False  # finished sessions answer 404
    with pytest.raises(ValueError, match="unknown status"):
        fake.set_status(sid, "DONE")
    with pytest.raises(KeyError, match="no fake session"):
        fake.set_status("sess_nope", "FAILED")


# --- faults and latency ------------------------------------------------------------------------


async def test_faults_apply_to_the_next_calls_in_order(
    fake: FakeLemonSlice, http: aiohttp.ClientSession
):
    fake.inject("list", Fault.status(503, retry_after=7), times=2)
    fake.inject("list", Fault.status(418, body="teapot"))
    first = await http.get(fake.url, headers=KEY_HEADERS)
    assert (first.status, first.headers["Retry-After"]) == (503, "7")
    first.release()
    assert (await call(http, "GET", fake.url))[0] == 503
    assert await call(http, "GET", fake.url) == (418, "teapot")
    assert (await call(http, "GET", fake.url))[0] == 200
    assert (await call(http, "GET", f"{fake.url}/x"))[0] == 404  # other endpoints untouched


async def test_fault_kinds_as_seen_on_the_wire(fake: FakeLemonSlice, http: aiohttp.ClientSession):
    fake.inject("list", Fault.html_502())
    status, body = await call(http, "GET", fake.url)
    assert status == 502
    assert "<h1>502 Bad Gateway</h1>" in body
    fake.inject("list", Fault.non_json())
    assert await call(http, "GET", fake.url) == (200, "OK")
    fake.inject("list", Fault.missing_fields())
    status, body = await call(http, "GET", fake.url)
    assert status == 200
    assert "sessions" not in body
    assert "pagination" in body
    fake.inject("list", Fault.drop(), times=2)  # aiohttp resends a GET once by itself
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "GET", fake.url)


async def test_a_status_fault_does_not_touch_state_but_lost_answer_does(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    fake.inject("create", Fault.status(500))
    with pytest.raises(CreateOutcomeUnknown):
        await client.create_session(agent_id="a")
    assert fake.creates == 0
    fake.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await client.create_session(agent_id="a")
    assert fake.creates == 1
    assert fake.live_count == 1


async def test_latency_is_added_per_endpoint(fake: FakeLemonSlice, client: LemonSliceClient):
    sid = (await client.create_session(agent_id="a"))["session_id"]
    fake.latency["get"] = 0.2
    started = time.monotonic()
    await client.get_session(sid)
    assert time.monotonic() - started >= 0.19  # a lower bound only: sleeps never end early
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.set_latency("delete", 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        FakeLemonSlice(latency={"get": -1.0})


async def test_max_in_flight_counts_concurrent_requests(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    sid = (await client.create_session(agent_id="a"))["session_id"]
    fake.latency["get"] = 0.5
    await asyncio.gather(*(client.get_session(sid) for _ in range(5)))
    assert fake.max_in_flight("get") == 5
    assert fake.max_in_flight("terminate") == 0


async def test_stop_releases_hung_requests(fake: FakeLemonSlice):
    fake.inject("list", Fault.hang(60))
    async with LemonSliceClient(FAKE_API_KEY, api_url=fake.url, retry=TEST_RETRY) as client:
        pending = asyncio.ensure_future(client.list_sessions().__anext__())
        while fake.max_in_flight("list") == 0:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(fake.stop(), 5)  # far less than the 60 s hang
        with pytest.raises((TransportError, StopAsyncIteration, ServerError)):
            await pending


def test_fault_factories_validate() -> None:
    with pytest.raises(ValueError, match=r"100\.\.599"):
        Fault.status(99)
    with pytest.raises(ValueError, match="seconds >= 0"):
        Fault.hang(-1)
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.from_dict({"kind": "explode"})
    with pytest.raises(ValueError, match="integer 'code'"):
        Fault.from_dict({"kind": "status"})
    assert Fault.from_dict({"kind": "status", "code": 429, "retry_after": 2}) == Fault.status(
        429, retry_after=2
    )
    assert Fault.from_dict({"kind": "hang", "seconds": 3}) == Fault.hang(3)
    assert Fault.from_dict({"kind": "html_502"}) == Fault.html_502()
    assert Fault.from_dict(Fault.lost_answer().to_dict()) == Fault.lost_answer()


async def test_inject_validates(fake: FakeLemonSlice) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.inject("delete", Fault.drop())
    with pytest.raises(ValueError, match="times"):
        fake.inject("get", Fault.drop(), times=0)


def test_url_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = FakeLemonSlice().url


# --- admin routes and state --------------------------------------------------------------------


async def test_admin_routes(
    fake: FakeLemonSlice, client: LemonSliceClient, http: aiohttp.ClientSession
):
    sid = (await client.create_session(agent_id="a"))["session_id"]

    status, body = await call(
        http,
        "POST",
        admin(fake, "faults"),
        json={"endpoint": "terminate", "kind": "status", "code": 503, "times": 2},
    )
    assert status == 200
    assert body["fault"] == {"kind": "status", "code": 503, "seconds": 0.0}
    assert await client.end_session(sid) is True
    assert fake.terminate_requests == {sid: 3}

    assert (await call(http, "POST", admin(fake, "latency"), json={"create": 0.001}))[0] == 200
    assert fake.latency["create"] == 0.001

    other = (await client.create_session(agent_id="b"))["session_id"]
    status, _ = await call(
        http, "POST", admin(fake, f"sessions/{other}/status"), json={"status": "FAILED"}
    )
    assert status == 200
    assert fake.sessions[other].status == "FAILED"

    state = await fake_state(fake.url)
    assert state["created"] == state["creates"] == 2
    assert state["live"] == 0
    assert state["sessions"][sid]["status"] == "COMPLETED"
    assert state["sessions"][sid]["terminate_count"] == 1
    assert state["sessions"][sid]["terminate_requests"] == 3
    assert state["terminate_requests"] == {sid: 3}
    assert state == json.loads(json.dumps(fake.state()))

    assert await call(http, "POST", admin(fake, "expire_idle")) == (200, {"expired": []})
    assert (await call(http, "POST", admin(fake, "reset")))[0] == 200
    assert (fake.sessions, fake.requests, fake.creates) == ({}, [], 0)


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("faults", {"endpoint": "delete", "kind": "drop"}, 400),
        ("faults", {"endpoint": "get", "kind": "explode"}, 400),
        ("faults", {"endpoint": "get", "kind": "drop", "times": "x"}, 400),
        ("latency", {"get": "slow"}, 400),
        ("latency", {"nope": 1}, 400),
        ("sessions/sess_nope/status", {"status": "FAILED"}, 404),
        ("faults", "[1, 2]", 400),
    ],
)
async def test_admin_routes_reject_bad_input(
    fake: FakeLemonSlice, http: aiohttp.ClientSession, route: str, body: Any, status: int
):
    kw: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    got, answer = await call(http, "POST", admin(fake, route), **kw)
    assert got == status
    assert "error" in answer


async def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "fake.json"
    async with (
        FakeLemonSlice(state_file=path) as fake,
        LemonSliceClient("test-key", api_url=fake.url) as client,
    ):
        created = await client.create_session(agent_id="a")
        await client.end_session(created["session_id"])
        kept = (await client.create_session(agent_id="b"))["session_id"]
    saved = json.loads(path.read_text())
    assert saved["created"] == 2
    async with FakeLemonSlice(state_file=path) as again:
        assert again.creates == 2
        assert again.terminate_counts == {created["session_id"]: 1}
        assert again.sessions[kept].status == "ACTIVE"
        assert again.sessions[kept].created_at.tzinfo is not None


# --- `sessionmgr fake-server` ------------------------------------------------------------------


async def _read_line(stream: asyncio.StreamReader, prefix: str) -> str:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"fake-server exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


async def test_fake_server_process_smoke(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("sessionmgr")
    state_file = tmp_path / "state.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEMONSLICE_")}
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "fake-server",
        "--port",
        "0",
        "--api-key",
        "proc-key",
        "--latency",
        "create=0.001",
        "--state-file",
        str(state_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = await asyncio.wait_for(
            _read_line(proc.stdout, "fake-server listening on "), START_TIMEOUT
        )
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/api/liveai/sessions")
        async with LemonSliceClient("proc-key", api_url=url, retry=TEST_RETRY) as client:
            created = await client.create_session(agent_id="a")
            async with aiohttp.ClientSession() as http:
                status, _ = await call(
                    http,
                    "POST",
                    url.replace("/api/liveai/sessions", "/_fake/faults"),
                    json={"endpoint": "terminate", "kind": "status", "code": 503},
                )
                assert status == 200
            assert await client.end_session(created["session_id"]) is True
        state = await fake_state(url)
        sid = created["session_id"]
        assert state["created"] == 1
        assert state["sessions"][sid]["terminate_count"] == 1
        assert state["sessions"][sid]["terminate_requests"] == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), START_TIMEOUT) == 0
        saved = json.loads(state_file.read_text())
        assert saved["sessions"][sid]["status"] == "COMPLETED"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_fake_server_rejects_a_bad_latency() -> None:
    result = CliRunner().invoke(cli, ["fake-server", "--latency", "delete=1"])
    assert result.exit_code == 2
    assert "ENDPOINT=SECONDS" in result.output


def test_fake_server_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["fake-server", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.output


def test_fake_server_process_helper(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"

    async def create_one(url: str) -> str:
        async with LemonSliceClient("helper-key", api_url=url, retry=TEST_RETRY) as client:
            return str((await client.create_session(agent_id="a"))["session_id"])

    with fake_server_process(
        api_key="helper-key", latency={"get": 0.001}, state_file=state_file
    ) as url:
        sid = asyncio.run(create_one(url))
        assert asyncio.run(fake_state(url))["sessions"][sid]["status"] == "ACTIVE"
    assert json.loads(state_file.read_text())["sessions"][sid]["status"] == "ACTIVE"
    with pytest.raises(aiohttp.ClientConnectionError):
        asyncio.run(fake_state(url))  # stopped on exit
