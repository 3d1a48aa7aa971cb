"""The repository refuses exactly what ``sessionmgr.transitions`` refuses.

Every (situation, action) pair on both backends: a fresh row is put in the situation (a status
and the lease it holds), the module's condition is asked about the row as stored, and the
repository's operation for that action is run. It applies exactly when the module says it may;
when refused, the row is left as it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from sessionmgr.clock import FakeClock
from sessionmgr.repository import EndRequest, SessionRepository
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.transitions import CONDITIONS, Action, as_row

ME = "me"
OTHER = "other"
LEASE = 30.0
MANUAL, SHUTDOWN = EndReason.MANUAL, EndReason.SHUTDOWN
SHORT = 10.0  # a lease (or idle window) the situation then lets run out

_sids = itertools.count(1)


def _sid() -> str:
    return f"s-{next(_sids)}"


async def _pending(repo: SessionRepository, clock: FakeClock, owner: str, expire: bool) -> int:
    intent = await repo.record_intent(
        idle_window=3600, max_age=None, owner=owner, lease=SHORT if expire else LEASE
    )
    if expire:
        clock.advance(2 * SHORT)
    return intent.id


async def _active(repo: SessionRepository, clock: FakeClock, *, due: bool = False) -> int:
    intent = await repo.record_intent(
        idle_window=SHORT if due else 3600, max_age=None, owner=ME, lease=LEASE
    )
    record = await repo.mark_active(intent.id, session_id=_sid(), room_url=None, control_url="c")
    assert record is not None
    if due:
        clock.advance(2 * SHORT)
    return record.id


async def _ending(
    repo: SessionRepository, clock: FakeClock, owner: str, *, expire: bool = False
) -> int:
    pk = await _active(repo, clock)
    lease = SHORT if expire else LEASE
    found = await repo.claim_end(pk, owner=owner, lease=lease, reason=EndReason.MANUAL)
    assert found.claimed
    if expire:
        clock.advance(2 * SHORT)
    return pk


async def _rescheduled(repo: SessionRepository, clock: FakeClock) -> int:
    pk = await _ending(repo, clock, OTHER)
    retry_at = clock.now() + timedelta(seconds=100)
    assert await repo.reschedule(pk, owner=OTHER, error="boom", retry_at=retry_at)
    return pk


async def _ended(repo: SessionRepository, clock: FakeClock) -> int:
    pk = await _ending(repo, clock, ME)
    assert await repo.mark_ended(pk, owner=ME) is not None
    return pk


async def _failed(repo: SessionRepository, clock: FakeClock) -> int:
    pk = await _pending(repo, clock, ME, expire=False)
    assert await repo.mark_failed(pk, reason=EndReason.CREATE_REJECTED)
    return pk


Setup = Callable[[SessionRepository, FakeClock], Awaitable[int]]

SITUATIONS: dict[str, Setup] = {
    "pending, mine": lambda r, c: _pending(r, c, ME, expire=False),
    "pending, another's": lambda r, c: _pending(r, c, OTHER, expire=False),
    "pending, lease ran out": lambda r, c: _pending(r, c, OTHER, expire=True),
    "active": lambda r, c: _active(r, c),
    "active, due": lambda r, c: _active(r, c, due=True),
    "ending, mine": lambda r, c: _ending(r, c, ME),
    "ending, another's": lambda r, c: _ending(r, c, OTHER),
    "ending, lease ran out": lambda r, c: _ending(r, c, OTHER, expire=True),
    "ending, retry later": _rescheduled,
    "ended": _ended,
    "failed": _failed,
}

Run = Callable[[SessionRepository, FakeClock, int], Awaitable[bool]]


async def _claimed_due(repo: SessionRepository, _clock: FakeClock, pk: int) -> bool:
    return pk in {r.id for r in await repo.claim_due(owner=ME, limit=1000, lease=LEASE)}


async def _claimed_intent(repo: SessionRepository, _clock: FakeClock, pk: int) -> bool:
    return pk in {r.id for r in await repo.claim_intents(owner=ME, lease=LEASE, limit=1000)}


async def _ended_in_bulk(repo: SessionRepository, _clock: FakeClock, pk: int) -> bool:
    return pk in await repo.end_many([EndRequest(pk)], owner=ME)


# action -> the repository operations that perform it (each must agree with the module)
OPERATIONS: dict[Action, list[Run]] = {
    Action.ACTIVATE: [
        lambda r, _c, pk: _not_none(
            r.mark_active(pk, session_id=_sid(), room_url=None, control_url="c")
        ),
    ],
    Action.FAIL: [lambda r, _c, pk: r.mark_failed(pk, reason=EndReason.CREATE_UNKNOWN)],
    Action.CLAIM_END: [
        lambda r, _c, pk: _claimed(r.claim_end(pk, owner=ME, lease=LEASE, reason=MANUAL)),
        lambda r, _c, pk: _not_none(r.begin_end(pk, owner=ME, lease=LEASE, reason=SHUTDOWN)),
    ],
    Action.RESCHEDULE: [
        lambda r, c, pk: r.reschedule(
            pk, owner=ME, error="x", retry_at=c.now() + timedelta(seconds=60)
        ),
    ],
    Action.END: [
        lambda r, _c, pk: _not_none(r.mark_ended(pk, owner=ME)),
        _ended_in_bulk,
    ],
    Action.END_UNLEASED: [lambda r, _c, pk: _not_none(r.mark_ended(pk, owner=None))],
    Action.END_REMOTE: [
        lambda r, _c, pk: r.mark_ended_remote(
            pk, reason=EndReason.REMOTE_COMPLETED, remote_status="COMPLETED", cost=None
        ),
    ],
    Action.CONTROL: [lambda r, _c, pk: _not_none(r.record_control(pk, detail="speak"))],
    Action.RESOLVE_INTENT: [
        lambda r, _c, pk: r.release_intent(pk, owner=ME),
        lambda r, c, pk: _not_none(
            r.adopt_intent(pk, owner=ME, session_id=_sid(), control_url="c", created_at=c.now())
        ),
    ],
    Action.RECORD_COST: [
        lambda r, _c, pk: r.record_cost(pk, cost=1.5, remote_status=None, retry_at=None),
    ],
    Action.CLAIM_DUE: [_claimed_due],
    Action.CLAIM_INTENT: [_claimed_intent],
}


async def _not_none(result: Awaitable[object]) -> bool:
    return await result is not None


async def _claimed(result: Awaitable[object]) -> bool:
    return bool(getattr(await result, "claimed"))  # noqa: B009 - an EndClaim


def test_every_action_has_its_operations() -> None:
    assert set(OPERATIONS) == set(Action) == set(CONDITIONS)


@pytest.mark.parametrize("situation", list(SITUATIONS))
async def test_repository_refuses_what_the_module_refuses(
    repo: SessionRepository, repo_clock: FakeClock, situation: str
) -> None:
    allowed_somewhere: set[Action] = set()
    for action, operations in OPERATIONS.items():
        for operation in operations:
            pk = await SITUATIONS[situation](repo, repo_clock)
            before = await repo.get(pk)
            now = repo_clock.now()
            allowed = CONDITIONS[action](as_row(before), ME, now, now)
            applied = await operation(repo, repo_clock, pk)
            assert applied == allowed, (situation, action, before)
            if not applied:
                assert await repo.get(pk) == before, (situation, action)
            else:
                allowed_somewhere.add(action)
    # the situations are the ones each action is about: it applies in at least one of them
    expected = {
        "pending, mine": {Action.ACTIVATE, Action.FAIL, Action.RESOLVE_INTENT},
        "pending, lease ran out": {Action.ACTIVATE, Action.FAIL, Action.CLAIM_INTENT},
        "active": {Action.CLAIM_END, Action.END_REMOTE, Action.CONTROL},
        "active, due": {Action.CLAIM_DUE, Action.CLAIM_END, Action.CONTROL},
        "ending, mine": {Action.RESCHEDULE, Action.END},
        "ending, lease ran out": {Action.CLAIM_END, Action.END_UNLEASED, Action.CLAIM_DUE},
        "ended": {Action.RECORD_COST},
        "failed": set(),
    }
    if situation in expected:
        assert expected[situation] <= allowed_somewhere, situation
    if situation == "failed":
        assert not allowed_somewhere


def test_statuses_covered() -> None:
    """Every status appears among the situations."""
    statuses = {name.split(",")[0] for name in SITUATIONS}
    assert statuses == {s.value for s in SessionStatus}
