"""The ``sessionmgr`` command: admin queries, cleanup jobs, ``serve`` and ``demo``.

Exit codes: 0 ok, 1 runtime failure (API down, database error), 2 usage error, 3 not found,
4 partial (some sessions of a batch could not be ended).

Every failure is one line on stderr (``error: ...``) saying what to do; tracebacks are for bugs.
Tables are for people (they fit the terminal, 80 columns when piped, no colour unless a TTY);
``--json`` is for scripts and uses the record's field names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import __version__, config, db
from .checks import MAX_PAGE, MAX_STATS_DAYS
from .cli_output import COLUMN_GAP as COLUMN_GAP
from .cli_output import CSV_FIELDS as CSV_FIELDS
from .cli_output import SHRINK_ORDER as SHRINK_ORDER
from .cli_output import URL_WIDTH as URL_WIDTH
from .cli_output import WIDE_WIDTH as WIDE_WIDTH
from .cli_output import (
    brief_table,
    due_reason,
    echo_json,
    events_table,
    human_seconds,
    iso_seconds,
    iso_time,
    new_table,
    print_out,
    print_reconcile,
    print_record,
    progress_bar,
    record_view,
    records_csv,
    records_table,
    stderr_console,
    stdin_is_tty,
    stdout_console,
)
from .cli_output import shorten as shorten
from .cli_params import (
    DURATION,
    DURATION_OR_OFF,
    KEY_JSON,
    KEY_VALUE,
    MOMENT,
    POSITIVE_DURATION,
    json_option,
    off_to_none,
)
from .cli_params import Duration as Duration
from .cli_params import KeyValue as KeyValue
from .cli_params import Moment as Moment
from .client import ASPECT_RATIOS, AUDIO_SAMPLE_RATES, TRANSPORT_TYPES
from .config import ENV_API_KEY, ENV_API_URL, ENV_DATABASE_URL, ENV_LIVEKIT_TOKEN, Settings
from .errors import (
    ActivationTimeout,
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
from .parsing import DURATION_UNITS as DURATION_UNITS
from .parsing import parse_duration as parse_duration
from .reaper import Outcome, TickResult
from .reconcile import ReconcileReport
from .records import (
    Page,
    SessionEvent,
    SessionFilter,
    SessionRecord,
    Stats,
    is_secret_key,
    scrub,
)
from .repository import SORTS, SessionRepository
from .server import RECONCILE_INTERVAL, SHUTDOWN_GRACE
from .states import FINAL_STATUSES, MANUAL_REASONS, EndReason, SessionStatus

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
_SECRETS: set[str] = set()


@dataclasses.dataclass
class CliContext:
    settings: Settings
    verbose: int
    log_format: str = "text"


def _scrub(text: str) -> str:
    """One line, without any secret this invocation knows of."""
    return scrub(text, _SECRETS, one_line=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """One line on stderr, then exit: bad input never shows a traceback."""
    click.echo(f"error: {_scrub(message)}", err=True)
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
        _SECRETS.clear()
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


def latency_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, float]:
    from .testing import ENDPOINTS

    out: dict[str, float] = {}
    for value in values:
        endpoint, sep, seconds = value.partition("=")
        try:
            if not sep or endpoint not in ENDPOINTS:
                raise ValueError
            out[endpoint] = float(seconds)
            if not out[endpoint] >= 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not ENDPOINT=SECONDS with ENDPOINT one of {', '.join(ENDPOINTS)} "
                f"and SECONDS >= 0 (e.g. terminate=0.02)"
            ) from None
    return out


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
        _SECRETS.add(settings.api_key)
    with contextlib.suppress(ConfigurationError):
        password = db.normalize_url(settings.database_url).password
        if password:
            _SECRETS.add(str(password))
    ctx.obj = CliContext(settings=settings, verbose=verbose, log_format=log_format)


def main() -> None:
    cli(prog_name="sessionmgr")


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


# --- commands -------------------------------------------------------------------------------
# Admin commands drive the library (repository, manager, reaper); the helpers they share come first:
# opening the database and batch results. Parameter types live in cli_params, output (tables,
# JSON, CSV, progress) in cli_output.

LIST_LIMIT = 50  # rows per `list` page
WALK_PAGE = 500  # rows per query when a command walks every match (end-all)
END_CONCURRENCY = config.REAPER_CONCURRENCY  # terminate requests in flight in end/end-all
PRUNE_BATCH = 1000  # rows deleted per transaction by `prune`
STATS_DAYS = 7  # days of history in `stats`
MAX_ERRORS_SHOWN = 5  # error lines a batch command prints before summarising the rest
DRY_RUN_API_KEY = "dry-run-no-key"  # dry runs never call the API, but the client wants a key


# --- opening the database and the manager ----------------------------------------------------


def _require_database(settings: Settings) -> None:
    """Read and admin commands never create a database file by accident."""
    path = db.sqlite_path(db.normalize_url(settings.database_url))
    if path is not None and str(path) not in ("", ":memory:") and not path.exists():
        raise DatabaseError(
            f"no database at {path}: run `sessionmgr db upgrade` (or check --database-url)"
        )


def _require_api_key(settings: Settings) -> None:
    if not settings.api_key:
        raise ConfigurationError(f"no LemonSlice API key: set {ENV_API_KEY} or pass --api-key")


@contextlib.asynccontextmanager
async def open_repository(settings: Settings) -> AsyncIterator[SessionRepository]:
    _require_database(settings)
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
    _require_database(settings)
    if needs_api:
        _require_api_key(settings)
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

    key: str
    outcome: str  # ended | unchanged | busy | failed | not_found
    message: str
    record: SessionRecord | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "outcome": self.outcome,
            "message": self.message,
            "session": self.record.to_dict() if self.record else None,
        }


def batch_exit_code(*, done: int, failed: int, not_found: int) -> int:
    """1 when nothing could be done, 4 when only part of it, 3 for unknown ids, else 0."""
    if failed:
        return EXIT_PARTIAL if done else EXIT_FAILURE
    return EXIT_NOT_FOUND if not_found else EXIT_OK


async def _end_many(
    manager: SessionManager,
    keys: Sequence[str],
    *,
    reason: EndReason,
    concurrency: int,
    advance: Callable[[int], None],
) -> list[EndOutcome]:
    gate = asyncio.Semaphore(concurrency)

    async def end_one(key: str) -> EndOutcome:
        async with gate:
            try:
                result = await manager.end_session(key, reason=reason)
            except SessionNotFound as exc:
                return EndOutcome(key, "not_found", str(exc), None)
            except SessionMgrError as exc:  # terminate failed (rescheduled) or still pending
                record = await manager.repository.find(key)
                message = describe(exc)
                if record is not None and record.status is SessionStatus.ENDING:
                    message += "; the reaper retries it"
                return EndOutcome(key, "failed", message, record)
            finally:
                advance(1)
        if result.changed:
            outcome = "ended"
        elif result.record.status in FINAL_STATUSES:
            outcome = "unchanged"
        else:
            outcome = "busy"  # another process holds it and is ending it
        return EndOutcome(key, outcome, result.message, result.record)

    return list(await asyncio.gather(*(end_one(k) for k in keys)))


def _label(outcome: EndOutcome) -> str:
    record = outcome.record
    if record is None:
        return outcome.key
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
        click.echo(f"error: {_scrub(error)}", err=True)
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


# --- create, end, touch, adopt ---------------------------------------------------------------


@cli.command()
@click.option("--agent-id", help="ID of a LemonSlice agent.")
@click.option("--agent-image-url", help="URL of an agent image.")
@click.option(
    "--agent-image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A PNG file to animate (sent as multipart form data).",
)
@click.option("--agent-prompt", help="Prompt for the agent.")
@click.option(
    "--idle-timeout",
    type=int,
    help="Seconds LemonSlice itself waits before ending an idle session (negative: never).",
)
@click.option(
    "--audio-sample-rate",
    type=click.Choice([str(r) for r in AUDIO_SAMPLE_RATES]),
    help="Hz the avatar takes and plays audio at [default: LemonSlice's].",
)
@click.option("--model", help="LemonSlice model to run the avatar on [default: LemonSlice's].")
@click.option(
    "--transport-type",
    type=click.Choice(TRANSPORT_TYPES),
    help="daily (pipecat) or livekit [default: livekit with --livekit-url, else daily].",
)
@click.option("--daily-room-url", help="Daily room to join.")
@click.option("--daily-token", help="Daily meeting token (never stored or printed).")
@click.option("--livekit-url", help="LiveKit server URL (a livekit session).")
@click.option(
    "--livekit-token",
    envvar=ENV_LIVEKIT_TOKEN,
    show_envvar=True,
    help="LiveKit token for the avatar (never stored or printed; prefer the environment).",
)
@click.option("--livekit-session-id", help="LiveKit room session id (room SID).")
@click.option("--agent-idle-prompt", help="Prompt for the agent while it listens.")
@click.option("--aspect-ratio", type=click.Choice(ASPECT_RATIOS), help="Video aspect ratio.")
@click.option(
    "--response-done-timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds."
)
@click.option("--simulcast/--no-simulcast", default=None, help="Simulcast video (livekit only).")
@click.option("--enable-recording", is_flag=True, default=None, help="Record the session.")
@click.option("--recordings-bucket", help="Where recordings go (with --enable-recording).")
@click.option(
    "--daily-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the Daily meeting token (keeps it out of `ps`).",
)
@click.option(
    "--property",
    "properties",
    type=KEY_JSON,
    multiple=True,
    help="Connection property KEY=VALUE (repeatable; JSON values allowed).",
)
@click.option(
    "--extra",
    type=KEY_JSON,
    multiple=True,
    help="Extra top-level request field KEY=VALUE (repeatable; JSON values allowed).",
)
@click.option(
    "--idle-window", type=POSITIVE_DURATION, help="Idle time before the reaper ends it (e.g. 5m)."
)
@click.option("--max-age", type=POSITIVE_DURATION, help="Longest life before the reaper ends it.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE stored with it.")
@click.option(
    "--wait-active",
    type=POSITIVE_DURATION,
    help="Then wait up to this long while LemonSlice keeps it QUEUED (e.g. 3m).",
)
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def create(
    obj: CliContext,
    agent_id: str | None,
    agent_image_url: str | None,
    agent_image: Path | None,
    agent_prompt: str | None,
    idle_timeout: int | None,
    audio_sample_rate: str | None,
    model: str | None,
    transport_type: str | None,
    daily_room_url: str | None,
    daily_token: str | None,
    livekit_url: str | None,
    livekit_token: str | None,
    livekit_session_id: str | None,
    agent_idle_prompt: str | None,
    aspect_ratio: str | None,
    response_done_timeout: float | None,
    simulcast: bool | None,
    enable_recording: bool | None,
    recordings_bucket: str | None,
    daily_token_file: Path | None,
    properties: tuple[tuple[str, Any], ...],
    extra: tuple[tuple[str, Any], ...],
    idle_window: float | None,
    max_age: float | None,
    meta: tuple[tuple[str, str], ...],
    wait_active: float | None,
    as_json: bool,
    wide: bool,
) -> None:
    """Start a session and record it; prints the record.

    A Daily session (pipecat's payload) by default; --livekit-url, --livekit-token (or
    $SESSIONMGR_LIVEKIT_TOKEN) and --livekit-session-id make a LiveKit one.
    """
    sources = [s for s in (agent_id, agent_image_url, agent_image) if s is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --agent-id, --agent-image-url, --agent-image")
    daily_token = secret_flag(
        click.get_current_context(), "daily_token", daily_token, daily_token_file
    )
    for token in (daily_token, livekit_token):
        if token:
            _SECRETS.add(token)
    if transport_type is None:
        transport_type = "livekit" if livekit_url or livekit_token else "daily"
    for key, value in properties:
        if isinstance(value, str) and is_secret_key(key) and value:
            _SECRETS.add(value)
    image = agent_image.read_bytes() if agent_image is not None else None

    async def go() -> SessionRecord:
        async with open_manager(obj.settings) as manager:
            try:
                record = await manager.create_session(
                    agent_id=agent_id,
                    agent_image_url=agent_image_url,
                    agent_image=image,
                    agent_prompt=agent_prompt,
                    idle_timeout=idle_timeout,
                    audio_sample_rate=int(audio_sample_rate) if audio_sample_rate else None,
                    model=model,
                    daily_room_url=daily_room_url,
                    daily_token=daily_token,
                    connection_properties=dict(properties) or None,
                    extra_properties=dict(extra) or None,
                    transport_type=transport_type,
                    livekit_url=livekit_url,
                    livekit_token=livekit_token,
                    livekit_session_id=livekit_session_id,
                    agent_idle_prompt=agent_idle_prompt,
                    response_done_timeout=response_done_timeout,
                    aspect_ratio=aspect_ratio,
                    simulcast=simulcast,
                    enable_recording=enable_recording,
                    recordings_bucket=recordings_bucket,
                    idle_window=idle_window,
                    max_age=max_age,
                    metadata=dict(meta) or None,
                )
            except ValueError as exc:  # the client's own argument checks (e.g. not a PNG)
                raise click.UsageError(str(exc)) from None
            if wait_active is not None:
                try:
                    record = await manager.wait_until_active(record.id, timeout=wait_active)
                except ActivationTimeout as exc:
                    raise ActivationTimeout(
                        f"#{record.id} {record.session_id}: {exc}; it stays recorded and "
                        "guarded (`sessionmgr show` shows remote_status)",
                        last_status=exc.last_status,
                    ) from None
            return record

    record = run(go())
    print_record(record, as_json=as_json, wide=wide, now=datetime.now(UTC))


def end_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--reason`` and ``--concurrency``, shared by ``end`` and ``end-all``."""
    fn = click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=END_CONCURRENCY,
        show_default=True,
        help="Terminate requests in flight at once.",
    )(fn)
    return click.option(
        "--reason",
        type=click.Choice([r.value for r in MANUAL_REASONS]),
        default=EndReason.MANUAL.value,
        show_default=True,
        help="End reason recorded.",
    )(fn)


@cli.command()
@click.argument("session_ids", metavar="SESSION_ID...", nargs=-1, required=True)
@end_options
@json_option
@click.pass_obj
def end(
    obj: CliContext, session_ids: tuple[str, ...], reason: str, concurrency: int, as_json: bool
) -> None:
    """End sessions now.

    SESSION_ID is a local id or a LemonSlice session_id.
    Exit 3 if an id is unknown, 4 if some could not be ended (the reaper retries them), 1 if none
    could.
    """

    async def go() -> list[EndOutcome]:
        async with open_manager(obj.settings) as manager:
            with progress_bar("ending", len(session_ids)) as advance:
                return await _end_many(
                    manager,
                    list(dict.fromkeys(session_ids)),
                    reason=EndReason(reason),
                    concurrency=concurrency,
                    advance=advance,
                )

    code = report_end_outcomes(run(go()), as_json=as_json)
    sys.exit(code)


@cli.command()
@click.argument("session_ids", metavar="SESSION_ID...", nargs=-1, required=True)
@json_option
@click.pass_obj
def touch(obj: CliContext, session_ids: tuple[str, ...], as_json: bool) -> None:
    """Record activity now for active sessions.

    SESSION_ID is a local id or a LemonSlice session_id.
    Exit 3 if any id is unknown; sessions that are not active are reported and left alone.
    """

    async def go() -> tuple[list[SessionRecord], list[SessionRecord], list[str]]:
        async with open_repository(obj.settings) as repo:
            found: dict[str, SessionRecord] = {}
            unknown: list[str] = []
            for key in dict.fromkeys(session_ids):
                record = await repo.find(key)
                if record is None:
                    unknown.append(key)
                else:
                    found[key] = record
            wanted = [
                r.session_id
                for r in found.values()
                if r.status is SessionStatus.ACTIVE and r.session_id is not None
            ]
            touched_ids = await repo.touch_many(wanted) if wanted else set()
            touched = [r for r in found.values() if r.session_id in touched_ids]
            idle = [r for r in found.values() if r.session_id not in touched_ids]
            return touched, idle, unknown

    touched, not_active, unknown = run(go())
    if as_json:
        echo_json(
            {
                "touched": [r.to_dict() for r in touched],
                "not_active": [r.to_dict() for r in not_active],
                "unknown": unknown,
            }
        )
    else:
        for r in touched:
            click.echo(f"#{r.id} {r.session_id}: touched")
    for r in not_active:
        label = r.session_id or "(no session_id)"
        click.echo(f"warning: #{r.id} {label} is {r.status}, not touched", err=True)
    for key in unknown:
        click.echo(
            f"error: no session with id or session_id {key!r}: see `sessionmgr list`", err=True
        )
    sys.exit(EXIT_NOT_FOUND if unknown else EXIT_OK)


@cli.command()
@click.argument("session_id")
@click.option("--agent-prompt", help="Replace the prompt that steers the avatar as it speaks.")
@click.option("--idle-prompt", help="Replace the prompt that steers the avatar as it listens.")
@click.option("--image-url", help="Show this image instead.")
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Show this PNG instead (at most 900 KB).",
)
@click.option("--action", "action", metavar="NAME", help="Trigger a pose or action by name.")
@click.option("--reset-idle-timeout", is_flag=True, help="Restart LemonSlice's idle clock.")
@json_option
@click.pass_obj
def control(
    obj: CliContext,
    session_id: str,
    agent_prompt: str | None,
    idle_prompt: str | None,
    image_url: str | None,
    image: Path | None,
    action: str | None,
    reset_idle_timeout: bool,
    as_json: bool,
) -> None:
    """Send one control event to an active session; recorded as a `control` event.

    SESSION_ID is a local id or a LemonSlice session_id. Exit 1 if the session is not active (or
    LemonSlice no longer has it: then it is recorded as ended), 3 if the id is unknown.
    """
    given = {
        "--agent-prompt": agent_prompt is not None,
        "--idle-prompt": idle_prompt is not None,
        "--image-url": image_url is not None,
        "--image": image is not None,
        "--action": action is not None,
        "--reset-idle-timeout": reset_idle_timeout,
    }
    if sum(given.values()) != 1:
        raise click.UsageError(f"give exactly one of {', '.join(given)}")
    png = image.read_bytes() if image is not None else None

    async def go() -> SessionRecord:
        async with open_manager(obj.settings) as manager:
            try:
                if agent_prompt is not None:
                    return await manager.update_agent_prompt(session_id, agent_prompt)
                if idle_prompt is not None:
                    return await manager.update_idle_prompt(session_id, idle_prompt)
                if image_url is not None or png is not None:
                    return await manager.update_image(session_id, image_url=image_url, image=png)
                if action is not None:
                    return await manager.trigger_action(session_id, action)
                return await manager.reset_idle_timeout(session_id)
            except InvalidArgument:
                raise
            except ValueError as exc:  # the client's own checks: not a PNG, over 900 KB
                raise click.UsageError(str(exc)) from None

    record = run(go())
    sent = next(flag for flag, on in given.items() if on).lstrip("-")
    if as_json:
        echo_json({"sent": sent, "session": record.to_dict()})
    else:
        click.echo(f"#{record.id} {record.session_id}: {sent} sent")


@cli.command()
@click.argument("session_id")
@click.option("--control-url", help="Its control URL [default: derived from --api-url].")
@click.option("--room-url", help="Its room URL, for the record.")
@click.option("--agent-id", help="The agent it runs, for the record.")
@click.option("--idle-window", type=POSITIVE_DURATION, help="Idle time before the reaper ends it.")
@click.option("--max-age", type=POSITIVE_DURATION, help="Longest life before the reaper ends it.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE stored with it.")
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def adopt(
    obj: CliContext,
    session_id: str,
    control_url: str | None,
    room_url: str | None,
    agent_id: str | None,
    idle_window: float | None,
    max_age: float | None,
    meta: tuple[tuple[str, str], ...],
    as_json: bool,
    wide: bool,
) -> None:
    """Guard a session created elsewhere.

    For sessions started outside sessionmgr (e.g. by pipecat's own transport). The reaper
    then ends it like any other once it is idle or too old.
    """

    async def go() -> tuple[SessionRecord, bool]:
        async with open_manager(obj.settings) as manager:
            known = await manager.repository.find(session_id)
            record = await manager.adopt_session(
                session_id,
                control_url,
                room_url,
                idle_window=idle_window,
                max_age=max_age,
                agent_id=agent_id,
                metadata=dict(meta) or None,
            )
            return record, known is None

    record, adopted = run(go())
    if not as_json:
        click.echo(f"adopted as #{record.id}" if adopted else f"already known as #{record.id}")
    print_record(record, as_json=as_json, wide=wide, now=datetime.now(UTC))


# --- list, show, stats -----------------------------------------------------------------------


@cli.command(name="list")
@click.option(
    "--status",
    "statuses",
    type=click.Choice([s.value for s in SessionStatus]),
    multiple=True,
    help="Only this status (repeatable).",
)
@click.option("--agent-id", help="Only this agent.")
@click.option("--since", type=MOMENT, help="Created at or after (ISO time, or e.g. 2h, 7d ago).")
@click.option("--until", type=MOMENT, help="Created before (ISO time, or e.g. 2h, 7d ago).")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE (repeatable: all).")
@click.option("--idle-for", type=DURATION, help="No activity for at least this long (e.g. 10m).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_PAGE),
    default=LIST_LIMIT,
    show_default=True,
    help="Rows per page.",
)
@click.option("--after", metavar="CURSOR", help="Next page: the cursor the last page printed.")
@click.option(
    "--sort",
    type=click.Choice(tuple(SORTS)),
    default="-created_at",
    show_default=True,
    help="Order ('-' = descending; last_activity_at = idle longest first).",
)
@click.option("--json", "fmt", flag_value="json", help="One JSON array.")
@click.option("--jsonl", "fmt", flag_value="jsonl", help="One JSON object per line.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header row.")
@click.option("--wide", is_flag=True, help="Every column, nothing truncated.")
@click.pass_obj
def list_(
    obj: CliContext,
    statuses: tuple[str, ...],
    agent_id: str | None,
    since: datetime | None,
    until: datetime | None,
    meta: tuple[tuple[str, str], ...],
    idle_for: float | None,
    limit: int,
    after: str | None,
    sort: str,
    fmt: str | None,
    wide: bool,
) -> None:
    """List sessions, newest first.

    When there are more rows than --limit, the cursor of the next page is printed on stderr.
    """
    flt = SessionFilter(
        statuses=[SessionStatus(s) for s in statuses] or None,
        agent_id=agent_id,
        created_after=since,
        created_before=until,
        meta=dict(meta),
        idle_for=idle_for,
    )

    async def go() -> tuple[Page, datetime]:
        async with open_repository(obj.settings) as repo:
            try:
                page = await repo.list(flt, limit=limit, after=after, sort=sort)
            except ValueError as exc:  # a damaged cursor, a filter no database can hold
                raise click.UsageError(str(exc)) from None
            return page, repo.clock.now()

    page, now = run(go())
    if fmt == "json":
        echo_json([r.to_dict() for r in page.items])
    elif fmt == "jsonl":
        for r in page.items:
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False, default=str))
    elif fmt == "csv":
        click.echo(records_csv(page.items), nl=False)
    elif page.items:
        width = None if wide else stdout_console().width
        print_out(records_table(page.items, now, width=width), wide=wide)
    else:
        click.echo("no sessions match", err=True)
    if page.next_cursor:
        click.echo(f"more: add --after {page.next_cursor}", err=True)


@cli.command()
@click.argument("session_id")
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def show(obj: CliContext, session_id: str, as_json: bool, wide: bool) -> None:
    """One session and its lifecycle events.

    SESSION_ID is a local id or a LemonSlice session_id. Exit 3 if unknown.
    """

    async def go() -> tuple[SessionRecord, list[SessionEvent], datetime]:
        async with open_repository(obj.settings) as repo:
            record = await repo.get(session_id)
            return record, await repo.events(record.id), repo.clock.now()

    record, events, now = run(go())
    if as_json:
        echo_json({**record.to_dict(), "events": [e.to_dict() for e in events]})
        return
    print_out(
        record_view(record, now, wide=wide),
        "",
        events_table(events) if events else "no events",
        wide=wide,
    )


@cli.command()
@click.option(
    "--days",
    type=click.IntRange(1, MAX_STATS_DAYS),
    default=STATS_DAYS,
    show_default=True,
    help="Days of per-day history (UTC).",
)
@json_option
@click.pass_obj
def stats(obj: CliContext, days: int, as_json: bool) -> None:
    """Counts, live sessions, durations and credits.

    Sessions per status, the oldest live one, sessions created and ended per UTC day, duration
    percentiles and credits of the sessions that ended in the last --days.
    """

    async def go() -> tuple[Stats, datetime]:
        async with open_repository(obj.settings) as repo:
            return await repo.stats(days=days), repo.clock.now()

    result, now = run(go())
    if as_json:
        echo_json(result.to_dict())
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(
        "sessions",
        "  ".join(f"{s.value} {result.by_status.get(s.value, 0)}" for s in SessionStatus),
    )
    grid.add_row("live now", str(result.live))
    oldest = result.oldest_live
    if oldest is not None:
        age = human_seconds((now - oldest.created_at).total_seconds())
        grid.add_row(
            "oldest live",
            Text(
                f"#{oldest.id} {oldest.session_id or '(pending)'} {oldest.agent_id or ''} "
                f"created {iso_seconds(oldest.created_at)} ({age} ago)"
            ),
        )
    else:
        grid.add_row("oldest live", "-")

    def dur(value: float | None) -> str:
        return "-" if value is None else human_seconds(value)

    grid.add_row(
        f"duration p50/p95 ({days}d)",
        f"{dur(result.duration_p50)} / {dur(result.duration_p95)}",
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.end_reasons.items()))
    grid.add_row(f"end reasons ({days}d)", reasons or "-")
    grid.add_row(
        f"credits known ({days}d)",
        f"{result.credits_known:g}"
        + (f" ({result.cost_unknown} ended without a cost yet)" if result.cost_unknown else ""),
    )
    table = new_table()
    table.add_column("DAY (UTC)", no_wrap=True)
    for name in ("CREATED", "ENDED", "CREDITS"):
        table.add_column(name, justify="right", no_wrap=True)
    for d in result.per_day:
        table.add_row(
            d.day.isoformat(),
            str(d.created),
            str(d.ended),
            "-" if d.credits is None else f"{d.credits:g}",
        )
    print_out(grid, "", table)


# --- reap, end-all, reconcile, prune ---------------------------------------------------------


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what is due; end nothing.")
@click.option(
    "--concurrency", type=click.IntRange(min=1), help="Terminate requests in flight at once."
)
@json_option
@click.pass_obj
def reap(obj: CliContext, dry_run: bool, concurrency: int | None, as_json: bool) -> None:
    """End every due session now: one reaper pass, for cron.

    Due means past its idle window or its max age.
    Safe beside `serve` and other reaps: each session is ended once. Exit 4 if some due sessions
    could not be ended (they stay due and are retried), 1 if none could.
    """
    ended: list[SessionRecord] = []

    async def go() -> tuple[TickResult, list[SessionRecord], datetime]:
        with progress_bar("reaping", None) as advance:

            async def on_ended(record: SessionRecord) -> None:
                ended.append(record)
                advance(1)

            async with open_manager(
                obj.settings, needs_api=not dry_run, concurrency=concurrency, on_ended=on_ended
            ) as manager:
                result = await manager.reaper.run_once(dry_run=dry_run)
                failed = [
                    await manager.repository.find(r.id) or r
                    for r in result.outcomes[Outcome.RESCHEDULED]
                ]
                return result, failed, manager.clock.now()

    result, failed, now = run(go())
    if dry_run:
        due = result.due
        if as_json:
            echo_json({"dry_run": True, "due": [r.to_dict() for r in due]})
        elif due:
            print_out(brief_table([(r, due_reason(r, now)) for r in due], now, "REASON"))
            click.echo(f"would end {len(due)} session(s)")
        else:
            click.echo("nothing due")
        return
    lost = result.outcomes[Outcome.LOST]
    if as_json:
        echo_json(
            {
                "dry_run": False,
                "ended": [r.to_dict() for r in ended],
                "failed": [r.to_dict() for r in failed],
                "lost": [r.to_dict() for r in lost],
            }
        )
    else:
        if ended:
            rows = [(r, str(r.end_reason or "")) for r in ended]
            print_out(brief_table(rows, now, "REASON"))
        by_reason = collections.Counter(str(r.end_reason) for r in ended)
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
        click.echo(f"ended {len(ended)} session(s)" + (f" ({detail})" if detail else ""))
        if lost:
            click.echo(f"{len(lost)} taken over by another process")
    if result.auth_failed:
        fail(
            "LemonSlice rejected the API key; due sessions stay due: fix --api-key / "
            f"{ENV_API_KEY}",
            EXIT_FAILURE,
        )
    if failed:
        errors = {r.last_error for r in failed if r.last_error}
        sample = f": {_scrub(sorted(errors)[0])}" if errors else ""
        fail(
            f"{len(failed)} due session(s) could not be ended now and will be retried{sample}",
            EXIT_PARTIAL if ended else EXIT_FAILURE,
        )


@cli.command(name="end-all")
@click.option(
    "--status",
    "statuses",
    type=click.Choice([SessionStatus.ACTIVE.value, SessionStatus.ENDING.value]),
    multiple=True,
    help="Only this status (repeatable) [default: active and ending].",
)
@click.option("--agent-id", help="Only this agent.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE (repeatable: all).")
@click.option("--dry-run", is_flag=True, help="Only list what would be ended.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@end_options
@json_option
@click.pass_obj
def end_all(
    obj: CliContext,
    statuses: tuple[str, ...],
    agent_id: str | None,
    meta: tuple[tuple[str, str], ...],
    dry_run: bool,
    yes: bool,
    reason: str,
    concurrency: int,
    as_json: bool,
) -> None:
    """End every matching live session.

    Asks first unless --yes or --dry-run.
    Without a terminal to ask on, it refuses unless --yes. Exit 4 if some could not be ended.
    """
    flt = SessionFilter(
        statuses=[SessionStatus(s) for s in statuses]
        or [SessionStatus.ACTIVE, SessionStatus.ENDING],
        agent_id=agent_id,
        meta=dict(meta),
    )

    async def go() -> tuple[list[SessionRecord], list[EndOutcome] | None]:
        async with open_manager(obj.settings, needs_api=not dry_run) as manager:
            matches: list[SessionRecord] = []
            cursor: str | None = None
            while True:
                page = await manager.repository.list(
                    flt, limit=WALK_PAGE, after=cursor, sort="created_at"
                )
                matches.extend(page.items)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            if dry_run or not matches:
                return matches, None
            if not yes:
                if not stdin_is_tty():
                    fail(
                        f"refusing to end {len(matches)} session(s) without confirmation: "
                        "pass --yes (or --dry-run to list them)",
                        EXIT_USAGE,
                    )
                if not click.confirm(f"End {len(matches)} live session(s)?", err=True):
                    fail("aborted: nothing ended", EXIT_FAILURE)
            with progress_bar("ending", len(matches)) as advance:
                outcomes = await _end_many(
                    manager,
                    [str(r.id) for r in matches],
                    reason=EndReason(reason),
                    concurrency=concurrency,
                    advance=advance,
                )
            return matches, outcomes

    matches, outcomes = run(go())
    if outcomes is None:
        if as_json:
            echo_json(
                {
                    "dry_run": dry_run,
                    "matched": len(matches),
                    "results": [],
                    "would_end": [r.to_dict() for r in matches],
                }
            )
        elif matches:
            rows = [(r, str(r.status)) for r in matches]
            print_out(brief_table(rows, datetime.now(UTC), "STATUS"))
            click.echo(f"would end {len(matches)} session(s)")
        else:
            click.echo("no live sessions match")
        return
    payload = {
        "dry_run": False,
        "matched": len(matches),
        "results": [o.to_dict() for o in outcomes],
        "would_end": [],
    }
    code = report_end_outcomes(outcomes, as_json=as_json, extra=payload)
    if not as_json:
        ended = sum(o.outcome == "ended" for o in outcomes)
        click.echo(f"ended {ended} of {len(matches)} session(s)")
    sys.exit(code)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report only; change nothing locally or remotely.")
@click.option(
    "--end-orphans",
    is_flag=True,
    help="Also end live remote sessions this database does not know (they may be another "
    "system's: only if this API key is yours alone).",
)
@json_option
@click.pass_obj
def reconcile(obj: CliContext, dry_run: bool, end_orphans: bool, as_json: bool) -> None:
    """Compare the database with LemonSlice and repair it.

    Records remote status and cost of live sessions, ends the ones LemonSlice already finished,
    resolves creates whose answer was lost, terminates again sessions ended here that LemonSlice
    still lists as live, and reports remote sessions unknown here (orphans).
    Exit 4 if some checks failed, 1 if the API could not be used at all.
    """

    async def go() -> ReconcileReport:
        async with open_manager(obj.settings) as manager:
            return await manager.reconcile(dry_run=dry_run, end_orphans=end_orphans)

    report = run(go())
    errors = [_scrub(e) for e in report.errors]
    nothing_done = not (report.checked or report.adopted or report.orphans or report.still_live)
    if as_json:
        echo_json(report.to_dict())
    elif not (errors and nothing_done):
        print_reconcile(report, end_orphans=end_orphans)
    if errors and nothing_done:  # the API could not be used at all: one line says why
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        fail(f"{errors[0]}{more}", EXIT_FAILURE)
    if errors:
        for error in errors[:MAX_ERRORS_SHOWN]:
            click.echo(f"error: {error}", err=True)
        if len(errors) > MAX_ERRORS_SHOWN:
            click.echo(f"error: ... and {len(errors) - MAX_ERRORS_SHOWN} more", err=True)
        sys.exit(EXIT_PARTIAL)


@cli.command()
@click.option(
    "--older-than",
    type=POSITIVE_DURATION,
    required=True,
    help="Delete ended/failed sessions that ended longer ago than this (e.g. 30d).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=PRUNE_BATCH,
    show_default=True,
    help="Rows deleted per transaction.",
)
@json_option
@click.pass_obj
def prune(
    obj: CliContext, older_than: float, dry_run: bool, batch_size: int, as_json: bool
) -> None:
    """Delete old ended and failed sessions.

    Their lifecycle events go with them. Rows are deleted in batches, so a running backend
    never waits long.
    """

    async def go() -> tuple[int, datetime]:
        async with open_repository(obj.settings) as repo:
            cutoff = repo.clock.now() - timedelta(seconds=older_than)
            total: int | None = None
            if not dry_run and stderr_console().is_terminal:  # a bar needs its total first
                total = await repo.prune(older_than=cutoff, batch_size=batch_size, dry_run=True)
            with progress_bar("pruning", total) as advance:
                done = 0

                def progress(deleted_so_far: int) -> None:
                    nonlocal done
                    advance(deleted_so_far - done)
                    done = deleted_so_far

                count = await repo.prune(
                    older_than=cutoff, batch_size=batch_size, dry_run=dry_run, progress=progress
                )
            return count, cutoff

    count, cutoff = run(go())
    if as_json:
        echo_json({"dry_run": dry_run, "older_than": iso_time(cutoff), "pruned": count})
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{verb} {count} session(s) that ended before {iso_seconds(cutoff)}")


# --- serve, demo -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--idle-window",
    type=POSITIVE_DURATION,
    help=f"Idle time before a session ends [default: {config.env_var('idle_window')}, else "
    f"{human_seconds(config.IDLE_WINDOW)}].",
)
@click.option(
    "--max-age",
    type=DURATION_OR_OFF,
    help=f"Longest life of a session, 'off' for none [default: {config.env_var('max_age')}, else "
    f"{human_seconds(config.MAX_AGE)}].",
)
@click.option(
    "--interval",
    type=POSITIVE_DURATION,
    help=f"Time between reaper ticks [default: {config.env_var('reaper_interval')}, else "
    f"{human_seconds(config.REAPER_INTERVAL)}].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help=f"Terminates in flight at once [default: {config.env_var('reaper_concurrency')}, else "
    f"{config.REAPER_CONCURRENCY}].",
)
@click.option(
    "--lease",
    type=POSITIVE_DURATION,
    help=f"How long a claim is held before another process may take it over [default: "
    f"{config.env_var('lease')}, else {human_seconds(config.LEASE)}].",
)
@click.option(
    "--reconcile-every",
    type=DURATION_OR_OFF,
    default=f"{RECONCILE_INTERVAL:g}s",
    show_default=True,
    help="Time between reconcile passes ('off': never).",
)
@click.option(
    "--grace",
    type=POSITIVE_DURATION,
    default=f"{SHUTDOWN_GRACE:g}s",
    show_default=True,
    help="How long in-flight terminates may finish after SIGTERM.",
)
@click.option(
    "--host",
    envvar=config.ENV_HTTP_HOST,
    show_envvar=True,
    help=f"Address for HTTP (health, metrics, API, dashboard) [default: {config.HTTP_HOST}]; "
    f"beyond loopback only with {config.ENV_ADMIN_TOKEN} set.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    envvar=config.ENV_HTTP_PORT,
    show_envvar=True,
    help=f"HTTP port [default: {config.HTTP_PORT}]; 0 picks a free one (see the log line).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help=f"A Host name HTTP answers to besides its address and localhost (repeatable) "
    f"[env var: {config.ENV_ALLOWED_HOSTS}, comma-separated].",
)
@click.pass_obj
def serve(
    obj: CliContext,
    idle_window: float | None,
    max_age: float | None,
    interval: float | None,
    concurrency: int | None,
    lease: float | None,
    reconcile_every: float,
    grace: float,
    host: str | None,
    port: int | None,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Run the reaper and the HTTP side until SIGTERM: the long-running process.

    Migrates the database first, then ends due sessions every --interval, reconciles with
    LemonSlice every --reconcile-every and answers HTTP on --host/--port (/healthz, /metrics,
    /api/..., the dashboard at /); logs at INFO on stderr. With SESSIONMGR_ADMIN_TOKEN set,
    every route but /healthz and the dashboard's page needs it; without, reads are open and
    changes off.
    """
    from .server import check_http_exposure
    from .server import serve as serve_forever  # the module's name is taken by this command

    _require_api_key(obj.settings)
    if obj.settings.admin_token:
        _SECRETS.add(obj.settings.admin_token)
    changes: dict[str, Any] = {
        "idle_window": idle_window,
        "reaper_interval": interval,
        "reaper_concurrency": concurrency,
        "lease": lease,
        "http_host": host,
        "http_port": port,
        "allowed_hosts": allowed_hosts or None,
    }
    settings = dataclasses.replace(
        obj.settings, **{k: v for k, v in changes.items() if v is not None}
    )
    if max_age is not None:
        settings = dataclasses.replace(settings, max_age=off_to_none(max_age))
    check_http_exposure(settings.http_host, settings.admin_token)
    configure_logging(
        level=logging.DEBUG if obj.verbose else logging.INFO, fmt=obj.log_format, stream=sys.stderr
    )
    run(serve_forever(settings, reconcile_interval=off_to_none(reconcile_every), grace=grace))


@cli.command()
@click.option(
    "--database",
    type=click.Path(dir_okay=False, path_type=Path),
    default="sessionmgr-demo.db",
    show_default=True,
    help="SQLite file the demo writes (replaced if it exists).",
)
def demo(database: Path) -> None:
    """Watch the whole loop against a local fake LemonSlice.

    No API key and no network needed; writes a SQLite file you can query afterwards.
    """
    from .demo import run_demo

    run(run_demo(database, stdout_console()))


# --- fake-server -----------------------------------------------------------------------------


@cli.command(name="fake-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0: any free port."
)
@click.option(
    "--api-key",
    "fake_key",
    help="The key the fake accepts [default: the global --api-key / LEMONSLICE_API_KEY, "
    "else test-key].",
)
@click.option(
    "--latency",
    "latency",
    multiple=True,
    metavar="ENDPOINT=SECONDS",
    callback=latency_option,
    help="Added latency per endpoint (create, get, list, terminate); repeatable.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Load sessions from this JSON file at start; write the state there while running "
    "and on exit.",
)
@click.option(
    "--queue-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    help="New sessions stay QUEUED this long (a cold start); create still answers at once.",
)
@click.option(
    "--server-timeouts/--no-server-timeouts",
    default=False,
    help="End sessions by themselves: idle_timeout (TIMED_OUT) and the 30-minute cap.",
)
@click.option(
    "--hold-create",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds a create's answer is held after its session started (a slow create).",
)
@click.pass_obj
def fake_server(
    obj: CliContext,
    host: str,
    port: int,
    fake_key: str | None,
    latency: dict[str, float],
    state_file: Path | None,
    queue_seconds: float,
    server_timeouts: bool,
    hold_create: float,
) -> None:
    """Run a local fake LemonSlice (for tests, benchmarks and demos) until SIGTERM/SIGINT.

    Prints one line, `fake-server listening on <url>`, where <url> is the sessions collection
    URL to use as LEMONSLICE_API_URL. JSON admin routes live under /_fake/ (state, faults,
    latency, realism, sessions/<id>/status, expire_idle, reset).
    """
    import signal

    from .testing import LISTENING_PREFIX, FakeLemonSlice

    fake = FakeLemonSlice(
        api_key=fake_key or obj.settings.api_key or "test-key",
        host=host,
        port=port,
        latency=latency,
        state_file=state_file,
        record_requests=False,  # a long benchmark must not grow the fake's memory
    )
    fake.configure_realism(
        queue_seconds=queue_seconds,
        server_timeouts=server_timeouts,
        hold={"create": hold_create} if hold_create else None,
    )

    async def serve_fake() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)  # not possible outside the main thread
        try:
            await fake.start()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port"
            ) from None
        try:
            click.echo(f"{LISTENING_PREFIX}{fake.url}")  # click.echo flushes
            await stop.wait()
        finally:
            await fake.stop()

    run(serve_fake())


# --- db: the schema ----------------------------------------------------------------------------


@cli.group(name="db")
def db_group() -> None:
    """The database schema: upgrade it, show its revision, check it against the code."""


@db_group.command(name="upgrade")
@click.pass_obj
def db_upgrade(obj: CliContext) -> None:
    """Create the database, or migrate it to what this version needs (safe to repeat)."""
    url = obj.settings.database_url

    async def upgrade() -> str | None:
        before = await db.current(url)
        await db.upgrade(url)
        return before

    before = run(upgrade())
    head = db.head_revision()
    where = db.safe_url(url)
    if before == head:
        click.echo(f"{where} is already at revision {head}")
    else:
        click.echo(f"{where} upgraded from {before or 'an empty database'} to revision {head}")


@db_group.command(name="current")
@click.pass_obj
def db_current(obj: CliContext) -> None:
    """Show the schema revision of the database, and whether it is the one the code needs."""
    at = run(db.current(obj.settings.database_url))
    head = db.head_revision()
    if at == head:
        click.echo(f"{at} (head)")
    elif at is None:
        click.echo(f"none (not migrated: run `sessionmgr db upgrade` to reach {head})")
    else:
        click.echo(f"{at} (behind: the code needs {head}; run `sessionmgr db upgrade`)")


@db_group.command(name="check")
@click.pass_obj
def db_check(obj: CliContext) -> None:
    """Exit non-zero when the database is behind or its schema differs from the models."""
    url = obj.settings.database_url
    problems = run(db.check(url))
    if problems:
        for problem in problems[:-1]:
            click.echo(f"error: {problem}", err=True)
        fail(problems[-1], EXIT_FAILURE)
    click.echo(f"ok: {db.safe_url(url)} is at revision {db.head_revision()} and matches the models")
