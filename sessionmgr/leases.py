"""``LeaseKeeper``: every lease a process holds is renewed while its work is slow.

A lease (an ``ending`` row being terminated, a ``pending`` intent whose create POST is in flight)
tells other processes "someone is on it". One that is not renewed runs out while a slow terminate
or create is still under way, and another process then starts a second one. Whoever takes a lease
registers the row here for as long as it works on it; one task renews every registered row
every ``lease / 3`` seconds in one statement, and stops when nothing is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from .clock import Clock
from .repository import SessionRepository

logger = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3  # renewals per lease period: two may fail before the lease lapses


class LeaseKeeper:
    def __init__(
        self, repository: SessionRepository, *, owner: str, lease: float, clock: Clock
    ) -> None:
        self.repository = repository
        self.owner = owner
        self.lease = lease
        self.clock = clock
        self._held: dict[int, int] = {}  # pk -> holders (a row may be held twice: claim, finish)
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0  # statements sent, for tests

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def add(self, pks: Iterable[int]) -> None:
        for pk in pks:
            self._held[pk] = self._held.get(pk, 0) + 1
        if self._held and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._renew(), name=f"leases {self.owner}")

    def discard(self, pks: Iterable[int]) -> None:
        for pk in pks:
            left = self._held.get(pk, 0) - 1
            if left > 0:
                self._held[pk] = left
            else:
                self._held.pop(pk, None)

    @contextlib.asynccontextmanager
    async def holding(self, pk: int) -> AsyncIterator[None]:
        """Keep ``pk``'s lease alive for the duration of the block."""
        self.add((pk,))
        try:
            yield
        finally:
            self.discard((pk,))

    async def _renew(self) -> None:
        while self._held:
            await self.clock.sleep(self.lease / RENEWALS_PER_LEASE)
            if not self._held:
                return
            try:
                await self.repository.renew_leases(
                    sorted(self._held), owner=self.owner, lease=self.lease
                )
                self.renewals += 1
            except Exception:  # the leases may lapse; another process then takes over
                logger.exception("renewing %d lease(s) failed; retrying", len(self._held))

    async def close(self) -> None:
        self._held.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
