"""``sessionmgr serve``: the long-running process that guards every session.

It upgrades the database, runs the reaper and a periodic reconcile, and on SIGTERM/SIGINT stops
claiming, lets in-flight terminates finish within a grace period, releases its leases and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from . import config
from .manager import SessionManager

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL = 60.0  # seconds between reconcile passes in serve
SHUTDOWN_GRACE = 10.0  # seconds in-flight terminates may take after SIGTERM


async def serve(
    settings: config.Settings,
    *,
    reconcile_interval: float | None = RECONCILE_INTERVAL,
    grace: float = SHUTDOWN_GRACE,
    ready: Callable[[SessionManager], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT. ``ready`` is called once the manager is up (for tests)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        manager = SessionManager(
            database_url=settings.database_url,
            api_key=settings.api_key,
            api_url=settings.api_url,
            idle_window=settings.idle_window,
            max_age=settings.max_age,
            reaper_interval=settings.reaper_interval,
            reaper_concurrency=settings.reaper_concurrency,
            reaper_batch=settings.reaper_batch,
            lease=settings.lease,
            reconcile_interval=reconcile_interval,
            auto_upgrade=True,
        )
        async with manager:
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
            logger.info("stopping: finishing in-flight terminates (grace %ss)", grace)
            await manager.reaper.stop(grace)
        logger.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
