"""Reconcile: the net under the net. Compare the database with what LemonSlice says.

LemonSlice's list has no status filter and is newest-first, so a pass lists only back to what can
still matter: ``horizon`` seconds (LemonSlice's 30-minute cap, plus queue time and margin) and the
oldest unresolved intent. A list found not newest-first is read whole (logged once).

1. Live rows are checked: from the list's ``session_status`` / ``credits_used`` when the session
   is in the listed range, else with one GET. The remote status and cost are recorded, and rows
   the server already finished are ended (``remote_completed`` / ``remote_timed_out`` /
   ``remote_failed``, or ``gone`` when it no longer knows the session). Ended rows whose cost is
   unknown take it from the list.
2. ``recover``: pending intents nobody holds (their creator's lease expired) are resolved. An
   unknown remote session may be adopted and ended (``create_unknown``) only when every intent
   that could own it (recorded at or before its remote ``created_at`` plus ``CLOCK_SKEW``) is
   resolved or has an expired lease; it then goes to one such intent (the latest recorded before
   it, inside ``match_window``). Expired intents with no match are retried with backoff, then
   marked failed after ``pending_grace``. ``serve``'s reaper runs this every tick.
3. Unknown live sessions no intent can own are *orphans*: reported, and ended (``orphan``) only
   when asked, since they may belong to another system sharing the API key; never while an intent
   that could own them is held.
4. A session this database ended more than ``settle`` seconds ago that LemonSlice still lists as
   live (a terminate answered 404 by a confused proxy, or accepted without effect) is ours and
   was meant to end: its terminate is sent again (``still_live``). The row stays ended.

An adopt that finds the session already recorded (its creator's answer won) never ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .config import IDLE_WINDOW
from .errors import LemonSliceError, NotFoundError
from .records import SessionRecord, iso_utc
from .repository import COST_HORIZON
from .states import REMOTE_FINAL, REMOTE_LIVE, EndReason, SessionStatus
from .transitions import COST_DELAY, LEGACY_INTENT_SETTLE, as_row, intent_due, may_end_remote

if TYPE_CHECKING:
    from .client import LemonSliceClient
    from .reaper import Reaper
    from .repository import SessionRepository

logger = logging.getLogger(__name__)

SETTLE = 120.0  # seconds: younger orphans (no intent) may still be mid-create elsewhere
PENDING_GRACE = 600.0  # seconds after which an unmatched intent is marked failed
MATCH_WINDOW = 120.0  # seconds after an intent was recorded within which its session must start
CLOCK_SKEW = 5.0  # seconds a remote created_at may precede the intent (clocks differ)
CHECK_CONCURRENCY = 10  # GET requests in flight at once
LIST_PAGE = 100  # remote sessions per list page (LemonSlice's maximum)
HORIZON = 1800.0 + 150.0 + 300.0  # seconds: the 30-minute cap + a cold start's queue + margin
RECOVER_BATCH = 100  # expired intents resolved per pass
RECOVER_RETRY_MIN = 2.0  # seconds before an unmatched expired intent is looked at again
RECOVER_RETRY_MAX = 60.0  # seconds, the cap on that backoff
COST_BATCH = 50  # costs asked for per reaper tick
RECOVERY_SUFFIX = "#recover"  # lease owner suffix of an intent held by recovery, not its creator

_unordered_logged = False  # "the list is not newest-first" is logged once per process


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteSession:
    session_id: str
    status: str | None
    created_at: datetime | None
    credits_used: float | None

    @classmethod
    def parse(cls, item: dict[str, Any]) -> RemoteSession:
        created = item.get("created_at")
        created_at = None
        if isinstance(created, str):
            try:
                created_at = datetime.fromisoformat(created.replace("Z", "+00:00"))
            except ValueError:
                created_at = None
            if created_at is not None and created_at.tzinfo is None:
                created_at = created_at.replace(tzinfo=UTC)  # no offset given: UTC, as the API
        status = item.get("session_status")
        return cls(
            session_id=str(item["session_id"]),
            status=status if isinstance(status, str) else None,
            created_at=created_at,
            credits_used=credits(item.get("credits_used")),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.created_at is not None:
            out["created_at"] = iso_utc(self.created_at)
        return out


@dataclasses.dataclass
class ReconcileReport:
    """What a pass found and did; ``list_requests``: list pages read (the pass's cost)."""

    dry_run: bool = False
    checked: int = 0
    ended_remote: list[SessionRecord] = dataclasses.field(default_factory=list)
    adopted: list[SessionRecord] = dataclasses.field(default_factory=list)
    orphans: list[RemoteSession] = dataclasses.field(default_factory=list)
    orphans_ended: list[str] = dataclasses.field(default_factory=list)
    intents_failed: list[SessionRecord] = dataclasses.field(default_factory=list)
    still_live: list[SessionRecord] = dataclasses.field(default_factory=list)  # ended here only
    terminated_again: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    held: list[str] = dataclasses.field(default_factory=list)  # left alone: an intent is held
    costs: int = 0  # costs recorded from the list
    list_requests: int = 0
    get_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "checked": self.checked,
            "ended_remote": [r.to_dict() for r in self.ended_remote],
            "adopted": [r.to_dict() for r in self.adopted],
            "orphans": [o.to_dict() for o in self.orphans],
            "orphans_ended": self.orphans_ended,
            "intents_failed": [r.to_dict() for r in self.intents_failed],
            "still_live": [r.to_dict() for r in self.still_live],
            "terminated_again": self.terminated_again,
            "errors": self.errors,
            "held": self.held,
            "costs": self.costs,
            "list_requests": self.list_requests,
            "get_requests": self.get_requests,
        }


def credits(value: Any) -> float | None:
    """A cost as LemonSlice reported it, if it is a finite number (anything else: unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


async def reconcile(
    repo: SessionRepository,
    client: LemonSliceClient,
    reaper: Reaper,
    *,
    dry_run: bool = False,
    end_orphans: bool = False,
    settle: float = SETTLE,
    pending_grace: float = PENDING_GRACE,
    match_window: float = MATCH_WINDOW,
    horizon: float = HORIZON,
) -> ReconcileReport:
    """One reconcile pass; ``reaper`` lends its lease owner and its way of ending a session."""
    report = ReconcileReport(dry_run=dry_run)
    now = repo.clock.now()
    rows = await _unleased_live_rows(repo, now)
    pending = await repo.pending_intents()
    since = now - timedelta(seconds=horizon)
    if pending:
        since = min(since, pending[0].created_at - timedelta(seconds=CLOCK_SKEW))
    try:
        remote = await list_remote(client, since, report)
    except (LemonSliceError, KeyError) as exc:
        report.errors.append(f"listing remote sessions failed: {exc}")
        await _check_live_rows(repo, client, reaper, report, rows, {})
        return report  # without the list, no intent can be judged unmatched
    by_id = {r.session_id: r for r in remote}
    await _check_live_rows(repo, client, reaper, report, rows, by_id)
    known = await repo.known_session_ids(by_id)
    if not dry_run:
        await _costs_from_list(repo, report, remote, known)
    await recover(
        repo,
        client,
        reaper,
        dry_run=dry_run,
        pending_grace=pending_grace,
        match_window=match_window,
        report=report,
        remote=remote,
    )
    now = repo.clock.now()
    known = await repo.known_session_ids(by_id)
    settled = now - timedelta(seconds=settle)
    await _terminate_still_live(repo, client, report, remote, known, settled)
    blocking = await _held_intents(repo, mine=set())
    adopted = {r.session_id for r in report.adopted}
    for orphan in remote:
        if orphan.session_id in known or orphan.session_id in adopted:
            continue
        if orphan.status not in REMOTE_LIVE:
            continue
        if orphan.created_at is None or orphan.created_at > settled:
            continue
        if _blocked(orphan, blocking):
            report.held.append(orphan.session_id)
            continue
        report.orphans.append(orphan)
        if end_orphans and not dry_run:
            record, created = await repo.adopt(
                session_id=orphan.session_id,
                control_url=client.control_url_for(orphan.session_id),
                idle_window=IDLE_WINDOW,  # ended at once; the window never matters
                max_age=None,
                metadata={"adopted_by": "reconcile"},
                created_at=orphan.created_at,
            )
            if created and await _end(repo, reaper, record, EndReason.ORPHAN, report):
                report.orphans_ended.append(orphan.session_id)
    if report.orphans:
        logger.warning(
            "%d live remote session(s) unknown to this database%s",
            len(report.orphans),
            "" if end_orphans else " (not ended: pass --end-orphans if they are ours)",
        )
    return report


async def list_remote(
    client: LemonSliceClient, since: datetime, report: ReconcileReport | None = None
) -> list[RemoteSession]:
    """Remote sessions created at or after ``since`` (newest first), reading pages only until
    the list is older than that. A list that is not newest-first is read whole."""
    global _unordered_logged
    out: list[RemoteSession] = []
    ordered = True
    past = False  # an item older than ``since`` was seen
    previous: datetime | None = None
    skew = timedelta(seconds=CLOCK_SKEW)
    pages = client.list_sessions(limit=LIST_PAGE)
    try:
        async for item in pages:
            if report is not None and len(out) % LIST_PAGE == 0:
                report.list_requests += 1
            remote = RemoteSession.parse(item)
            created = remote.created_at
            later = previous is not None and created is not None and created > previous + skew
            if ordered and later:
                ordered = False
                if not _unordered_logged:
                    _unordered_logged = True
                    logger.warning(
                        "LemonSlice's session list is not newest-first: reading it whole "
                        "on every reconcile (slower, still correct)"
                    )
            if created is not None:
                previous = created if previous is None else min(previous, created)
            out.append(remote)
            past = past or (created is not None and created < since)
            # stop at a page's end (a fetched page costs nothing more to read, and its order
            # is checked whole): the next page would be older still
            if ordered and past and len(out) % LIST_PAGE == 0:
                break
    finally:
        if isinstance(pages, AsyncGenerator):
            await pages.aclose()  # stops the paging at once
    return out


async def recover(
    repo: SessionRepository,
    client: LemonSliceClient,
    reaper: Reaper,
    *,
    dry_run: bool = False,
    pending_grace: float = PENDING_GRACE,
    match_window: float = MATCH_WINDOW,
    report: ReconcileReport | None = None,
    remote: list[RemoteSession] | None = None,
) -> ReconcileReport:
    """Resolve pending intents nobody holds (see the module docstring, step 2).

    Starts with one indexed read (``has_due_intents``) and lists remote sessions only when it
    finds some, so it runs on every reaper tick for free. Intents are taken under a lease of the
    recoverer (``owner#recover``), so a creator that was merely slow finds its renewal refused,
    and two recoverers never resolve one intent."""
    report = report if report is not None else ReconcileReport(dry_run=dry_run)
    if not await repo.has_due_intents():
        return report
    owner = reaper.owner + RECOVERY_SUFFIX
    if dry_run:
        at, now = await repo.lease_now(), repo.clock.now()
        mine = [i for i in await repo.pending_intents() if intent_due(as_row(i), now, at)]
    else:
        mine = await repo.claim_intents(owner=owner, lease=reaper.lease, limit=RECOVER_BATCH)
    if not mine:
        return report
    now = repo.clock.now()
    if remote is None:
        since = min(i.created_at for i in mine) - timedelta(seconds=CLOCK_SKEW)
        try:
            remote = await list_remote(client, since, report)
        except (LemonSliceError, KeyError) as exc:
            report.errors.append(f"listing remote sessions failed: {exc}")
            if not dry_run:
                for intent in mine:
                    await repo.release_intent(intent.id, owner=owner, retry_at=_retry(intent, now))
            return report
    known = await repo.known_session_ids(r.session_id for r in remote)
    unknown = sorted(
        (r for r in remote if r.session_id not in known and r.created_at is not None),
        key=lambda r: (r.created_at, r.session_id),
    )
    blocking = await _held_intents(repo, mine={i.id for i in mine})
    free = {i.id: i for i in mine}
    skew = timedelta(seconds=CLOCK_SKEW)
    window = timedelta(seconds=match_window)
    for session in unknown:
        assert session.created_at is not None
        if _blocked(session, blocking):
            report.held.append(session.session_id)
            continue
        owners = [
            i
            for i in free.values()
            if i.created_at - skew <= session.created_at <= i.created_at + window
        ]
        if not owners:
            continue
        intent = max(owners, key=lambda i: (i.created_at, i.id))  # the closest before it
        del free[intent.id]
        if dry_run:
            report.adopted.append(intent)
            continue
        record = await repo.adopt_intent(
            intent.id,
            owner=owner,
            session_id=session.session_id,
            control_url=client.control_url_for(session.session_id),
            created_at=session.created_at,
        )
        if record is None:  # its creator's answer won, or that session was recorded meanwhile
            free[intent.id] = intent  # still ours to resolve, if it is still pending
            continue
        report.adopted.append(record)
        final = REMOTE_FINAL.get(session.status or "")
        if final is not None:
            await repo.mark_ended_remote(
                record.id,
                reason=final,
                remote_status=str(session.status),
                cost=session.credits_used,
            )
        else:
            await _end(repo, reaper, record, EndReason.CREATE_UNKNOWN, report)
    for intent in free.values():
        age = (now - intent.created_at).total_seconds()
        if age >= pending_grace:
            report.intents_failed.append(intent)
            if not dry_run:
                await repo.mark_failed(
                    intent.id,
                    reason=EndReason.CREATE_UNKNOWN,
                    error="create outcome unknown and no matching remote session found",
                )
        elif not dry_run:
            await repo.release_intent(intent.id, owner=owner, retry_at=_retry(intent, now))
    return report


def _retry(intent: SessionRecord, now: datetime) -> datetime:
    """When an unmatched expired intent is looked at again: soon at first (its session may not
    be listed yet), backing off with its age."""
    age = (now - intent.created_at).total_seconds()
    delay = min(max(RECOVER_RETRY_MIN, age / 4), RECOVER_RETRY_MAX)
    return now + timedelta(seconds=delay)


async def _held_intents(repo: SessionRepository, *, mine: set[int]) -> list[SessionRecord]:
    """Pending intents a creator still holds (a live lease not taken by recovery, or a lease-less
    intent younger than ``LEGACY_INTENT_SETTLE``): no session they could own may be ended."""
    at = await repo.lease_now()
    now = repo.clock.now()
    held = []
    for intent in await repo.pending_intents():
        if intent.id in mine:
            continue
        if intent.lease_until is None:
            if (now - intent.created_at).total_seconds() < LEGACY_INTENT_SETTLE:
                held.append(intent)
        elif intent.lease_until > at and not (intent.lease_owner or "").endswith(RECOVERY_SUFFIX):
            held.append(intent)
    return held


def _blocked(session: RemoteSession, held: list[SessionRecord]) -> bool:
    """Could a held intent own this session (recorded at or before its start plus skew)?"""
    if session.created_at is None:
        return bool(held)
    latest = session.created_at + timedelta(seconds=CLOCK_SKEW)
    return any(i.created_at <= latest for i in held)


async def fetch_costs(repo: SessionRepository, client: LemonSliceClient, reaper: Reaper) -> int:
    """Ask for the cost of sessions ended without one (``costs_due``); returns how many were
    recorded. A session still billing is asked again later; one that is gone, or finished
    without a cost, or ended more than ``COST_HORIZON`` ago, is not asked again."""
    due = await repo.costs_due(limit=COST_BATCH)
    if not due:
        return 0
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)
    recorded = 0

    async def ask(record: SessionRecord) -> None:
        nonlocal recorded
        now = repo.clock.now()
        ended_at = record.ended_at or now
        give_up = (now - ended_at).total_seconds() >= COST_HORIZON
        later = None if give_up else now + timedelta(seconds=COST_DELAY * 2)
        if record.session_id is None or give_up:
            # nothing to ask about, or ended too long ago (e.g. a retry time left on a row ended
            # before costs were fetched): stop asking without a request
            await repo.record_cost(record.id, cost=None, remote_status=None, retry_at=None)
            return
        async with gate:
            try:
                remote = await client.get_session(record.session_id)
            except NotFoundError:
                await repo.record_cost(record.id, cost=None, remote_status=None, retry_at=None)
                return
            except LemonSliceError:
                await repo.record_cost(record.id, cost=None, remote_status=None, retry_at=later)
                return
        status = str(remote.get("session_status"))
        cost = credits(remote.get("cost"))
        if cost is None and status in REMOTE_FINAL and status != "COMPLETED":
            later = None  # GET reports a cost only for COMPLETED; the list may still say
        await repo.record_cost(record.id, cost=cost, remote_status=status, retry_at=later)
        if cost is not None:
            recorded += 1

    await asyncio.gather(*(ask(r) for r in due))
    return recorded


async def _costs_from_list(
    repo: SessionRepository,
    report: ReconcileReport,
    remote: list[RemoteSession],
    known: set[str],
) -> None:
    """Ended rows with no cost take the list's ``credits_used`` of a finished session."""
    finished = {
        r.session_id: r
        for r in remote
        if r.session_id in known and r.status in REMOTE_FINAL and r.credits_used is not None
    }
    if not finished:
        return
    for record in await repo.ended_without_cost(finished):
        assert record.session_id is not None
        item = finished[record.session_id]
        if await repo.record_cost(
            record.id, cost=item.credits_used, remote_status=item.status, retry_at=None
        ):
            report.costs += 1


async def _terminate_still_live(
    repo: SessionRepository,
    client: LemonSliceClient,
    report: ReconcileReport,
    remote: list[RemoteSession],
    known: set[str],
    settled: datetime,
) -> None:
    """Sessions ended here (before ``settled``) that LemonSlice lists as live: terminate again."""
    live_known = [r.session_id for r in remote if r.status in REMOTE_LIVE and r.session_id in known]
    if not live_known:
        return
    report.still_live = await repo.ended_before(live_known, settled)
    for record in report.still_live:
        assert record.session_id is not None  # selected by session_id
        logger.warning(
            "session %s was ended here (%s) but LemonSlice still lists it as live%s",
            record.session_id,
            record.end_reason,
            "" if report.dry_run else ": terminating it again",
            extra={"session_id": record.session_id},
        )
        if report.dry_run:
            continue
        try:
            terminated = await client.end_session(
                record.session_id, client.stored_control_url(record.session_id, record.control_url)
            )
        except LemonSliceError as exc:
            report.errors.append(f"{record.session_id}: terminating again failed: {exc}")
            continue
        if terminated:  # False: LemonSlice no longer knows it after all
            report.terminated_again.append(record.session_id)


async def _unleased_live_rows(repo: SessionRepository, now: datetime) -> list[SessionRecord]:
    at = await repo.lease_now()
    return [
        r
        async for r in repo.iter_live(statuses=(SessionStatus.ACTIVE, SessionStatus.ENDING))
        if r.session_id is not None and may_end_remote(as_row(r), at)
    ]


async def _check_live_rows(
    repo: SessionRepository,
    client: LemonSliceClient,
    reaper: Reaper,
    report: ReconcileReport,
    rows: list[SessionRecord],
    listed: dict[str, RemoteSession],
) -> None:
    """Each live row's remote status: the list's when it covers the row, else one GET."""
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def check(record: SessionRecord) -> None:
        assert record.session_id is not None
        item = listed.get(record.session_id)
        if item is not None and item.status is not None:
            status, cost = item.status, item.credits_used if item.status in REMOTE_FINAL else None
        else:
            async with gate:
                report.get_requests += 1
                try:
                    remote = await client.get_session(record.session_id)
                except NotFoundError:
                    remote = {"session_status": "NOT_FOUND"}
                except LemonSliceError as exc:
                    report.errors.append(f"{record.session_id}: {exc}")
                    return
            status = str(remote.get("session_status"))
            cost = credits(remote.get("cost"))
        report.checked += 1
        reason = EndReason.GONE if status == "NOT_FOUND" else REMOTE_FINAL.get(status)
        if reason is None:
            if not report.dry_run:
                await repo.record_remote(record.id, remote_status=status, cost=cost)
            return
        if report.dry_run:
            report.ended_remote.append(record)
        elif await repo.mark_ended_remote(
            record.id, reason=reason, remote_status=status, cost=cost
        ):
            ended = await repo.get(record.id)
            report.ended_remote.append(ended)
            await reaper.notify_ended(ended)

    await asyncio.gather(*(check(r) for r in rows))


async def _end(
    repo: SessionRepository,
    reaper: Reaper,
    record: SessionRecord,
    reason: EndReason,
    report: ReconcileReport,
) -> bool:
    claimed = await repo.begin_end(record.id, owner=reaper.owner, lease=reaper.lease, reason=reason)
    if claimed is None:
        return False
    try:
        await reaper.finish(claimed)
    except LemonSliceError as exc:  # rescheduled on the row; the reaper retries it
        report.errors.append(f"{record.session_id}: {exc}")
        return False
    return True
