"""Engines, migrations, schema checks and database errors; the ``sessionmgr db`` commands."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sessionmgr import db, writer
from sessionmgr.cli import cli
from sessionmgr.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseLocked,
    DatabaseNotMigrated,
)
from sessionmgr.repository import SessionRepository

ROOT = Path(__file__).resolve().parents[1]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# --- engines -------------------------------------------------------------------------------------


async def test_sqlite_engine_settings(tmp_path: Path):
    engine = db.create_engine(sqlite_url(tmp_path / "e.db"))
    try:
        async with engine.connect() as conn:
            pragmas = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
    finally:
        await engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL
        "busy_timeout": int(db.BUSY_TIMEOUT * 1000),
        "foreign_keys": 1,
    }


async def test_sqlite_file_and_directory_are_created_private(tmp_path: Path):
    path = tmp_path / "deep" / "er" / "sessions.db"
    engine = db.create_engine(sqlite_url(path))
    await engine.dispose()
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_urls_are_normalized_to_async_drivers():
    assert db.normalize_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert db.normalize_url("postgresql://u@h/d").drivername == "postgresql+asyncpg"
    assert db.normalize_url("postgres://u@h/d").drivername == "postgresql+asyncpg"


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("sqlite+aiosqlite:///:memory:", "in-memory SQLite is not supported"),
        ("sqlite+aiosqlite://", "in-memory SQLite is not supported"),
        ("mysql://u@h/d", "unsupported database"),
        ("not a url", "cannot parse database URL"),
    ],
)
def test_unusable_urls_fail_with_a_fix(url: str, hint: str):
    with pytest.raises(ConfigurationError, match=hint) as info:
        db.create_engine(url)
    assert "sqlite+aiosqlite:///" in str(info.value)  # says what would work


def test_safe_url_hides_the_password():
    shown = db.safe_url("postgresql+asyncpg://sm:hunter2@db.example/sessions")
    assert "hunter2" not in shown
    assert shown == "postgresql+asyncpg://sm:***@db.example/sessions"


# --- migrations ----------------------------------------------------------------------------------


async def test_upgrade_current_and_models_match_migrations(repo_url: str):
    assert await db.current(repo_url) is None
    await db.upgrade(repo_url)
    assert await db.current(repo_url) == db.head_revision()
    assert await db.check(repo_url) == []  # alembic's autogenerate comparison finds nothing
    await db.upgrade(repo_url)  # idempotent
    assert await db.current(repo_url) == db.head_revision()


async def test_check_sees_a_schema_that_drifted_from_the_models(repo_url: str):
    await db.upgrade(repo_url)
    engine = db.create_engine(repo_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_sessions_ended_at"))
            await conn.execute(text("ALTER TABLE sessions ADD COLUMN surprise INTEGER"))
    finally:
        await engine.dispose()
    problems = await db.check(repo_url)
    assert any("ix_sessions_ended_at" in p for p in problems), problems
    assert any("surprise" in p for p in problems), problems
    assert all(p.startswith("models differ from migrations") for p in problems)


async def test_check_says_behind_and_what_to_run(repo_url: str):
    problems = await db.check(repo_url)
    assert len(problems) == 1
    assert "run `sessionmgr db upgrade`" in problems[0]


async def test_concurrent_upgrades_do_not_trip_over_each_other(repo_url: str):
    await asyncio.gather(*(db.upgrade(repo_url) for _ in range(3)))
    assert await db.check(repo_url) == []


async def test_opening_an_unmigrated_database_names_the_fix(repo_url: str):
    with pytest.raises(DatabaseNotMigrated) as info:
        await SessionRepository.open(repo_url)
    message = str(info.value)
    assert "is not migrated (at none, code needs" in message
    assert message.endswith("run `sessionmgr db upgrade`")
    assert "\n" not in message


@pytest.mark.postgres
async def test_not_migrated_message_hides_the_password():
    from tests.conftest import postgres_database

    async with postgres_database() as url:
        with_password = make_url(url).set(password="hunter2")  # trust auth ignores it
        rendered = with_password.render_as_string(hide_password=False)
        with pytest.raises(DatabaseNotMigrated) as info:
            await SessionRepository.open(rendered)
    assert "hunter2" not in str(info.value)
    assert ":***@" in str(info.value)


async def test_a_database_from_newer_code_is_refused(repo_url: str):
    await db.upgrade(repo_url)
    engine = db.create_engine(repo_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    finally:
        await engine.dispose()
    with pytest.raises(DatabaseNotMigrated, match="f00d, which this sessionmgr does not know"):
        await SessionRepository.open(repo_url)


async def test_open_with_upgrade_migrates_first(repo_url: str):
    async with await SessionRepository.open(repo_url, upgrade=True) as repo:
        assert repo.dialect in ("sqlite", "postgresql")
        assert "hunter2" not in repr(repo)
    assert await db.current(repo_url) == db.head_revision()


def test_alembic_command_line_from_the_project_root(tmp_path: Path):
    url = sqlite_url(tmp_path / "a.db")
    alembic = Path(sys.executable).with_name("alembic")
    done = subprocess.run(
        [str(alembic), "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert asyncio.run(db.check(url)) == []


def test_sessionmgr_db_upgrade_works_from_any_directory(tmp_path: Path):
    url = sqlite_url(tmp_path / "elsewhere.db")
    done = subprocess.run(
        [sys.executable, "-m", "sessionmgr", "--database-url", url, "db", "upgrade"],
        cwd=tmp_path,  # no alembic.ini here: the migrations come with the package
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SESSIONMGR_DATABASE_URL"},
    )
    assert done.returncode == 0, done.stderr
    assert asyncio.run(db.current(url)) == db.head_revision()


# --- errors --------------------------------------------------------------------------------------


async def test_a_file_that_is_not_a_database_is_one_clear_line(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_text("shopping list\n" * 200)
    with pytest.raises(DatabaseError, match="is not a SQLite database") as info:
        await SessionRepository.open(sqlite_url(path))
    assert "\n" not in str(info.value)


async def test_missing_tables_say_run_upgrade(tmp_path: Path):
    url = sqlite_url(tmp_path / "s.db")
    async with await SessionRepository.open(url, upgrade=True) as repo:
        async with repo.engine.begin() as conn:
            await conn.execute(text("DROP TABLE session_events"))
            await conn.execute(text("DROP TABLE sessions"))
        with pytest.raises(DatabaseNotMigrated, match="run `sessionmgr db upgrade`"):
            await repo.find(1)
        with pytest.raises(DatabaseNotMigrated, match="run `sessionmgr db upgrade`"):
            await repo.record_intent(idle_window=60, max_age=None)


async def test_a_briefly_held_lock_is_waited_out(tmp_path: Path):
    """Another process holding the write lock for a moment: writes wait, nobody sees an error."""
    url = sqlite_url(tmp_path / "s.db")
    async with await SessionRepository.open(url, upgrade=True) as repo:
        other = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, other.execute, args=("COMMIT",)).start()
        records = await asyncio.gather(
            *(repo.record_intent(idle_window=60, max_age=None) for _ in range(20))
        )
        claimed = await repo.claim_due(owner="me", limit=10, lease=60)
        other.close()
    assert len({r.id for r in records}) == 20
    assert claimed == []


async def test_a_lock_held_past_every_timeout_is_database_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.05)
    monkeypatch.setattr(writer, "LOCK_RETRY_TOTAL", 0.2)
    url = sqlite_url(tmp_path / "s.db")
    async with await SessionRepository.open(url, upgrade=True) as repo:
        other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseLocked, match="stayed locked") as info:
                await repo.record_intent(idle_window=60, max_age=None)
            assert "\n" not in str(info.value)
        finally:
            other.execute("ROLLBACK")
            other.close()
        await repo.record_intent(idle_window=60, max_age=None)  # and it recovers


def test_map_error_without_a_known_cause_keeps_one_line():
    err = db.map_error(RuntimeError("line one\nline two"), "sqlite:///x.db")
    assert isinstance(err, DatabaseError)
    assert str(err) == "error from database sqlite:///x.db: line one"


# --- the `sessionmgr db` commands ----------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_db_commands(repo_url: str):
    head = db.head_revision()
    current = invoke("--database-url", repo_url, "db", "current")
    assert current.exit_code == 0
    assert current.output.startswith("none (not migrated: run `sessionmgr db upgrade`")

    check = invoke("--database-url", repo_url, "db", "check")
    assert check.exit_code == 1
    assert "run `sessionmgr db upgrade`" in check.output

    upgrade = invoke("--database-url", repo_url, "db", "upgrade")
    assert upgrade.exit_code == 0, upgrade.output
    assert f"upgraded from an empty database to revision {head}" in upgrade.output
    again = invoke("--database-url", repo_url, "db", "upgrade")
    assert f"already at revision {head}" in again.output

    assert invoke("--database-url", repo_url, "db", "current").output == f"{head} (head)\n"
    check = invoke("--database-url", repo_url, "db", "check")
    assert check.exit_code == 0
    assert check.output.startswith("ok: ")


def test_db_check_on_a_missing_sqlite_file_does_not_create_it(tmp_path: Path):
    path = tmp_path / "nowhere.db"
    result = invoke("--database-url", sqlite_url(path), "db", "check")
    assert result.exit_code == 1
    assert "does not exist: run `sessionmgr db upgrade`" in result.output
    assert not path.exists()
