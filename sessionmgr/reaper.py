"""The reaper: ends sessions past their idle window or max age, safely from several processes.

Each tick flushes buffered touches, then claims due rows with a lease (one statement, see the
repository) and terminates them with at most ``concurrency`` requests in flight. Claims are taken in
slices (refilled to twice the concurrency once the unsent fall to it), so a slow API never leaves
hundreds of rows leased but unattended; the ends of terminated rows are recorded together
(``EndRecorder``: one bulk UPDATE per transaction), and a ``LeaseKeeper`` keeps the leases of held
rows alive while their terminates are slow. A process that dies leaves leases that expire; another
reaper takes the rows over, and asks LemonSlice first whether the session already ended (the dead
owner may have sent its terminate).

Then the tick resolves pending intents whose creator's lease expired (``reconcile.recover``: a
create killed mid-flight is ended within seconds, not at the next reconcile) and asks for the cost
of sessions ended without one. Both start with an indexed read that finds nothing on a quiet
database, so they cost nothing then. Active rows are claimed ``touch_grace`` seconds after their
deadline, so a touch still buffered in another process always lands first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from . import config
from .checks import check_count, check_seconds
from .client import LemonSliceClient
from .clock import SYSTEM_CLOCK, Clock
from .errors import (
    AuthError,
    ConfigurationError,
    LemonSliceError,
    NotFoundError,
    RateLimitedError,
)
from .leases import LeaseKeeper
from .reconcile import credits, fetch_costs, recover
from .records import SessionFilter, SessionRecord
from .repository import EndRequest, SessionRepository
from .retry import RetryPolicy
from .states import REMOTE_FINAL, EndReason, SessionStatus
from .transitions import as_row, claim_due

logger = logging.getLogger(__name__)

EndedHook = Callable[[SessionRecord], Awaitable[None]]
TickHook = Callable[["TickResult"], None]

STOP_GRACE = 10.0  # seconds in-flight terminates may take to finish on stop()
TOUCH_GRACE = config.TOUCH_FLUSH_INTERVAL  # seconds past a deadline before a claim: the touch
# flush interval, within which every process writes its buffered touches
RESCHEDULE_POLICY = RetryPolicy(
    attempts=1_000_000, base=config.RETRY_BASE, cap=config.RETRY_MAX, deadline=float("inf")
)


def new_owner() -> str:
    """A lease owner name that says which process holds a row: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Outcome(enum.StrEnum):
    ENDED = "ended"  # terminated now
    GONE = "gone"  # the server no longer knew it (404/410): ended, reason gone
    RESCHEDULED = "rescheduled"  # terminate failed; retried later with backoff
    LOST = "lost"  # our lease was taken over before we could record the end


@dataclasses.dataclass
class Heartbeat:
    """What health checks read: when the reaper last ticked and what it has done so far."""

    started_at: datetime | None = None
    last_tick_at: datetime | None = None
    last_tick_seconds: float | None = None
    ticks: int = 0
    claimed: int = 0
    ended: int = 0
    gone: int = 0
    rescheduled: int = 0
    auth_failures: int = 0
    tick_errors: int = 0
    last_error: str | None = None
    last_progress_at: datetime | None = None  # the last claim slice or end, mid-tick too
    recovered: int = 0  # intents resolved by recovery
    costs: int = 0  # costs recorded after the end

    @property
    def last_alive_at(self) -> datetime | None:
        """When the reaper last showed progress: a long drain keeps this fresh between ticks."""
        times = [t for t in (self.last_tick_at, self.last_progress_at) if t is not None]
        return max(times) if times else None


@dataclasses.dataclass
class TickResult:
    """One pass: the rows it ended (or, in a dry run, would end) and what became of each."""

    outcomes: dict[Outcome, list[SessionRecord]] = dataclasses.field(
        default_factory=lambda: {o: [] for o in Outcome}
    )
    due: list[SessionRecord] = dataclasses.field(default_factory=list)  # dry run only
    auth_failed: bool = False
    seconds: float = 0.0  # how long the tick took

    @property
    def claimed(self) -> int:
        return sum(len(records) for records in self.outcomes.values())

    @property
    def ended(self) -> list[SessionRecord]:
        return self.outcomes[Outcome.ENDED] + self.outcomes[Outcome.GONE]


class EndRecorder:
    """Records terminated sessions' ends in bulk (``SessionRepository.end_many``): ends that
    arrive while one statement runs go together in the next, so a drain writes a slice of ends
    per transaction instead of one unit-of-work op each."""

    def __init__(self, repository: SessionRepository, owner: str) -> None:
        self.repository = repository
        self.owner = owner
        self._queue: list[tuple[EndRequest, asyncio.Future[SessionRecord | None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.statements = 0  # bulk ends run, for tests and benchmarks

    async def end(self, request: EndRequest) -> SessionRecord | None:
        """Record ``request``'s end; the ended record, or None when the lease was taken over."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SessionRecord | None] = loop.create_future()
        self._queue.append((request, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"ends {self.owner}")
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                ended = await self.repository.end_many(
                    [request for request, _ in batch], owner=self.owner
                )
            except Exception as exc:  # each waiter's end failed: its caller reschedules
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.statements += 1
            for request, future in batch:
                if not future.done():
                    future.set_result(ended.get(request.pk))


class Reaper:
    def __init__(
        self,
        repository: SessionRepository,
        client: LemonSliceClient,
        *,
        owner: str | None = None,
        interval: float = config.REAPER_INTERVAL,
        concurrency: int = config.REAPER_CONCURRENCY,
        batch: int = config.REAPER_BATCH,
        lease: float = config.LEASE,
        retry: RetryPolicy = RESCHEDULE_POLICY,
        clock: Clock | None = None,
        on_ended: EndedHook | None = None,
        on_tick: TickHook | None = None,
        touch_grace: float = TOUCH_GRACE,
        recover: bool = True,
    ) -> None:
        """``on_tick`` is called after every tick that claimed (not dry runs), e.g. for metrics.
        ``recover``: each tick also resolves expired intents and fetches costs after ends."""
        check_seconds("Reaper interval", interval, error=ConfigurationError)
        check_seconds("Reaper lease", lease, error=ConfigurationError)
        check_count("Reaper concurrency", concurrency, error=ConfigurationError)
        check_count("Reaper batch", batch, error=ConfigurationError)
        self.repository = repository
        self.client = client
        self.owner = owner or new_owner()
        self.interval = interval
        self.concurrency = concurrency
        self.batch = batch
        self.lease = lease
        self.retry = retry
        self.clock = clock or repository.clock or SYSTEM_CLOCK
        self.on_ended = on_ended
        self.on_tick = on_tick
        self.touch_grace = touch_grace
        self.recover = recover
        self.heartbeat = Heartbeat()
        self.leases = LeaseKeeper(repository, owner=self.owner, lease=lease, clock=self.clock)
        self.ends = EndRecorder(repository, self.owner)
        self._slots = asyncio.Semaphore(concurrency)  # terminate requests in flight
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- one session -----------------------------------------------------------------------

    async def finish(
        self,
        record: SessionRecord,
        *,
        abort: asyncio.Event | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Outcome:
        """Terminate a row this reaper holds (status ``ending``) and record what happened.

        Shared by the reaper's ticks and ``SessionManager.end_session`` so that one session ends
        the same way whoever ends it. Errors are recorded on the row (rescheduled) and re-raised.
        Only the HTTP call holds one of the ``concurrency`` slots: recording the end waits for
        the group commit without keeping a terminate from starting. ``abort`` set (the API key
        was rejected) gives the row back untried; ``on_sent`` is called when the slot is freed.
        """
        outcome, _ = await self.end_claimed(record, abort=abort, on_sent=on_sent)
        return outcome

    async def end_claimed(
        self,
        record: SessionRecord,
        *,
        abort: asyncio.Event | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> tuple[Outcome, SessionRecord | None]:
        """``finish``, also returning the row as recorded (ended or rescheduled; None when
        LOST: another process holds it now)."""
        pks = (record.id,)
        self.leases.add(pks)  # add/discard, not ``holding``: no context manager per session
        try:
            return await self._finish(record, abort=abort, on_sent=on_sent)
        finally:
            self.leases.discard(pks)

    async def _finish(
        self,
        record: SessionRecord,
        *,
        abort: asyncio.Event | None,
        on_sent: Callable[[], None] | None,
    ) -> tuple[Outcome, SessionRecord | None]:
        repo = self.repository
        if record.session_id is None:  # cannot happen for claimed rows; keep the row, say why
            again = await repo.reschedule_record(
                record.id, owner=self.owner, error="no session_id", retry_at=self._retry_at(record)
            )
            return Outcome.RESCHEDULED, again
        if record.attempts > 1 and (abort is None or not abort.is_set()):
            # A takeover or a retry: the previous attempt may have terminated it already.
            known = await self._ended_remotely(record)
            if known is not None:
                if on_sent is not None:
                    on_sent()
                return known
        failure: LemonSliceError | None = None
        async with self._slots:
            if abort is not None and abort.is_set():
                failure = None
                terminated = None
            else:
                try:
                    terminated = await self.client.end_session(
                        record.session_id,
                        self.client.stored_control_url(record.session_id, record.control_url),
                    )
                except LemonSliceError as exc:
                    failure, terminated = exc, None
                    if isinstance(exc, AuthError) and abort is not None:
                        abort.set()  # before the slot passes on: no other row is tried
        if on_sent is not None:
            on_sent()
        if terminated is None:
            retry_after = failure.retry_after if isinstance(failure, RateLimitedError) else None
            again = await repo.reschedule_record(
                record.id,
                owner=self.owner,
                error=str(failure) if failure else "not attempted: API key rejected",
                retry_at=self._retry_at(record, retry_after),
            )
            self.heartbeat.rescheduled += 1
            if failure is not None:
                raise failure
            return Outcome.RESCHEDULED, again
        reason = None if terminated else EndReason.GONE
        ended = await self.ends.end(EndRequest(record.id, reason=reason))
        if ended is None:
            self._lost(record)
            return Outcome.LOST, None
        outcome = Outcome.ENDED if terminated else Outcome.GONE
        if outcome is Outcome.ENDED:
            self._progress(ended=1)
        else:
            self.heartbeat.gone += 1
            self._progress()
        logger.info(
            "ended session %s (%s)",
            record.session_id,
            reason or record.end_reason,
            extra={"session_id": record.session_id, "reason": str(reason or record.end_reason)},
        )
        await self.notify_ended(ended)
        return outcome, ended

    def _lost(self, record: SessionRecord) -> None:
        logger.warning(
            "lease on session %s was taken over before its end was recorded",
            record.session_id,
            extra={"session_id": record.session_id, "owner": self.owner},
        )

    async def _ended_remotely(
        self, record: SessionRecord
    ) -> tuple[Outcome, SessionRecord | None] | None:
        """Ask LemonSlice before a second terminate: record the end without one when the session
        already finished (or is gone). None: still live, or no answer; terminate then."""
        assert record.session_id is not None
        try:
            async with self._slots:
                remote = await self.client.get_session(record.session_id)
        except NotFoundError:
            remote = None
        except LemonSliceError:
            return None
        if remote is None:
            request = EndRequest(record.id, reason=EndReason.GONE)
            outcome = Outcome.GONE
        else:
            status = str(remote.get("session_status"))
            if status not in REMOTE_FINAL:
                return None
            request = EndRequest(record.id, remote_status=status, cost=credits(remote.get("cost")))
            outcome = Outcome.ENDED
        ended = await self.ends.end(request)
        if ended is None:
            self._lost(record)
            return Outcome.LOST, None
        self._progress(ended=1)
        logger.info(
            "session %s had already ended remotely; recorded without a second terminate",
            record.session_id,
            extra={"session_id": record.session_id},
        )
        await self.notify_ended(ended)
        return outcome, ended

    def _progress(self, *, claimed: int = 0, ended: int = 0) -> None:
        """Heartbeat after each claim slice and each end (health follows progress)."""
        self.heartbeat.claimed += claimed
        if ended:
            self.heartbeat.ended += ended
        self.heartbeat.last_progress_at = self.clock.now()

    def _retry_at(self, record: SessionRecord, retry_after: float | None = None) -> datetime:
        delay = self.retry.delay(max(record.attempts, 1), retry_after)
        return self.clock.now() + timedelta(seconds=delay)

    async def notify_ended(self, record: SessionRecord) -> None:
        """Run ``on_ended`` for a session this process ended (here or in reconcile); a failing
        hook is logged, never raised: a user's hook must not break the reaper. A hook that
        returns is progress too: ends are recorded in bulk ahead of their hooks, so a drain whose
        hooks are slow (webhooks, metrics) must not read as stale while they complete."""
        if self.on_ended is None:
            return
        try:
            await self.on_ended(record)
        except Exception:
            logger.exception("on_ended hook failed for session %s", record.session_id)
        self._progress()

    # --- one tick --------------------------------------------------------------------------

    async def run_once(self, *, dry_run: bool = False) -> TickResult:
        """One pass: flush touches, then claim and end everything due now.

        ``dry_run`` lists what is due without claiming or terminating anything.
        """
        started = self.clock.monotonic()
        result = TickResult()
        await self.repository.flush_touches()
        if dry_run:
            result.due = await self.due_now()
            return result
        unsent: set[int] = set()  # claimed and not yet through their terminate request
        tasks: set[asyncio.Task[None]] = set()
        auth_failed = asyncio.Event()
        auth_logged = False  # log the rejected key once per tick
        room_freed = asyncio.Event()

        async def end_one(record: SessionRecord) -> None:
            # ``_finish`` straight: the claim registered the lease, the ``finally`` drops it
            # (no ``finish``/``end_claimed`` frames and lease bookkeeping per session)
            try:
                outcome, _ = await self._finish(
                    record, abort=auth_failed, on_sent=lambda: sent(record.id)
                )
                result.outcomes[outcome].append(record)
            except AuthError as exc:
                nonlocal auth_logged
                if not auth_logged:
                    auth_logged = True
                    self.heartbeat.auth_failures += 1
                    logger.error(
                        "LemonSlice rejected the API key while ending sessions: %s; "
                        "fix LEMONSLICE_API_KEY (sessions stay due and are retried)",
                        exc,
                    )
                result.outcomes[Outcome.RESCHEDULED].append(record)
            except LemonSliceError as exc:
                logger.warning(
                    "terminate of %s failed, will retry: %s",
                    record.session_id,
                    exc,
                    extra={"session_id": record.session_id},
                )
                result.outcomes[Outcome.RESCHEDULED].append(record)
            except Exception:
                logger.exception("ending session %s failed", record.session_id)
                result.outcomes[Outcome.RESCHEDULED].append(record)
            finally:
                self.leases.discard((record.id,))
                sent(record.id)

        def sent(pk: int) -> None:
            unsent.discard(pk)
            room_freed.set()

        try:
            exhausted = False
            while not exhausted and not auth_failed.is_set() and not self._stopping.is_set():
                # Refill with hysteresis: once the claimed-and-unsent rows fall to the
                # concurrency, claim back up to twice it. Enough that no slot idles while the
                # next claim runs, few enough that slow terminates never sit on a pile of leases,
                # and each claim a slice, not a row per sent terminate. Rows already terminated
                # and waiting for their commit do not count.
                if len(unsent) > self.concurrency:
                    room_freed.clear()
                    await room_freed.wait()
                    continue
                want = min(2 * self.concurrency - len(unsent), self.batch)
                claimed = await self.repository.claim_due(
                    owner=self.owner, limit=want, lease=self.lease, grace=self.touch_grace
                )
                self._progress(claimed=len(claimed))
                exhausted = len(claimed) < want
                self.leases.add(r.id for r in claimed)  # renewed until finished
                for record in claimed:
                    unsent.add(record.id)
                    task = asyncio.create_task(end_one(record))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            # However the claiming stopped (all done, stop(), a failed claim), the terminates
            # already sent run to the end and are recorded; cancelling us cancels them too.
            while tasks:
                await asyncio.gather(*tasks)
        if self.recover and not auth_failed.is_set() and not self._stopping.is_set():
            await self._recover_and_cost()
        result.auth_failed = auth_failed.is_set()
        self.heartbeat.ticks += 1
        self.heartbeat.last_tick_at = self.clock.now()
        self.heartbeat.last_tick_seconds = result.seconds = self.clock.monotonic() - started
        if self.on_tick is not None:
            try:
                self.on_tick(result)
            except Exception:  # a metrics or user hook must not fail the tick it reports
                logger.exception("on_tick hook failed")
        return result

    async def _recover_and_cost(self) -> None:
        """Resolve expired intents, then fetch costs due; a failure of either is logged (the
        next tick retries), never fails the tick's ends."""
        try:
            report = await recover(self.repository, self.client, self)
            self.heartbeat.recovered += len(report.adopted) + len(report.intents_failed)
        except Exception:
            logger.exception("recovering expired intents failed; retrying next tick")
        try:
            self.heartbeat.costs += await fetch_costs(self.repository, self.client, self)
        except Exception:
            logger.exception("fetching costs after the end failed; retrying next tick")
        self._progress()

    async def due_now(self, limit: int = 10_000) -> list[SessionRecord]:
        """Active sessions whose deadline has passed, soonest first (what a tick would end,
        ``touch_grace`` included)."""
        now = self.clock.now()
        due_before = now - timedelta(seconds=self.touch_grace)
        due: list[SessionRecord] = []
        cursor: str | None = None
        while len(due) < limit:
            page = await self.repository.list(
                SessionFilter(statuses=[SessionStatus.ACTIVE, SessionStatus.ENDING]),
                limit=min(500, limit - len(due)),
                after=cursor,
                sort="deadline",
            )
            for record in page.items:
                if record.deadline is None or record.deadline > due_before:
                    return due
                if not claim_due(as_row(record), now, now, self.touch_grace):
                    continue
                due.append(record)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return due

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick every ``interval`` seconds until ``stop()``; a failed tick is logged, not fatal."""
        self.heartbeat.started_at = self.clock.now()
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                self.heartbeat.tick_errors += 1
                self.heartbeat.last_error = str(exc)
                logger.exception("reaper tick failed; retrying next interval")
            await self._sleep(self.interval)

    async def _sleep(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._stopping.clear()
            self._task = asyncio.create_task(self.run(), name=f"reaper {self.owner}")
        return self._task

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop claiming, let in-flight terminates finish within ``grace``, release our leases."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.leases.close()
        released = await self.repository.release_leases(self.owner)
        if released:
            logger.info("released %d lease(s) for other reapers", released)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()
