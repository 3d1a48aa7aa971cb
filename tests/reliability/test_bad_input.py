"""Bad input, property-based: malformed arguments to the library and the CLI, malformed answers
to the client. Always a clear typed error (or a one-line CLI message), never a traceback, never a
half-written row.

Example counts are modest and derandomized (``settings`` below), so a failure reproduces exactly
and the file stays well under 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sessionmgr import db
from sessionmgr.checks import MAX_SECONDS, MAX_STATS_DAYS
from sessionmgr.cli import cli
from sessionmgr.cli_params import DURATION, MOMENT, POSITIVE_DURATION
from sessionmgr.client import LemonSliceClient, Timeouts
from sessionmgr.clock import FakeClock
from sessionmgr.errors import (
    CreateOutcomeUnknown,
    DatabaseError,
    LemonSliceError,
    SessionMgrError,
    SessionNotFound,
)
from sessionmgr.manager import SessionManager
from sessionmgr.models import NAME_LENGTH, SESSION_ID_LENGTH
from sessionmgr.queries import SORTS
from sessionmgr.records import SessionFilter, is_clean_text
from sessionmgr.repository import SessionRepository
from sessionmgr.retry import RetryPolicy
from sessionmgr.states import SessionStatus
from sessionmgr.testing import FakeLemonSlice

LIBRARY = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ANSWERS = settings(LIBRARY, max_examples=50)
CLI = settings(LIBRARY, max_examples=25)
ARGUMENT_ERRORS = (ValueError, TypeError)  # what a bad argument raises, by the library's contract


def assert_argument_error(exc: BaseException) -> None:
    """A bad argument's error: ValueError/TypeError or one of sessionmgr's own (not a database
    error, which would mean the value got as far as the database), one line, saying something."""
    assert type(exc) in ARGUMENT_ERRORS or (
        isinstance(exc, SessionMgrError) and not isinstance(exc, DatabaseError)
    ), repr(exc)
    text = str(exc)
    assert text
    assert "\n" not in text


# --- strategies: values no entry point may accept --------------------------------------------

# Seconds: not a positive finite number within 100 years (None is valid: "use the default").
bad_seconds = st.one_of(
    st.sampled_from(
        [0, 0.0, -0.0, -1, -1e-9, math.nan, math.inf, -math.inf, 1e308, 10**400, MAX_SECONDS * 2]
    ),
    st.floats(max_value=0.0),
    st.floats(min_value=MAX_SECONDS, exclude_min=True),
    st.integers(max_value=0),
    st.integers(min_value=int(MAX_SECONDS) + 1),
    st.sampled_from(["10", b"10", [10], True, object()]),
)
lone_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# Text no database column can hold the same way on SQLite and PostgreSQL.
unstorable_text = st.one_of(
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), lone_surrogate, st.text(max_size=5)),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=5), st.text(max_size=5)),
)
bad_name = st.one_of(  # agent_id, and any id-like argument
    unstorable_text,
    st.sampled_from(["", " ", "\t\n"]),
    st.text(alphabet="ab", min_size=NAME_LENGTH + 1, max_size=NAME_LENGTH + 50),
    st.sampled_from([123, 1.5, b"agent", ["agent"], {"a": 1}]),
)
bad_session_id = st.one_of(
    unstorable_text,
    st.sampled_from(["", "   "]),
    st.text(alphabet="xyz", min_size=SESSION_ID_LENGTH + 1, max_size=SESSION_ID_LENGTH + 20),
    st.sampled_from([None, 3.5, b"sess", ["sess"], True]),
)
bad_metadata = st.one_of(
    st.sampled_from([[1, 2], "bot=x", 5, b"{}"]),
    st.dictionaries(st.text(min_size=1, max_size=5), unstorable_text, min_size=1, max_size=2),
    st.dictionaries(unstorable_text, st.text(max_size=5), min_size=1, max_size=2),
    st.builds(lambda v: {"v": v}, st.sampled_from([math.nan, math.inf, object(), {1, 2}, b"x"])),
)
bad_idle_timeout = st.one_of(
    st.integers(min_value=2**31),
    st.integers(max_value=-(2**31) - 1),
    st.sampled_from([1.5, math.nan, "60", True]),
)
bad_create = st.one_of(
    st.fixed_dictionaries({"agent_id": bad_name}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "idle_window": bad_seconds}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "max_age": bad_seconds}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "metadata": bad_metadata}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "agent_prompt": unstorable_text}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "idle_timeout": bad_idle_timeout}),
    st.fixed_dictionaries({"agent_image_url": unstorable_text}),
    st.fixed_dictionaries({"agent_id": st.just("agent_ok"), "daily_room_url": unstorable_text}),
)


# --- library entry points ----------------------------------------------------------------------


async def rows_and_requests(manager: SessionManager, fake: FakeLemonSlice) -> tuple[int, int]:
    page = await manager.repository.list(limit=1000)
    return len(page.items), len(fake.requests)


@given(kwargs=bad_create)
@LIBRARY
async def test_create_session_refuses_bad_arguments_before_any_row_or_request(
    manager: SessionManager, lemon: FakeLemonSlice, kwargs: dict[str, Any]
) -> None:
    before = await rows_and_requests(manager, lemon)
    with pytest.raises(Exception) as info:  # noqa: PT011 - which error is asserted below
        await manager.create_session(**kwargs)
    assert_argument_error(info.value)
    assert await rows_and_requests(manager, lemon) == before


@given(
    kwargs=st.one_of(
        st.fixed_dictionaries({"session_id": bad_session_id}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "idle_window": bad_seconds}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "max_age": bad_seconds}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "metadata": bad_metadata}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "agent_id": bad_name}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "room_url": unstorable_text}),
        st.fixed_dictionaries({"session_id": st.just("sess_ok"), "control_url": unstorable_text}),
    )
)
@LIBRARY
async def test_adopt_session_refuses_bad_arguments_before_any_row(
    manager: SessionManager, lemon: FakeLemonSlice, kwargs: dict[str, Any]
) -> None:
    before = await rows_and_requests(manager, lemon)
    with pytest.raises(Exception) as info:  # noqa: PT011
        await manager.adopt_session(**kwargs)
    assert_argument_error(info.value)
    assert await rows_and_requests(manager, lemon) == before


@given(session_id=bad_session_id)
@LIBRARY
async def test_a_bad_touch_fails_at_once_and_never_poisons_later_flushes(
    manager: SessionManager, lemon: FakeLemonSlice, clock: FakeClock, session_id: Any
) -> None:
    """touch() is O(1) and buffered: a bad id written later would fail every flush, and with it
    every reaper tick. It must be refused when called, and the reaper keep working."""
    record = await manager.create_session(agent_id="agent_1")
    assert record.session_id is not None
    with pytest.raises(Exception) as info:  # noqa: PT011
        manager.touch(session_id)
    assert_argument_error(info.value)
    manager.touch(record.session_id)
    clock.advance(manager.idle_window + 1)
    result = await manager.reaper.run_once()
    assert record.id in [r.id for r in result.ended]


@given(
    key=st.one_of(
        bad_session_id.filter(lambda k: k != "" and not isinstance(k, bool)),
        st.sampled_from([0, -1, 2**63, 10**30, "9" * 40, "²", "١٢٣"]),
        st.text(max_size=30),
    )
)
@LIBRARY
async def test_end_session_with_a_bad_key_changes_nothing(
    manager: SessionManager, lemon: FakeLemonSlice, key: Any
) -> None:
    record = await manager.create_session(agent_id="agent_1")
    before = await rows_and_requests(manager, lemon)
    try:
        await manager.end_session(key)
    except SessionNotFound:
        pass
    except Exception as exc:
        assert_argument_error(exc)
    else:  # only a key that names the session may end it
        assert key in (record.id, record.session_id) or (
            isinstance(key, str) and key.isascii() and key.isdigit() and int(key) == record.id
        )
        return
    assert await rows_and_requests(manager, lemon) == before
    assert (await manager.get(record.id)).status is SessionStatus.ACTIVE


@given(
    flt=st.one_of(
        st.builds(SessionFilter, statuses=st.sampled_from(["active", ["nope"], [1], ["ACTIVE "]])),
        st.builds(SessionFilter, agent_id=bad_name),
        st.builds(
            SessionFilter,
            created_after=st.sampled_from([datetime(2026, 1, 1), "2026-01-01", 0]),
        ),
        st.builds(SessionFilter, created_before=st.sampled_from([datetime(2026, 1, 1), 1.0])),
        st.builds(SessionFilter, meta=st.dictionaries(unstorable_text, st.text(), min_size=1)),
        st.builds(SessionFilter, meta=st.dictionaries(st.just("bot"), unstorable_text, min_size=1)),
        st.builds(SessionFilter, meta=st.sampled_from([["bot"], "bot=x"])),
        st.builds(
            SessionFilter,
            idle_for=st.one_of(
                st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf, 1e300, "5m"])
            ),
        ),
    ),
    paging=st.one_of(
        st.fixed_dictionaries({}),
        st.fixed_dictionaries({"limit": st.sampled_from([0, -1, 10**6, 2.5, "50", True])}),
        st.fixed_dictionaries({"sort": st.sampled_from(["name", "", ["id"], None])}),
        st.fixed_dictionaries({"after": st.one_of(st.text(max_size=40), st.sampled_from([5]))}),
    ),
)
@LIBRARY
async def test_repository_list_refuses_bad_filters(
    manager: SessionManager, flt: SessionFilter, paging: dict[str, Any]
) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011
        await manager.repository.list(flt, **paging)
    assert_argument_error(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_age": 1e308},  # was OverflowError in record_intent (now + timedelta)
        {"idle_window": math.inf},  # was written, POSTed, then OverflowError in mark_active
        {"idle_window": 1e12},  # the same, past datetime.max
        {"idle_window": 0},  # was silently the manager's default window
        {"metadata": {"v": math.nan}},  # was stored on SQLite, refused by PostgreSQL's JSONB
    ],
    ids=["max_age_1e308", "idle_window_inf", "idle_window_1e12", "idle_window_0", "meta_nan"],
)
async def test_window_and_metadata_regressions(
    manager: SessionManager, lemon: FakeLemonSlice, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"idle_window|max_age|metadata"):
        await manager.create_session(agent_id="agent_1", **kwargs)
    assert await rows_and_requests(manager, lemon) == (0, 0)


@pytest.mark.parametrize("value", [0, -5, math.nan, math.inf, 1e308])
async def test_manager_settings_are_checked_when_built(value: float) -> None:
    from sessionmgr.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="idle_window"):
        SessionManager(database_url="sqlite+aiosqlite:///unused.db", idle_window=value)
    with pytest.raises(ConfigurationError, match="max_age"):
        SessionManager(database_url="sqlite+aiosqlite:///unused.db", max_age=value)


# --- malformed answers to the client -------------------------------------------------------------

GARBAGE_ANSWERS = 4  # requests of one example answered with its reply; later ones: an empty page
API_KEY = "garbage-test-key"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class GarbageServer:
    """A loopback HTTP server answering every path and method with ``reply``, whatever it is."""

    def __init__(self) -> None:
        self.reply = Reply()
        self.count = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def answer(self, reply: Reply) -> None:
        self.reply, self.count = reply, 0

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.count += 1
        reply = self.reply if self.count <= GARBAGE_ANSWERS else Reply(body=b'{"sessions": []}')
        body = b"" if reply.status in (204, 304) else reply.body
        headers = {"Content-Type": reply.content_type, **reply.headers}
        return web.Response(status=reply.status, body=body, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/api/liveai/sessions"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def garbage() -> AsyncIterator[GarbageServer]:
    server = GarbageServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def garbage_client(garbage: GarbageServer) -> AsyncIterator[LemonSliceClient]:
    retry = RetryPolicy(attempts=2, base=0.0, cap=0.0, deadline=5.0)  # one quick retry
    async with LemonSliceClient(
        API_KEY, api_url=garbage.url, retry=retry, timeouts=Timeouts(connect=2.0, total=5.0)
    ) as client:
        yield client


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**20, max_value=10**400)
    | st.floats()
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
session_item = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.one_of(st.text(max_size=8), json_values, unstorable_text),
        "session_status": st.sampled_from(["ACTIVE", "COMPLETED", "QUEUED"]) | json_values,
        "created_at": st.one_of(
            st.sampled_from(["2026-01-01T00:00:00", "2026-01-01T00:00:00Z", "yesterday", ""]),
            json_values,
        ),
        "credits_used": json_values,
    },
)
# JSON shaped like the protocol's answers, every field any type (or missing).
protocol_like = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.one_of(st.text(max_size=8), json_values, unstorable_text),
        "room_url": json_values | unstorable_text,
        "control_url": json_values | unstorable_text,
        "session_status": st.one_of(st.sampled_from(["ACTIVE", "COMPLETED"]), json_values),
        "cost": json_values,
        "success": json_values,
        "sessions": st.lists(session_item, max_size=3) | json_values,
        "pagination": st.fixed_dictionaries(
            {},
            optional={
                "page": json_values,
                "total_pages": json_values,
                "has_more": json_values,
                "total": json_values,
            },
        )
        | json_values,
    },
)


def _encode(value: Any, encoding: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass")


# Bodies that once broke the client, or come close; each is also an explicit example below.
NASTY_BODIES = [
    b"",
    b"<html><body>502 Bad Gateway</body></html>",
    b"1" * 5000,  # past int's digit limit
    b"1e999",
    b"NaN",
    b"[" * 100_000,  # nested past the parser's recursion limit: was a RecursionError
    b'{"session_id": "sess_\\ud800"}',  # a lone surrogate escaped in JSON
    b'{"session_id": "sess_1", "control_url": "\\u0000", "room_url": "\\ud800"}',
    b'{"session_status": ["ACTIVE"], "cost": 1e999}',
    b'{"sessions": [{"session_id": "a"}], "pagination": {"page": "1", "total_pages": 2}}',
    b'{"sessions": [{"session_id": "a"}], "pagination": {"page": null, "total_pages": 9}}',
    b'{"sessions": [{"session_id": "a"}], "pagination": {"page": 1, "total_pages": 1e999}}',
    b'{"sessions": [{"session_id": "a"}, {"session_id": "a\\u0000"}]}',
    b'{"success": "false"}',
]
bodies = st.one_of(
    st.builds(_encode, protocol_like, st.sampled_from(["utf-8", "utf-16", "utf-32"])),
    st.builds(_encode, json_values, st.just("utf-8")),
    st.binary(max_size=64),  # arbitrary bytes, non-UTF-8 included
    st.sampled_from(NASTY_BODIES),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
replies = st.builds(
    Reply,
    status=st.one_of(
        st.sampled_from([200, 201, 204, 301, 302, 304, 400, 404, 410, 418, 429, 500, 503]),
        st.integers(min_value=200, max_value=599),
    ),
    body=bodies,
    content_type=st.sampled_from(
        ["application/json", "text/html", "text/plain; charset=latin-1", "application/octet-stream"]
    ),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "Retry-After": st.one_of(
                header_text,
                st.sampled_from(["1e400", "-5", "nan", "inf", "Mon, 01 Jan 99999 00:00:00 GMT"]),
            ),
            "Location": header_text,
        },
    ),
)
OPS = ("create", "get", "list", "terminate")


async def _call(op: str, client: LemonSliceClient) -> Any:
    if op == "create":
        return await client.create_session(agent_id="agent_1")
    if op == "get":
        return await client.get_session("sess_1")
    if op == "terminate":
        return await client.end_session("sess_1")
    return [item async for item in client.list_sessions(limit=2)]


def _assert_valid(op: str, value: Any) -> None:
    """What each call promises when it returns."""
    if op == "create":
        assert isinstance(value, dict)
        assert isinstance(value["session_id"], str)
        assert value["session_id"].strip()
        assert isinstance(value["control_url"], str)
        assert value["room_url"] is None or isinstance(value["room_url"], str)
    elif op == "get":
        assert isinstance(value, dict)
        assert isinstance(value["session_status"], str)
    elif op == "terminate":
        assert isinstance(value, bool)
    else:
        ids = [item["session_id"] for item in value]
        assert all(isinstance(i, str) and i.strip() for i in ids)
        assert len(ids) == len(set(ids))


def _with_nasty_examples(test: Any) -> Any:
    for body in NASTY_BODIES:
        test = example(reply=Reply(status=200, body=body))(test)
    return test


@pytest.mark.parametrize("op", OPS)
@given(reply=replies)
@_with_nasty_examples
@ANSWERS
async def test_the_client_answers_any_reply_with_a_value_or_a_typed_error(
    garbage: GarbageServer, garbage_client: LemonSliceClient, op: str, reply: Reply
) -> None:
    garbage.answer(reply)
    error: LemonSliceError | None = None
    try:
        value = await _call(op, garbage_client)
    except LemonSliceError as exc:  # anything else (KeyError, TypeError, ...) fails the test
        error = exc
    if error is None:
        assert 200 <= reply.status < 300 or (op == "terminate" and reply.status in (404, 410))
        _assert_valid(op, value)
        return
    assert "\n" not in str(error)
    assert API_KEY not in str(error)
    if op == "create" and 200 <= reply.status < 300:
        assert isinstance(error, CreateOutcomeUnknown)  # a session may have been created


@pytest.fixture
async def garbage_manager(
    garbage_client: LemonSliceClient, tmp_path: Path
) -> AsyncIterator[SessionManager]:
    async with SessionManager(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'garbage.db'}",
        client=garbage_client,
        clock=FakeClock(datetime(2026, 1, 1, tzinfo=UTC)),
        reaper=False,
        auto_upgrade=True,
    ) as manager:
        yield manager


@given(reply=replies)
@_with_nasty_examples
@example(
    reply=Reply(
        body=b'{"sessions": [{"session_id": "x1", "session_status": ["ACTIVE"], '
        b'"created_at": "2026-01-01T00:00:30", "credits_used": 1e999}]}'
    )
)
@example(reply=Reply(body=b'{"session_status": "COMPLETED", "cost": 1e400}'))
@example(reply=Reply(body=b'{"session_status": "COMPLETED", "cost": ' + b"9" * 400 + b"}"))
@ANSWERS
async def test_reconcile_reports_malformed_answers_and_never_raises(
    garbage: GarbageServer, garbage_manager: SessionManager, reply: Reply
) -> None:
    """What ``sessionmgr reconcile`` (and serve's periodic pass) meets when LemonSlice answers
    garbage to its GETs and lists: a report, never an exception; rows stay in possible states."""
    manager = garbage_manager
    repo = manager.repository
    assert isinstance(manager.clock, FakeClock)
    await manager.adopt_session(f"sess_{garbage.count}_{id(reply)}")  # control on the API
    await repo.record_intent(agent_id="agent_1", idle_window=60.0, max_age=None)
    manager.clock.advance(700)  # past SETTLE and PENDING_GRACE: every intent is judged
    garbage.answer(reply)
    report = await manager.reconcile()
    assert all("\n" not in error for error in report.errors)
    for row in (await repo.list(limit=1000)).items:
        assert row.status in SessionStatus
        if row.status is SessionStatus.ACTIVE:
            assert row.session_id
        if row.cost is not None:
            assert math.isfinite(row.cost)


# --- malformed arguments to the CLI ---------------------------------------------------------------

SEED_ID = "sess_seed"  # the one session in the CLI tests' database (local id 1)
DEAD_API = "http://127.0.0.1:9/api/liveai/sessions"  # nothing listens: no bad value may get there
CLI_BASE = ["--api-url", DEAD_API]  # the key comes from the environment (the flag warns)


@dataclass
class CliDb:
    url: str
    path: Path

    def snapshot(self) -> tuple[list[tuple[Any, ...]], int]:
        """Every session row and how many events: what a bad command must leave alone."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            rows = conn.execute("SELECT * FROM sessions ORDER BY id").fetchall()
            events = conn.execute("SELECT count(*) FROM session_events").fetchone()[0]
        return rows, int(events)


@pytest.fixture
def cli_db(tmp_path: Path) -> CliDb:
    path = tmp_path / "cli.db"
    url = f"sqlite+aiosqlite:///{path}"

    async def seed() -> None:
        await db.upgrade(url)
        async with await SessionRepository.open(url) as repo:
            await repo.adopt(
                session_id=SEED_ID, control_url=f"{DEAD_API}/x", idle_window=60.0, max_age=None
            )

    asyncio.run(seed())
    return CliDb(url, path)


def _unusable_id(key: str) -> bool:
    return not key.strip() or len(key) > SESSION_ID_LENGTH or not is_clean_text(key)


def _names_the_seed(key: str) -> bool:
    return key == SEED_ID or (key.isascii() and key.isdigit() and int(key) == 1)


def _bad_value(convert: Callable[[str], object]) -> Callable[[str], bool]:
    """A filter keeping the strings ``convert`` (a click type's) refuses."""

    def refused(text: str) -> bool:
        try:
            convert(text)
        except click.BadParameter:
            return True
        return False

    return refused


cli_text = st.text(max_size=12) | unstorable_text
bad_positive_duration = st.sampled_from(
    ["0", "0s", "-5", "1e5", "inf", "nan", "5 m", "", "9" * 400, "99999999999999", "1h-5m"]
) | cli_text.filter(_bad_value(lambda t: POSITIVE_DURATION.convert(t, None, None)))
bad_duration = st.sampled_from(["-1", "1e5", "9" * 400, "99999999999999", "3y"]) | cli_text.filter(
    _bad_value(lambda t: DURATION.convert(t, None, None))
)
bad_moment = st.sampled_from(
    [
        "99999999999d",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-05:00",
        "2026-13-01",
        "9" * 400,
        "yesterday",
    ]
) | cli_text.filter(_bad_value(lambda t: MOMENT.convert(t, None, None)))
bad_key_value = st.sampled_from(["novalue", "=v", " =v", "k\udcff=v", "k=v\x00"]) | st.builds(
    lambda k, v: f"{k}={v}", unstorable_text, st.text(max_size=4)
)
bad_cli_id = st.one_of(
    unstorable_text,
    st.sampled_from(["", " ", "9" * 40, "0", "-1", "²", "x" * 200]),
    st.text(max_size=20),
).filter(lambda k: not _names_the_seed(k))
bad_int = st.integers().map(str) | st.text(max_size=6)
statuses = [s.value for s in SessionStatus]

CLI_CASES: dict[str, st.SearchStrategy[list[str]]] = {
    "create": st.one_of(
        st.tuples(st.just("--agent-id"), bad_name.filter(lambda v: isinstance(v, str))),
        st.tuples(st.just("--agent-id=agent_ok --idle-window"), bad_positive_duration),
        st.tuples(st.just("--agent-id=agent_ok --max-age"), bad_positive_duration),
        st.tuples(st.just("--agent-id=agent_ok --meta"), bad_key_value),
        st.tuples(
            st.just("--agent-id=agent_ok --idle-timeout"),
            bad_int.filter(lambda v: not v.lstrip("-").isdigit() or abs(int(v)) >= 2**31),
        ),
        st.tuples(st.just("--agent-id=agent_ok --agent-prompt"), unstorable_text),
        st.tuples(st.just("--agent-id=agent_ok --daily-room-url"), unstorable_text),
        st.tuples(st.just("--agent-id=agent_ok --property"), bad_key_value),
    ).map(lambda pair: [*pair[0].split(), pair[1]]),
    "adopt": st.one_of(
        bad_cli_id.filter(_unusable_id).map(lambda k: [k]),
        bad_positive_duration.map(lambda v: ["sess_new", "--idle-window", v]),
        bad_positive_duration.map(lambda v: ["sess_new", "--max-age", v]),
        bad_key_value.map(lambda v: ["sess_new", "--meta", v]),
        unstorable_text.map(lambda v: ["sess_new", "--agent-id", v]),
    ),
    "end": bad_cli_id.map(lambda k: [k]),
    "touch": bad_cli_id.map(lambda k: [k]),
    "show": bad_cli_id.map(lambda k: [k]),
    "list": st.one_of(
        bad_moment.map(lambda v: ["--since", v]),
        bad_moment.map(lambda v: ["--until", v]),
        bad_duration.map(lambda v: ["--idle-for", v]),
        bad_key_value.map(lambda v: ["--meta", v]),
        unstorable_text.map(lambda v: ["--agent-id", v]),
        cli_text.filter(lambda v: v not in statuses).map(lambda v: ["--status", v]),
        bad_int.filter(lambda v: not (v.isdigit() and 1 <= int(v) <= 1000)).map(
            lambda v: ["--limit", v]
        ),
        st.text(min_size=1, max_size=30).map(lambda v: ["--after", v]),
        cli_text.filter(lambda v: v not in SORTS).map(lambda v: ["--sort", v]),
    ),
    "end-all": st.one_of(
        unstorable_text.map(lambda v: ["--yes", "--agent-id", v]),
        bad_key_value.map(lambda v: ["--yes", "--meta", v]),
        bad_int.filter(lambda v: not (v.isdigit() and int(v) >= 1)).map(
            lambda v: ["--yes", "--concurrency", v]
        ),
    ),
    "prune": st.one_of(
        bad_positive_duration.map(lambda v: ["--older-than", v]),
        bad_int.filter(lambda v: not (v.isdigit() and int(v) >= 1)).map(
            lambda v: ["--older-than", "30d", "--batch-size", v]
        ),
    ),
    "stats": bad_int.filter(lambda v: not (v.isdigit() and 1 <= int(v) <= MAX_STATS_DAYS)).map(
        lambda v: ["--days", v]
    ),
}


@pytest.mark.parametrize("command", list(CLI_CASES))
@given(data=st.data())
@CLI
def test_the_cli_refuses_bad_flags_in_one_line_and_writes_nothing(
    cli_db: CliDb, command: str, data: st.DataObject
) -> None:
    args = data.draw(CLI_CASES[command], label="args")
    before = cli_db.snapshot()
    result = CliRunner().invoke(
        cli,
        [*CLI_BASE, "--database-url", cli_db.url, command, *args],
        env={"LEMONSLICE_API_KEY": "k-123456", "SESSIONMGR_DATABASE_URL": None, "COLUMNS": "200"},
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (2, 3), (result.exit_code, result.output)  # usage / not found
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert cli_db.snapshot() == before  # no half-written (or any) row


@pytest.mark.parametrize(
    "argv",
    [
        [b"end", b"sess_\xff\xfe"],  # not UTF-8: Python hands the command lone surrogates
        [b"list", b"--agent-id", b"\xc3("],
        [b"prune", b"--older-than", b"9" * 400],
    ],
    ids=["end-undecodable", "list-undecodable", "prune-huge"],
)
def test_real_processes_print_one_line_for_bad_bytes(cli_db: CliDb, argv: list[bytes]) -> None:
    """Through a real argv (bytes from the OS, decoded with surrogateescape), not CliRunner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEMONSLICE_", "SESSIONMGR_"))}
    cmd = [sys.executable.encode(), b"-m", b"sessionmgr", b"--database-url", cli_db.url.encode()]
    proc = subprocess.run(cmd + argv, capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode in (2, 3), proc
    assert proc.stdout == b""
    assert b"Traceback" not in proc.stderr
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
