"""Shared fixtures. ``fake`` and ``client`` first (LemonSlice side); storage fixtures follow."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from sqlalchemy.engine import URL, make_url

from sessionmgr import db
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.repository import SessionRepository
from sessionmgr.testing import FakeLemonSlice

from .helpers import FAKE_API_KEY, fast_client, make_manager


@pytest.fixture
async def fake() -> AsyncIterator[FakeLemonSlice]:
    """A started FakeLemonSlice on a free loopback port, accepting ``FAKE_API_KEY``."""
    async with FakeLemonSlice(api_key=FAKE_API_KEY) as server:
        yield server


@pytest.fixture
async def client(fake: FakeLemonSlice) -> AsyncIterator[LemonSliceClient]:
    """A LemonSliceClient against ``fake`` with fast retries and short timeouts."""
    async with fast_client(fake) as c:
        yield c


# --- storage: ``repo_url`` on SQLite and PostgreSQL, ``repo`` on a FakeClock -----------

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _sessionmgr_logger_restored() -> Iterator[None]:
    """A test that runs the CLI or ``serve`` in process calls ``configure_logging``, which stops
    the ``sessionmgr`` logger from propagating; later tests' ``caplog`` would then see nothing."""
    logger = logging.getLogger("sessionmgr")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


PG_URL_ENV = "SESSIONMGR_TEST_POSTGRES_URL"  # e.g. postgresql+asyncpg://postgres@127.0.0.1/test
PG_REQUIRED_ENV = "SESSIONMGR_REQUIRE_POSTGRES"  # "1": a missing server fails, never skips


def postgres_unavailable(reason: str) -> NoReturn:
    if os.environ.get(PG_REQUIRED_ENV) == "1":
        pytest.fail(f"{reason} (and {PG_REQUIRED_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def _server_url() -> URL:
    base = os.environ.get(PG_URL_ENV)
    if not base:
        postgres_unavailable(f"{PG_URL_ENV} is not set")
    return make_url(base)


async def _admin(url: URL, database: str | None = None) -> Any:
    """An asyncpg connection to ``database`` (default: the maintenance db, else the URL's)."""
    import asyncpg  # type: ignore[import-untyped]

    last: Exception | None = None
    for name in (database,) if database else ("postgres", url.database):
        dsn = url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
        try:
            return await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            last = exc
    postgres_unavailable(f"PostgreSQL at {url.render_as_string()} is not reachable: {last}")


async def _create_database(url: URL) -> str:
    """A new database ``sm_test_<hex>``: concurrent test runs on one server never meet."""
    name = f"sm_test_{secrets.token_hex(6)}"
    conn = await _admin(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
        hide_password=False
    )


async def _drop_database(url: str) -> None:
    parsed = make_url(url)
    conn = await _admin(parsed)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
    finally:
        await conn.close()


async def _empty_database(url: str) -> None:
    """Back to an empty database (no tables, no alembic_version): much faster than a new one."""
    parsed = make_url(url)
    conn = await _admin(parsed, parsed.database)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh database of its own on the test server, dropped afterwards."""
    url = await _create_database(_server_url())
    try:
        yield url
    finally:
        await _drop_database(url)


@pytest.fixture(scope="session")
def postgres_run_database() -> Iterator[str]:
    """One database for this test run, emptied before each test that uses it."""
    url = _in_own_loop(_create_database, _server_url())
    try:
        yield url
    finally:
        _in_own_loop(_drop_database, url)


def _in_own_loop(fn: Callable[[Any], Coroutine[Any, Any, T]], arg: Any) -> T:
    """Run ``fn(arg)`` to completion on a private loop (callers may be inside a running one)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, fn(arg)).result()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file under tmp_path, or this run's PostgreSQL database,
    emptied."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sessions.db'}"
    else:
        url = request.getfixturevalue("postgres_run_database")
        _pg_state["migrated"] = False
        await _empty_database(url)
        yield url


@pytest.fixture
def repo_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def sqlite_migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, made once per run and copied by ``migrated_url``."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"
    _in_own_loop(db.upgrade, f"sqlite+aiosqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
    return path


# Whether this run's PostgreSQL database holds exactly the migrated schema: tests that take
# ``repo_url`` may leave anything behind, so they clear it.
_pg_state = {"migrated": False}


async def _truncate_or_migrate(url: str) -> None:
    """An empty, migrated PostgreSQL database: truncated if it still is one (fast), else
    rebuilt."""
    if not _pg_state["migrated"]:
        await _empty_database(url)
        await db.upgrade(url)
        _pg_state["migrated"] = True
        return
    parsed = make_url(url)
    conn = await _admin(parsed, parsed.database)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.execute("TRUNCATE sessions, session_events RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Like ``repo_url``, but already migrated to head and holding no sessions."""
    if request.param == "sqlite":
        path = tmp_path / "sessions.db"
        shutil.copyfile(request.getfixturevalue("sqlite_migrated_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_run_database")
        await _truncate_or_migrate(url)
        yield url


@pytest.fixture
async def repo(migrated_url: str, repo_clock: FakeClock) -> AsyncIterator[SessionRepository]:
    """A repository on ``migrated_url`` whose time moves only with ``repo_clock``."""
    repository = await SessionRepository.open(migrated_url, clock=repo_clock)
    try:
        yield repository
    finally:
        await repository.close()


# --- manager, reaper and reconcile fixtures --------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    """One fake clock shared by the fake server and the manager, so their times agree."""
    return FakeClock()


@pytest.fixture
async def lemon(clock: FakeClock) -> AsyncIterator[FakeLemonSlice]:
    async with FakeLemonSlice(api_key=FAKE_API_KEY, clock=clock) as server:
        yield server


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'sessions.db'}"


@pytest.fixture
async def manager(
    lemon: FakeLemonSlice, clock: FakeClock, db_url: str
) -> AsyncIterator[SessionManager]:
    """A manager on SQLite whose reaper the test drives: advance the clock, call run_once()."""
    async with make_manager(lemon, clock, db_url) as mgr:
        yield mgr
