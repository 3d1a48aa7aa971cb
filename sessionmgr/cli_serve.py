"""`sessionmgr serve`, `demo` and `fake-server`: the long-running processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import config
from .cli_app import SECRETS, CliContext, cli, require_api_key, run
from .cli_output import (
    human_seconds,
    stdout_console,
)
from .cli_params import (
    DURATION_OR_OFF,
    POSITIVE_DURATION,
    off_to_none,
)
from .errors import (
    ConfigurationError,
)
from .logs import configure_logging
from .server import RECONCILE_INTERVAL, SHUTDOWN_GRACE


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
    "--server-keepalive",
    type=POSITIVE_DURATION,
    help="Send reset-idle-timeout to a session touched through the recording proxy (a "
    "forwarded control event), at most once per this interval, so LemonSlice's own idle "
    "timeout never ends a session still in use [default: off].",
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
    server_keepalive: float | None,
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

    require_api_key(obj.settings)
    if obj.settings.admin_token:
        SECRETS.add(obj.settings.admin_token)
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
    run(
        serve_forever(
            settings,
            reconcile_interval=off_to_none(reconcile_every),
            grace=grace,
            server_keepalive=server_keepalive,
        )
    )


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
