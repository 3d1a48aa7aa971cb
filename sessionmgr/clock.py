"""Where time comes from. Everything takes a ``Clock`` so tests never wait for real deadlines."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait; a fake clock returns as soon as time is advanced past the wake-up."""
        ...


class SystemClock:
    """The real clock."""

    simulated = False  # real time: a database server's clock can stand in for it

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class SkewedClock(SystemClock):
    """The real clock, ``offset`` seconds off: a host whose clock runs fast (or slow), for
    tests of what must not depend on each host's clock (leases on PostgreSQL)."""

    def __init__(self, offset: float) -> None:
        self.offset = timedelta(seconds=offset)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def is_simulated(clock: Clock) -> bool:
    """True for a clock that moves only when a test says (``FakeClock``): no database clock can
    follow it, so leases are then stamped on it instead of on the database's."""
    return bool(getattr(clock, "simulated", False))


class FakeClock:
    """A clock that moves only when told to, for tests.

    ``sleep`` parks the caller until ``advance`` moves time past its wake-up, so a test can step a
    reaper through an idle window without waiting for it.
    """

    simulated = True

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._mono = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self._mono += seconds
        self._now += timedelta(seconds=seconds)
        due = [(t, f) for t, f in self._sleepers if t <= self._mono]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._mono]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)

    @property
    def sleepers(self) -> int:
        """How many tasks are parked in ``sleep`` (lets a test wait until a loop is idle)."""
        return sum(1 for _, f in self._sleepers if not f.done())
