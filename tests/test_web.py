"""The HTTP side of serve, in process: aiohttp's test client against a manager on FakeLemonSlice
and a FakeClock. Auth, filters, pagination, errors, health, metrics, and secrets kept out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sessionmgr import __version__, config
from sessionmgr.cli import cli
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.config import Settings
from sessionmgr.errors import ConfigurationError
from sessionmgr.manager import SessionManager
from sessionmgr.metrics import Metrics
from sessionmgr.records import SessionRecord
from sessionmgr.server import check_http_exposure
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault
from sessionmgr.web import create_app

from .helpers import FAKE_API_KEY, TEST_RETRY, TEST_TIMEOUTS, fast_client, make_manager, wait_for

TOKEN = "admin-tok-5f2c9e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATIC = Path(__file__).parent.parent / "sessionmgr" / "static"


@contextlib.asynccontextmanager
async def http(
    manager: SessionManager,
    token: str | None = TOKEN,
    metrics: Metrics | None = None,
    *,
    signed_in: bool = True,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A client of the app; ``signed_in``: every request carries the admin token (when set)."""
    app = create_app(manager, admin_token=token, metrics=metrics)
    headers = AUTH if token and signed_in else None
    async with TestClient(TestServer(app), headers=headers) as client:
        yield client


@pytest.fixture
async def api(manager: SessionManager) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with http(manager) as client:
        yield client


async def expect_error(resp: Any, status: int, error: str, *needles: str) -> str:
    """A JSON ``{error, detail}`` answer with this status; returns the detail."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) >= {"error", "detail"}
    assert body["error"] == error, body
    for needle in needles:
        assert needle in body["detail"], body
    assert "Traceback" not in body["detail"]
    return str(body["detail"])


async def create(api: Any, **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/sessions", json={"agent_id": "a", **body}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


# --- auth --------------------------------------------------------------------------------------


async def test_changes_are_off_without_a_configured_token(
    manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    record = await manager.create_session(agent_id="a")
    async with http(manager, token=None) as api:
        for path in ("/api/sessions", f"/api/sessions/{record.id}/touch"):
            resp = await api.post(path, json={"agent_id": "a"}, headers=AUTH)
            await expect_error(resp, 403, "forbidden", "SESSIONMGR_ADMIN_TOKEN")
        resp = await api.post(f"/api/sessions/{record.id}/end", headers=AUTH)
        await expect_error(resp, 403, "forbidden", "SESSIONMGR_ADMIN_TOKEN")
        assert (await api.get("/api/sessions")).status == 200  # reads stay open
    assert lemon.creates == 1
    assert (await manager.get(record.id)).status is SessionStatus.ACTIVE


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ],
)
async def test_missing_or_wrong_token_is_401(
    manager: SessionManager, lemon: FakeLemonSlice, headers: dict[str, str]
) -> None:
    async with http(manager, signed_in=False) as api:
        resp = await api.post("/api/sessions", json={"agent_id": "a"}, headers=headers)
        detail = await expect_error(resp, 401, "unauthorized", "Authorization: Bearer")
    assert TOKEN not in detail
    assert lemon.creates == 0


# --- create, touch, end ------------------------------------------------------------------------


async def test_create_touch_end_through_the_api(
    api: Any, manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock
) -> None:
    created = await create(api, idle_window=120, max_age=600, metadata={"user": "bob"})
    assert created["status"] == "active"
    assert created["idle_window"] == 120
    assert created["max_age"] == 600
    assert created["metadata"] == {"user": "bob"}
    assert lemon.live_count == 1

    clock.advance(30)
    resp = await api.post(f"/api/sessions/{created['session_id']}/touch", headers=AUTH)
    assert resp.status == 200, await resp.text()
    touched = await resp.json()
    assert touched["last_activity_at"] != created["last_activity_at"]
    assert (await manager.get(created["id"])).last_activity_at == clock.now()

    resp = await api.post(f"/api/sessions/{created['id']}/end", headers=AUTH)
    assert resp.status == 200
    ended = await resp.json()
    assert ended["changed"] is True
    assert ended["record"]["status"] == "ended"
    assert ended["record"]["end_reason"] == "manual"
    assert lemon.live_count == 0

    again = await api.post(f"/api/sessions/{created['id']}/end", headers=AUTH)  # idempotent
    assert again.status == 200
    body = await again.json()
    assert body["changed"] is False
    assert "already ended" in body["message"]
    assert lemon.terminate_counts[created["session_id"]] == 1

    resp = await api.post(f"/api/sessions/{created['id']}/touch", headers=AUTH)
    await expect_error(resp, 409, "conflict", "ended")


async def test_end_takes_a_reason_and_refuses_others(api: Any, manager: SessionManager) -> None:
    created = await create(api)
    resp = await api.post(
        f"/api/sessions/{created['id']}/end", json={"reason": "idle"}, headers=AUTH
    )
    await expect_error(resp, 400, "bad_request", "manual", "shutdown")
    resp = await api.post(f"/api/sessions/{created['id']}/end", json={"why": "x"}, headers=AUTH)
    await expect_error(resp, 400, "bad_request", "why")
    resp = await api.post(
        f"/api/sessions/{created['id']}/end", json={"reason": "shutdown"}, headers=AUTH
    )
    assert resp.status == 200
    assert (await manager.get(created["id"])).end_reason is EndReason.SHUTDOWN


async def test_ending_a_pending_session_is_a_conflict(api: Any, manager: SessionManager) -> None:
    intent = await manager.repository.record_intent(agent_id="a", idle_window=60, max_age=None)
    resp = await api.post(f"/api/sessions/{intent.id}/end", headers=AUTH)
    await expect_error(resp, 409, "conflict", "pending")


async def test_a_failed_terminate_is_502_and_left_to_the_reaper(
    api: Any, manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    created = await create(api)
    lemon.inject("terminate", Fault.status(503), times=10)
    resp = await api.post(f"/api/sessions/{created['id']}/end", headers=AUTH)
    await expect_error(resp, 502, "lemonslice_error", "503", "the reaper retries")
    assert (await manager.get(created["id"])).status is SessionStatus.ENDING


async def test_a_session_another_process_is_ending_is_202(
    api: Any, manager: SessionManager
) -> None:
    created = await create(api)
    await manager.repository.begin_end(
        created["id"], owner="other-host", lease=60, reason=EndReason.IDLE
    )
    resp = await api.post(f"/api/sessions/{created['id']}/end", headers=AUTH)
    assert resp.status == 202
    body = await resp.json()
    assert body["changed"] is False
    assert body["message"] == "being ended by other-host"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"agent_id": "a", "idle_window": NaN}', "not JSON"),
        (b'{"agent_id": "a\\ud800"}', "surrogate"),
        (b'{"agent_id": "a", "metadata": {"k\\udfff": 1}}', "surrogate"),
        (b'{"agent_id": "a", "api_url": "http://evil.example"}', "api_url"),
        (b'{"agent_id": 5}', "agent_id must be a string"),
        (b'{"agent_id": "a", "idle_window": 0}', "idle_window"),
        (b'{"agent_id": "a", "idle_window": -3}', "idle_window"),
        (b'{"agent_id": "a", "idle_window": 1e308}', "idle_window"),
        (b'{"agent_id": "a", "max_age": 1e308}', "max_age"),
        (b'{"agent_id": "a", "max_age": "1h"}', "max_age must be a number"),
        (b'{"agent_id": "a", "idle_timeout": 2147483648}', "idle_timeout must be whole seconds"),
        (b'{"agent_id": "a", "idle_timeout": true}', "idle_timeout"),
        (b'{"agent_id": "a", "metadata": [1]}', "metadata must be an object"),
        (b'{"agent_id": "a", "agent_image_url": "http://x/y.png"}', "agent"),
        (b"{}", "agent"),
    ],
)
async def test_bad_create_bodies_are_400_and_create_nothing(
    api: Any, manager: SessionManager, lemon: FakeLemonSlice, body: bytes, needle: str
) -> None:
    resp = await api.post(
        "/api/sessions", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    await expect_error(resp, 400, "bad_request", needle)
    assert lemon.creates == 0
    assert (await manager.repository.list()).items == []


async def test_lemonslice_failures_are_502(
    api: Any, manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    lemon.inject("create", Fault.status(422, body='{"error": "bad agent"}'))
    resp = await api.post("/api/sessions", json={"agent_id": "a"}, headers=AUTH)
    await expect_error(resp, 502, "lemonslice_error", "422")
    lemon.inject("create", Fault.lost_answer())
    resp = await api.post("/api/sessions", json={"agent_id": "b"}, headers=AUTH)
    await expect_error(resp, 502, "lemonslice_unknown_outcome", "reconcile")
    statuses = sorted(r.status for r in (await manager.repository.list()).items)
    assert statuses == [SessionStatus.FAILED, SessionStatus.PENDING]


# --- reads ---------------------------------------------------------------------------------------


async def seed_for_filters(manager: SessionManager, clock: FakeClock) -> dict[str, SessionRecord]:
    """Four sessions a minute apart: two agents, tags, one ended, one idle for long."""
    out = {}
    out["old"] = await manager.create_session(agent_id="alpha", metadata={"team": "red"})
    clock.advance(60)
    out["ended"] = await manager.create_session(agent_id="beta", metadata={"team": "red"})
    await manager.end_session(out["ended"].id)
    clock.advance(60)
    out["blue"] = await manager.create_session(agent_id="alpha", metadata={"team": "blue"})
    clock.advance(60)
    out["new"] = await manager.create_session(agent_id="beta")
    return out


async def ids(api: Any, query: str) -> list[int]:
    resp = await api.get(f"/api/sessions?{query}")
    assert resp.status == 200, await resp.text()
    return [item["id"] for item in (await resp.json())["items"]]


async def test_list_filters_match_the_cli(
    api: Any, manager: SessionManager, clock: FakeClock
) -> None:
    s = await seed_for_filters(manager, clock)
    old, ended, blue, new = (s[k].id for k in ("old", "ended", "blue", "new"))
    assert await ids(api, "") == [new, blue, ended, old]  # newest first, like `list`
    assert await ids(api, "status=ended") == [ended]
    assert await ids(api, "status=active&status=ended") == [new, blue, ended, old]
    assert await ids(api, "status=ended,active&sort=id") == [old, ended, blue, new]
    assert await ids(api, "agent_id=alpha") == [blue, old]
    assert await ids(api, "meta=team=red") == [ended, old]
    assert await ids(api, "meta=team=red&agent_id=beta") == [ended]
    since = s["blue"].created_at.isoformat()
    assert await ids(api, f"since={since.replace('+00:00', 'Z')}") == [new, blue]
    until = s["blue"].created_at.replace(tzinfo=None).isoformat()  # naive means UTC
    assert await ids(api, f"until={until}") == [ended, old]
    assert await ids(api, "idle_for=100") == [ended, old]
    assert await ids(api, "idle_for=2m&status=active") == [old]
    assert await ids(api, "sort=created_at&limit=2") == [old, ended]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("status=bogus", "pending, active"),
        ("status=active,", "unknown status"),
        ("since=yesterday", "since"),
        ("until=2026-13-45", "until"),
        ("idle_for=abc", "idle_for"),
        ("idle_for=99999999999999999999", "idle_for"),
        ("meta=novalue", "KEY=VALUE"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1&limit=2", "at most once"),
        ("sort=name", "unknown sort"),
        ("after=garbage", "invalid cursor"),
        ("agent_id=a%00b", "NUL"),  # PostgreSQL would refuse it: a 400, not a 503
    ],
)
async def test_bad_filters_are_400(api: Any, query: str, needle: str) -> None:
    await expect_error(await api.get(f"/api/sessions?{query}"), 400, "bad_request", needle)


async def test_pagination_cursor_round_trip(api: Any, manager: SessionManager) -> None:
    made = [(await manager.create_session(agent_id=f"a{i}")).id for i in range(7)]
    seen: list[int] = []
    pages = 0
    cursor = None
    while True:
        query = "limit=3&sort=created_at" + (f"&after={cursor}" if cursor else "")
        body = await (await api.get(f"/api/sessions?{query}")).json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == made
    assert pages == 3
    first = await (await api.get("/api/sessions?limit=3&sort=created_at")).json()
    resp = await api.get(f"/api/sessions?limit=3&sort=-created_at&after={first['next_cursor']}")
    await expect_error(resp, 400, "bad_request", "sorted by")


async def test_show_by_id_or_session_id_with_events(api: Any, manager: SessionManager) -> None:
    record = await manager.create_session(agent_id="a")
    await manager.end_session(record.id)
    for key in (record.id, record.session_id):
        resp = await api.get(f"/api/sessions/{key}")
        assert resp.status == 200
        body = await resp.json()
        assert body["id"] == record.id
        assert body["status"] == "ended"
        assert [e["to_status"] for e in body["events"]] == ["pending", "active", "ending", "ended"]


@pytest.mark.parametrize("key", ["424242", "sess_nope", "99999999999999999999", "²", "%00"])
async def test_unknown_sessions_are_404(api: Any, key: str) -> None:
    await expect_error(await api.get(f"/api/sessions/{key}"), 404, "not_found")
    resp = await api.post(f"/api/sessions/{key}/touch", headers=AUTH)
    await expect_error(resp, 404, "not_found")


async def test_unknown_routes_and_methods_answer_json(api: Any) -> None:
    await expect_error(await api.get("/api/nothing"), 404, "not_found", "/api/openapi.json")
    await expect_error(await api.delete("/api/sessions"), 405, "method_not_allowed")
    await expect_error(await api.get("/static/../pyproject.toml"), 404, "not_found")
    await expect_error(await api.get("/static/evil.js"), 404, "not_found")


async def test_stats_like_the_cli(api: Any, manager: SessionManager, clock: FakeClock) -> None:
    await seed_for_filters(manager, clock)
    body = await (await api.get("/api/stats?days=2")).json()
    expected = (await manager.repository.stats(days=2)).to_dict()
    assert {k: v for k, v in body.items() if k != "now"} == expected
    assert body["by_status"]["active"] == 3
    assert body["by_status"]["ended"] == 1
    assert len(body["per_day"]) == 2
    assert len((await (await api.get("/api/stats")).json())["per_day"]) == 7
    for bad in ("0", "3661", "week"):
        await expect_error(await api.get(f"/api/stats?days={bad}"), 400, "bad_request", "days")


async def test_openapi_describes_every_route(api: Any) -> None:
    doc = await (await api.get("/api/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in api.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served == described


async def test_dashboard_is_served_and_reaches_nothing_outside(api: Any) -> None:
    page = await api.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "Live sessions" in await page.text()
    js = await api.get("/static/dashboard.js")
    assert js.status == 200
    assert js.content_type == "text/javascript"
    for path in STATIC.iterdir():
        text = path.read_text()
        for remote in ("http://", "https://", "//cdn"):
            assert remote not in text, path
        assert "innerHTML" not in text, path  # data is set as text, never parsed as HTML


# --- health --------------------------------------------------------------------------------------


async def test_healthz_tracks_the_reaper(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_hook(record: SessionRecord) -> None:  # a user hook that hangs the tick
        entered.set()
        await release.wait()

    async with (
        make_manager(
            lemon, clock, db_url, reaper=True, reaper_interval=5.0, on_ended=slow_hook
        ) as manager,
        http(manager) as api,
    ):
        await wait_for(lambda: manager.reaper.heartbeat.ticks >= 1)
        resp = await api.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {
            "database": "ok",
            "reaper_last_tick_age": 0.0,
            "version": __version__,
        }

        await manager.create_session(agent_id="a")
        clock.advance(61)  # past the idle window: the next tick ends it and hangs in the hook
        await asyncio.wait_for(entered.wait(), 10)
        clock.advance(14)  # 75 s since the last finished tick, 14 s since the last end
        assert (await api.get("/healthz")).status == 200  # progress is recent
        clock.advance(2)  # 16 s with no progress, limit 3 x 5 s
        resp = await api.get("/healthz")
        detail = await expect_error(resp, 503, "reaper_stale", "limit 15 s")
        assert "16 s" in detail
        assert (await resp.json())["reaper_last_tick_age"] == 77.0

        release.set()
        await wait_for(lambda: manager.reaper.heartbeat.ticks >= 2)
        assert (await api.get("/healthz")).status == 200


async def test_healthz_stays_healthy_through_a_drain_longer_than_its_limit(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str
) -> None:
    """The heartbeat follows each end and each ``on_ended`` hook, so a drain of many slow ends
    never reads as stale (ends are recorded in bulk, ahead of their hooks: here the hooks are
    what takes 60 s of the fake clock, one at a time)."""
    ended = asyncio.Queue[tuple[SessionRecord, asyncio.Event]]()

    async def each_end(record: SessionRecord) -> None:
        release = asyncio.Event()
        await ended.put((record, release))
        await release.wait()

    async with (
        make_manager(
            lemon,
            clock,
            db_url,
            reaper=True,
            reaper_interval=5.0,
            reaper_concurrency=1,
            on_ended=each_end,
        ) as manager,
        http(manager) as api,
    ):
        await wait_for(lambda: manager.reaper.heartbeat.ticks >= 1)
        for n in range(6):
            await manager.create_session(agent_id=f"a{n}")
        clock.advance(61)
        for _ in range(6):  # one tick, 6 ends 10 s apart: 60 s, four times the 15 s limit
            _, release = await asyncio.wait_for(ended.get(), 10)
            assert (await api.get("/healthz")).status == 200
            clock.advance(10)
            release.set()
        await wait_for(lambda: manager.reaper.heartbeat.ticks >= 2)


async def test_healthz_without_a_reaper_is_503(api: Any) -> None:
    await expect_error(await api.get("/healthz"), 503, "reaper_not_running", "not running")


async def test_database_down_is_503(
    lemon: FakeLemonSlice, clock: FakeClock, tmp_path: Path
) -> None:
    folder = tmp_path / "db"
    folder.mkdir()
    async with (
        make_manager(lemon, clock, f"sqlite+aiosqlite:///{folder / 's.db'}") as manager,
        http(manager) as api,
    ):
        await manager.create_session(agent_id="a")
        await manager.repository.engine.dispose()
        shutil.rmtree(folder)  # new connections cannot open the file
        resp = await api.get("/healthz")
        await expect_error(resp, 503, "database_unavailable", "database")
        assert (await resp.json())["database"] == "unavailable"
        await expect_error(await api.get("/api/sessions"), 503, "database_unavailable")
        await expect_error(await api.get("/api/stats"), 503, "database_unavailable")
        metrics = await api.get("/metrics")
        assert metrics.status == 200
        assert samples(await metrics.text())[("sessionmgr_database_up", ())] == 0
        folder.mkdir()  # let the manager close cleanly
    # aiosqlite ends the thread of a failed connect on its own; wait for those while the loop
    # still runs, or they report "Event loop is closed" during a later test
    for thread in threading.enumerate():
        if "_connection_worker_thread" in thread.name:
            await asyncio.to_thread(thread.join, 10)


# --- metrics -------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus-client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_follow_sessions_api_calls_and_the_reaper(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str
) -> None:
    metrics = Metrics()
    client = LemonSliceClient(
        FAKE_API_KEY,
        api_url=lemon.url,
        retry=TEST_RETRY,
        timeouts=TEST_TIMEOUTS,
        trace_configs=[metrics.trace_config()],
    )
    async with (
        client,
        SessionManager(
            database_url=db_url,
            client=client,
            clock=clock,
            auto_upgrade=True,
            reaper=False,
            idle_window=60,
        ) as manager,
        http(manager, metrics=metrics) as api,
    ):

        async def scrape() -> dict[Any, float]:
            resp = await api.get("/metrics")
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return samples(await resp.text())

        def live(status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
            return ("sessionmgr_sessions_live", (("status", status),))

        before = await scrape()
        assert before[("sessionmgr_sessions_created_total", ())] == 0
        assert before[live("active")] == 0
        assert before[("sessionmgr_database_up", ())] == 1

        first = await create(api)
        await create(api)
        after_create = await scrape()
        assert after_create[("sessionmgr_sessions_created_total", ())] == 2
        assert after_create[live("active")] == 2
        create_ok = (
            "sessionmgr_api_requests_total",
            (("endpoint", "create"), ("outcome", "2xx")),
        )
        assert after_create[create_ok] == 2
        count = ("sessionmgr_api_request_duration_seconds_count", (("endpoint", "create"),))
        assert after_create[count] == 2

        await api.post(f"/api/sessions/{first['id']}/end", headers=AUTH)
        clock.advance(61)  # the other one is idle now
        lemon.inject("terminate", Fault.status(500))  # one 5xx, retried by the client
        tick = await manager.reaper.run_once()
        assert len(tick.ended) == 1
        m = await scrape()
        ended = "sessionmgr_sessions_ended_total"
        assert m[(ended, (("reason", "manual"),))] == 1
        assert m[(ended, (("reason", "idle"),))] == 1
        assert m[live("active")] == 0
        assert m[("sessionmgr_reaper_claims_total", ())] == 1
        assert m[("sessionmgr_reaper_ended_total", ())] == 1
        assert m[("sessionmgr_reaper_terminate_failures_total", ())] == 0
        assert m[("sessionmgr_reaper_tick_duration_seconds_count", ())] == 1
        requests = "sessionmgr_api_requests_total"
        assert m[(requests, (("endpoint", "terminate"), ("outcome", "5xx")))] == 1
        assert m[(requests, (("endpoint", "terminate"), ("outcome", "2xx")))] == 2

        # a terminate that keeps failing is rescheduled and counted as a reaper failure
        third = await create(api)
        clock.advance(61)
        lemon.inject("terminate", Fault.status(500), times=100)
        await manager.reaper.run_once()
        m = await scrape()
        assert m[("sessionmgr_reaper_terminate_failures_total", ())] == 1
        assert m[live("ending")] == 1
        assert (await manager.get(third["id"])).status is SessionStatus.ENDING

        # an unknown live session on the server shows up as a reconcile orphan
        lemon.faults.clear()
        async with fast_client(lemon) as other:
            await other.create_session(agent_id="someone-else")
        clock.advance(121)
        report = await manager.reconcile()
        assert len(report.orphans) == 1
        assert (await scrape())[("sessionmgr_reconcile_orphans_total", ())] == 1


async def test_metrics_keep_user_hooks_and_registries_apart(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str
) -> None:
    seen: list[str] = []

    async def on_created(record: SessionRecord) -> None:
        seen.append(f"created {record.id}")

    async def on_ended(record: SessionRecord) -> None:
        seen.append(f"ended {record.id}")

    async with make_manager(
        lemon, clock, db_url, on_created=on_created, on_ended=on_ended
    ) as manager:
        one, two = Metrics(), Metrics()
        async with http(manager, metrics=one), http(manager, metrics=one):  # attached once
            record = await manager.create_session(agent_id="a")
            await manager.end_session(record.id)
        assert seen == [f"created {record.id}", f"ended {record.id}"]
        created = samples(one.render().decode())[("sessionmgr_sessions_created_total", ())]
        assert created == 1
        assert samples(two.render().decode())[("sessionmgr_sessions_created_total", ())] == 0


# --- secrets -------------------------------------------------------------------------------------


async def test_secrets_never_reach_responses_or_logs(
    api: Any, manager: SessionManager, caplog: pytest.LogCaptureFixture, lemon: FakeLemonSlice
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = ["daily-SECRET-7781", "prop-SECRET-5512", "meta-SECRET-9034", TOKEN, FAKE_API_KEY]
    created = await create(
        api,
        daily_token=secrets[0],
        connection_properties={"api_key": secrets[1]},
        metadata={"user": "bob", "session_token": secrets[2]},
    )
    lemon.inject("create", Fault.status(400, body=f"rejected token {secrets[0]}"))
    rejected = await api.post(
        "/api/sessions", json={"agent_id": "a", "daily_token": secrets[0]}, headers=AUTH
    )
    bodies = [json.dumps(created), await rejected.text()]
    for method, path in [
        ("GET", "/api/sessions"),
        ("GET", f"/api/sessions/{created['id']}"),
        ("GET", "/api/stats"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/api/openapi.json"),
        ("POST", f"/api/sessions/{created['id']}/touch"),
        ("POST", f"/api/sessions/{created['id']}/end"),
    ]:
        resp = await api.request(method, path, headers=AUTH)
        bodies.append(await resp.text())
    bad = await api.post("/api/sessions", data=f'{{"agent_id": "{TOKEN}\\ud800"}}', headers=AUTH)
    bodies.append(await bad.text())
    bodies.append(await (await api.post("/api/sessions", headers={"Authorization": TOKEN})).text())
    everything = "\n".join(bodies) + caplog.text
    for secret in secrets:
        assert secret not in everything, secret
    assert created["metadata"]["session_token"] == "***"


# --- serve's settings -------------------------------------------------


def test_only_loopback_serves_without_an_admin_token() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check_http_exposure(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigurationError, match=config.ENV_ADMIN_TOKEN):
            check_http_exposure(host, None)
        check_http_exposure(host, "a-token")


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    args = ["--database-url", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"]
    env = {"SESSIONMGR_ADMIN_TOKEN": "", "SESSIONMGR_HTTP_HOST": "", "SESSIONMGR_HTTP_PORT": ""}
    env["LEMONSLICE_API_KEY"] = "k"
    result = CliRunner().invoke(cli, [*args, "serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: refusing to serve HTTP on 0.0.0.0 without an admin token: set "
        "SESSIONMGR_ADMIN_TOKEN, or keep --host 127.0.0.1"
    ]
    assert not (tmp_path / "x.db").exists()
    bad_port = CliRunner().invoke(cli, [*args, "serve", "--port", "70000"], env=env)
    assert bad_port.exit_code == 2
    assert "--port" in bad_port.stderr


def test_http_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SESSIONMGR_ADMIN_TOKEN": TOKEN,
            "SESSIONMGR_HTTP_HOST": "::1",
            "SESSIONMGR_HTTP_PORT": "0",
        }
    )
    assert (settings.admin_token, settings.http_host, settings.http_port) == (TOKEN, "::1", 0)
    assert TOKEN not in repr(settings)
    assert Settings.from_env({}).http_port == 8787
    for bad in ("web", "70000", "-1"):
        with pytest.raises(ConfigurationError, match="SESSIONMGR_HTTP_PORT"):
            Settings.from_env({"SESSIONMGR_HTTP_PORT": bad})
