"""``sessionmgr serve``: the long-running process that guards every session.

It upgrades the database, runs the reaper and a periodic reconcile, and answers HTTP (health,
metrics, the admin API and the dashboard: sessionmgr/web.py). On SIGTERM/SIGINT it stops HTTP
first, then stops claiming, lets in-flight terminates finish within a grace period, releases its
leases and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from . import config, proxy
from .checks import check_seconds
from .client import LemonSliceClient
from .errors import ConfigurationError
from .manager import SessionManager
from .metrics import Metrics
from .web import create_app

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL = 60.0  # seconds between reconcile passes in serve
SHUTDOWN_GRACE = 10.0  # seconds in-flight terminates may take after SIGTERM
HTTP_SHUTDOWN = 2.0  # seconds open HTTP requests may take after SIGTERM


async def serve(
    settings: config.Settings,
    *,
    reconcile_interval: float | None = RECONCILE_INTERVAL,
    grace: float = SHUTDOWN_GRACE,
    server_keepalive: float | None = None,
    ready: Callable[[SessionManager], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT. ``server_keepalive``: as SessionManager's (for sessions
    touched through the recording proxy). ``ready`` is called once the manager is up (for tests)."""
    check_http_exposure(settings.http_host, settings.admin_token)
    check_seconds("--grace", grace, error=ConfigurationError)
    if reconcile_interval is not None:
        check_seconds("--reconcile-every", reconcile_interval, error=ConfigurationError)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        metrics = Metrics()
        client = LemonSliceClient(
            settings.api_key,
            api_url=settings.api_url,
            trace_configs=[metrics.trace_config()],
            control_origins=settings.control_origins,
        )
        manager = SessionManager(
            database_url=settings.database_url,
            client=client,
            idle_window=settings.idle_window,
            max_age=settings.max_age,
            reaper_interval=settings.reaper_interval,
            reaper_concurrency=settings.reaper_concurrency,
            reaper_batch=settings.reaper_batch,
            lease=settings.lease,
            reconcile_interval=reconcile_interval,
            server_keepalive=server_keepalive,
            auto_upgrade=True,
        )
        async with client, manager:
            app = create_app(
                manager,
                admin_token=settings.admin_token,
                metrics=metrics,
                allowed_hosts=(settings.http_host, *settings.allowed_hosts),
            )
            proxy.add_routes(app, manager)  # LemonSlice's API, recorded (own auth: x-api-key)
            runner = await _start_http(app, settings.http_host, settings.http_port)
            try:
                logger.info(
                    "serving: reaper every %ss (owner %s), idle window %ss, max age %s",
                    settings.reaper_interval,
                    manager.owner,
                    settings.idle_window,
                    f"{settings.max_age}s" if settings.max_age else "none",
                )
                if ready is not None:
                    ready(manager)
                await stop.wait()
            finally:
                await runner.cleanup()  # no new API calls while the reaper winds down
            logger.info("stopping: finishing in-flight terminates (grace %ss)", grace)
            await manager.reaper.stop(grace)
        logger.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def _start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen on host:port and log ``listening on http://host:port`` (the port actually bound)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port "
            "(0: any free one) or --host"
        ) from None
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    logger.info("listening on http://%s:%s", shown, bound_port)
    return runner


def check_http_exposure(host: str, admin_token: str | None) -> None:
    """Beyond loopback, anyone who reaches the port could read every session: demand a token."""
    if admin_token or _is_loopback(host):
        return
    raise ConfigurationError(
        f"refusing to serve HTTP on {host} without an admin token: set "
        f"{config.ENV_ADMIN_TOKEN}, or keep --host 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
