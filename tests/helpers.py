"""Builders shared by the manager, reaper and reconcile tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from sessionmgr.client import LemonSliceClient, Timeouts
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.retry import RetryPolicy
from sessionmgr.testing import FakeLemonSlice

FAKE_API_KEY = "test-key"
# Retries in milliseconds and a 1 s attempt limit, so fault tests stay fast.
TEST_RETRY = RetryPolicy(attempts=4, base=0.001, cap=0.01, deadline=5.0)
TEST_TIMEOUTS = Timeouts(connect=1.0, total=1.0)
SLOW_TIMEOUTS = Timeouts(connect=1.0, total=60.0)  # for tests whose creates take seconds


def slow_client(fake: FakeLemonSlice) -> LemonSliceClient:
    """Fast retries, but an answer may take up to a minute (held creates, QUEUED starts)."""
    return LemonSliceClient(
        fake.api_key, api_url=fake.url, retry=TEST_RETRY, timeouts=SLOW_TIMEOUTS
    )


def fast_client(fake: FakeLemonSlice) -> LemonSliceClient:
    """A client that retries in milliseconds, so fault tests stay fast."""
    return LemonSliceClient(
        fake.api_key, api_url=fake.url, retry=TEST_RETRY, timeouts=TEST_TIMEOUTS
    )


@contextlib.asynccontextmanager
async def make_manager(
    fake: FakeLemonSlice, clock: FakeClock, db_url: str, *, slow: bool = False, **kw: Any
) -> AsyncIterator[SessionManager]:
    """A manager whose reaper the test drives by hand (``reaper.run_once()`` after advancing);
    ``slow``: its client waits for answers that take seconds."""
    kw.setdefault("idle_window", 60.0)
    kw.setdefault("max_age", 3600.0)
    kw.setdefault("reaper", False)
    async with (
        slow_client(fake) if slow else fast_client(fake) as client,
        SessionManager(
            database_url=db_url, client=client, clock=clock, auto_upgrade=True, **kw
        ) as mgr,
    ):
        yield mgr


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to other tasks until ``condition()`` holds; fails the test past ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)
