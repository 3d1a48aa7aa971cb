"""The HTTP side of ``sessionmgr serve``: health, metrics, a JSON admin API and a dashboard.

One middleware (``_guard``) stands in front of every route. It refuses a ``Host`` that is not
this server's (DNS rebinding: a web page whose name resolves to 127.0.0.1 must not read the
API), then, with ``SESSIONMGR_ADMIN_TOKEN`` set, demands ``Authorization: Bearer <token>`` on
every route but the few in ``OPEN_ROUTES``. Without a token (loopback only, see server.py) reads
are open and changes are off (403). Every error is JSON ``{"error", "detail"}``: never an HTML
page or a traceback, never a secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from importlib import resources
from typing import Any, NoReturn

from aiohttp import web

from . import __version__, openapi
from .checks import DEFAULT_PAGE, DEFAULT_STATS_DAYS, MAX_PAGE, MAX_STATS_DAYS
from .config import ENV_ADMIN_TOKEN, ENV_ALLOWED_HOSTS
from .errors import (
    ActivationTimeout,
    CreateOutcomeUnknown,
    DatabaseError,
    LemonSliceError,
    NoCreditsError,
    SessionMgrError,
    SessionNotFound,
    SessionNotLive,
    excerpt,
)
from .manager import SessionManager
from .metrics import CONTENT_TYPE, Metrics
from .parsing import parse_duration, parse_key_value, parse_moment
from .queries import SORTS
from .records import SessionFilter, SessionRecord, iso_utc, scrub, unclean_text
from .states import MANUAL_REASONS, EndReason, SessionStatus
from .transitions import still_creating

logger = logging.getLogger(__name__)

STALE_TICKS = 3  # reaper intervals without a tick before /healthz says 503
HEALTH_DB_TIMEOUT = 2.0  # seconds /healthz waits for the database
STATIC_FILES = {  # name -> content type; nothing else under /static is served
    "dashboard.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
CREATE_FIELDS: dict[str, tuple[type, ...]] = {  # JSON body of POST /api/sessions -> JSON types
    "agent_id": (str,),
    "agent_image_url": (str,),
    "agent_prompt": (str,),
    "idle_timeout": (int,),
    "audio_sample_rate": (int,),
    "model": (str,),
    "daily_room_url": (str,),
    "daily_token": (str,),
    "connection_properties": (dict,),
    "extra_properties": (dict,),
    "transport_type": (str,),
    "livekit_url": (str,),
    "livekit_token": (str,),
    "livekit_session_id": (str,),
    "agent_idle_prompt": (str,),
    "response_done_timeout": (int, float),
    "aspect_ratio": (str,),
    "simulcast": (bool,),
    "enable_recording": (bool,),
    "recordings_bucket": (str,),
    "idle_window": (int, float),
    "max_age": (int, float),
    "metadata": (dict,),
    "wait_active": (int, float),  # then wait up to this many seconds while it is QUEUED
}
# JSON body of POST /api/sessions/{id}/control: exactly one of these
CONTROL_FIELDS: dict[str, tuple[type, ...]] = {
    "agent_prompt": (str,),
    "idle_prompt": (str,),
    "image_url": (str,),
    "image_base64": (str,),
    "action": (str,),
    "reset_idle_timeout": (bool,),
}
MAX_BODY_BYTES = 2 * 1024 * 1024  # a 900 KB image, base64, fits

KIND_NAMES: dict[tuple[type, ...], str] = {
    (str,): "a string",
    (dict,): "an object",
    (int,): "a whole number",
    (bool,): "true or false",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MANAGER: web.AppKey[SessionManager] = web.AppKey("manager", SessionManager)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
TOKEN: web.AppKey[str] = web.AppKey("admin_token", str)
HOSTS: web.AppKey[frozenset[str]] = web.AppKey("allowed_hosts", frozenset)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # what "reads" means without a token
LOCAL_NAMES = ("localhost",)  # Host names always answered, besides the address a request came to


@dataclasses.dataclass(frozen=True, slots=True)
class OpenRoute:
    """A route the admin token does not guard, and why. ``path`` is a route as registered
    (``/healthz``), or with ``prefix`` every route under it (``/static/`` covers
    ``/static/{name}``). Matched against the route a request resolved to, not its raw path, so
    no ``..`` or percent-encoding can reach a guarded handler through an open prefix."""

    path: str
    why: str
    prefix: bool = False

    def covers(self, route: str) -> bool:
        if self.prefix:
            return route == self.path.rstrip("/") or route.startswith(self.path)
        return route == self.path


OPEN_ROUTES = (
    OpenRoute("/healthz", "probes carry no credentials; it shows no session"),
    OpenRoute("/", "the dashboard's page holds no data; its script asks for the token"),
    OpenRoute("/static/", "the dashboard's script and style: no data", prefix=True),
    # The LemonSlice-compatible proxy (sessionmgr/integrations) carries its own auth: callers
    # send their LemonSlice key as x-api-key, as to LemonSlice itself, never the admin token.
    OpenRoute("/api/liveai/", "authenticated by the caller's own x-api-key", prefix=True),
)


class ApiError(Exception):
    """An answer other than 2xx: ``error`` is a stable code, ``detail`` one line for people."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def bad_request(detail: str) -> NoReturn:
    raise ApiError(400, "bad_request", detail)


def error_response(status: int, error: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "detail": detail, **extra}, status=status)


# aiohttp's own refusals (unknown route, wrong method, body too large) as our JSON shape
HTTP_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(
    manager: SessionManager,
    *,
    admin_token: str | None,
    metrics: Metrics | None = None,
    allowed_hosts: Iterable[str] = (),
) -> web.Application:
    """The app for an open ``manager``. ``metrics`` (a new ``Metrics`` if None) is attached to
    it; to count LemonSlice requests too, build the manager's client with
    ``trace_configs=[metrics.trace_config()]``. ``allowed_hosts``: ``Host`` names answered
    besides ``localhost`` and the address each request arrived at (``serve`` passes ``--host``
    and ``--allowed-host``)."""
    metrics = metrics or Metrics()
    metrics.attach(manager)
    app = web.Application(middlewares=[_errors, _guard], client_max_size=MAX_BODY_BYTES)
    app[MANAGER] = manager
    app[METRICS] = metrics
    app[TOKEN] = admin_token or ""
    app[HOSTS] = frozenset(_host_name(h) for h in (*LOCAL_NAMES, *allowed_hosts) if h.strip())
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics_text)
    r.add_get("/api/openapi.json", openapi_document)
    r.add_get("/api/sessions", list_sessions)
    r.add_post("/api/sessions", create_session)
    r.add_get("/api/sessions/{id}", show_session)
    r.add_post("/api/sessions/{id}/touch", touch_session)
    r.add_post("/api/sessions/{id}/end", end_session)
    r.add_post("/api/sessions/{id}/control", control_session)
    r.add_get("/api/stats", stats)
    r.add_get("/", dashboard)
    r.add_get("/static/{name}", static_file)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as ``{"error", "detail"}`` with the status that fits it."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error, _scrub(request, exc.detail))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = HTTP_ERRORS.get(exc.status, "http_error")
        detail = f"{exc.reason}: {request.method} {request.path} (the routes: /api/openapi.json)"
        return error_response(exc.status, error, _scrub(request, detail))
    except SessionNotFound as exc:
        return error_response(404, "not_found", _scrub(request, str(exc)))
    except DatabaseError as exc:
        logger.warning("database unavailable for %s %s: %s", request.method, request.path, exc)
        return error_response(503, "database_unavailable", _scrub(request, str(exc)))
    except SessionNotLive as exc:
        return error_response(409, "conflict", _scrub(request, str(exc)))
    except ActivationTimeout as exc:
        return error_response(504, "activation_timeout", _scrub(request, str(exc)))
    except NoCreditsError as exc:
        return error_response(502, "lemonslice_no_credits", _scrub(request, str(exc)))
    except CreateOutcomeUnknown as exc:
        detail = f"{exc}: the session may exist; its record stays pending and reconcile resolves it"
        return error_response(502, "lemonslice_unknown_outcome", _scrub(request, detail))
    except LemonSliceError as exc:
        return error_response(502, "lemonslice_error", _scrub(request, str(exc)))
    except (SessionMgrError, ValueError) as exc:  # InvalidArgument and the client's own checks
        return error_response(400, "bad_request", _scrub(request, str(exc)))
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "unexpected server error: see the server log")


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one gate: this server's Host, then the admin token (see the module docstring)."""
    _check_host(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    if route is not None and any(o.covers(route) for o in OPEN_ROUTES):
        return await handler(request)
    if request.app[TOKEN] or (route is not None and request.method not in SAFE_METHODS):
        _authorize(request)
    return await handler(request)


def _check_host(request: web.Request) -> None:
    """A browser tricked by DNS rebinding sends the attacker's name as Host: refuse any name
    but ours. An address literal is ours when the request came to that address."""
    name = _host_name(request.headers.get("Host", ""))  # not request.host: no DNS lookup
    if name in request.app[HOSTS]:
        return
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and name == _host_name(str(sockname[0])):
        return
    raise ApiError(
        403,
        "host_not_allowed",
        f"Host {excerpt(name, 80)!r} is not this server's: use its address or localhost, or "
        f"allow the name with `sessionmgr serve --allowed-host NAME` / {ENV_ALLOWED_HOSTS}",
    )


def _host_name(host: str) -> str:
    """``Example.COM:8787`` -> ``example.com``; ``[::1]:8787`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") > 1:  # a bare IPv6 address (a configured one, or a socket's)
        return host
    return host.partition(":")[0].rstrip(".")


def _scrub(request: web.Request, text: str) -> str:
    """One line without the admin token (errors never carry the API key: the client sees to it)."""
    return scrub(text, (request.app[TOKEN],), one_line=True)


def _manager(request: web.Request) -> SessionManager:
    return request.app[MANAGER]


# --- health and metrics ----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """200 when the database answers and the reaper ticked within ``STALE_TICKS`` intervals.

    503 otherwise, ``error`` naming why: ``database_unavailable``, ``reaper_not_running`` (disabled,
    stopped or crashed: nothing in this process ends due sessions) or ``reaper_stale`` (no tick
    ended, no claim slice and no end for too long: a long drain that keeps ending is healthy).
    """
    manager = _manager(request)
    body: dict[str, Any] = {"database": "ok", "reaper_last_tick_age": None, "version": __version__}
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            await manager.repository.ping()
    except (SessionMgrError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {HEALTH_DB_TIMEOUT:g} s"
        body["database"] = "unavailable"
        return error_response(503, "database_unavailable", f"database: {reason}", **body)
    reaper = manager.reaper
    beat = reaper.heartbeat
    now = manager.clock.now()
    if beat.last_tick_at is not None:
        body["reaper_last_tick_age"] = round((now - beat.last_tick_at).total_seconds(), 3)
    if not reaper.running:
        detail = "the reaper is not running in this process: due sessions are not being ended"
        return error_response(503, "reaper_not_running", detail, **body)
    # progress, not tick ends: a long drain claims and ends all along (issue 12)
    since = beat.last_alive_at or beat.started_at or now
    quiet = (now - since).total_seconds()
    limit = STALE_TICKS * reaper.interval
    if quiet > limit:
        detail = (
            f"the reaper has shown no progress (no tick, claim or end) for {quiet:.0f} s "
            f"(limit {limit:g} s, {STALE_TICKS} intervals): see the server log"
        )
        return error_response(503, "reaper_stale", detail, **body)
    return web.json_response(body)


async def metrics_text(request: web.Request) -> web.Response:
    text = await request.app[METRICS].scrape(_manager(request))
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(__version__))


# --- reads ------------------------------------------------------------------------------------


def _one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        bad_request(f"give {name} at most once")
    return values[0] if values else None


def _parsed(convert: Callable[[], Any], name: str) -> Any:
    """A value parsed as the CLI parses it (parsing.py), its complaint as a 400."""
    try:
        return convert()
    except ValueError as exc:
        bad_request(f"{name}: {exc}")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = _one(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        bad_request(f"{name} must be a whole number between {low} and {high}, not {raw!r}")
    if not low <= value <= high:
        bad_request(f"{name} must be between {low} and {high}, not {value}")
    return value


def _filter(request: web.Request) -> SessionFilter:
    """The query of ``GET /api/sessions``: the same filters as ``sessionmgr list``."""
    if not all(_storable(v) for v in request.query.values()):
        bad_request("the query holds a NUL character or text that is not valid Unicode")
    statuses = []
    for raw in request.query.getall("status", []):
        for part in raw.split(","):
            try:
                statuses.append(SessionStatus(part.strip()))
            except ValueError:
                valid = ", ".join(s.value for s in SessionStatus)
                bad_request(f"unknown status {part!r}: use one of {valid}")
    since, until, idle = (_one(request, n) for n in ("since", "until", "idle_for"))
    meta: dict[str, str] = {}
    for raw in request.query.getall("meta", []):
        key, value = _parsed(functools.partial(parse_key_value, raw), "meta")
        meta[key] = value
    idle_for = (
        None if idle is None else _parsed(functools.partial(parse_duration, idle), "idle_for")
    )
    return SessionFilter(
        statuses=statuses or None,
        agent_id=_one(request, "agent_id"),
        created_after=_moment(since, "since"),
        created_before=_moment(until, "until"),
        meta=meta,
        idle_for=idle_for,
    )


def _moment(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    return _parsed(functools.partial(parse_moment, raw), name)  # type: ignore[no-any-return]


async def list_sessions(request: web.Request) -> web.Response:
    """One page of sessions; ``next_cursor`` goes back as ``after`` for the next page."""
    flt = _filter(request)
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    sort = _one(request, "sort") or "-created_at"
    if sort not in SORTS:
        bad_request(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    after = _one(request, "after")
    manager = _manager(request)
    page = await manager.repository.list(flt, limit=limit, after=after, sort=sort)
    return web.json_response(
        {
            "items": [r.to_dict() for r in page.items],
            "next_cursor": page.next_cursor,
            "now": iso_utc(manager.clock.now()),
        }
    )


async def _record(request: web.Request) -> SessionRecord:
    """The session named in the path: a local id or a LemonSlice session_id, as the CLI takes."""
    session_ref = request.match_info["id"]  # a local id or a LemonSlice session_id
    if not _storable(session_ref):
        raise SessionNotFound(f"no session with id or session_id {session_ref!r}")
    return await _manager(request).repository.get(session_ref)


async def show_session(request: web.Request) -> web.Response:
    record = await _record(request)
    events = await _manager(request).repository.events(record.id)
    return web.json_response({**record.to_dict(), "events": [e.to_dict() for e in events]})


async def stats(request: web.Request) -> web.Response:
    days = _int_param(request, "days", DEFAULT_STATS_DAYS, 1, MAX_STATS_DAYS)
    manager = _manager(request)
    result = await manager.repository.stats(days=days)
    return web.json_response({**result.to_dict(), "now": iso_utc(manager.clock.now())})


# --- changes (admin token) --------------------------------------------------------------------


def _authorize(request: web.Request) -> None:
    """The admin token (``_guard`` calls this for every guarded route)."""
    token = request.app[TOKEN]
    if not token:
        raise ApiError(
            403,
            "forbidden",
            f"changes over HTTP are off: set {ENV_ADMIN_TOKEN} for `sessionmgr serve` "
            "and send it as 'Authorization: Bearer <token>'",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    )
    if not ok:
        raise ApiError(
            401, "unauthorized", "send 'Authorization: Bearer <token>' with the admin token"
        )


async def _json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        bad_request(f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        bad_request("the body must be a JSON object")
    if not _storable(body):
        bad_request("the body holds text that is not valid Unicode (a lone surrogate)")
    return body


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _storable(value: Any) -> bool:
    """Text a database can hold, at any depth (see ``unclean_text``)."""
    return unclean_text(value) is None


def _create_args(body: Mapping[str, Any]) -> dict[str, Any]:
    return _fields(body, CREATE_FIELDS)  # ranges are the client's and repository's: a 400


def _fields(body: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """The given (non-null) fields of ``body``, each of its JSON type."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        bad_request(f"unknown field(s) {', '.join(unknown)}: use {', '.join(fields)}")
    args: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            continue
        kinds = fields[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            what = KIND_NAMES.get(kinds, "a number")
            bad_request(f"{name} must be {what}")
        args[name] = value
    return args


async def create_session(request: web.Request) -> web.Response:
    """Create through the manager (intent first, so a crash mid-create is still found)."""
    args = _create_args(await _json_object(request))
    wait_active = args.pop("wait_active", None)
    manager = _manager(request)
    record = await manager.create_session(**args)
    if wait_active is not None:  # an ActivationTimeout is a 504; the session stays guarded
        record = await manager.wait_until_active(record.id, timeout=wait_active)
    return web.json_response(record.to_dict(), status=201)


async def control_session(request: web.Request) -> web.Response:
    """Send one control event (the body names it: exactly one of ``CONTROL_FIELDS``) to an
    active session, as ``sessionmgr control`` does. 409 when the session is not active (or
    LemonSlice no longer has it: it is then recorded as ended), 502 when LemonSlice fails."""
    args = _fields(await _json_object(request), CONTROL_FIELDS)
    if args.get("reset_idle_timeout") is False:
        del args["reset_idle_timeout"]
    if len(args) != 1:
        bad_request(f"give exactly one of {', '.join(CONTROL_FIELDS)}")
    [(name, value)] = args.items()
    record = await _record(request)
    manager = _manager(request)
    if name == "agent_prompt":
        record = await manager.update_agent_prompt(record.id, value)
    elif name == "idle_prompt":
        record = await manager.update_idle_prompt(record.id, value)
    elif name == "image_url":
        record = await manager.update_image(record.id, image_url=value)
    elif name == "image_base64":
        try:
            image = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            bad_request("image_base64 is not base64 text")
        record = await manager.update_image(record.id, image=image)
    elif name == "action":
        record = await manager.trigger_action(record.id, value)
    else:
        record = await manager.reset_idle_timeout(record.id)
    return web.json_response({"sent": name, "record": record.to_dict()})


async def touch_session(request: web.Request) -> web.Response:
    """Record activity now and write it at once (an admin touch is rare; no need to buffer)."""
    repo = _manager(request).repository
    record = await _record(request)
    if record.session_id is None or not await repo.touch_many([record.session_id]):
        current = await repo.get(record.id)
        raise ApiError(
            409,
            "conflict",
            f"session {record.id} is {current.status}: only active ones are touched",
        )
    return web.json_response((await repo.get(record.id)).to_dict())


async def end_session(request: web.Request) -> web.Response:
    """End a session (idempotent, as the manager is). 200 when it is over, 202 while another
    process is ending it, 409 while it is still being created, 502 when the terminate failed
    (the session stays ``ending`` and the reaper retries it)."""
    body = await _json_object(request, optional=True)
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        bad_request(f"unknown field(s) {', '.join(unknown)}: only reason")
    reason = body.get("reason", EndReason.MANUAL.value)
    if reason not in MANUAL_REASONS:
        bad_request(f"reason must be one of {', '.join(MANUAL_REASONS)}")
    record = await _record(request)
    if record.status is SessionStatus.PENDING:
        raise ApiError(
            409,
            "conflict",
            still_creating(record.id),
        )
    try:
        result = await _manager(request).end_session(record.id, reason=reason)
    except LemonSliceError as exc:
        raise ApiError(
            502, "lemonslice_error", f"{exc}: the session stays ending and the reaper retries"
        ) from None
    status = 202 if result.record.status is SessionStatus.ENDING else 200
    return web.json_response(
        {"changed": result.changed, "message": result.message, "record": result.record.to_dict()},
        status=status,
    )


# --- dashboard --------------------------------------------------------------------------------


async def dashboard(request: web.Request) -> web.Response:
    return _static("dashboard.html")


async def static_file(request: web.Request) -> web.Response:
    return _static(request.match_info["name"])


def _static(name: str) -> web.Response:
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    body = resources.files("sessionmgr").joinpath("static", name).read_bytes()
    return web.Response(
        body=body, content_type=kind, charset="utf-8", headers={"Cache-Control": "no-cache"}
    )
