"""The OpenAPI 3.1 document of the admin HTTP API (sessionmgr/web.py), served at
``/api/openapi.json``.

Written by hand: aiohttp has no well-kept generator (aiohttp-apispec and aiohttp-swagger are
unmaintained), and the API is small. tests/test_web_schema.py runs schemathesis against this
document, so it cannot drift from what the server answers.
"""

from __future__ import annotations

from typing import Any

from .checks import DEFAULT_PAGE, DEFAULT_STATS_DAYS, INT32, MAX_PAGE, MAX_SECONDS, MAX_STATS_DAYS
from .client import ASPECT_RATIOS, AUDIO_SAMPLE_RATES, TRANSPORT_TYPES
from .queries import SORTS
from .states import MANUAL_REASONS, EndReason, SessionStatus

CONTROL_NAMES = (  # web.CONTROL_FIELDS, the body keys of POST /api/sessions/{id}/control
    "agent_prompt",
    "idle_prompt",
    "image_url",
    "image_base64",
    "action",
    "reset_idle_timeout",
)
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?[smhdwSMHDW])+)\s*$"  # cli_params.parse_duration


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _body(name: str, *, required: bool) -> dict[str, Any]:
    """A JSON request body of the component schema ``name``."""
    return {"required": required, "content": {"application/json": {"schema": _ref(name)}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {  # status -> what it means, as components/responses/E<status>
    400: "Bad input (a filter, a body field): `detail` says which and what to use",
    401: "Missing or wrong admin token",
    403: "Changes are off (the server has no SESSIONMGR_ADMIN_TOKEN), or the Host is not this "
    "server's (host_not_allowed)",
    404: "No session with that id or session_id",
    409: "The session's state does not allow this now",
    502: "LemonSlice rejected the request or could not be reached (`error` is "
    "lemonslice_no_credits for its 402: no subscription or not enough credits)",
    503: "The database is unavailable",
    504: "The session is still QUEUED at LemonSlice after wait_active seconds (it stays "
    "recorded and guarded)",
}


def _responses(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    return ok | {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


SESSION_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A local id (digits) or a LemonSlice session_id, as `sessionmgr show` takes",
    "schema": {"type": "string"},
}
BEARER: list[dict[str, list[str]]] = [{"adminToken": []}]
# what a route that changes one session through LemonSlice may answer (end, control): a bad
# body, access refused (401, 403), an unknown session, one not in a state to change, LemonSlice
# failing, the database unavailable
SESSION_CHANGE_ERRORS = (400, 401, 403, 404, 409, 502, 503)
RECORD_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "session_id": _nullable("string"),
    "status": {"type": "string", "enum": [s.value for s in SessionStatus]},
    "agent_id": _nullable("string"),
    "agent_image_url": _nullable("string"),
    "agent_prompt": _nullable("string"),
    "idle_timeout": _nullable("integer"),
    "room_url": _nullable("string"),
    "control_url": _nullable("string"),
    "idle_window": {"type": "number"},
    "max_age": _nullable("number"),
    "created_at": {"type": "string", "format": "date-time"},
    "updated_at": {"type": "string", "format": "date-time"},
    "last_activity_at": {"type": "string", "format": "date-time"},
    "deadline": _nullable("string", format="date-time"),
    "ended_at": _nullable("string", format="date-time"),
    "end_reason": {"enum": [*(r.value for r in EndReason), None]},
    "remote_status": _nullable("string"),
    "cost": _nullable("number"),
    "attempts": {"type": "integer"},
    "next_attempt_at": _nullable("string", format="date-time"),
    "last_error": _nullable("string"),
    "lease_owner": _nullable("string"),
    "lease_until": _nullable("string", format="date-time"),
    "metadata": {"type": "object"},
    "model": _nullable("string"),
    "transport_type": {"type": "string", "enum": list(TRANSPORT_TYPES)},
}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "A stable code, e.g. bad_request"},
            "detail": {"type": "string", "description": "One line: what went wrong, what to do"},
        },
    },
    "Session": {
        "type": "object",
        "required": list(RECORD_PROPERTIES),
        "properties": RECORD_PROPERTIES,
    },
    "Event": {
        "type": "object",
        "required": ["id", "session_pk", "at", "from_status", "to_status", "reason", "detail"],
        "properties": {
            "id": {"type": "integer"},
            "session_pk": {"type": "integer"},
            "at": {"type": "string", "format": "date-time"},
            "from_status": {"enum": [*(s.value for s in SessionStatus), None]},
            "to_status": {"type": "string", "enum": [s.value for s in SessionStatus]},
            "reason": _nullable("string"),
            "detail": _nullable("string"),
        },
    },
    "SessionWithEvents": {
        "allOf": [
            _ref("Session"),
            {
                "type": "object",
                "required": ["events"],
                "properties": {"events": {"type": "array", "items": _ref("Event")}},
            },
        ]
    },
    "Page": {
        "type": "object",
        "required": ["items", "next_cursor", "now"],
        "properties": {
            "items": {"type": "array", "items": _ref("Session")},
            "next_cursor": _nullable("string", description="Pass as `after` for the next page"),
            "now": {"type": "string", "format": "date-time"},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["by_status", "live", "oldest_live", "per_day", "end_reasons", "now"],
        "properties": {
            "by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
            "live": {"type": "integer"},
            "oldest_live": {"oneOf": [_ref("Session"), {"type": "null"}]},
            "per_day": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["day", "created", "ended", "credits"],
                    "properties": {
                        "day": {"type": "string", "format": "date"},
                        "created": {"type": "integer"},
                        "ended": {"type": "integer"},
                        "credits": _nullable("number"),
                    },
                },
            },
            "duration_p50": _nullable("number"),
            "duration_p95": _nullable("number"),
            "end_reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
            "credits_known": {"type": "number", "description": "Sum of the known costs"},
            "cost_unknown": {
                "type": "integer",
                "description": "Sessions ended in the window whose cost is not known yet",
            },
            "now": {"type": "string", "format": "date-time"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["database", "reaper_last_tick_age", "version"],
        "properties": {
            "database": {"type": "string"},
            "reaper_last_tick_age": _nullable("number", description="Seconds since the last tick"),
            "version": {"type": "string"},
            "error": {
                "type": "string",
                "enum": ["database_unavailable", "reaper_not_running", "reaper_stale"],
            },
            "detail": {"type": "string"},
        },
    },
    "CreateRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": "The client's create arguments (exactly one of agent_id and "
        "agent_image_url) plus what the reaper enforces. api_url is not accepted: the server "
        "only talks to its configured LemonSlice URL.",
        "properties": {
            "agent_id": _nullable("string"),
            "agent_image_url": _nullable("string"),
            "agent_prompt": _nullable("string"),
            "idle_timeout": _nullable("integer", minimum=-INT32, maximum=INT32 - 1),
            "audio_sample_rate": {"enum": [*AUDIO_SAMPLE_RATES, None]},
            "model": _nullable("string", description="LemonSlice's default when absent"),
            "daily_room_url": _nullable("string"),
            "daily_token": _nullable("string", description="Passed on, never stored"),
            "connection_properties": _nullable("object"),
            "extra_properties": _nullable("object"),
            "transport_type": {
                "enum": [*TRANSPORT_TYPES, None],
                "description": "daily (default; pipecat's payload) or livekit (then "
                "livekit_url and livekit_token are needed, and daily_* are refused)",
            },
            "livekit_url": _nullable("string"),
            "livekit_token": _nullable("string", description="Passed on, never stored"),
            "livekit_session_id": _nullable("string"),
            "agent_idle_prompt": _nullable("string"),
            "response_done_timeout": _nullable("number", exclusiveMinimum=0),
            "aspect_ratio": {"enum": [*ASPECT_RATIOS, None]},
            "simulcast": _nullable("boolean", description="livekit only"),
            "enable_recording": _nullable("boolean"),
            "recordings_bucket": _nullable("string", description="needs enable_recording"),
            "idle_window": _nullable("number", exclusiveMinimum=0, maximum=MAX_SECONDS),
            "max_age": _nullable("number", exclusiveMinimum=0, maximum=MAX_SECONDS),
            "metadata": _nullable("object"),
            "wait_active": _nullable(
                "number",
                exclusiveMinimum=0,
                description="Then wait up to this many seconds while LemonSlice keeps the "
                "session QUEUED (504 if it still is)",
            ),
        },
    },
    "ControlRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": "Exactly one control event, as `sessionmgr control` sends it",
        "properties": {
            "agent_prompt": _nullable("string"),
            "idle_prompt": _nullable("string"),
            "image_url": _nullable("string"),
            "image_base64": _nullable(
                "string", description="A PNG, base64; at most 900,000 bytes decoded"
            ),
            "action": _nullable("string", description="A pose or action name"),
            "reset_idle_timeout": _nullable("boolean"),
        },
    },
    "ControlResult": {
        "type": "object",
        "required": ["sent", "record"],
        "properties": {
            "sent": {"type": "string", "enum": list(CONTROL_NAMES)},
            "record": _ref("Session"),
        },
    },
    "EndRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "reason": {
                "type": "string",
                "enum": [r.value for r in MANUAL_REASONS],
                "default": EndReason.MANUAL.value,
            }
        },
    },
    "EndResult": {
        "type": "object",
        "required": ["changed", "message", "record"],
        "properties": {
            "changed": {"type": "boolean"},
            "message": {"type": "string"},
            "record": _ref("Session"),
        },
    },
}

LIST_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "status",
        "in": "query",
        "description": "Only these statuses (repeat, or comma-separated)",
        "schema": {"type": "array", "items": {"enum": [s.value for s in SessionStatus]}},
        "style": "form",
        "explode": True,
    },
    {"name": "agent_id", "in": "query", "schema": {"type": "string"}},
    {
        "name": "since",
        "in": "query",
        "description": "Created at or after: ISO 8601 time, or a duration ago (2h, 7d)",
        "schema": {"type": "string"},
    },
    {
        "name": "until",
        "in": "query",
        "description": "Created before: ISO 8601 time, or a duration ago",
        "schema": {"type": "string"},
    },
    {
        "name": "meta",
        "in": "query",
        "description": "Metadata tag KEY=VALUE (repeat: all must match)",
        "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^=]*[^=\\s][^=]*="}},
        "style": "form",
        "explode": True,
    },
    {
        "name": "idle_for",
        "in": "query",
        "description": "No activity for at least this long (90, 10m, 2h, 1h30m)",
        "schema": {"type": "string", "pattern": DURATION_PATTERN},
    },
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
    },
    {
        "name": "after",
        "in": "query",
        "description": "The next_cursor of the previous page (same sort)",
        "schema": {"type": "string"},
    },
    {
        "name": "sort",
        "in": "query",
        "schema": {"type": "string", "enum": list(SORTS), "default": "-created_at"},
    },
]


def document(version: str) -> dict[str, Any]:
    """The whole document; ``version`` is sessionmgr's."""
    return _guarded(_document(version))


def _guarded(doc: dict[str, Any]) -> dict[str, Any]:
    """Every operation the admin token guards (web.OPEN_ROUTES decides) may answer 401. (Reads
    declare no ``security``: without a configured token they are open, see the description.)"""
    from .web import OPEN_ROUTES  # web imports this module

    for path, operations in doc["paths"].items():
        if any(o.covers(path) for o in OPEN_ROUTES):
            continue
        for operation in operations.values():
            operation["responses"].setdefault("401", {"$ref": "#/components/responses/E401"})
    return doc


def _document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sessionmgr admin API",
            "version": version,
            "description": "With SESSIONMGR_ADMIN_TOKEN set, every route but /healthz and the "
            "dashboard's page and files needs `Authorization: Bearer <token>`; without one "
            "(loopback only) reads are open and changes answer 403. A Host that is not this "
            "server's is refused (403 host_not_allowed). Errors are JSON {error, detail}.",
        },
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Database reachable and reaper ticking within 3 intervals",
                    "operationId": "healthz",
                    "responses": {
                        "200": _json(_ref("Health"), "Healthy"),
                        "503": _json(_ref("Health"), "Unhealthy; `error` names why"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text exposition format",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
            "/api/sessions": {
                "get": {
                    "summary": "Sessions, filtered and keyset-paginated like `sessionmgr list`",
                    "operationId": "listSessions",
                    "parameters": LIST_PARAMETERS,
                    "responses": _responses({"200": _json(_ref("Page"), "One page")}, 400, 503),
                },
                "post": {
                    "summary": "Create a session through the manager (intent recorded first)",
                    "operationId": "createSession",
                    "security": BEARER,
                    "requestBody": _body("CreateRequest", required=True),
                    "responses": _responses(
                        {"201": _json(_ref("Session"), "Created and recorded")},
                        400,
                        401,
                        403,
                        502,
                        503,
                        504,
                    ),
                },
            },
            "/api/sessions/{id}": {
                "get": {
                    "summary": "One session and its lifecycle events",
                    "operationId": "showSession",
                    "parameters": [SESSION_ID_PARAM],
                    "responses": _responses(
                        {"200": _json(_ref("SessionWithEvents"), "The session")}, 404, 503
                    ),
                }
            },
            "/api/sessions/{id}/touch": {
                "post": {
                    "summary": "Record activity now (active sessions only)",
                    "operationId": "touchSession",
                    "security": BEARER,
                    "parameters": [SESSION_ID_PARAM],
                    "responses": _responses(
                        {"200": _json(_ref("Session"), "Touched")}, 401, 403, 404, 409, 503
                    ),
                }
            },
            "/api/sessions/{id}/end": {
                "post": {
                    "summary": "End a session; idempotent",
                    "operationId": "endSession",
                    "security": BEARER,
                    "parameters": [SESSION_ID_PARAM],
                    "requestBody": _body("EndRequest", required=False),
                    "responses": _responses(
                        {
                            "200": _json(_ref("EndResult"), "Ended now, or already over"),
                            "202": _json(
                                _ref("EndResult"), "Terminate failed; the reaper retries it"
                            ),
                        },
                        *SESSION_CHANGE_ERRORS,
                    ),
                }
            },
            "/api/sessions/{id}/control": {
                "post": {
                    "summary": "Send one control event to an active session (recorded as an "
                    "event); 409 if it is not active",
                    "operationId": "controlSession",
                    "security": BEARER,
                    "parameters": [SESSION_ID_PARAM],
                    "requestBody": _body("ControlRequest", required=True),
                    "responses": _responses(
                        {"200": _json(_ref("ControlResult"), "Sent and recorded")},
                        *SESSION_CHANGE_ERRORS,
                    ),
                }
            },
            "/api/stats": {
                "get": {
                    "summary": "Counts, durations and credits, like `sessionmgr stats`",
                    "operationId": "stats",
                    "parameters": [
                        {
                            "name": "days",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_STATS_DAYS,
                                "default": DEFAULT_STATS_DAYS,
                            },
                        }
                    ],
                    "responses": _responses({"200": _json(_ref("Stats"), "Stats")}, 400, 503),
                }
            },
            "/": {
                "get": {
                    "summary": "The dashboard page",
                    "operationId": "dashboard",
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/static/{name}": {
                "get": {
                    "summary": "The dashboard's files",
                    "operationId": "static",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {
                                "type": "string",
                                "enum": ["dashboard.html", "dashboard.css", "dashboard.js"],
                            },
                        }
                    ],
                    "responses": {
                        "200": {"description": "The file"},
                        "404": {"$ref": "#/components/responses/E404"},
                    },
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "responses": {f"E{code}": _json(_ref("Error"), text) for code, text in ERRORS.items()},
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }
