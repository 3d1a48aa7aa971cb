"""Engines, migrations and database errors: everything about *where* sessions are stored.

SQLite runs in WAL mode with a busy timeout, and sessionmgr emits ``BEGIN`` itself (``BEGIN
IMMEDIATE`` for writes), so a write transaction holds the write lock from its first statement and
concurrent writers wait for each other instead of failing with "database is locked". Alembic is
run programmatically from the migrations shipped inside the package, so ``sessionmgr db upgrade``
works from any directory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseLocked,
    DatabaseNotMigrated,
    SessionMgrError,
)

logger = logging.getLogger(__name__)

BUSY_TIMEOUT = 30.0  # seconds SQLite waits for another writer before "database is locked"
SQLITE_FILE_MODE = 0o600  # the database holds who ran what: owner only
PG_POOL_SIZE = 10  # connections kept open per process
PG_MAX_OVERFLOW = 10  # extra connections allowed under bursts
PG_POOL_RECYCLE = 1800.0  # seconds before a pooled connection is replaced
PG_MIGRATION_LOCK = 0x5E5510  # advisory lock key: one migrator at a time
ERROR_EXCERPT = 200  # characters of a driver message kept in an error
WAL_RETRY_PAUSE = 0.01  # seconds between attempts to switch a new file to WAL

# Execution option read by the SQLite "begin" hook: the BEGIN flavour of a transaction.
SQLITE_BEGIN = "sessionmgr_sqlite_begin"
WRITE_OPTIONS: Mapping[str, Any] = {SQLITE_BEGIN: "IMMEDIATE"}

_SQLITE_DRIVER = "sqlite+aiosqlite"
_PG_DRIVER = "postgresql+asyncpg"
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


# --- URLs and engines --------------------------------------------------------------------------


def normalize_url(url: str | URL) -> URL:
    """The URL with its async driver: ``sqlite://`` and ``postgresql://`` are accepted too."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        raise ConfigurationError(
            f"cannot parse database URL {url!r}: use sqlite+aiosqlite:///path/to/sessions.db"
            " or postgresql+asyncpg://user@host/dbname"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername=_SQLITE_DRIVER)
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername=_PG_DRIVER)
    raise ConfigurationError(
        f"unsupported database {safe_url(parsed)}: use sqlite+aiosqlite:///path/to/sessions.db"
        " or postgresql+asyncpg://user@host/dbname"
    )


def safe_url(url: str | URL) -> str:
    """The URL for messages and logs, password masked."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


def sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL (None for other backends)."""
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database or "").expanduser()


def create_engine(url: str | URL, **kw: Any) -> AsyncEngine:
    """An async engine for ``url``, tuned for sessionmgr (see the module docstring).

    SQLite: the file and its directory are created if missing (file mode 0600). PostgreSQL: asyncpg
    with a pre-pinged pool. ``kw`` goes to SQLAlchemy's ``create_async_engine``.
    """
    return _make_engine(url, **kw)


def _make_engine(
    url: str | URL, *, foreign_keys: bool = True, create: bool = True, **kw: Any
) -> AsyncEngine:
    # A failed statement's error (logged, shown) would otherwise carry its bound parameters:
    # prompts, metadata, URLs that let anyone join a call.
    kw.setdefault("hide_parameters", True)
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, foreign_keys=foreign_keys, create=create, **kw)
    params: dict[str, Any] = {
        "pool_size": PG_POOL_SIZE,
        "max_overflow": PG_MAX_OVERFLOW,
        "pool_pre_ping": True,
        "pool_recycle": PG_POOL_RECYCLE,
    }
    if kw.get("poolclass") is NullPool:
        params = {}
    params.update(kw)
    return create_async_engine(parsed, **params)


def _sqlite_engine(url: URL, *, foreign_keys: bool, create: bool, **kw: Any) -> AsyncEngine:
    path = sqlite_path(url)
    if path is None or url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        raise ConfigurationError(
            "in-memory SQLite is not supported (every connection would see its own empty"
            " database): use a file, e.g. sqlite+aiosqlite:///./sessionmgr.db"
        )
    if not url.query.get("uri") and (create or path.exists()):
        if create:
            _create_file(path)
        _ensure_wal(path, url)
    engine = create_async_engine(url, **kw)
    _sqlite_hooks(engine.sync_engine, busy_ms=int(BUSY_TIMEOUT * 1000), foreign_keys=foreign_keys)
    return engine


def inline_sqlite_engine(url: URL, *, wal_limit: int) -> Engine:
    """The group writer's synchronous engine on the same file (stdlib ``sqlite3``, same pragmas),
    for transactions run inline on the event loop (sessionmgr/writer.py): it never waits for a
    lock (``busy_timeout=0``: the writer retries with ``asyncio.sleep``) and never checkpoints
    (``wal_autocheckpoint=0``: the writer checkpoints off the loop); ``wal_limit`` (bytes): what
    the WAL shrinks back to once checkpointed. ``temp_store=MEMORY``: SQLite gathers a
    ``RETURNING`` statement's rows (every claim and bulk end) in a temporary table, which by
    default opens a temporary file for each statement: ~50 us here, three times what the UPDATE
    itself costs. The writer's temporary tables are a batch's rows at most, so memory is the right
    place for them (the readers keep the default: a big sort may spill to disk)."""
    engine = create_sync_engine(
        url.set(drivername="sqlite+pysqlite"),
        hide_parameters=True,
        poolclass=NullPool,
        connect_args={"check_same_thread": False},
    )
    pragmas = (
        "PRAGMA wal_autocheckpoint = 0",
        f"PRAGMA journal_size_limit = {int(wal_limit)}",
        "PRAGMA temp_store = MEMORY",
    )
    _sqlite_hooks(engine, busy_ms=0, foreign_keys=True, extra=pragmas)
    return engine.execution_options(**WRITE_OPTIONS)


def _sqlite_hooks(
    engine: Engine, *, busy_ms: int, foreign_keys: bool, extra: tuple[str, ...] = ()
) -> None:
    """sessionmgr's pragmas on every new connection, and its own BEGIN (see the docstring)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        sqlite_pragmas(dbapi_conn, busy_ms=busy_ms, foreign_keys=foreign_keys, extra=extra)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        raw = conn.connection.dbapi_connection
        if not isinstance(raw, sqlite3.Connection):  # aiosqlite's adapter: through SQLAlchemy
            conn.exec_driver_sql(f"BEGIN {mode}")
            return
        # a stdlib connection (the writer's inline one: a BEGIN per batch): straight to the
        # driver, as the writer's statements go; SQLAlchemy's execution of one statement costs
        # more than SQLite's BEGIN
        try:
            raw.execute(f"BEGIN {mode}")
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                f"BEGIN {mode}", None, exc, sqlite3.Error, hide_parameters=True
            ) from exc


def sqlite_pragmas(
    dbapi_conn: Any, *, busy_ms: int, foreign_keys: bool = True, extra: tuple[str, ...] = ()
) -> None:
    """The pragmas every SQLite connection of sessionmgr gets (the one place that says them):
    WAL, ``synchronous=NORMAL``, its busy timeout, foreign keys, then ``extra``; and no driver
    BEGIN (``isolation_level = None``: sessionmgr emits its own, see ``_on_begin``)."""
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA journal_mode")  # normally WAL already (see _ensure_wal)
        if str(cursor.fetchone()[0]).lower() != "wal":
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        for pragma in extra:
            cursor.execute(pragma)
    finally:
        cursor.close()


def sqlite_read_connection(path: Path) -> sqlite3.Connection:
    """A read-only stdlib connection to the SQLite file at ``path`` (sessionmgr/reader.py), usable
    from any one thread at a time: ``mode=rw`` (a file that has gone away is an error, never a new
    empty database), ``query_only``, the usual pragmas and busy timeout. In autocommit, so a
    single SELECT is its own snapshot; a read of several statements emits its own BEGIN."""
    uri = path.resolve().as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, timeout=BUSY_TIMEOUT, check_same_thread=False, uri=True)
    try:
        busy_ms = int(BUSY_TIMEOUT * 1000)
        sqlite_pragmas(conn, busy_ms=busy_ms, extra=("PRAGMA query_only = ON",))
    except BaseException:
        conn.close()
        raise
    return conn


def _create_file(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, SQLITE_FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise DatabaseError(
            f"cannot create SQLite database {path}: {exc.strerror}; choose a writable path in"
            " SESSIONMGR_DATABASE_URL"
        ) from None
    os.close(fd)
    os.chmod(path, SQLITE_FILE_MODE)  # whatever the umask said
    logger.info("created SQLite database %s", path)


def _ensure_wal(path: Path, url: URL) -> None:
    """Put the file in WAL mode (persistent) once, before pooled connections race for it.

    Leaving rollback-journal mode needs the file to itself, and SQLite may refuse that at once,
    without its busy handler, when other connections are starting up: so it is done here, from
    one connection, retrying for as long as the busy timeout.
    """
    give_up = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT)) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= give_up:
                raise map_error(exc, url) from None
            time.sleep(WAL_RETRY_PAUSE)
        except sqlite3.Error as exc:
            raise map_error(exc, url) from None


def write_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (and pool) whose transactions start as writes (SQLite ``BEGIN IMMEDIATE``).

    A deferred SQLite transaction that reads before it writes cannot wait for the write lock (the
    upgrade fails at once with "database is locked"); an immediate one waits the busy timeout.
    """
    return engine.execution_options(**WRITE_OPTIONS)


# --- errors --------------------------------------------------------------------------------------


def _driver_message(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(orig).strip().splitlines()
    line = text[0] if text else type(orig).__name__
    return line if len(line) <= ERROR_EXCERPT else line[: ERROR_EXCERPT - 1] + "…"


def _sqlstate(exc: BaseException) -> str | None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def is_locked(exc: BaseException) -> bool:
    """SQLite's busy timeout ran out (or PostgreSQL aborted a deadlock / serialization conflict)."""
    if not isinstance(exc, SQLAlchemyError | sqlite3.OperationalError):
        return False
    if _sqlstate(exc) in _RETRYABLE_SQLSTATES:
        return True
    msg = _driver_message(exc).lower()
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


def map_error(exc: BaseException, url: str | URL | None = None) -> SessionMgrError:
    """A typed, one-line error for a driver failure; the SQL and its parameters are left out."""
    if isinstance(exc, SessionMgrError):
        return exc
    where = f"database {safe_url(url)}" if url is not None else "the database"
    msg = _driver_message(exc)
    low = msg.lower()
    if is_locked(exc):
        return DatabaseLocked(
            f"{where} stayed locked past the {BUSY_TIMEOUT:g} s busy timeout: another process"
            " holds a long write transaction; retry, or stop that process"
        )
    if isinstance(exc, IntegrityError):
        return DatabaseError(f"{where} refused a write: {msg}")
    if "no such table" in low or ("relation" in low and "does not exist" in low):
        return DatabaseNotMigrated(f"{where} has no sessionmgr schema: run `sessionmgr db upgrade`")
    if "file is not a database" in low:
        return DatabaseError(
            f"{where} is not a SQLite database: point SESSIONMGR_DATABASE_URL at a sessionmgr"
            " database file"
        )
    if "unable to open database file" in low:
        return DatabaseError(f"cannot open {where}: check that the path exists and is writable")
    if "readonly database" in low:
        return DatabaseError(f"{where} is read-only: check the file's permissions")
    if "disk is full" in low:
        return DatabaseError(f"{where}: the disk is full; free some space")
    if "authentication" in low or "password" in low or ("role" in low and "does not exist" in low):
        return DatabaseError(
            f"cannot log in to {where}: check the user and password in SESSIONMGR_DATABASE_URL"
        )
    if "database" in low and "does not exist" in low:
        name = make_url(url).database if url is not None else "<name>"
        return DatabaseError(f"{where} does not exist: create it (e.g. `createdb {name}`)")
    if isinstance(exc, OSError | ConnectionError) or "connect" in low:
        return DatabaseError(
            f"cannot connect to {where} ({msg}): check that the server is running and"
            " SESSIONMGR_DATABASE_URL"
        )
    return DatabaseError(f"error from {where}: {msg}")


@contextlib.contextmanager
def translating(url: str | URL | None) -> Iterator[None]:
    """Raise driver errors (and connection failures) as sessionmgr's typed errors."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise map_error(exc, url) from exc


# --- migrations ----------------------------------------------------------------------------------


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic ``Config`` for the migrations shipped in the package (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def migrations_dir() -> str:
    """Where the ``sessionmgr.migrations`` package is: ``migrations/`` in a checkout (pyproject.toml
    maps it into the package), ``site-packages/sessionmgr/migrations`` once installed."""
    spec = importlib.util.find_spec("sessionmgr.migrations")
    if spec is None or spec.origin is None:  # a broken install: say so, not a KeyError
        raise DatabaseError("sessionmgr's migrations are missing: reinstall sessionmgr")
    return str(Path(spec.origin).parent)


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this version of sessionmgr needs."""
    head = _scripts().get_current_head()
    assert head is not None, "sessionmgr ships at least one migration"
    return head


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def _current_sync(conn: Connection) -> str | None:
    heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) if heads else None


async def run_migrations(engine: AsyncEngine, fn: Callable[[Connection], None]) -> None:
    """Run ``fn`` (alembic work) in one write transaction, one migrator at a time.

    SQLite: the engine must have foreign keys off (batch migrations recreate tables, and dropping
    a referenced table would cascade); integrity is checked before the commit instead.
    """
    async with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        await conn.run_sync(fn)
        if conn.dialect.name == "sqlite":
            broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).fetchall()
            if broken:
                raise DatabaseError(
                    f"migration left {len(broken)} rows with broken foreign keys; rolled back"
                )


def migration_engine(url: str | URL) -> AsyncEngine:
    """A throwaway engine for migrations (no pool; SQLite foreign keys off)."""
    return _make_engine(url, foreign_keys=False, poolclass=NullPool)


async def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (default: what this code needs)."""

    def _upgrade(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    engine = migration_engine(url)
    try:
        with translating(url):
            await run_migrations(engine, _upgrade)
    finally:
        await engine.dispose()


async def current(url: str) -> str | None:
    """The schema's revision, None when never migrated (a missing SQLite file is not created)."""
    engine = _make_engine(url, create=False, poolclass=NullPool)
    path = sqlite_path(engine.url)
    try:
        if path is not None and not path.exists():
            return None
        with translating(url):
            async with engine.connect() as conn:
                return await conn.run_sync(_current_sync)
    finally:
        await engine.dispose()


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    # Tables that are not sessionmgr's (a shared PostgreSQL database) are not our business.
    return not (type_ == "table" and reflected and compare_to is None)


def _describe(diff: Any) -> str:
    if isinstance(diff, list):  # modify_* diffs come grouped per column
        return "; ".join(_describe(d) for d in diff)
    kind, *rest = diff
    names = []
    for part in rest:
        name = getattr(part, "name", None)
        if isinstance(name, str):
            table = getattr(getattr(part, "table", None), "name", None)
            names.append(f"{table}.{name}" if table and table != name else name)
        elif isinstance(part, str) and part:
            names.append(part)
    return f"{kind} {' '.join(names)}".strip()


def _check_sync(conn: Connection) -> list[str]:
    from .models import Base

    problems: list[str] = []
    at = _current_sync(conn)
    head = head_revision()
    if at != head:
        problems.append(
            f"database is at {at or 'no revision'}, code needs {head}: run `sessionmgr db upgrade`"
        )
        return problems
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": _include})
    for diff in compare_metadata(ctx, Base.metadata):
        problems.append(f"models differ from migrations: {_describe(diff)}")
    return problems


async def check(url: str) -> list[str]:
    """What is wrong with the schema at ``url``: behind head, or models != migrations."""
    engine = _make_engine(url, create=False, poolclass=NullPool)
    path = sqlite_path(engine.url)
    try:
        if path is not None and not path.exists():
            return [f"{path} does not exist: run `sessionmgr db upgrade`"]
        with translating(url):
            async with engine.connect() as conn:
                return await conn.run_sync(_check_sync)
    finally:
        await engine.dispose()


async def ensure_migrated(engine: AsyncEngine) -> None:
    """Fail with one line naming `sessionmgr db upgrade` unless the schema is at head."""
    url = engine.url
    with translating(url):
        async with engine.connect() as conn:
            at = await conn.run_sync(_current_sync)
    head = head_revision()
    if at == head:
        return
    where = safe_url(url)
    if at is not None and not set(at.split(",")) <= _known_revisions():
        raise DatabaseNotMigrated(
            f"database at {where} is at revision {at}, which this sessionmgr does not know:"
            " upgrade sessionmgr"
        )
    raise DatabaseNotMigrated(
        f"database at {where} is not migrated (at {at or 'none'}, code needs {head}):"
        " run `sessionmgr db upgrade`"
    )
