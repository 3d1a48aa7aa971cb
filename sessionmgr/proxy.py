"""A LemonSlice-compatible recording proxy in ``sessionmgr serve``, for clients sessionmgr cannot
wrap (any framework, any language): point their ``api_url`` at ``http://HOST:PORT/api/liveai/
sessions`` and every session they create is recorded, reaped and reconciled.

The routes are LemonSlice's own, at the same paths:

- ``POST /api/liveai/sessions``: the caller's body (JSON or multipart) goes byte-for-byte to
  ``LEMONSLICE_API_URL`` through ``SessionManager.create_session_raw`` (intent first). The answer
  is LemonSlice's, with ``control_url`` pointing back here, so the caller's terminate comes back
  and is recorded. An answer that never came is a 504 and leaves the intent ``pending`` for
  recovery; a 4xx/5xx is passed back with its status and body.
- ``POST /api/liveai/sessions/{id}/control``: ``terminate`` ends the session through the manager
  (reason ``manual``, event detail ``client terminate via proxy``); other events are forwarded
  byte-for-byte and, once LemonSlice accepted them, recorded as ``control`` events and counted as
  activity (a touch), as ``SessionManager``'s own control events are; a 404 ends the record
  (``gone``).
- ``GET /api/liveai/sessions[/{id}]``: passed through.

Auth is the caller's ``x-api-key``, compared in constant time with the configured key: a caller
that holds the key could call LemonSlice itself, so it may call it through here. The admin token
is not asked for on these paths (everything under ``PREFIX``): callers are LemonSlice clients,
which send no such header. Errors are LemonSlice's shape, ``{"detail": ...}``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from .client import RawAnswer
from .errors import (
    CreateOutcomeUnknown,
    DatabaseError,
    InvalidArgument,
    LemonSliceError,
    SessionMgrError,
    TransportError,
)
from .manager import SessionManager
from .records import SessionRecord, is_clean_text
from .states import EndReason, SessionStatus

logger = logging.getLogger(__name__)

PREFIX = "/api/liveai/"  # every proxy route lives under it, and carries its own auth
COLLECTION = "/api/liveai/sessions"
MAX_BODY = 8 * 1024 * 1024  # bytes of a request body (an uploaded agent image fits)
READ_CHUNK = 64 * 1024  # bytes read at a time while enforcing MAX_BODY
TERMINATE_DETAIL = "client terminate via proxy"
PROXY_TAGS = {"via": "proxy"}  # metadata of every session created through the proxy

MANAGER: web.AppKey[SessionManager] = web.AppKey("proxy_manager", SessionManager)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProxyError(Exception):
    """An answer of the proxy itself, in LemonSlice's error shape."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def add_routes(app: web.Application, manager: SessionManager) -> None:
    """Serve LemonSlice's session API on ``app`` for an open ``manager`` (``serve`` calls it)."""
    app[MANAGER] = manager
    r = app.router
    r.add_post(COLLECTION, create)
    r.add_get(COLLECTION, list_sessions)
    r.add_get(COLLECTION + "/{session_id}", get_session)
    r.add_post(COLLECTION + "/{session_id}/control", control)


def _lemonslice_errors(handler: Handler) -> Handler:
    """Key check first, then every failure as ``{"detail"}`` with the status that fits it."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            _check_key(request)
            return await handler(request)
        except ProxyError as exc:
            return detail(exc.status, exc.detail)
        except CreateOutcomeUnknown as exc:
            return detail(504, f"{exc}: sessionmgr keeps the intent and resolves it")
        except TransportError as exc:
            timed_out = isinstance(exc.__cause__, TimeoutError)
            return detail(504 if timed_out else 502, str(exc))
        except LemonSliceError as exc:
            return detail(502, str(exc))
        except InvalidArgument as exc:
            return detail(400, str(exc))
        except DatabaseError as exc:
            logger.warning("proxy: database unavailable: %s", exc)
            return detail(503, f"sessionmgr's database is unavailable: {exc}")

    return wrapper


def detail(status: int, text: str) -> web.Response:
    return web.json_response({"detail": " ".join(text.split())}, status=status)


def _manager(request: web.Request) -> SessionManager:
    return request.app[MANAGER]


def _check_key(request: web.Request) -> None:
    given = request.headers.get("x-api-key", "")
    if not _manager(request).client.key_matches(given):
        raise ProxyError(401, "invalid or missing X-API-Key")


async def _body(request: web.Request) -> bytes:
    """The body, refused past ``MAX_BODY`` without reading it all."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ProxyError(413, f"the body is larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > MAX_BODY:
            raise ProxyError(413, f"the body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _passed_back(answer: RawAnswer) -> web.Response:
    headers = {"Content-Type": answer.content_type} if answer.content_type else None
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def _control_url_here(request: web.Request, session_id: str) -> str:
    """This server's control URL for ``session_id``, as the caller reached it: behind a reverse
    proxy that terminates TLS, the scheme it names (``Forwarded: proto=``, else
    ``X-Forwarded-Proto``). Trusting it is safe: the Host has passed the guard, and the header
    only shapes the URL handed back to the very caller that sent it."""
    url = request.url
    scheme = _forwarded_scheme(request)
    if scheme is not None and scheme != url.scheme:
        url = url.with_scheme(scheme)
    return f"{url.origin()}{COLLECTION}/{quote(session_id, safe='')}/control"


def _forwarded_scheme(request: web.Request) -> str | None:
    """The first hop's scheme a reverse proxy recorded, if it is http or https."""
    proto: str | None = None
    if request.forwarded:
        proto = request.forwarded[0].get("proto")
    if proto is None:
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0]
    proto = proto.strip().lower()
    return proto if proto in ("http", "https") else None


# --- routes -----------------------------------------------------------------------------------


@_lemonslice_errors
async def create(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    content_type = request.headers.get("Content-Type", "application/json")
    record, answer = await _manager(request).create_session_raw(
        body, content_type, metadata=PROXY_TAGS
    )
    if record is None or answer.session is None:
        return _passed_back(answer)
    try:
        data = json.loads(answer.body)
    except ValueError:  # pragma: no cover - answer.session is only set for a JSON object
        return _passed_back(answer)
    if "control_url" in data and record.session_id is not None:
        data["control_url"] = _control_url_here(request, record.session_id)
    return web.json_response(data, status=answer.status)


@_lemonslice_errors
async def list_sessions(request: web.Request) -> web.StreamResponse:
    client = _manager(request).client
    query = f"?{request.query_string}" if request.query_string else ""
    return _passed_back(await client.forward("GET", client.api_url + query))


@_lemonslice_errors
async def get_session(request: web.Request) -> web.StreamResponse:
    client = _manager(request).client
    sid = quote(request.match_info["session_id"], safe="")
    return _passed_back(await client.forward("GET", f"{client.api_url}/{sid}"))


@_lemonslice_errors
async def control(request: web.Request) -> web.StreamResponse:
    manager = _manager(request)
    session_id = request.match_info["session_id"]
    body = await _body(request)
    try:
        event = json.loads(body).get("event")
    except (ValueError, AttributeError, RecursionError):
        event = None
    record = await _own_record(manager, session_id)
    if record is not None and event == "terminate":
        return await _terminate(manager, record)
    url = record.control_url if record is not None and record.control_url else None
    answer = await manager.client.forward(
        "POST",
        url or manager.client.control_url_for(session_id),
        body=body,
        content_type=request.headers.get("Content-Type", "application/json"),
    )
    if record is not None and record.status is SessionStatus.ACTIVE:
        if 200 <= answer.status < 300:  # as SessionManager's control events: activity, an event
            manager.touch(session_id)
            name = event[:64] if isinstance(event, str) and is_clean_text(event) else "control"
            await manager.repository.record_control(record.id, detail=f"{name} via proxy")
        elif answer.status in (404, 410):  # LemonSlice no longer has it: ended, as the reaper would
            with contextlib.suppress(SessionMgrError):  # the reaper's terminate finds it gone
                await manager.end_session(record.id, reason=EndReason.GONE)
    return _passed_back(answer)


async def _own_record(manager: SessionManager, session_id: str) -> SessionRecord | None:
    """The record of this LemonSlice session, if sessionmgr holds one (never a local id)."""
    if not session_id.strip():
        return None
    try:
        record = await manager.repository.find(session_id)
    except InvalidArgument:
        return None
    return record if record is not None and record.session_id == session_id else None


async def _terminate(manager: SessionManager, record: SessionRecord) -> web.StreamResponse:
    """The caller ended its session: end it through the manager, answer as LemonSlice would."""
    if record.status in (SessionStatus.ENDED, SessionStatus.FAILED):
        raise ProxyError(404, "session not found or already ended")
    result = await manager.end_session(record.id, reason=EndReason.MANUAL, detail=TERMINATE_DETAIL)
    final = result.record
    if final.status is SessionStatus.ENDED and final.end_reason is EndReason.GONE:
        raise ProxyError(404, "session not found or already ended")
    ending_elsewhere = final.status is SessionStatus.ENDING and final.lease_owner is not None
    if final.status is not SessionStatus.ENDED and not ending_elsewhere:
        raise ProxyError(502, "the terminate failed; sessionmgr's reaper retries it")
    return web.json_response({"success": True})
