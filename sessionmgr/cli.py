"""The ``sessionmgr`` command: admin queries, cleanup jobs, ``serve`` and ``demo``.

Exit codes: 0 ok, 1 runtime failure (API down, database error), 2 usage error, 3 not found,
4 partial (some sessions of a batch could not be ended).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import click

from . import __version__
from .config import ENV_API_KEY, ENV_API_URL, ENV_DATABASE_URL, Settings
from .errors import (
    ConfigurationError,
    DatabaseError,
    LemonSliceError,
    SessionMgrError,
    SessionNotFound,
)
from .logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PARTIAL = 4

T = TypeVar("T")


@dataclasses.dataclass
class CliContext:
    settings: Settings
    verbose: int


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """One line on stderr, then exit: bad input never shows a traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning sessionmgr's errors into one-line messages and exit codes."""
    try:
        return asyncio.run(coro)
    except SessionNotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    except (DatabaseError, LemonSliceError, SessionMgrError) as exc:
        fail(str(exc), EXIT_FAILURE)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--database-url",
    envvar=ENV_DATABASE_URL,
    show_envvar=True,
    help="SQLAlchemy URL of the session database [default: sqlite+aiosqlite:///./sessionmgr.db].",
)
@click.option("--api-url", envvar=ENV_API_URL, show_envvar=True, help="LemonSlice sessions URL.")
@click.option(
    "--api-key", envvar=ENV_API_KEY, show_envvar=True, help="LemonSlice API key (never echoed)."
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.version_option(__version__, prog_name="sessionmgr")
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    api_url: str | None,
    api_key: str | None,
    verbose: int,
    log_format: str,
) -> None:
    """Manage LemonSlice avatar sessions with persistence.

    Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 not found, 4 partial.
    """
    configure_logging(
        level=logging.WARNING - 10 * min(verbose, 2), fmt=log_format, stream=sys.stderr
    )
    try:
        settings = Settings.from_env(api_key=api_key, api_url=api_url, database_url=database_url)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.obj = CliContext(settings=settings, verbose=verbose)


def main() -> None:
    cli(prog_name="sessionmgr")


# --- commands -------------------------------------------------------------------------------
