"""``FakeLemonSlice``: a local server speaking the LemonSlice protocol, with injected faults.

A real aiohttp server on loopback (random free port by default), so the code under test goes
through real sockets, timeouts and dropped connections::

    async with FakeLemonSlice(api_key="test-key") as fake:
        client = LemonSliceClient("test-key", api_url=fake.url)
        fake.inject("terminate", Fault.status(503), times=2)
        ...
        assert fake.terminate_counts[session_id] == 1

Another process can run it with ``sessionmgr fake-server`` and drive it through the JSON admin
routes under ``/_fake/`` (``fake_state(url)`` reads its state). Admin routes need no API key and are
not recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.parser
import email.policy
import hmac
import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from yarl import URL

from .client import ASPECT_RATIOS, AUDIO_SAMPLE_RATES, MAX_IMAGE_BYTES
from .clock import SYSTEM_CLOCK, Clock
from .records import is_secret_key
from .resources import AsyncResource
from .states import REMOTE_LIVE

logger = logging.getLogger(__name__)

COLLECTION_PATH = "/api/liveai/sessions"
ADMIN_PATH = "/_fake"
ENDPOINTS = ("create", "get", "list", "terminate", "control")  # control: events but terminate
SERVER_IDLE_TIMEOUT = 60  # seconds, LemonSlice's default idle_timeout
CREDITS_PER_MINUTE = 1.0  # what the fake bills a live session
LIST_DEFAULT_LIMIT = 25  # sessions per page when the client does not say
LIST_MAX_LIMIT = 100  # a larger limit is refused (400), as LemonSlice documents 1-100
MAX_SESSION_SECONDS = 1800.0  # LemonSlice ends any session after 30 minutes (server_timeouts)
SHUTDOWN_TIMEOUT = 0.5  # seconds stop() waits for in-flight handlers
STATE_SAVE_INTERVAL = 0.5  # seconds between writes of --state-file while state changes
ADMIN_TIMEOUT = 10.0  # seconds, fake_state()'s limit
PROCESS_START_TIMEOUT = 20.0  # seconds fake_server_process() waits for the process to listen
LISTENING_PREFIX = "fake-server listening on "  # the one line `sessionmgr fake-server` prints
REDACTED = "REDACTED"
FAKE_ROOM_BASE = "https://fake-lemonslice.daily.co"  # rooms of sessions created without one
MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body the fake reads: a 900 KB image, base64, fits
NO_CREDITS_DETAIL = "No active subscription or insufficient credits"

STATUSES = ("QUEUED", "ACTIVE", "COMPLETED", "TIMED_OUT", "FAILED")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# The fields a client needs from each endpoint's answer; ``Fault.missing_fields`` drops them.
_REQUIRED_FIELDS = {
    "create": ("session_id",),
    "get": ("session_status",),
    "list": ("sessions",),
    "terminate": ("success",),
    "control": ("success",),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """What goes wrong with the next call(s) of an endpoint.

    ``status``, ``html_502`` and ``drop`` fail before the request is handled (nothing changes on
    the server). ``lost_answer``, ``hang``, ``non_json`` and ``missing_fields`` handle the request
    first (a create does create the session, a terminate does end it) and then spoil the answer:
    the connection is dropped, the answer comes ``seconds`` late, or its body is unusable.
    """

    kind: str
    code: int | None = None
    body: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0

    KINDS: ClassVar[tuple[str, ...]] = (
        "status",
        "html_502",
        "non_json",
        "missing_fields",
        "hang",
        "drop",
        "lost_answer",
    )

    @classmethod
    def status(
        cls, code: int, body: str | None = None, retry_after: float | str | None = None
    ) -> Fault:
        """Answer HTTP ``code`` (with a ``Retry-After`` header when given) without handling."""
        if not 100 <= code <= 599:
            raise ValueError(f"HTTP status {code} is not in 100..599")
        ra = None if retry_after is None else _format_retry_after(retry_after)
        return cls("status", code=code, body=body, retry_after=ra)

    @classmethod
    def html_502(cls) -> Fault:
        """A proxy's HTML 502 page."""
        return cls("html_502", code=502)

    @classmethod
    def non_json(cls) -> Fault:
        """Handle the request, then answer with a body that is not JSON."""
        return cls("non_json")

    @classmethod
    def missing_fields(cls) -> Fault:
        """Handle the request, then answer JSON without the fields a client needs."""
        return cls("missing_fields")

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        """Handle the request, then hold the answer ``seconds`` (past the client's timeout)."""
        if seconds < 0:
            raise ValueError("Fault.hang needs seconds >= 0")
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without handling the request or answering."""
        return cls("drop")

    @classmethod
    def lost_answer(cls) -> Fault:
        """Handle the request (a create IS created), then close the connection unanswered."""
        return cls("lost_answer")

    @property
    def handles_request(self) -> bool:
        return self.kind in ("non_json", "missing_fields", "hang", "lost_answer")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build from the admin route's JSON (``kind`` plus that kind's arguments)."""
        kind = data.get("kind")
        if kind == "status":
            if not isinstance(data.get("code"), int):
                raise ValueError("a status fault needs an integer 'code'")
            return cls.status(data["code"], data.get("body"), data.get("retry_after"))
        if kind == "hang":
            seconds = data.get("seconds")
            if not isinstance(seconds, int | float):
                raise ValueError("a hang fault needs a number 'seconds'")
            return cls.hang(float(seconds))
        if kind in cls.KINDS:
            return cls(str(kind), code=502 if kind == "html_502" else None)
        raise ValueError(f"unknown fault kind {kind!r}: use one of {', '.join(cls.KINDS)}")


@dataclasses.dataclass(frozen=True, slots=True)
class FormField:
    """One part of a multipart request."""

    name: str
    data: bytes
    filename: str | None
    content_type: str

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One API request as the fake received it (the ``x-api-key`` header value redacted)."""

    endpoint: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any  # the parsed JSON body; None for multipart or non-JSON bodies
    form: dict[str, FormField] | None  # multipart parts by name

    @property
    def payload(self) -> Any:
        """The create payload whichever way it came: JSON body or the multipart ``payload``."""
        if self.form is not None and "payload" in self.form:
            return json.loads(self.form["payload"].data)
        return self.json


@dataclasses.dataclass(slots=True)
class FakeSession:
    """A session the fake holds; ``payload`` has token/secret/key-like values redacted."""

    session_id: str
    status: str
    created_at: datetime
    idle_timeout: int
    cost: float | None
    terminate_count: int
    payload: dict[str, Any]
    last_activity: datetime
    room_url: str | None = None
    control_url: str | None = None
    ended_at: datetime | None = None
    terminate_requests: int = 0
    controls: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # events, redacted

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("created_at", "last_activity", "ended_at"):
            if out[name] is not None:
                out[name] = out[name].isoformat()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FakeSession:
        values = dict(data)
        for name in ("created_at", "last_activity", "ended_at"):
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name])
        return cls(**values)


class FakeLemonSlice(AsyncResource):
    """An in-process LemonSlice: create (JSON and multipart, daily and livekit), get, paged list,
    terminate and the other control events; ``no_credits = True`` makes creates answer 402."""

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        latency: Mapping[str, float] | None = None,
        state_file: str | os.PathLike[str] | None = None,
        record_requests: bool = True,
    ) -> None:
        self.api_key = api_key  # the key this fake accepts (a test value, not a secret)
        self.host = host
        self.port = port
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.latency: dict[str, float] = {}
        for endpoint, seconds in (latency or {}).items():
            self.set_latency(endpoint, seconds)
        self.state_file = Path(state_file) if state_file is not None else None
        self.record_requests = record_requests
        self.requests: list[RecordedRequest] = []
        self.sessions: dict[str, FakeSession] = {}
        self._created = 0
        self._terminate_requests: dict[str, int] = {}
        # endpoint -> queued [fault, calls left]; ``faults.clear()`` drops every pending fault
        self.faults: dict[str, deque[list[Any]]] = {}
        self.no_credits = False  # True: creates answer 402, as an account without credits does
        self._in_flight: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
        self._max_in_flight: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._dirty = False
        self._saver: asyncio.Task[None] | None = None
        self._init_realism()

    def __repr__(self) -> str:
        where = self.url if self._runner else "not started"
        return f"FakeLemonSlice({where}, sessions={len(self.sessions)})"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            return
        if self.state_file is not None and self.state_file.exists():
            self._load_state(self.state_file)
        self._stopping.clear()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        base = COLLECTION_PATH
        app.router.add_post(base, self._api("create", self._create))
        app.router.add_get(base, self._api("list", self._list))
        app.router.add_get(base + "/{session_id}", self._api("get", self._get))
        app.router.add_post(base + "/{session_id}/control", self._control_route())
        app.router.add_get(ADMIN_PATH + "/state", self._admin_state)
        app.router.add_post(ADMIN_PATH + "/faults", self._admin_faults)
        app.router.add_post(ADMIN_PATH + "/latency", self._admin_latency)
        app.router.add_post(ADMIN_PATH + "/sessions/{session_id}/status", self._admin_status)
        app.router.add_post(ADMIN_PATH + "/expire_idle", self._admin_expire)
        app.router.add_post(ADMIN_PATH + "/reset", self._admin_reset)
        app.router.add_post(ADMIN_PATH + "/realism", self._admin_realism)
        app.router.add_post(ADMIN_PATH + "/credits", self._admin_credits)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        if self.state_file is not None:
            self._saver = asyncio.create_task(self._save_periodically())
        logger.debug("FakeLemonSlice listening on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()  # wakes hung handlers so shutdown is quick
        if self._saver is not None:
            self._saver.cancel()
            await asyncio.gather(self._saver, return_exceptions=True)
            self._saver = None
        await runner.cleanup()
        if self.state_file is not None:
            self.save_state(self.state_file)

    async def _enter(self) -> None:
        await self.start()

    async def _exit(self) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The sessions collection URL, e.g. ``http://127.0.0.1:PORT/api/liveai/sessions``."""
        if self._runner is None:
            raise RuntimeError("FakeLemonSlice is not started: use `async with` or await start()")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{COLLECTION_PATH}"

    # --- what tests read ------------------------------------------------------------------------

    @property
    def creates(self) -> int:
        """Sessions created (every successful create, whatever became of its answer)."""
        return self._created

    @property
    def live_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.status in REMOTE_LIVE)

    @property
    def terminate_counts(self) -> dict[str, int]:
        """Successful terminates per session, for sessions terminated at least once (a terminate
        of an ended session is a 404 and does not count)."""
        return {sid: s.terminate_count for sid, s in self.sessions.items() if s.terminate_count}

    @property
    def terminate_requests(self) -> dict[str, int]:
        """Every terminate request per session id, faulted, refused and unknown ids included."""
        return dict(self._terminate_requests)

    def terminate_requests_total(self) -> list[RecordedRequest]:
        """Every recorded terminate request, in arrival order."""
        return [r for r in self.requests if r.endpoint == "terminate"]

    def max_in_flight(self, endpoint: str) -> int:
        """The most requests of ``endpoint`` the fake was handling at once (since start/reset)."""
        _check_endpoint(endpoint)
        return self._max_in_flight[endpoint]

    def state(self) -> dict[str, Any]:
        """The JSON of ``GET /_fake/state``."""
        return {
            "url": self.url if self._runner else None,
            "created": self._created,
            "creates": self._created,
            "live": self.live_count,
            "requests": len(self.requests),
            "sessions": {sid: s.to_dict() for sid, s in self.sessions.items()},
            "terminate_requests": dict(self._terminate_requests),
        }

    # --- what tests change ----------------------------------------------------------------------

    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """Make the next ``times`` calls of ``endpoint`` fail with ``fault`` (queued in order)."""
        _check_endpoint(endpoint)
        if times < 1:
            raise ValueError("times must be >= 1")
        self.faults.setdefault(endpoint, deque()).append([fault, times])

    def set_latency(self, endpoint: str, seconds: float) -> None:
        _check_endpoint(endpoint)
        if seconds < 0:
            raise ValueError(f"latency for {endpoint} must be >= 0 seconds")
        self.latency[endpoint] = float(seconds)

    def set_status(self, session_id: str, status: str, cost: float | None = None) -> None:
        """Move a session to any remote status, as the real service would on its own."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
        session = self._session(session_id)
        session.status = status
        if status in REMOTE_LIVE:
            session.ended_at = None
        elif session.ended_at is None:
            session.ended_at = self.clock.now()
        if cost is not None:
            session.cost = cost
        elif status == "COMPLETED" and session.cost is None:
            session.cost = self._bill(session)
        self._dirty = True

    def touch(self, session_id: str) -> None:
        """Record activity in the session's room (what the server's idle timeout watches)."""
        self._session(session_id).last_activity = self.clock.now()

    def expire_idle(self) -> list[str]:
        """End live sessions idle for at least their ``idle_timeout`` (>= 0) as TIMED_OUT."""
        now = self.clock.now()
        expired = []
        for session in self.sessions.values():
            if (
                session.status in REMOTE_LIVE
                and session.idle_timeout >= 0
                and (now - session.last_activity).total_seconds() >= session.idle_timeout
            ):
                session.status = "TIMED_OUT"
                session.ended_at = now
                expired.append(session.session_id)
        self._dirty = self._dirty or bool(expired)
        return expired

    def reset(self) -> None:
        """Forget every session, request and pending fault."""
        self.requests.clear()
        self.sessions.clear()
        self._terminate_requests.clear()
        self._created = 0
        self.faults.clear()
        self.no_credits = False
        self._max_in_flight = dict.fromkeys(ENDPOINTS, 0)
        self._dirty = True

    # --- realism: what makes the fake as rough as LemonSlice -------------------------------------

    def _init_realism(self) -> None:
        self.answer_hold: dict[str, float] = {}  # endpoint -> seconds its answer is held
        self._released: dict[str, asyncio.Event] = {}
        self.queue_seconds = 0.0  # > 0: new sessions stay QUEUED this long (a cold start)
        self.server_timeouts = False  # True: idle_timeout and the 30-minute cap end sessions
        self.max_session_seconds = MAX_SESSION_SECONDS
        self.list_newest_first = True  # False: a list out of its documented order
        self._queued: dict[str, FakeSession] = {}

    def hold_answers(self, endpoint: str, seconds: float) -> None:
        """Hold each ``endpoint`` answer for ``seconds`` *after* the request took effect: a
        create's session already exists and is listed while its creator still waits (the slow
        create of the real service). ``release_answers`` lets the held answers go at once."""
        _check_endpoint(endpoint)
        if seconds < 0:
            raise ValueError(f"hold for {endpoint} must be >= 0 seconds")
        self.answer_hold[endpoint] = float(seconds)
        self._released[endpoint] = asyncio.Event()

    def release_answers(self, endpoint: str) -> None:
        """Send the answers ``hold_answers`` is holding now, and hold no more."""
        self.answer_hold.pop(endpoint, None)
        if (event := self._released.pop(endpoint, None)) is not None:
            event.set()

    def configure_realism(
        self,
        *,
        queue_seconds: float | None = None,
        server_timeouts: bool | None = None,
        max_session_seconds: float | None = None,
        hold: Mapping[str, float] | None = None,
        release: Iterable[str] = (),
    ) -> None:
        """Switch each rough edge on or off (also ``POST /_fake/realism`` and the fake-server
        flags)."""
        if queue_seconds is not None:
            if float(queue_seconds) < 0:
                raise ValueError("queue_seconds must be >= 0")
            self.queue_seconds = float(queue_seconds)
        if server_timeouts is not None:
            self.server_timeouts = bool(server_timeouts)
        if max_session_seconds is not None:
            if float(max_session_seconds) <= 0:
                raise ValueError("max_session_seconds must be > 0")
            self.max_session_seconds = float(max_session_seconds)
        for endpoint, seconds in (hold or {}).items():
            self.hold_answers(endpoint, float(seconds))
        for endpoint in release:
            self.release_answers(endpoint)

    def _queue_if_cold(self, session: FakeSession) -> None:
        if self.queue_seconds > 0 and session.status == "ACTIVE":
            session.status = "QUEUED"
            self._queued[session.session_id] = session

    def apply_server_rules(self) -> list[str]:
        """What the server does by itself, on the fake's clock: QUEUED sessions become ACTIVE
        after ``queue_seconds``; with ``server_timeouts``, a session idle for its
        ``idle_timeout`` (>= 0) ends TIMED_OUT and one older than ``max_session_seconds`` ends
        COMPLETED, each with its cost. Runs before every request; returns the ids it ended."""
        now = self.clock.now()
        queue = timedelta(seconds=self.queue_seconds)
        for sid, session in list(self._queued.items()):
            if session.status != "QUEUED":
                del self._queued[sid]
            elif now - session.created_at >= queue:
                session.status = "ACTIVE"
                del self._queued[sid]
                self._dirty = True
        if not self.server_timeouts:
            return []
        ended = []
        for session in self.sessions.values():
            if session.status not in REMOTE_LIVE:
                continue
            capped = session.created_at + timedelta(seconds=self.max_session_seconds)
            idled = (
                session.last_activity + timedelta(seconds=session.idle_timeout)
                if session.idle_timeout >= 0
                else None
            )
            if idled is not None and idled <= now and idled < capped:
                session.status, session.ended_at = "TIMED_OUT", idled
            elif capped <= now:
                session.status, session.ended_at = "COMPLETED", capped
            else:
                continue
            session.cost = self._bill(session, until=session.ended_at)
            ended.append(session.session_id)
        self._dirty = self._dirty or bool(ended)
        return ended

    def seed_history(
        self, count: int, *, before: datetime, spacing: float = 60.0, cost: float = 1.0
    ) -> None:
        """Add ``count`` finished (COMPLETED) sessions, created ``spacing`` seconds apart up to
        ``before``: a long remote history in one call, without a request each."""
        for n in range(count):
            created = before - timedelta(seconds=spacing * (count - n))
            sid = f"hist_{n:08d}"
            self.sessions[sid] = FakeSession(
                session_id=sid,
                status="COMPLETED",
                created_at=created,
                idle_timeout=SERVER_IDLE_TIMEOUT,
                cost=cost,
                terminate_count=0,
                payload={},
                last_activity=created,
                control_url=None,
                ended_at=created + timedelta(seconds=spacing / 2),
            )
        self._dirty = True

    async def _hold_answer(self, endpoint: str) -> None:
        seconds = self.answer_hold.get(endpoint)
        if not seconds:
            return
        waits = {
            asyncio.ensure_future(self._released[endpoint].wait()),
            asyncio.ensure_future(self._stopping.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    # --- state file -----------------------------------------------------------------------------

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write ``state()`` atomically (readers never see half a file)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        os.replace(tmp, target)
        self._dirty = False

    def _load_state(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self.sessions = {sid: FakeSession.from_dict(s) for sid, s in data["sessions"].items()}
        self._created = int(data.get("created", len(self.sessions)))
        self._terminate_requests = dict(data.get("terminate_requests", {}))

    async def _save_periodically(self) -> None:
        assert self.state_file is not None
        while True:
            await asyncio.sleep(STATE_SAVE_INTERVAL)
            if self._dirty:
                self.save_state(self.state_file)

    # --- the API --------------------------------------------------------------------------------

    def _api(
        self, endpoint: str, handler: Callable[[RecordedRequest, web.Request], web.Response]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            self._in_flight[endpoint] += 1
            if self._in_flight[endpoint] > self._max_in_flight[endpoint]:
                self._max_in_flight[endpoint] = self._in_flight[endpoint]
            try:
                return await handle(request)
            finally:
                self._in_flight[endpoint] -= 1

        async def handle(request: web.Request) -> web.StreamResponse:
            self.apply_server_rules()
            recorded = await self._record(endpoint, request)
            if endpoint == "terminate":
                sid = request.match_info["session_id"]
                self._terminate_requests[sid] = self._terminate_requests.get(sid, 0) + 1
                if sid in self.sessions:
                    self.sessions[sid].terminate_requests += 1
                self._dirty = True
            if delay := self.latency.get(endpoint):
                await asyncio.sleep(delay)
            fault = self._next_fault(endpoint)
            if fault is not None and not fault.handles_request:
                return _fault_answer(fault, request)
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return _error(401, "invalid or missing X-API-Key")
            response = handler(recorded, request)
            await self._hold_answer(endpoint)
            if fault is None:
                return response
            return await self._spoil(endpoint, fault, request, response)

        return route

    async def _spoil(
        self, endpoint: str, fault: Fault, request: web.Request, response: web.Response
    ) -> web.StreamResponse:
        if fault.kind == "lost_answer":
            return _drop(request)
        if fault.kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), fault.seconds)
            return response
        if fault.kind == "non_json":
            return web.Response(status=response.status, text="OK", content_type="text/plain")
        # missing_fields
        if not 200 <= response.status < 300 or response.body is None:
            return response
        data = json.loads(bytes(response.body))  # type: ignore[arg-type]
        for name in _REQUIRED_FIELDS[endpoint]:
            data.pop(name, None)
        return web.json_response(data, status=response.status)

    def _create(self, recorded: RecordedRequest, request: web.Request) -> web.Response:
        if self.no_credits:
            return web.json_response({"detail": NO_CREDITS_DETAIL}, status=402)
        try:
            payload = recorded.payload
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the payload part is not JSON")
        if not isinstance(payload, dict):
            return _error(400, "the body must be a JSON object (or multipart with 'payload')")
        image = recorded.form.get("image") if recorded.form is not None else None
        sources = [k for k in ("agent_id", "agent_image_url") if payload.get(k) is not None]
        if image is not None:
            sources.append("agent_image")
            if not image.data.startswith(_PNG_SIGNATURE):
                return _error(400, "image must be a PNG")
        if len(sources) != 1:
            return _error(400, "Provide exactly one of agent_id, agent_image_url, or agent_image")
        transport = payload.get("transport_type")
        if transport not in ("daily", "livekit"):
            return _error(400, "transport_type must be 'daily' or 'livekit'")
        idle_timeout = payload.get("idle_timeout", SERVER_IDLE_TIMEOUT)
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int):
            return _error(400, "idle_timeout must be an integer number of seconds")
        properties = payload.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return _error(400, "properties must be an object")
        if (problem := _create_problem(payload, transport)) is not None:
            return _error(400, problem)

        session_id = "sess_" + secrets.token_hex(12)
        now = self.clock.now()
        control_url = f"{self.url}/{session_id}/control"
        room_url = (properties or {}).get("daily_url") or f"{FAKE_ROOM_BASE}/{session_id}"
        self.sessions[session_id] = FakeSession(
            session_id=session_id,
            status="ACTIVE",
            created_at=now,
            idle_timeout=idle_timeout,
            cost=None,
            terminate_count=0,
            payload=_redact(payload),
            last_activity=now,
            room_url=room_url if transport == "daily" else None,
            control_url=control_url,
        )
        self._created += 1
        self._dirty = True
        self._queue_if_cold(self.sessions[session_id])
        if transport == "livekit":  # the self-managed flavour answers with the id only
            return web.json_response({"session_id": session_id})
        return web.json_response(
            {"session_id": session_id, "room_url": room_url, "control_url": control_url}
        )

    def _get(self, recorded: RecordedRequest, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["session_id"])
        if session is None:
            return _error(404, "session not found")
        body: dict[str, Any] = {"session_status": session.status}
        if session.status == "COMPLETED":
            body["cost"] = session.cost
        return web.json_response(body)

    def _list(self, recorded: RecordedRequest, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            limit = int(request.query.get("limit", str(LIST_DEFAULT_LIMIT)))
        except ValueError:
            return _error(400, "page and limit must be integers")
        if page < 1 or not 1 <= limit <= LIST_MAX_LIMIT:
            return _error(400, f"page must be >= 1 and limit 1-{LIST_MAX_LIMIT}")
        newest_first = sorted(
            self.sessions.values(), key=lambda s: s.created_at, reverse=self.list_newest_first
        )
        total = len(newest_first)
        chunk = newest_first[(page - 1) * limit : page * limit]
        total_pages = (total + limit - 1) // limit
        return web.json_response(
            {
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "created_at": _iso_ms(s.created_at),
                        "session_status": s.status,
                        "credits_used": s.cost,
                        "provider": "DAILY",
                    }
                    for s in chunk
                ],
                "pagination": {
                    "page": page,
                    "limit": limit,
                    "total": total,
                    "total_pages": total_pages,
                    "has_more": page < total_pages,
                },
            }
        )

    def _control(self, recorded: RecordedRequest, request: web.Request) -> web.Response:
        if not isinstance(recorded.json, dict) or recorded.json.get("event") != "terminate":
            return _error(400, 'the body must be {"event": "terminate"}')
        session = self.sessions.get(request.match_info["session_id"])
        if session is None or session.status not in REMOTE_LIVE:
            return _error(404, "session not found or already ended")
        session.status = "COMPLETED"
        session.ended_at = self.clock.now()
        session.cost = self._bill(session)
        session.terminate_count += 1
        self._dirty = True
        return web.json_response({"success": True})

    # --- control events (everything but terminate on the control URL) -------------------------

    def _control_route(self) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """One URL, two endpoints: ``terminate`` for ``{"event": "terminate"}`` (and anything
        unreadable, which it refuses), ``control`` for every other event, so faults and counts of
        terminates stay apart from the rest."""
        terminate = self._api("terminate", self._control)
        control = self._api("control", self._control_event)

        async def route(request: web.Request) -> web.StreamResponse:
            try:
                event = json.loads(await request.read()).get("event")
            except (ValueError, AttributeError):
                event = None
            if isinstance(event, str) and event != "terminate":
                return await control(request)
            return await terminate(request)

        return route

    def control_events(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """The control events sessions accepted (all, or one session's), oldest first; an
        update-image sent as base64 is recorded as its decoded size, not its bytes."""
        sessions = [self._session(session_id)] if session_id else self.sessions.values()
        return [dict(c) for s in sessions for c in s.controls]

    def _control_event(self, recorded: RecordedRequest, request: web.Request) -> web.Response:
        body = recorded.json
        assert isinstance(body, dict)  # the route sent only JSON objects with an event here
        session = self.sessions.get(request.match_info["session_id"])
        if session is None or session.status not in REMOTE_LIVE:
            return _error(404, "session not found or already ended")
        event = body["event"]
        checked = _check_control(event, body)
        if isinstance(checked, web.Response):
            return checked
        if event == "reset-idle-timeout":
            session.last_activity = self.clock.now()
        elif event == "update-agent-prompt":
            session.payload["agent_prompt"] = checked["agent_prompt"]
        elif event == "update-idle-prompt":
            session.payload["agent_idle_prompt"] = checked["idle_prompt"]
        session.controls.append(_redact(checked))
        self._dirty = True
        return web.json_response({"success": True})

    async def _admin_credits(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        self.no_credits = bool(data.get("no_credits", True))
        return web.json_response({"ok": True, "no_credits": self.no_credits})

    # --- admin routes ---------------------------------------------------------------------------

    async def _admin_state(self, request: web.Request) -> web.Response:
        self.apply_server_rules()
        return web.json_response(self.state())

    async def _admin_faults(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        try:
            times = data.get("times", 1)
            fault = Fault.from_dict(data)
            self.inject(str(data.get("endpoint")), fault, int(times))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        return web.json_response({"ok": True, "fault": fault.to_dict(), "times": times})

    async def _admin_latency(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        try:
            for endpoint, seconds in data.items():
                self.set_latency(endpoint, float(seconds))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        return web.json_response({"ok": True, "latency": self.latency})

    async def _admin_status(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        try:
            self.set_status(
                request.match_info["session_id"], str(data.get("status")), data.get("cost")
            )
        except KeyError as exc:
            return _error(404, str(exc.args[0]))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        return web.json_response({"ok": True})

    async def _admin_expire(self, request: web.Request) -> web.Response:
        return web.json_response({"expired": self.expire_idle()})

    async def _admin_realism(self, request: web.Request) -> web.Response:
        """``{"queue_seconds": s, "server_timeouts": bool, "max_session_seconds": s,
        "hold": {endpoint: s}, "release": [endpoint, ...]}``, each optional."""
        data = await _admin_json(request)
        try:
            self.configure_realism(**data)
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        return web.json_response({"ok": True})

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # --- helpers --------------------------------------------------------------------------------

    async def _record(self, endpoint: str, request: web.Request) -> RecordedRequest:
        body = await request.read()
        parsed: Any = None
        form = None
        if request.content_type == "multipart/form-data":
            form = _parse_multipart(request.headers.get("Content-Type", ""), body)
        elif body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        headers = (
            {k: (REDACTED if k.lower() == "x-api-key" else v) for k, v in request.headers.items()}
            if self.record_requests
            else {}  # nobody will read them: spare the work under benchmark load
        )
        recorded = RecordedRequest(
            endpoint=endpoint,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            body=body,
            json=parsed,
            form=form,
        )
        if self.record_requests:
            self.requests.append(recorded)
        return recorded

    def _next_fault(self, endpoint: str) -> Fault | None:
        queue = self.faults.get(endpoint)
        if not queue:
            return None
        entry = queue[0]
        entry[1] -= 1
        if entry[1] <= 0:
            queue.popleft()
        fault: Fault = entry[0]
        return fault

    def _session(self, session_id: str) -> FakeSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no fake session {session_id!r}") from None

    def _bill(self, session: FakeSession, until: datetime | None = None) -> float:
        seconds = ((until or self.clock.now()) - session.created_at).total_seconds()
        return round(max(seconds, 0.0) / 60.0 * CREDITS_PER_MINUTE, 4)


async def fake_state(url: str) -> dict[str, Any]:
    """``GET /_fake/state`` of a fake (any URL on it, e.g. its collection URL), from any process."""
    state_url = URL(url).origin().with_path(ADMIN_PATH + "/state")
    timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(state_url) as resp,
    ):
        resp.raise_for_status()
        data: dict[str, Any] = await resp.json()
        return data


@contextlib.contextmanager
def fake_server_process(
    api_key: str = "test-key",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    latency: Mapping[str, float] | None = None,
    state_file: str | os.PathLike[str] | None = None,
    start_timeout: float = PROCESS_START_TIMEOUT,
) -> Iterator[str]:
    """``sessionmgr fake-server`` in its own process; yields its sessions URL.

    The fake outlives anything the test does to its own clients (SIGKILL included); on exit it
    gets SIGTERM, and SIGKILL if it has not stopped within ``start_timeout``.
    """
    cmd = [sys.executable, "-m", "sessionmgr", "fake-server", "--host", host, "--port", str(port)]
    cmd += ["--api-key", api_key]
    for endpoint, seconds in (latency or {}).items():
        cmd += ["--latency", f"{endpoint}={seconds}"]
    if state_file is not None:
        cmd += ["--state-file", os.fspath(state_file)]
    with listening_process(cmd, start_timeout=start_timeout) as url:
        yield url


@contextlib.contextmanager
def listening_process(
    cmd: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    start_timeout: float = PROCESS_START_TIMEOUT,
) -> Iterator[str]:
    """Run ``cmd``, a server that prints ``listening on URL`` first (as ``fake-server`` does);
    yields the URL. On exit: SIGTERM, then SIGKILL if it has not stopped within
    ``start_timeout``."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        url = _await_listening(proc, start_timeout)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(start_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _await_listening(proc: subprocess.Popen[str], timeout: float) -> str:
    """The URL from the fake-server's first line, read in a thread so a hang cannot block us."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"fake-server printed nothing within {timeout:g} s") from None
    if not line.startswith(LISTENING_PREFIX):
        raise RuntimeError(f"fake-server did not start (exit code {proc.poll()}): {line!r}")
    return line[len(LISTENING_PREFIX) :].strip()


def _check_endpoint(endpoint: str) -> None:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}: use one of {', '.join(ENDPOINTS)}")


def _format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def _fault_answer(fault: Fault, request: web.Request) -> web.StreamResponse:
    if fault.kind == "drop":
        return _drop(request)
    if fault.kind == "html_502":
        return web.Response(status=502, text=_HTML_502, content_type="text/html")
    if fault.code is None:  # pragma: no cover - Fault.status always sets it
        raise ValueError(f"fault {fault} has no HTTP status")
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    if fault.body is None:
        return web.json_response(
            {"error": f"injected HTTP {fault.code}"}, status=fault.code, headers=headers
        )
    try:
        json.loads(fault.body)
        content_type = "application/json"
    except ValueError:
        content_type = "text/plain"
    return web.Response(
        status=fault.code, text=fault.body, content_type=content_type, headers=headers
    )


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection with no answer; the response returned is never written."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=499)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _admin_json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json() if request.can_read_body else {}
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body is not JSON"}') from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}')
    return data


def _parse_multipart(content_type: str, body: bytes) -> dict[str, FormField]:
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, FormField] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            data = b""
        fields[str(name)] = FormField(
            name=str(name),
            data=data,
            filename=part.get_filename(),
            content_type=part.get_content_type(),
        )
    return fields


def _create_problem(payload: Mapping[str, Any], transport: str) -> str | None:
    """What LemonSlice would refuse (400) in a create beyond the agent source, or None."""
    properties = payload.get("properties") or {}
    if transport == "livekit":
        for name in ("livekit_url", "livekit_token"):
            if not isinstance(properties.get(name), str) or not properties[name]:
                return f"a livekit session needs properties.{name}"
        if "daily_url" in properties or "daily_token" in properties:
            return "daily_url and daily_token are for daily sessions"
    elif any(str(k).startswith("livekit_") for k in properties):
        return "livekit properties are for livekit sessions"
    rate = payload.get("audio_sample_rate")
    if rate is not None and (isinstance(rate, bool) or rate not in AUDIO_SAMPLE_RATES):
        return f"audio_sample_rate must be one of {', '.join(map(str, AUDIO_SAMPLE_RATES))}"
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        return "model must be a string"
    if payload.get("aspect_ratio") not in (None, *ASPECT_RATIOS):
        return f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}"
    return None


_CONTROL_TEXT = {"update-agent-prompt": "agent_prompt", "update-idle-prompt": "idle_prompt"}


def _check_control(event: str, body: Mapping[str, Any]) -> dict[str, Any] | web.Response:
    """A control event as recorded, or the 400/413 LemonSlice answers to it. Both documented
    trigger shapes are accepted (the docs disagree), recorded as ``{"event": "action", ...}``."""
    if event in _CONTROL_TEXT:
        field = _CONTROL_TEXT[event]
        if not isinstance(body.get(field), str):
            return _error(400, f"{event} needs a string {field}")
        return {"event": event, field: body[field]}
    if event == "reset-idle-timeout":
        return {"event": event}
    if event == "action" or event == "pose-trigger":
        raw = body.get("action") if event == "action" else (body.get("pose_trigger") or {})
        name = raw.get("name") if isinstance(raw, dict) else raw
        if not isinstance(name, str) or not name:
            return _error(400, f"{event} needs a name")
        return {"event": "action", "action": name, "shape": event}
    if event == "update-image":
        url, b64 = body.get("image_url"), body.get("image_base64")
        if (url is None) == (b64 is None):
            return _error(400, "update-image needs exactly one of image_url or image_base64")
        if url is not None:
            if not isinstance(url, str) or not url:
                return _error(400, "image_url must be a non-empty string")
            return {"event": event, "image_url": url}
        try:
            data = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            return _error(400, "image_base64 must be base64 text")
        if len(data) > MAX_IMAGE_BYTES:
            return _error(413, f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES}")
        if not data.startswith(_PNG_SIGNATURE):
            return _error(400, "image must be a PNG")
        return {"event": event, "image_bytes": len(data)}
    return _error(400, f"unknown control event {event!r}")


def _redact(value: Any) -> Any:
    """A copy with values under token/secret/key-like keys replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _iso_ms(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
