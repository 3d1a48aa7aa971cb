"""Reconcile: the net under the net. Compare the database with what LemonSlice says.

1. Every live row is checked with GET: the remote status and cost are recorded, and rows the server
   already finished are ended (``remote_completed`` / ``remote_timed_out`` / ``remote_failed``, or
   ``gone`` when it no longer knows the session).
2. Remote sessions are listed; a live one the database does not know is matched to an unresolved
   ``pending`` intent of this database (a create whose answer was lost): one session per intent,
   started inside that intent's window. A match is adopted and ended (``create_unknown``).
3. Unmatched unknown live sessions are *orphans*: reported, and ended (``orphan``) only when asked,
   since they may belong to another system sharing the API key.
4. Intents older than the grace period with no match never started: marked failed
   (``create_unknown``).
5. A session this database ended more than ``settle`` seconds ago that LemonSlice still lists as
   live (a terminate answered 404 by a confused proxy, or accepted without effect) is ours and
   was meant to end: its terminate is sent again (``still_live``). The row stays ended.

Intents and remote sessions younger than ``settle`` seconds are left alone: their create may still
be in flight in another process, about to record its answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .config import IDLE_WINDOW
from .errors import LemonSliceError, NotFoundError
from .records import SessionRecord, iso_utc
from .states import REMOTE_FINAL, REMOTE_LIVE, EndReason, SessionStatus

if TYPE_CHECKING:
    from .client import LemonSliceClient
    from .reaper import Reaper
    from .repository import SessionRepository

logger = logging.getLogger(__name__)

SETTLE = 120.0  # seconds: younger intents and remote sessions may still be mid-create
PENDING_GRACE = 600.0  # seconds after which an unmatched intent is marked failed
MATCH_WINDOW = 120.0  # seconds after an intent was recorded within which its session must start
CLOCK_SKEW = 5.0  # seconds a remote created_at may precede the intent (clocks differ)
CHECK_CONCURRENCY = 10  # GET requests in flight at once
LIST_PAGE = 100  # remote sessions per list page


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
) -> ReconcileReport:
    """One reconcile pass; ``reaper`` lends its lease owner and its way of ending a session."""
    report = ReconcileReport(dry_run=dry_run)
    await _check_live_rows(repo, client, reaper, report)
    try:
        remote = [RemoteSession.parse(item) async for item in client.list_sessions(limit=LIST_PAGE)]
    except (LemonSliceError, KeyError) as exc:
        report.errors.append(f"listing remote sessions failed: {exc}")
        return report  # without the list, no intent can be judged unmatched
    now = repo.clock.now()
    known = await repo.known_session_ids(r.session_id for r in remote)
    unknown = [r for r in remote if r.session_id not in known]
    matched = await _resolve_intents(
        repo, client, reaper, report, unknown, now, settle, pending_grace, match_window
    )
    settled = now - timedelta(seconds=settle)
    await _terminate_still_live(repo, client, report, remote, known, settled)
    for orphan in unknown:
        if orphan.session_id in matched or orphan.status not in REMOTE_LIVE:
            continue
        if orphan.created_at is None or orphan.created_at > settled:
            continue
        report.orphans.append(orphan)
        if end_orphans and not dry_run:
            record, _ = await repo.adopt(
                session_id=orphan.session_id,
                control_url=client.control_url_for(orphan.session_id),
                idle_window=IDLE_WINDOW,  # ended at once; the window never matters
                max_age=None,
                metadata={"adopted_by": "reconcile"},
                created_at=orphan.created_at,
            )
            if await _end(repo, reaper, record, EndReason.ORPHAN, report):
                report.orphans_ended.append(orphan.session_id)
    if report.orphans:
        logger.warning(
            "%d live remote session(s) unknown to this database%s",
            len(report.orphans),
            "" if end_orphans else " (not ended: pass --end-orphans if they are ours)",
        )
    return report


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
                record.session_id,
                record.control_url or client.control_url_for(record.session_id),
            )
        except LemonSliceError as exc:
            report.errors.append(f"{record.session_id}: terminating again failed: {exc}")
            continue
        if terminated:  # False: LemonSlice no longer knows it after all
            report.terminated_again.append(record.session_id)


async def _check_live_rows(
    repo: SessionRepository, client: LemonSliceClient, reaper: Reaper, report: ReconcileReport
) -> None:
    now = repo.clock.now()
    rows = [
        r
        async for r in repo.iter_live(statuses=(SessionStatus.ACTIVE, SessionStatus.ENDING))
        if r.session_id is not None and not (r.lease_until is not None and r.lease_until > now)
    ]
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def check(record: SessionRecord) -> None:
        assert record.session_id is not None
        async with gate:
            try:
                remote = await client.get_session(record.session_id)
            except NotFoundError:
                remote = {"session_status": "NOT_FOUND"}
            except LemonSliceError as exc:
                report.errors.append(f"{record.session_id}: {exc}")
                return
        report.checked += 1
        status = str(remote.get("session_status"))
        cost = credits(remote.get("cost"))
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
            if reaper.on_ended is not None:
                await reaper._call_hook(reaper.on_ended, ended)

    await asyncio.gather(*(check(r) for r in rows))


async def _resolve_intents(
    repo: SessionRepository,
    client: LemonSliceClient,
    reaper: Reaper,
    report: ReconcileReport,
    unknown: list[RemoteSession],
    now: datetime,
    settle: float,
    pending_grace: float,
    match_window: float,
) -> set[str]:
    """Match old pending intents to unknown remote sessions; fail the hopeless ones."""
    matched: set[str] = set()
    candidates = sorted(
        (r for r in unknown if r.created_at is not None),
        key=lambda r: r.created_at or now,
    )
    for intent in sorted(await repo.pending_intents(), key=lambda r: r.created_at):
        age = (now - intent.created_at).total_seconds()
        if age < settle:
            continue
        lo = intent.created_at - timedelta(seconds=CLOCK_SKEW)
        hi = intent.created_at + timedelta(seconds=match_window)
        match = next(
            (
                r
                for r in candidates
                if r.session_id not in matched
                and r.created_at is not None
                and lo <= r.created_at <= hi
            ),
            None,
        )
        if match is None:
            if age >= pending_grace:
                report.intents_failed.append(intent)
                if not report.dry_run:
                    await repo.mark_failed(
                        intent.id,
                        reason=EndReason.CREATE_UNKNOWN,
                        error="create outcome unknown and no matching remote session found",
                    )
            continue
        matched.add(match.session_id)
        if report.dry_run:
            report.adopted.append(intent)
            continue
        record, _ = await repo.adopt(
            session_id=match.session_id,
            control_url=client.control_url_for(match.session_id),
            idle_window=intent.idle_window,
            max_age=intent.max_age,
            agent_id=intent.agent_id,
            metadata=intent.metadata,
            created_at=match.created_at,
            pending_pk=intent.id,
        )
        report.adopted.append(record)
        final = REMOTE_FINAL.get(match.status or "")
        if final is not None:
            await repo.mark_ended_remote(
                record.id, reason=final, remote_status=str(match.status), cost=match.credits_used
            )
        else:
            await _end(repo, reaper, record, EndReason.CREATE_UNKNOWN, report)
    return matched


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
