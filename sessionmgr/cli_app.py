"""The root of the ``sessionmgr`` command and what every command shares: the invocation's
settings and secrets, exit codes, one-line errors, opening the database and the manager, and
batch results.

Exit codes: 0 ok, 1 runtime failure (API down, database error), 2 usage error, 3 not found,
4 partial (some sessions of a batch could not be ended).

Every failure is one line on stderr (``error: ...``) saying what to do; tracebacks are for bugs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import __version__, config, db
from .cli_output import (
    echo_json,
)
from .config import ENV_API_KEY, ENV_API_URL, ENV_DATABASE_URL, Settings
from .errors import (
    AuthError,
    ConfigurationError,
    CreateOutcomeUnknown,
    DatabaseError,
    InvalidArgument,
    NoCreditsError,
    SessionMgrError,
    SessionNotFound,
    TransportError,
)
from .logs import configure_logging
from .manager import SessionManager
from .records import (
    SessionRecord,
    scrub,
)
from .repository import SessionRepository
from .states import FINAL_STATUSES, EndReason, SessionStatus

# Names imported `as` themselves are re-exported: callers and tests import them from here.

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PARTIAL = 4

T = TypeVar("T")

# Log level by -v count: commands report outcomes themselves, so by default only errors are
# logged (a retry warning would break the one-line error); `serve` logs at INFO.
LOG_LEVELS = (logging.ERROR, logging.INFO, logging.DEBUG)

# Values that must never be printed (API key, tokens, the database password), collected as the
# invocation learns them and replaced by "***" in every error line.
SECRETS: set[str] = set()


@dataclasses.dataclass
class CliContext:
    settings: Settings
    verbose: int
    log_format: str = "text"


def scrub_line(text: str) -> str:
    """One line, without any secret this invocation knows of."""
    return scrub(text, SECRETS, one_line=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """One line on stderr, then exit: bad input never shows a traceback."""
    click.echo(f"error: {scrub_line(message)}", err=True)
    sys.exit(code)


def describe(exc: SessionMgrError) -> str:
    """The error's own message, plus what to do about it when the message does not say."""
    text = str(exc)
    if isinstance(exc, NoCreditsError):  # the body and URL add nothing a person can act on
        return f"{exc.args[0]} [HTTP 402]"
    if isinstance(exc, AuthError) and ENV_API_KEY not in text:
        return f"{text}: check --api-key / {ENV_API_KEY}"
    if isinstance(exc, CreateOutcomeUnknown):
        return (
            f"{text}: the session may exist; its record stays pending and "
            "`sessionmgr reconcile` resolves it"
        )
    if isinstance(exc, TransportError) and ENV_API_URL not in text:
        return f"LemonSlice API unreachable: {text} (check --api-url / {ENV_API_URL})"
    return text


def exit_for(exc: Exception) -> tuple[str, int] | None:
    """The one-line message and exit code for an expected failure; None for a bug."""
    if isinstance(exc, SessionNotFound):
        return str(exc), EXIT_NOT_FOUND
    if isinstance(exc, ConfigurationError | InvalidArgument):
        return str(exc), EXIT_USAGE
    if isinstance(exc, SessionMgrError):  # LemonSliceError, DatabaseError and the rest
        return describe(exc), EXIT_FAILURE
    if isinstance(exc, SQLAlchemyError):  # not translated by the repository: still one line
        orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        return f"database error: {orig}", EXIT_FAILURE
    if isinstance(exc, OSError):
        return str(exc), EXIT_FAILURE
    return None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning sessionmgr's errors into one-line messages and exit codes."""
    try:
        return asyncio.run(coro)
    except Exception as exc:
        expected = exit_for(exc)
        if expected is None:
            raise
        fail(*expected)


class SessionMgrGroup(click.Group):
    """A group whose usage errors are one ``error:`` line naming the help to read."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        click_main: Callable[..., Any] = super().main
        if not kwargs.pop("standalone_mode", True):
            return click_main(*args, standalone_mode=False, **kwargs)
        SECRETS.clear()
        try:
            rv = click_main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            fail(f"{exc.format_message()}{hint}", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", EXIT_FAILURE)
        except Exception as exc:  # raised outside run(), e.g. by a check before it
            expected = exit_for(exc)
            if expected is None:
                raise
            fail(*expected)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK)


@click.group(
    cls=SessionMgrGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 ok, 1 runtime failure (API down, database error), 2 usage error, "
    "3 not found, 4 partial (some sessions of a batch could not be ended).",
)
@click.option(
    "--database-url",
    envvar=ENV_DATABASE_URL,
    show_envvar=True,
    help="SQLAlchemy URL of the session database [default: sqlite+aiosqlite:///./sessionmgr.db].",
)
@click.option("--api-url", envvar=ENV_API_URL, show_envvar=True, help="LemonSlice sessions URL.")
@click.option(
    "--api-key",
    envvar=ENV_API_KEY,
    show_envvar=True,
    help="LemonSlice API key (never echoed; on a command line it shows in `ps`: prefer the file).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File holding the LemonSlice API key [env var: {config.ENV_API_KEY_FILE}].",
)
@click.option(
    "-v", "--verbose", count=True, help="Log progress (-v) or everything (-vv) on stderr."
)
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
    api_key_file: Path | None,
    verbose: int,
    log_format: str,
) -> None:
    """Manage LemonSlice avatar sessions with persistence.

    Flags win over environment variables, which win over defaults.
    """
    configure_logging(level=LOG_LEVELS[min(verbose, 2)], fmt=log_format, stream=sys.stderr)
    try:
        api_key = secret_flag(ctx, "api_key", api_key, api_key_file, f" or {ENV_API_KEY}")
        settings = Settings.from_env(api_key=api_key, api_url=api_url, database_url=database_url)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    if settings.api_key:
        SECRETS.add(settings.api_key)
    with contextlib.suppress(ConfigurationError):
        password = db.normalize_url(settings.database_url).password
        if password:
            SECRETS.add(str(password))
    ctx.obj = CliContext(settings=settings, verbose=verbose, log_format=log_format)


def secret_flag(
    ctx: click.Context, name: str, value: str | None, path: Path | None, also: str = ""
) -> str | None:
    """A secret from ``--NAME VALUE`` or ``--NAME-file PATH``. The file keeps it out of ``ps``
    and shell histories, so the plain flag still works but says so on stderr."""
    flag = "--" + name.replace("_", "-")
    on_command_line = ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    if path is not None:
        if on_command_line:
            raise click.UsageError(f"give {flag} or {flag}-file, not both")
        return config.read_secret_file(path, f"{flag}-file")
    if on_command_line and value:
        click.echo(
            f"warning: {flag} shows in `ps` and shell history: use {flag}-file{also} instead",
            err=True,
        )
    return value


# --- what the commands share ----------------------------------------------------------------
# Commands (cli_sessions, cli_queries, cli_cleanup, cli_serve, cli_db) drive the library
# (repository, manager, reaper); here is what they share: opening the database and batch results.
# Parameter types live in cli_params, output (tables, JSON, CSV, progress) in cli_output.

WALK_PAGE = 500  # rows per query when a command walks every match (end-all)
END_CONCURRENCY = config.REAPER_CONCURRENCY  # terminate requests in flight in end/end-all
PRUNE_BATCH = 1000  # rows deleted per transaction by `prune`
MAX_ERRORS_SHOWN = 5  # error lines a batch command prints before summarising the rest
DRY_RUN_API_KEY = "dry-run-no-key"  # dry runs never call the API, but the client wants a key


# --- opening the database and the manager ----------------------------------------------------


def require_database(settings: Settings) -> None:
    """Read and admin commands never create a database file by accident."""
    path = db.sqlite_path(db.normalize_url(settings.database_url))
    if path is not None and str(path) not in ("", ":memory:") and not path.exists():
        raise DatabaseError(
            f"no database at {path}: run `sessionmgr db upgrade` (or check --database-url)"
        )


def require_api_key(settings: Settings) -> None:
    if not settings.api_key:
        raise ConfigurationError(f"no LemonSlice API key: set {ENV_API_KEY} or pass --api-key")


@contextlib.asynccontextmanager
async def open_repository(settings: Settings) -> AsyncIterator[SessionRepository]:
    require_database(settings)
    repo = await SessionRepository.open(settings.database_url)
    try:
        yield repo
    finally:
        await repo.close()


@contextlib.asynccontextmanager
async def open_manager(
    settings: Settings,
    *,
    needs_api: bool = True,
    concurrency: int | None = None,
    on_ended: Callable[[SessionRecord], Awaitable[None]] | None = None,
) -> AsyncIterator[SessionManager]:
    """A manager without a background reaper: commands drive it by hand."""
    require_database(settings)
    if needs_api:
        require_api_key(settings)
    manager = SessionManager(
        database_url=settings.database_url,
        api_key=settings.api_key or DRY_RUN_API_KEY,
        api_url=settings.api_url,
        idle_window=settings.idle_window,
        max_age=settings.max_age,
        reaper=False,
        reaper_concurrency=concurrency or settings.reaper_concurrency,
        lease=settings.lease,
        on_ended=on_ended,
    )
    async with manager:
        yield manager


# --- batch results ---------------------------------------------------------------------------


@dataclasses.dataclass
class EndOutcome:
    """What ending one session of a batch came to."""

    session_ref: str
    outcome: str  # ended | unchanged | busy | failed | not_found
    message: str
    record: SessionRecord | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_ref": self.session_ref,
            "outcome": self.outcome,
            "message": self.message,
            "session": self.record.to_dict() if self.record else None,
        }


def batch_exit_code(*, done: int, failed: int, not_found: int) -> int:
    """1 when nothing could be done, 4 when only part of it, 3 for unknown ids, else 0."""
    if failed:
        return EXIT_PARTIAL if done else EXIT_FAILURE
    return EXIT_NOT_FOUND if not_found else EXIT_OK


async def end_many(
    manager: SessionManager,
    session_refs: Sequence[str],
    *,
    reason: EndReason,
    concurrency: int,
    advance: Callable[[int], None],
) -> list[EndOutcome]:
    gate = asyncio.Semaphore(concurrency)

    async def end_one(session_ref: str) -> EndOutcome:
        async with gate:
            try:
                result = await manager.end_session(session_ref, reason=reason)
            except SessionNotFound as exc:
                return EndOutcome(session_ref, "not_found", str(exc), None)
            except SessionMgrError as exc:  # terminate failed (rescheduled) or still pending
                record = await manager.repository.find(session_ref)
                message = describe(exc)
                if record is not None and record.status is SessionStatus.ENDING:
                    message += "; the reaper retries it"
                return EndOutcome(session_ref, "failed", message, record)
            finally:
                advance(1)
        if result.changed:
            outcome = "ended"
        elif result.record.status in FINAL_STATUSES:
            outcome = "unchanged"
        else:
            outcome = "busy"  # another process holds it and is ending it
        return EndOutcome(session_ref, outcome, result.message, result.record)

    return list(await asyncio.gather(*(end_one(k) for k in session_refs)))


def _label(outcome: EndOutcome) -> str:
    record = outcome.record
    if record is None:
        return outcome.session_ref
    return f"#{record.id} {record.session_id or '(no session_id)'}"


def report_end_outcomes(outcomes: Sequence[EndOutcome], *, as_json: bool, extra: Any = None) -> int:
    """Print results (stdout) and failures (stderr); returns the exit code of the batch."""
    if as_json:
        echo_json(extra if extra is not None else [o.to_dict() for o in outcomes])
    errors: list[str] = []
    for o in outcomes:
        if o.outcome == "not_found":
            errors.append(o.message)
        elif o.outcome == "failed":
            errors.append(f"{_label(o)}: {o.message}")
        elif not as_json:
            click.echo(f"{_label(o)}: {o.message}")
    for error in errors[:MAX_ERRORS_SHOWN]:
        click.echo(f"error: {scrub_line(error)}", err=True)
    if len(errors) > MAX_ERRORS_SHOWN:
        click.echo(f"error: ... and {len(errors) - MAX_ERRORS_SHOWN} more", err=True)
    done = sum(o.outcome in ("ended", "unchanged", "busy") for o in outcomes)
    failed = sum(o.outcome == "failed" for o in outcomes)
    not_found = sum(o.outcome == "not_found" for o in outcomes)
    if failed and len(outcomes) > 1:
        click.echo(
            f"error: {failed} of {len(outcomes)} sessions could not be ended now; "
            "the reaper retries them (see `sessionmgr list --status ending`)",
            err=True,
        )
    return batch_exit_code(done=done, failed=failed, not_found=not_found)
