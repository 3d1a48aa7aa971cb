"""The schema: times, constraints that refuse impossible states, and secret redaction."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from sessionmgr.clock import FakeClock
from sessionmgr.models import (
    SessionRow,
    UTCDateTime,
    format_sqlite_time,
    parse_sqlite_time,
    sessions,
)
from sessionmgr.records import REDACTED, SessionRecord, redact
from sessionmgr.repository import SessionRepository

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_record_field_is_a_column():
    columns = {c.name for c in sessions.columns}
    fields = {f.name for f in dataclasses.fields(SessionRecord)}
    assert fields <= columns
    assert columns - fields == {"expires_at"}
    assert sessions.c.metadata is SessionRow.meta.property.columns[0]  # attribute ``meta``


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "pg"])
def test_naive_datetimes_are_refused(dialect: Any):
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    if bind is None:  # PostgreSQL: the TypeDecorator's own hook
        bind = lambda v: UTCDateTime().process_bind_param(v, dialect)  # noqa: E731
    with pytest.raises(ValueError, match="timezone-aware"):
        bind(datetime(2026, 1, 1))


def test_sqlite_bind_matches_sqlalchemy_text_format():
    dialect = sqlite.dialect()
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert bind is not None
    plus_two = timezone(timedelta(hours=2))
    assert bind(datetime(2026, 3, 4, 7, 8, 9, 12, tzinfo=plus_two)) == "2026-03-04 05:08:09.000012"
    assert bind(datetime(2026, 3, 4, tzinfo=UTC)) == "2026-03-04 00:00:00.000000"


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 3, 4, 7, 8, 9, 12, tzinfo=UTC),
        datetime(2026, 3, 4, tzinfo=UTC),  # no microseconds: still six digits
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),  # the day before
        datetime(2026, 12, 31, 20, 0, 0, 5, tzinfo=timezone(timedelta(hours=-5))),  # year after
        datetime.fromisoformat("2026-06-01 12:00:00.250000+00:00"),  # as read back
    ],
)
def test_sqlite_fast_bind_is_the_generic_path_byte_for_byte(value: datetime):
    """The fast formatter (every SQLite write's times, the touch flush's text compare) must
    store exactly what SQLAlchemy's own path stores, or lexical order and equality break."""
    dialect = sqlite.dialect()
    generic = sqlite.DATETIME().bind_processor(dialect)
    assert generic is not None
    expected = generic(UTCDateTime().process_bind_param(value, dialect))
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert bind is not None
    assert format_sqlite_time(value) == expected
    assert bind(value) == expected
    assert parse_sqlite_time(expected) == value


def test_the_fast_bind_refuses_naive_times_and_passes_none():
    with pytest.raises(ValueError, match="timezone-aware"):
        format_sqlite_time(datetime(2026, 1, 1))
    assert format_sqlite_time(None) is None


async def test_times_come_back_aware_utc_whatever_zone_went_in(repo: SessionRepository):
    tokyo = timezone(timedelta(hours=9))
    created = datetime(2026, 1, 1, 9, 0, tzinfo=tokyo)  # midnight UTC
    record, _ = await repo.adopt(
        session_id="s1", control_url="c", idle_window=60, max_age=None, created_at=created
    )
    stored = await repo.get(record.id)
    assert stored.created_at == T0
    assert stored.created_at.tzinfo is UTC or stored.created_at.utcoffset() == timedelta(0)
    assert stored.created_at.isoformat() == "2026-01-01T00:00:00+00:00"


async def test_sqlite_stores_readable_text_in_time_order(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    clock = FakeClock(T0)
    async with await SessionRepository.open(url, clock=clock, upgrade=True) as repo:
        for step in (0.5, 9.0, 86_400.0, 0.000001):
            clock.advance(step)
            await repo.record_intent(idle_window=60, max_age=None)
    with sqlite3.connect(tmp_path / "s.db") as conn:
        rows = conn.execute("SELECT created_at FROM sessions ORDER BY created_at").fetchall()
        by_id = conn.execute("SELECT created_at FROM sessions ORDER BY id").fetchall()
    assert rows == by_id  # lexical order is time order
    assert rows[0][0] == "2026-01-01 00:00:00.500000"


async def test_column_types_per_backend(repo: SessionRepository):
    """Times: text on SQLite, timestamptz on PostgreSQL; metadata: JSON / JSONB."""
    async with repo.engine.connect() as conn:
        if repo.dialect == "sqlite":
            rows = await conn.execute(text("SELECT name, type FROM pragma_table_info('sessions')"))
            expected = {"created_at": "DATETIME", "metadata": "JSON"}
        else:
            rows = await conn.execute(
                text(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = 'sessions'"
                )
            )
            expected = {"created_at": "timestamp with time zone", "metadata": "jsonb"}
        kinds: dict[str, str] = {name: kind for name, kind in rows.all()}
    assert {k: kinds[k] for k in expected} == expected


def _row(**over: Any) -> dict[str, Any]:
    row = {
        "status": "pending",
        "idle_window": 60.0,
        "created_at": T0,
        "updated_at": T0,
        "last_activity_at": T0,
        "attempts": 0,
        "metadata": {},
    }
    return row | over


@pytest.mark.parametrize(
    "bad",
    [
        {"status": "zombie"},
        {"status": "failed", "end_reason": "bored", "ended_at": T0},
        {"status": "active"},  # no session_id
        {"status": "ended", "session_id": "x", "attempts": 1},  # no ended_at
        {"status": "pending", "ended_at": T0},
        {"status": "active", "session_id": "x", "attempts": 2},
        {"status": "ending", "session_id": "x", "attempts": 0},
        {"idle_window": 0.0},
        {"max_age": -5.0},
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items() if k != "ended_at"),
)
async def test_database_refuses_impossible_rows(repo: SessionRepository, bad: dict[str, Any]):
    async with repo.engine.connect() as conn:
        await conn.execute(insert(sessions), _row())  # the baseline is fine
        with pytest.raises(IntegrityError):
            await conn.execute(insert(sessions), _row(**bad))


async def test_session_id_is_unique(repo: SessionRepository):
    async with repo.engine.connect() as conn:
        # pending rows have no session_id yet: any number of them
        await conn.execute(insert(sessions), [_row(), _row(), _row()])
        await conn.execute(insert(sessions), _row(status="active", session_id="dup"))
        with pytest.raises(IntegrityError):
            await conn.execute(insert(sessions), _row(status="active", session_id="dup"))


def test_redact_hides_secret_looking_keys_at_any_depth():
    given = {
        "user": "ada",
        "daily_token": "t1",
        "API_KEY": "k1",
        "Client-Secret": "s1",
        "nested": {"refreshToken": "t2", "ok": 1, "deeper": {"secret_sauce": "s2"}},
        "list": [{"access_key": "k2"}, "plain"],
    }
    out = redact(given)
    assert out == {
        "user": "ada",
        "daily_token": REDACTED,
        "API_KEY": REDACTED,
        "Client-Secret": REDACTED,
        "nested": {"refreshToken": REDACTED, "ok": 1, "deeper": {"secret_sauce": REDACTED}},
        "list": [{"access_key": REDACTED}, "plain"],
    }
    assert given["daily_token"] == "t1"  # a copy: the caller's mapping is untouched
    assert redact(None) == {}
