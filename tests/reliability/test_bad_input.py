"""Bad input, property-based: malformed arguments to the library and the CLI, malformed answers
to the client. Always a clear typed error (or a one-line CLI message), never a traceback, never a
half-written row.

Example counts are modest and derandomized (``settings`` below), so a failure reproduces exactly
and the file stays well under 30 s.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionmgr.clock import FakeClock
from sessionmgr.errors import (
    DatabaseError,
    SessionMgrError,
    SessionNotFound,
)
from sessionmgr.manager import SessionManager
from sessionmgr.models import NAME_LENGTH, SESSION_ID_LENGTH
from sessionmgr.records import SessionFilter
from sessionmgr.repository import MAX_SECONDS
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
    else:  # only a key that names the one session may end it
        assert key in (record.id, str(record.id), record.session_id)
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
