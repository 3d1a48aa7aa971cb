"""Security, as a reviewer would probe it: the admin API in process (aiohttp's test client, and
raw HTTP where a client library would tidy the request up) and a real ``serve --port 0``
process; the API key kept to LemonSlice's origin; nothing sensitive in logs or on command lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner, Result
from sqlalchemy import text

from sessionmgr import db
from sessionmgr.cli import cli
from sessionmgr.client import MAX_ANSWER_BYTES, LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.errors import (
    CreateOutcomeUnknown,
    InvalidResponseError,
    UntrustedURLError,
)
from sessionmgr.manager import SessionManager
from sessionmgr.records import redact
from sessionmgr.repository import SessionRepository
from sessionmgr.states import SessionStatus
from sessionmgr.testing import FakeLemonSlice, fake_server_process
from sessionmgr.web import OPEN_ROUTES, OpenRoute, create_app

from .helpers import FAKE_API_KEY, TEST_RETRY, TEST_TIMEOUTS, make_manager

TOKEN = "sec-admin-token-5b81c0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API_KEY = "sec-lemonslice-key-93d1"
STATIC = Path(__file__).parent.parent / "sessionmgr" / "static"
START_TIMEOUT = 30.0  # seconds a serve process may take to listen
CLEAN_ENV = {k: None for k in os.environ if k.startswith(("SESSIONMGR_", "LEMONSLICE_"))} | {
    "COLUMNS": None
}


@contextlib.asynccontextmanager
async def served(
    manager: SessionManager, token: str | None = TOKEN, allowed_hosts: tuple[str, ...] = ()
) -> AsyncIterator[tuple[web.Application, TestClient[web.Request, web.Application]]]:
    app = create_app(manager, admin_token=token, allowed_hosts=allowed_hosts)
    async with TestClient(TestServer(app)) as client:
        yield app, client


async def raw_get(port: int, target: str, host: str, headers: dict[str, str] | None = None) -> Any:
    """One HTTP/1.1 GET sent byte for byte (no client library normalises the path or Host)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def concrete_routes(app: web.Application) -> list[tuple[str, str, str]]:
    """(method, canonical route, a path that reaches it) for every route of the app."""
    out = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        canonical = route.resource.canonical
        path = re.sub(r"\{name\}", "dashboard.js", canonical)
        path = re.sub(r"\{[^}]+\}", "1", path)
        out.append((route.method, canonical, path))
    return out


def is_open(canonical: str) -> bool:
    return any(o.covers(canonical) for o in OPEN_ROUTES)


# --- reads behind the token ----------------------------------------------------------------------


async def test_with_a_token_every_route_but_the_open_ones_needs_it(
    manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    record = await manager.create_session(agent_id="a", agent_prompt="the secret plan")
    async with served(manager) as (app, api):
        routes = concrete_routes(app)
        guarded = {c for _, c, _ in routes if not is_open(c)}
        assert guarded >= {
            "/metrics",
            "/api/openapi.json",
            "/api/sessions",
            "/api/sessions/{id}",
            "/api/stats",
        }
        for method, canonical, path in routes:
            if is_open(canonical):
                resp = await api.request(method, path)
                assert resp.status != 401, (method, path)
                continue
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                resp = await api.request(method, path, headers=headers)
                assert resp.status == 401, (method, path, headers)
                body = await resp.json()
                assert body["error"] == "unauthorized"
                assert "the secret plan" not in json.dumps(body)
        listed = await api.get("/api/sessions", headers=AUTH)
        assert [s["id"] for s in (await listed.json())["items"]] == [record.id]
        scrape = await api.get("/metrics", headers=AUTH)
        assert scrape.status == 200
        assert "sessionmgr_database_up 1.0" in await scrape.text()
        health = await api.get("/healthz")  # no token: probes carry none
        answer = await health.json()  # 503 here: this test's manager runs no reaper
        assert (health.status, answer["error"]) == (503, "reaper_not_running")
        assert answer["database"] == "ok"
    assert lemon.creates == 1


async def test_an_unknown_route_asks_for_the_token_before_saying_404(
    manager: SessionManager,
) -> None:
    async with served(manager) as (_, api):
        assert (await api.get("/api/nothing-here")).status == 401
        assert (await api.get("/api/nothing-here", headers=AUTH)).status == 404


async def test_no_path_trick_reaches_a_guarded_route_through_an_open_one(
    manager: SessionManager,
) -> None:
    await manager.create_session(agent_id="a", agent_prompt="the secret plan")
    async with served(manager) as (_, api):
        port = api.port
        assert port is not None
        for target in (
            "/static/../api/sessions",
            "/static/..%2Fapi%2Fsessions",
            "/static/%2e%2e/api/sessions",
            "/healthz/../api/sessions",
            "/./api/sessions",
            "//api/sessions",
        ):
            status, body = await raw_get(port, target, f"127.0.0.1:{port}")
            assert b"the secret plan" not in body, target
            assert status in (401, 404), (target, status, body[:200])


async def test_an_open_prefix_covers_routes_added_under_it_later(
    manager: SessionManager,
) -> None:
    """The LemonSlice-compatible proxy (another branch) adds routes under /api/liveai/ that
    authenticate with the caller's own x-api-key: the admin token must not stand in the way."""

    async def proxied(request: web.Request) -> web.Response:
        return web.json_response({"proxied": request.headers.get("x-api-key")})

    for token in (TOKEN, None):  # and "changes off" without a token does not apply either
        app = create_app(manager, admin_token=token)
        app.router.add_post("/api/liveai/sessions", proxied)
        async with TestClient(TestServer(app)) as api:
            resp = await api.post("/api/liveai/sessions", headers={"x-api-key": "caller-key"})
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"proxied": "caller-key"}
    prefix = OpenRoute("/api/liveai/", "own auth", prefix=True)
    assert prefix.covers("/api/liveai/sessions/{session_id}/control")
    assert prefix.covers("/api/liveai")
    assert not prefix.covers("/api/liveaix")
    assert not prefix.covers("/api/sessions")
    assert not OpenRoute("/", "page").covers("/api/sessions")


async def test_without_a_token_reads_are_open_and_changes_off(
    manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    async with served(manager, token=None) as (_, api):
        assert (await api.get("/api/sessions")).status == 200
        assert (await api.get("/metrics")).status == 200
        resp = await api.post("/api/sessions", json={"agent_id": "a"}, headers=AUTH)
        assert resp.status == 403
        assert "SESSIONMGR_ADMIN_TOKEN" in (await resp.json())["detail"]
    assert lemon.creates == 0


def test_the_dashboard_keeps_the_token_for_the_tab_only() -> None:
    script = (STATIC / "dashboard.js").read_text()
    assert "sessionStorage" in script
    assert "localStorage" not in script
    assert "document.cookie" not in script
    assert "Authorization" in script
    page = (STATIC / "dashboard.html").read_text()
    assert 'type="password"' in page


# --- the Host check (DNS rebinding) ------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8787",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "10.1.2.3",
        "[::2]:8787",
    ],
)
async def test_a_foreign_host_is_refused_with_a_json_error(
    manager: SessionManager, host: str
) -> None:
    async with served(manager) as (_, api):
        assert api.port is not None
        for path in ("/healthz", "/api/sessions", "/"):
            status, body = await raw_get(api.port, path, host, AUTH)
            assert status == 403, (path, body)
            answer = json.loads(body)
            assert answer["error"] == "host_not_allowed"
            assert "SESSIONMGR_ALLOWED_HOSTS" in answer["detail"]


async def test_our_own_names_are_answered(manager: SessionManager) -> None:
    async with served(manager, allowed_hosts=("127.0.0.1", "Sessions.Internal")) as (_, api):
        port = api.port
        assert port is not None
        for host in (
            f"127.0.0.1:{port}",
            "localhost",
            f"LOCALHOST:{port}",
            "sessions.internal",
            f"sessions.internal:{port}",
        ):
            status, body = await raw_get(port, "/api/sessions", host, AUTH)
            assert status == 200, (host, body)


async def test_the_address_a_request_came_to_is_ours_on_a_wildcard_bind(
    manager: SessionManager,
) -> None:
    """Bound to 0.0.0.0, the server does not know its names, but the address a connection
    arrived at is its own (a Kubernetes probe sends the pod's IP as Host)."""
    app = create_app(manager, admin_token=TOKEN, allowed_hosts=("0.0.0.0",))
    async with TestClient(TestServer(app, host="0.0.0.0")) as api:
        assert api.port is not None
        status, _ = await raw_get(api.port, "/api/sessions", f"127.0.0.1:{api.port}", AUTH)
        assert status == 200
        status, _ = await raw_get(api.port, "/api/sessions", "attacker.example", AUTH)
        assert status == 403


# --- a real `serve --port 0` -------------------------------------------------------------------


class ServeProcess:
    """``python -m sessionmgr serve --port 0`` with the given environment; ``url`` from its
    ``listening on`` line; ``stop()`` sends SIGTERM and returns the whole log."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SESSIONMGR_", "LEMON"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sessionmgr", "serve", "--port", "0", *args],
            env=base | env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def listening(self) -> str:
        while True:
            line = self.lines.get(timeout=START_TIMEOUT)
            self.log.append(line)
            if not line:
                pytest.fail(f"serve exited with {self.proc.wait()}: {''.join(self.log)}")
            if match := re.search(r"listening on (http://\S+)", line):
                return match.group(1)

    def finished(self) -> tuple[int, str]:
        """The exit code and log of a process expected to stop by itself."""
        code = self.proc.wait(timeout=START_TIMEOUT)
        while (line := self.lines.get(timeout=10)) != "":
            self.log.append(line)
        return code, "".join(self.log)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        code, log = self.finished()
        assert code == 0, log
        return log

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def serve_process(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[ServeProcess]:
    server = ServeProcess(tmp_path, env, *args)
    try:
        yield server
    finally:
        server.kill()


def http(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    data = json.dumps(body or {}).encode() if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_a_real_serve_guards_every_read_and_its_host(tmp_path: Path) -> None:
    key_file = secret_file(tmp_path / "api-key", API_KEY)
    token_file = secret_file(tmp_path / "admin-token", TOKEN)
    with fake_server_process(api_key=API_KEY) as api_url:
        env = {
            "LEMONSLICE_API_URL": api_url,
            "LEMONSLICE_API_KEY_FILE": str(key_file),
            "SESSIONMGR_ADMIN_TOKEN_FILE": str(token_file),
            "SESSIONMGR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}",
        }
        with serve_process(tmp_path, env, "--allowed-host", "sessions.internal") as serve:
            url = serve.listening()
            status, body = http(f"{url}/api/sessions", "POST", body={"agent_id": "a"})
            assert status == 401, body
            status, body = http(f"{url}/api/sessions", "POST", AUTH, {"agent_id": "a"})
            assert status == 201, body
            status, body = http(f"{url}/api/sessions", headers=AUTH)
            assert [s["agent_id"] for s in json.loads(body)["items"]] == ["a"]
            for path in ("/api/sessions", "/api/sessions/1", "/api/stats", "/metrics"):
                status, body = http(f"{url}{path}")
                assert status == 401, (path, body)
                assert json.loads(body)["error"] == "unauthorized"
            status, body = http(f"{url}/metrics", headers=AUTH)
            assert status == 200
            assert b"sessionmgr_reaper_up 1.0" in body
            status, body = http(f"{url}/healthz")
            assert status == 200, body
            port = int(url.rsplit(":", 1)[1])
            status, body = asyncio.run(raw_get(port, "/healthz", "rebound.attacker.example"))
            assert status == 403
            assert json.loads(body)["error"] == "host_not_allowed"
            status, _ = asyncio.run(raw_get(port, "/healthz", f"sessions.internal:{port}"))
            assert status == 200
            cmdline = Path(f"/proc/{serve.proc.pid}/cmdline").read_bytes()
            assert API_KEY.encode() not in cmdline
            assert TOKEN.encode() not in cmdline
            log = serve.stop()
    assert "Traceback" not in log
    assert API_KEY not in log
    assert TOKEN not in log


@pytest.mark.slow
def test_a_real_serve_refuses_a_bad_setting_before_starting(tmp_path: Path) -> None:
    database = tmp_path / "serve.db"
    env = {
        "LEMONSLICE_API_KEY": API_KEY,
        "SESSIONMGR_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "SESSIONMGR_LEASE": "0",
    }
    with serve_process(tmp_path, env) as serve:
        code, log = serve.finished()
    assert code == 2
    assert log.strip().splitlines() == [
        "error: SESSIONMGR_LEASE / --lease must be a number of seconds above 0, not 0.0"
    ]
    assert not database.exists()


@pytest.mark.slow
def test_the_dashboard_asks_for_the_token_in_a_real_browser(tmp_path: Path) -> None:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail("no chromium: run `make chromium`")
    with fake_server_process(api_key=API_KEY) as api_url:
        env = {
            "LEMONSLICE_API_URL": api_url,
            "LEMONSLICE_API_KEY": API_KEY,
            "SESSIONMGR_ADMIN_TOKEN": TOKEN,
            "SESSIONMGR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}",
        }
        with serve_process(tmp_path, env) as serve:
            url = serve.listening()
            flags = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=5000",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
            ]
            dom = subprocess.run(
                [str(chromium), *flags, f"{url}/"],
                capture_output=True,
                text=True,
                timeout=90,
                check=True,
            ).stdout
            serve.stop()
    assert '<form id="signin" class="signin">' in dom  # shown: no longer hidden
    assert "This server needs its admin token." in dom
    assert 'id="count-active">–<' in dom  # nothing read


# --- the API key goes only to LemonSlice -------------------------------------------------------


class Impostor:
    """A LemonSlice stand-in whose create answers a control_url on another server (``evil``),
    which records every request it gets: it must never see the key."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.evil_requests: list[dict[str, str]] = []
        self.terminates: list[str] = []
        self.created_at: str | None = None
        self.api = TestServer(self._api_app())
        self.evil = TestServer(self._evil_app())

    def _api_app(self) -> web.Application:
        app = web.Application()

        async def create(request: web.Request) -> web.Response:
            self.created_at = self.clock.now().isoformat()
            return web.json_response(
                {
                    "session_id": "sess_imp",
                    "room_url": "https://x.daily.co/r",
                    "control_url": str(self.evil.make_url("/sess_imp/control")),
                }
            )

        async def control(request: web.Request) -> web.Response:
            self.terminates.append(request.match_info["id"])
            return web.json_response({"success": True})

        async def listing(request: web.Request) -> web.Response:
            live = [] if self.created_at is None or self.terminates else ["sess_imp"]
            sessions = [
                {"session_id": s, "created_at": self.created_at, "session_status": "ACTIVE"}
                for s in live
            ]
            return web.json_response({"sessions": sessions, "pagination": {"has_more": False}})

        async def status(request: web.Request) -> web.Response:
            done = bool(self.terminates)
            return web.json_response({"session_status": "COMPLETED" if done else "ACTIVE"})

        app.router.add_post("/api/liveai/sessions", create)
        app.router.add_get("/api/liveai/sessions", listing)
        app.router.add_get("/api/liveai/sessions/{id}", status)
        app.router.add_post("/api/liveai/sessions/{id}/control", control)
        return app

    def _evil_app(self) -> web.Application:
        app = web.Application()

        async def anything(request: web.Request) -> web.Response:
            self.evil_requests.append(dict(request.headers))
            return web.json_response({"success": True})

        app.router.add_route("*", "/{tail:.*}", anything)
        return app

    @property
    def api_url(self) -> str:
        return str(self.api.make_url("/api/liveai/sessions"))

    @property
    def evil_url(self) -> str:
        return str(self.evil.make_url(""))

    async def __aenter__(self) -> Impostor:
        await self.api.start_server()
        await self.evil.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.api.close()
        await self.evil.close()

    def client(self, **kw: Any) -> LemonSliceClient:
        return LemonSliceClient(
            API_KEY, api_url=self.api_url, retry=TEST_RETRY, timeouts=TEST_TIMEOUTS, **kw
        )


@pytest.fixture
async def impostor() -> AsyncIterator[Impostor]:
    async with Impostor() as server:
        yield server


async def test_a_create_answer_with_a_foreign_control_url_is_refused(impostor: Impostor) -> None:
    async with impostor.client() as client:
        with pytest.raises(CreateOutcomeUnknown) as caught:
            await client.create_session(agent_id="a")
    message = str(caught.value)
    assert "not on the LemonSlice API's origin" in message
    assert "LEMONSLICE_CONTROL_ORIGINS" in message
    assert API_KEY not in message
    assert impostor.evil_requests == []


async def test_the_manager_and_http_keep_the_intent_pending_for_reconcile(
    impostor: Impostor, db_url: str
) -> None:
    async with (
        impostor.client() as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=True) as mgr,
    ):
        with pytest.raises(CreateOutcomeUnknown):
            await mgr.create_session(agent_id="a")
        async with served(mgr) as (_, api):
            resp = await api.post("/api/sessions", json={"agent_id": "b"}, headers=AUTH)
            assert resp.status == 502
            body = await resp.json()
            assert body["error"] == "lemonslice_unknown_outcome"
            assert "origin" in body["detail"]
        records = (await mgr.repository.list()).items
        assert [r.status for r in records] == [SessionStatus.PENDING] * 2
        assert all(r.control_url is None for r in records)
    assert impostor.evil_requests == []


async def test_reconcile_ends_that_session_at_the_documented_url(db_url: str) -> None:
    """The refused answer leaves a live session: it still ends, and the key still goes only to
    the API's origin."""
    clock = FakeClock()
    async with Impostor(clock) as impostor:
        client = LemonSliceClient(
            API_KEY, api_url=impostor.api_url, retry=TEST_RETRY, timeouts=TEST_TIMEOUTS
        )
        async with (
            client,
            SessionManager(
                database_url=db_url, client=client, clock=clock, reaper=False, auto_upgrade=True
            ) as mgr,
        ):
            with pytest.raises(CreateOutcomeUnknown):
                await mgr.create_session(agent_id="a")
            clock.advance(700)  # the intent's lease and reconcile's settling time are over
            report = await mgr.reconcile()
            assert report.errors == []
            [record] = (await mgr.repository.list()).items
            assert record.session_id == "sess_imp"
            assert record.status is SessionStatus.ENDED
            assert record.control_url == f"{impostor.api_url}/sess_imp/control"
        assert impostor.terminates == ["sess_imp"]
        assert impostor.evil_requests == []


async def test_an_explicitly_configured_control_origin_is_used(impostor: Impostor) -> None:
    async with impostor.client(control_origins=[impostor.evil_url]) as client:
        answer = await client.create_session(agent_id="a")
        assert answer["control_url"].startswith(impostor.evil_url)
        assert await client.end_session("sess_imp", answer["control_url"]) is True
    assert [h.get("x-api-key") for h in impostor.evil_requests] == [API_KEY]


async def test_end_session_refuses_a_foreign_control_url_before_sending(
    impostor: Impostor,
) -> None:
    async with impostor.client() as client:
        with pytest.raises(UntrustedURLError, match="not on the LemonSlice API's origin"):
            await client.end_session("sess_imp", f"{impostor.evil_url}/sess_imp/control")
    assert impostor.evil_requests == []


@pytest.mark.parametrize(
    "control_url",
    [
        "https://127.0.0.1:{port}/api/liveai/sessions/s/control",  # another scheme
        "http://127.0.0.1:1/api/liveai/sessions/s/control",  # another port
        "http://localhost:{port}/api/liveai/sessions/s/control",  # another name
        "http://127.0.0.1:{port}@evil.example/s/control",  # userinfo trick
        "javascript:alert(1)",
        "/relative/control",
    ],
)
async def test_only_the_exact_origin_is_trusted(impostor: Impostor, control_url: str) -> None:
    port = impostor.api.port
    async with impostor.client() as client:
        same = f"http://127.0.0.1:{port}/elsewhere/s/control"
        assert client.check_control_url(same) == same
        with pytest.raises(UntrustedURLError):
            client.check_control_url(control_url.format(port=port))


async def test_a_url_trusted_for_one_call_is_not_trusted_after_it(impostor: Impostor) -> None:
    """A per-call ``api_url`` widens the check for that call only: the URL it let through is
    refused next time without it (the check remembers only what passed the client's own
    origins)."""
    async with impostor.client() as client:
        other = "http://127.0.0.2:9/api/liveai/sessions/s/control"
        assert client.check_control_url(other, api_url="http://127.0.0.2:9/api") == other
        with pytest.raises(UntrustedURLError):
            client.check_control_url(other)
        mine = client.control_url_for("s")
        assert client.check_control_url(mine) == mine
        assert client.check_control_url(mine) == mine  # again: the remembered answer
        with pytest.raises(UntrustedURLError):
            client.check_control_url(other)


async def test_adopt_refuses_a_foreign_control_url(
    manager: SessionManager, lemon: FakeLemonSlice
) -> None:
    with pytest.raises(UntrustedURLError, match="LEMONSLICE_CONTROL_ORIGINS"):
        await manager.adopt_session("sess_elsewhere", "https://evil.example/sess/control")
    assert (await manager.repository.list()).items == []
    adopted = await manager.adopt_session("sess_ok", f"{lemon.url}/sess_ok/control")
    assert adopted.control_url == f"{lemon.url}/sess_ok/control"


async def test_cli_adopt_refuses_a_foreign_control_url(lemon: FakeLemonSlice, db_url: str) -> None:
    await db.upgrade(db_url)
    result = await invoke(
        "--database-url",
        db_url,
        "--api-url",
        lemon.url,
        "adopt",
        "sess_elsewhere",
        "--control-url",
        "https://evil.example/c",
        env={"LEMONSLICE_API_KEY": FAKE_API_KEY},
    )
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: control_url 'https://evil.example/c' is not on")
    async with await SessionRepository.open(db_url) as repo:
        assert (await repo.list()).items == []


async def test_a_stored_foreign_control_url_is_never_called(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str, impostor: Impostor
) -> None:
    """A row recorded before the check (or written by hand) still ends, at the documented URL."""
    async with make_manager(lemon, clock, db_url, idle_window=60.0) as mgr:
        live = await mgr.client.create_session(agent_id="a")
        await mgr.repository.adopt(
            session_id=live["session_id"],
            control_url=f"{impostor.evil_url}/{live['session_id']}/control",
            idle_window=60.0,
            max_age=None,
        )
        clock.advance(120)
        await mgr.reaper.run_once()
        record = await mgr.get(live["session_id"])
    assert record.status is SessionStatus.ENDED
    assert lemon.terminate_counts == {live["session_id"]: 1}
    assert impostor.evil_requests == []


# --- nothing sensitive in logs -----------------------------------------------------------------


async def test_a_failed_statement_never_shows_its_parameters(
    repo: SessionRepository, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "prompt: the launch code is 0000"
    for name in ("sessionmgr", "sqlalchemy"):  # ours and the engine's (drivers log on their own)
        caplog.set_level(logging.DEBUG, logger=name)
    for engine in (repo.engine, db.create_engine(repo.engine.url)):
        assert engine.sync_engine.hide_parameters
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the driver's own error
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO no_such_table VALUES (:p)"), {"p": secret})
        assert secret not in str(caught.value)
        assert "parameters hidden" in str(caught.value)
    await engine.dispose()
    assert secret not in caplog.text


def test_redaction_walks_lists_inside_lists() -> None:
    value = {
        "rooms": [[{"token": "t-1", "name": "a"}], ({"nested": [{"api_key": "k"}]},)],
        "secret": ["whole", "list"],
        "plain": [1, "two", None],
    }
    assert redact(value) == {
        "rooms": [[{"token": "***", "name": "a"}], [{"nested": [{"api_key": "***"}]}]],
        "secret": "***",
        "plain": [1, "two", None],
    }


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversized_answer_is_refused_unread(chunked: bool) -> None:
    big = b'{"session_status": "ACTIVE", "pad": "' + b"x" * (MAX_ANSWER_BYTES + 10) + b'"}'

    async def huge(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=big, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 65536):
            await resp.write(big[i : i + 65536])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/api/liveai/sessions{tail:.*}", huge)
    async with TestServer(app) as server:
        url = str(server.make_url("/api/liveai/sessions"))
        client = LemonSliceClient(API_KEY, api_url=url, retry=TEST_RETRY, timeouts=TEST_TIMEOUTS)
        async with client:
            with pytest.raises(InvalidResponseError, match="more than 1048576 bytes"):
                await client.get_session("sess_1")
            with pytest.raises(CreateOutcomeUnknown, match="more than 1048576 bytes"):
                await client.create_session(agent_id="a")


# --- keys off the command line -----------------------------------------------------------------


async def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """The CLI in a thread (it runs its own event loop), beside the test's fake."""
    return await asyncio.to_thread(
        CliRunner().invoke, cli, list(args), env=CLEAN_ENV | (env or {}), catch_exceptions=False
    )


@pytest.fixture
async def migrated_db(db_url: str) -> str:
    await db.upgrade(db_url)
    return db_url


def base_args(lemon: FakeLemonSlice, db_url: str) -> list[str]:
    return ["--database-url", db_url, "--api-url", lemon.url]


async def test_api_key_file_keeps_the_key_off_the_command_line(
    lemon: FakeLemonSlice, migrated_db: str, tmp_path: Path
) -> None:
    key_file = secret_file(tmp_path / "key", FAKE_API_KEY)
    result = await invoke(
        *base_args(lemon, migrated_db), "--api-key-file", str(key_file), "create", "--agent-id", "a"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert lemon.creates == 1
    from_env = await invoke(
        *base_args(lemon, migrated_db),
        "create",
        "--agent-id",
        "b",
        env={"LEMONSLICE_API_KEY_FILE": str(key_file)},
    )
    assert from_env.exit_code == 0, from_env.output
    assert lemon.creates == 2


async def test_the_api_key_flag_still_works_but_warns_once(
    lemon: FakeLemonSlice, migrated_db: str
) -> None:
    result = await invoke(
        *base_args(lemon, migrated_db), "--api-key", FAKE_API_KEY, "create", "--agent-id", "a"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: --api-key shows in `ps` and shell history: use --api-key-file or "
        "LEMONSLICE_API_KEY instead"
    ]
    quiet = await invoke(
        *base_args(lemon, migrated_db),
        "create",
        "--agent-id",
        "a",
        env={"LEMONSLICE_API_KEY": FAKE_API_KEY},
    )
    assert quiet.exit_code == 0
    assert quiet.stderr == ""


@pytest.mark.parametrize(
    ("extra", "env", "needle"),
    [
        (["--api-key", "k", "--api-key-file", "{file}"], {}, "give --api-key or --api-key-file"),
        (["--api-key-file", "{missing}"], {}, "cannot read --api-key-file"),
        (["--api-key-file", "{empty}"], {}, "must hold the secret on one line"),
        ([], {"LEMONSLICE_API_KEY_FILE": "{missing}"}, "cannot read LEMONSLICE_API_KEY_FILE"),
        (
            [],
            {"LEMONSLICE_API_KEY_FILE": "{file}", "LEMONSLICE_API_KEY": "k"},
            "set LEMONSLICE_API_KEY or LEMONSLICE_API_KEY_FILE, not both",
        ),
    ],
)
async def test_a_bad_key_source_is_one_usage_line(
    lemon: FakeLemonSlice,
    migrated_db: str,
    tmp_path: Path,
    extra: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    paths = {
        "file": str(secret_file(tmp_path / "key", FAKE_API_KEY)),
        "missing": str(tmp_path / "nope"),
        "empty": str(secret_file(tmp_path / "empty", "")),
    }
    args = [a.format(**paths) for a in extra]
    result = await invoke(
        *base_args(lemon, migrated_db),
        *args,
        "create",
        "--agent-id",
        "a",
        env={k: v.format(**paths) for k, v in env.items()},
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert FAKE_API_KEY not in result.output
    assert lemon.creates == 0


async def test_daily_token_file(lemon: FakeLemonSlice, migrated_db: str, tmp_path: Path) -> None:
    token_file = secret_file(tmp_path / "daily", "daily-tok-from-file-77")
    env: dict[str, str | None] = {"LEMONSLICE_API_KEY": FAKE_API_KEY}
    args = [*base_args(lemon, migrated_db), "create", "--agent-id", "a", "--json"]
    result = await invoke(*args, "--daily-token-file", str(token_file), env=env)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    [request] = [r for r in lemon.requests if r.endpoint == "create"]
    assert request.json["properties"]["daily_token"] == "daily-tok-from-file-77"
    assert "daily-tok-from-file-77" not in result.output
    flagged = await invoke(*args, "--daily-token", "daily-tok-flag-88", env=env)
    assert flagged.exit_code == 0
    assert flagged.stderr.splitlines() == [
        "warning: --daily-token shows in `ps` and shell history: use --daily-token-file instead"
    ]


def test_the_api_document_says_which_routes_need_the_token() -> None:
    from sessionmgr import openapi

    for path, operations in openapi.document("t")["paths"].items():
        for method, operation in operations.items():
            guarded = not is_open(path)
            assert ("401" in operation["responses"]) is guarded, (method, path)


async def test_a_request_without_a_host_header_is_refused(manager: SessionManager) -> None:
    async with served(manager) as (_, api):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(b"GET /api/sessions HTTP/1.0\r\nAuthorization: Bearer " + TOKEN.encode())
        writer.write(b"\r\n\r\n")
        data = await reader.read()
        writer.close()
    assert data.startswith(b"HTTP/1.0 403") or data.startswith(b"HTTP/1.1 403"), data[:100]
    assert b"host_not_allowed" in data
