"""Alembic environment for sessionmgr, async, for SQLite and PostgreSQL.

Two ways in: ``sessionmgr db upgrade`` (and ``SessionRepository.open(upgrade=True)``) hand over an
open connection in ``config.attributes["connection"]``; ``alembic upgrade head`` from the project
root reads the URL from ``-x url=...``, then ``sqlalchemy.url``, then ``SESSIONMGR_DATABASE_URL``,
then the default. SQLite uses batch mode so future ALTERs work.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from sessionmgr.config import DEFAULT_DATABASE_URL, ENV_DATABASE_URL
from sessionmgr.db import migration_engine, normalize_url, run_migrations
from sessionmgr.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.get_section("loggers"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    x_args = context.get_x_argument(as_dictionary=True)
    return (
        x_args.get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get(ENV_DATABASE_URL)
        or DEFAULT_DATABASE_URL
    )


def _configure(**kw: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kw)  # type: ignore[arg-type]


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = migration_engine(url)
    try:
        await run_migrations(engine, do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    url = normalize_url(_url())
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(_run_online(_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
