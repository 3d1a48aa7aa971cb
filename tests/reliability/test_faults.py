"""API fault matrix: every fault ``FakeLemonSlice`` injects, on every endpoint, against the
manager (create_session, end_session, reconcile) and the reaper (run_once).

``MATRIX`` is the documented outcome of each cell, as data; ``test_fault_cell`` checks one cell:
the outcome right after the fault, then (where the outcome says so) a later clean reconcile or
reaper pass, then that nothing is lost (``assert_nothing_lost``).

Columns: ``times`` is ``once`` (only the next request fails: is it retried?) or ``always`` (every
request until the entry point gives up); ``tries`` is how many requests the faulted endpoint saw
(1: not retried, 2: retried once then fine, ``all``: every attempt of the client's RetryPolicy;
``all*2``: aiohttp itself resends an idempotent GET once when the connection drops, so a dropped
GET costs two requests per attempt; it never resends a POST, so a create is never sent twice);
``error`` is the typed error the client raised (``-``: none). Outcomes:

- ``active``: the create was retried and succeeded; the row is active.
- ``failed_intent``: the create was provably not taken; the intent is failed (create_rejected).
- ``pending_found``: outcome unknown and the server did start the session; the intent stays
  pending and reconcile (past SETTLE) adopts and ends it (create_unknown).
- ``pending_none``: outcome unknown and nothing started; pending until reconcile fails it past
  PENDING_GRACE (create_unknown).
- ``ended``: terminated; ended with the reason it was claimed for (manual / idle / create_unknown).
- ``ended_gone``: the first terminate took effect but its answer was lost; the retry's 404 ends
  the row as ``gone``.
- ``gone_trusted``: the server said 404/410 about a live session and is believed: ended as
  ``gone``. (The fake lied: its session stays live until a reconcile past SETTLE
  terminates it again, see tests/test_reconcile.py.)
- ``rescheduled_ended``: the terminate failed; the row stays ``ending`` with its lease released,
  ``next_attempt_at`` and ``last_error`` set; a clean reaper pass later ends it (its reason).
  When the failed attempt had in fact ended it remotely (a hang, a lost answer), the clean
  pass asks LemonSlice first (GET), finds it finished and ends it with its reason, with no
  second terminate.
- ``checked``: reconcile recorded the remote status.
- ``reported``: reconcile reported the error and left the row as it was; a clean reconcile
  resolves it.
- ``adopted_ended``: reconcile matched the lost create to its intent and ended it (create_unknown).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sessionmgr import config, errors
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.errors import CreateOutcomeUnknown, LemonSliceError
from sessionmgr.manager import EndResult, SessionManager
from sessionmgr.reaper import Outcome, TickResult
from sessionmgr.reconcile import HORIZON, PENDING_GRACE, SETTLE, ReconcileReport
from sessionmgr.records import SessionRecord
from sessionmgr.states import REMOTE_LIVE, EndReason, SessionStatus, can_transition
from sessionmgr.testing import FakeLemonSlice, Fault

from ..helpers import FAKE_API_KEY, TEST_RETRY, TEST_TIMEOUTS, fast_client

MATRIX_TEXT = """
endpoint   entry           fault           times   tries  outcome            error
create     create_session  400             always  1      failed_intent      ClientRequestError
create     create_session  401             always  1      failed_intent      AuthError
create     create_session  403             always  1      failed_intent      AuthError
create     create_session  404             always  1      failed_intent      ClientRequestError
create     create_session  409             always  1      failed_intent      ClientRequestError
create     create_session  410             always  1      failed_intent      ClientRequestError
create     create_session  422             always  1      failed_intent      ClientRequestError
create     create_session  429             always  all    failed_intent      RateLimitedError
create     create_session  500             always  1      pending_none       CreateOutcomeUnknown
create     create_session  502             always  1      pending_none       CreateOutcomeUnknown
create     create_session  503             always  all    failed_intent      ServerError
create     create_session  504             always  1      pending_none       CreateOutcomeUnknown
create     create_session  html_502        always  1      pending_none       CreateOutcomeUnknown
create     create_session  non_json        always  1      pending_found      CreateOutcomeUnknown
create     create_session  missing_fields  always  1      pending_found      CreateOutcomeUnknown
create     create_session  hang            always  1      pending_found      CreateOutcomeUnknown
create     create_session  drop            always  1      pending_none       CreateOutcomeUnknown
create     create_session  lost_answer     always  1      pending_found      CreateOutcomeUnknown
create     create_session  429             once    2      active             -
create     create_session  503             once    2      active             -

terminate  end_session     400             always  1      rescheduled_ended  ClientRequestError
terminate  end_session     401             always  1      rescheduled_ended  AuthError
terminate  end_session     403             always  1      rescheduled_ended  AuthError
terminate  end_session     404             always  1      gone_trusted       -
terminate  end_session     409             always  1      rescheduled_ended  ClientRequestError
terminate  end_session     410             always  1      gone_trusted       -
terminate  end_session     422             always  1      rescheduled_ended  ClientRequestError
terminate  end_session     429             always  all    rescheduled_ended  RateLimitedError
terminate  end_session     500             always  all    rescheduled_ended  ServerError
terminate  end_session     502             always  all    rescheduled_ended  ServerError
terminate  end_session     503             always  all    rescheduled_ended  ServerError
terminate  end_session     504             always  all    rescheduled_ended  ServerError
terminate  end_session     html_502        always  all    rescheduled_ended  ServerError
terminate  end_session     non_json        always  1      ended              -
terminate  end_session     missing_fields  always  1      ended              -
terminate  end_session     hang            always  all    rescheduled_ended   TransportError
terminate  end_session     drop            always  all    rescheduled_ended  TransportError
terminate  end_session     lost_answer     always  all    rescheduled_ended   TransportError
terminate  end_session     429             once    2      ended              -
terminate  end_session     500             once    2      ended              -
terminate  end_session     502             once    2      ended              -
terminate  end_session     503             once    2      ended              -
terminate  end_session     504             once    2      ended              -
terminate  end_session     html_502        once    2      ended              -
terminate  end_session     hang            once    2      ended_gone         -
terminate  end_session     drop            once    2      ended              -
terminate  end_session     lost_answer     once    2      ended_gone         -

terminate  run_once        400             always  1      rescheduled_ended  ClientRequestError
terminate  run_once        401             always  1      rescheduled_ended  AuthError
terminate  run_once        403             always  1      rescheduled_ended  AuthError
terminate  run_once        404             always  1      gone_trusted       -
terminate  run_once        409             always  1      rescheduled_ended  ClientRequestError
terminate  run_once        410             always  1      gone_trusted       -
terminate  run_once        422             always  1      rescheduled_ended  ClientRequestError
terminate  run_once        429             always  all    rescheduled_ended  RateLimitedError
terminate  run_once        500             always  all    rescheduled_ended  ServerError
terminate  run_once        502             always  all    rescheduled_ended  ServerError
terminate  run_once        503             always  all    rescheduled_ended  ServerError
terminate  run_once        504             always  all    rescheduled_ended  ServerError
terminate  run_once        html_502        always  all    rescheduled_ended  ServerError
terminate  run_once        non_json        always  1      ended              -
terminate  run_once        missing_fields  always  1      ended              -
terminate  run_once        hang            always  all    rescheduled_ended   TransportError
terminate  run_once        drop            always  all    rescheduled_ended  TransportError
terminate  run_once        lost_answer     always  all    rescheduled_ended   TransportError
terminate  run_once        429             once    2      ended              -
terminate  run_once        500             once    2      ended              -
terminate  run_once        502             once    2      ended              -
terminate  run_once        503             once    2      ended              -
terminate  run_once        504             once    2      ended              -
terminate  run_once        html_502        once    2      ended              -
terminate  run_once        hang            once    2      ended_gone         -
terminate  run_once        drop            once    2      ended              -
terminate  run_once        lost_answer     once    2      ended_gone         -

terminate  reconcile       400             always  1      rescheduled_ended  ClientRequestError
terminate  reconcile       401             always  1      rescheduled_ended  AuthError
terminate  reconcile       403             always  1      rescheduled_ended  AuthError
terminate  reconcile       404             always  1      gone_trusted       -
terminate  reconcile       409             always  1      rescheduled_ended  ClientRequestError
terminate  reconcile       410             always  1      gone_trusted       -
terminate  reconcile       422             always  1      rescheduled_ended  ClientRequestError
terminate  reconcile       429             always  all    rescheduled_ended  RateLimitedError
terminate  reconcile       500             always  all    rescheduled_ended  ServerError
terminate  reconcile       502             always  all    rescheduled_ended  ServerError
terminate  reconcile       503             always  all    rescheduled_ended  ServerError
terminate  reconcile       504             always  all    rescheduled_ended  ServerError
terminate  reconcile       html_502        always  all    rescheduled_ended  ServerError
terminate  reconcile       non_json        always  1      ended              -
terminate  reconcile       missing_fields  always  1      ended              -
terminate  reconcile       hang            always  all    rescheduled_ended   TransportError
terminate  reconcile       drop            always  all    rescheduled_ended  TransportError
terminate  reconcile       lost_answer     always  all    rescheduled_ended   TransportError
terminate  reconcile       429             once    2      ended              -
terminate  reconcile       500             once    2      ended              -
terminate  reconcile       502             once    2      ended              -
terminate  reconcile       503             once    2      ended              -
terminate  reconcile       504             once    2      ended              -
terminate  reconcile       html_502        once    2      ended              -
terminate  reconcile       hang            once    2      ended_gone         -
terminate  reconcile       drop            once    2      ended              -
terminate  reconcile       lost_answer     once    2      ended_gone         -

get        reconcile       400             always  1      reported           ClientRequestError
get        reconcile       401             always  1      reported           AuthError
get        reconcile       403             always  1      reported           AuthError
get        reconcile       404             always  1      gone_trusted       NotFoundError
get        reconcile       409             always  1      reported           ClientRequestError
get        reconcile       410             always  1      gone_trusted       NotFoundError
get        reconcile       422             always  1      reported           ClientRequestError
get        reconcile       429             always  all    reported           RateLimitedError
get        reconcile       500             always  all    reported           ServerError
get        reconcile       502             always  all    reported           ServerError
get        reconcile       503             always  all    reported           ServerError
get        reconcile       504             always  all    reported           ServerError
get        reconcile       html_502        always  all    reported           ServerError
get        reconcile       non_json        always  1      reported           InvalidResponseError
get        reconcile       missing_fields  always  1      reported           InvalidResponseError
get        reconcile       hang            always  all    reported           TransportError
get        reconcile       drop            always  all*2  reported           TransportError
get        reconcile       lost_answer     always  all*2  reported           TransportError
get        reconcile       429             once    2      checked            -
get        reconcile       500             once    2      checked            -
get        reconcile       502             once    2      checked            -
get        reconcile       503             once    2      checked            -
get        reconcile       504             once    2      checked            -
get        reconcile       html_502        once    2      checked            -
get        reconcile       hang            once    2      checked            -
get        reconcile       drop            once    2      checked            -
get        reconcile       lost_answer     once    2      checked            -

list       reconcile       400             always  1      reported           ClientRequestError
list       reconcile       401             always  1      reported           AuthError
list       reconcile       403             always  1      reported           AuthError
list       reconcile       404             always  1      reported           NotFoundError
list       reconcile       409             always  1      reported           ClientRequestError
list       reconcile       410             always  1      reported           NotFoundError
list       reconcile       422             always  1      reported           ClientRequestError
list       reconcile       429             always  all    reported           RateLimitedError
list       reconcile       500             always  all    reported           ServerError
list       reconcile       502             always  all    reported           ServerError
list       reconcile       503             always  all    reported           ServerError
list       reconcile       504             always  all    reported           ServerError
list       reconcile       html_502        always  all    reported           ServerError
list       reconcile       non_json        always  1      reported           InvalidResponseError
list       reconcile       missing_fields  always  1      reported           InvalidResponseError
list       reconcile       hang            always  all    reported           TransportError
list       reconcile       drop            always  all*2  reported           TransportError
list       reconcile       lost_answer     always  all*2  reported           TransportError
list       reconcile       429             once    2      adopted_ended      -
list       reconcile       500             once    2      adopted_ended      -
list       reconcile       502             once    2      adopted_ended      -
list       reconcile       503             once    2      adopted_ended      -
list       reconcile       504             once    2      adopted_ended      -
list       reconcile       html_502        once    2      adopted_ended      -
list       reconcile       hang            once    2      adopted_ended      -
list       reconcile       drop            once    2      adopted_ended      -
list       reconcile       lost_answer     once    2      adopted_ended      -
"""

IDLE_WINDOW = 60.0  # seconds, the manager's idle window in every cell
ALWAYS = 100  # "always": more requests than any entry point makes
HANG_TIMEOUT = 0.5  # seconds, the client's attempt limit in hang cells
HANG_SECONDS = 60.0  # the fake holds a hung answer this long (its stop() cuts it short)
RETRY_AT_LATEST = config.RETRY_MAX + 1  # seconds after which any rescheduled row is due again
CLAIMED_REASON = {
    "end_session": EndReason.MANUAL,
    "run_once": EndReason.IDLE,
    "reconcile": EndReason.CREATE_UNKNOWN,
}


@dataclasses.dataclass(frozen=True)
class Cell:
    endpoint: str
    entry: str
    fault: str
    times: str
    tries: int
    outcome: str
    error: type[LemonSliceError] | None

    def __str__(self) -> str:
        return f"{self.endpoint}-{self.entry}-{self.fault}-{self.times}"

    def make_fault(self) -> Fault:
        if self.fault.isdigit():
            code = int(self.fault)
            return Fault.status(code, retry_after=1 if code == 429 else None)
        if self.fault == "hang":
            return Fault.hang(HANG_SECONDS)
        factory: Callable[[], Fault] = getattr(Fault, self.fault)
        return factory()


def parse_matrix(text: str) -> list[Cell]:
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    assert header == ["endpoint", "entry", "fault", "times", "tries", "outcome", "error"]
    cells = []
    for endpoint, entry, fault, times, tries, outcome, error in rows:
        cells.append(
            Cell(
                endpoint=endpoint,
                entry=entry,
                fault=fault,
                times=times,
                tries=_tries(tries),
                outcome=outcome,
                error=None if error == "-" else getattr(errors, error),
            )
        )
    return cells


def _tries(text: str) -> int:
    if text == "all":
        return TEST_RETRY.attempts
    if text == "all*2":
        return 2 * TEST_RETRY.attempts
    return int(text)


MATRIX = parse_matrix(MATRIX_TEXT)


def test_the_matrix_covers_every_fault_on_every_endpoint() -> None:
    """Every kind and status the brief names, on each (endpoint, entry point) pair, at least
    'always'; and no cell twice."""
    assert len({str(c) for c in MATRIX}) == len(MATRIX)
    statuses = ["400", "401", "403", "404", "409", "410", "422", "429", "500", "502", "503"]
    kinds = [k for k in Fault.KINDS if k != "status"]
    pairs = {(c.endpoint, c.entry) for c in MATRIX}
    assert pairs == {
        ("create", "create_session"),
        ("terminate", "end_session"),
        ("terminate", "run_once"),
        ("terminate", "reconcile"),
        ("get", "reconcile"),
        ("list", "reconcile"),
    }
    for endpoint, entry in pairs:
        row = [c for c in MATRIX if (c.endpoint, c.entry) == (endpoint, entry)]
        always = {c.fault for c in row if c.times == "always"}
        assert always == {*statuses, "504", *kinds}, (endpoint, entry)
        # a "once" row exactly where the client retries: there it differs from "always"
        retried = {c.fault for c in row if c.times == "always" and c.tries > 1}
        assert {c.fault for c in row if c.times == "once"} == retried, (endpoint, entry)


# --- the rig: a fake on a FakeClock, a manager on a fresh SQLite file ---------------------------


@dataclasses.dataclass
class Rig:
    fake: FakeLemonSlice
    clock: FakeClock
    manager: SessionManager
    raised: list[LemonSliceError]  # every error the client's public methods raised

    @property
    def client(self) -> LemonSliceClient:
        return self.manager.client

    def requests(self, endpoint: str) -> int:
        return sum(1 for r in self.fake.requests if r.endpoint == endpoint)

    async def only_row(self) -> SessionRecord:
        rows = (await self.manager.repository.list(limit=10)).items
        assert len(rows) == 1, rows
        return rows[0]


def spy_on_errors(client: LemonSliceClient) -> list[LemonSliceError]:
    """Record every error the client's public calls raise (the manager catches most of them)."""
    raised: list[LemonSliceError] = []
    # creates go through _send_create (the manager sends the request it validated)
    for name in ("_send_create", "get_session", "end_session"):
        method = getattr(client, name)

        async def call(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            try:
                return await _method(*args, **kwargs)
            except LemonSliceError as exc:
                raised.append(exc)
                raise

        setattr(client, name, call)
    list_sessions = client.list_sessions

    async def listing(*args: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            async for item in list_sessions(*args, **kwargs):
                yield item
        except LemonSliceError as exc:
            raised.append(exc)
            raise

    setattr(client, "list_sessions", listing)  # noqa: B010 - mypy refuses assigning a method
    return raised


@pytest.fixture
async def rig(tmp_path: Path, sqlite_migrated_template: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    path = tmp_path / "sessions.db"
    shutil.copyfile(sqlite_migrated_template, path)
    async with (
        FakeLemonSlice(api_key=FAKE_API_KEY, clock=clock) as fake,
        fast_client(fake) as client,
        SessionManager(
            database_url=f"sqlite+aiosqlite:///{path}",
            client=client,
            clock=clock,
            reaper=False,
            idle_window=IDLE_WINDOW,
            max_age=3600.0,
        ) as manager,
    ):
        yield Rig(fake, clock, manager, spy_on_errors(client))


# --- one cell ------------------------------------------------------------------------------------


async def prepare(cell: Cell, rig: Rig) -> None:
    """The state the entry point meets: a live session, or a lost create's pending intent."""
    mgr = rig.manager
    if cell.entry in ("end_session", "run_once") or cell.endpoint == "get":
        await mgr.create_session(agent_id="agent_matrix")
    if cell.endpoint == "get":
        # reconcile takes a listed session's status from the list: only a row older than what
        # the list is read back to is asked with GET, so put it there (100 finished sessions
        # between it and the horizon fill the one page read)
        rig.clock.advance(HORIZON + 2000)
        rig.fake.seed_history(
            100, before=rig.clock.now() - timedelta(seconds=HORIZON + 10), spacing=1.0
        )
    elif cell.entry == "reconcile":  # list, terminate: a create whose answer was lost
        rig.fake.inject("create", Fault.lost_answer())
        with pytest.raises(CreateOutcomeUnknown):
            await mgr.create_session(agent_id="agent_matrix")
        rig.clock.advance(SETTLE + 1)
    if cell.entry == "run_once":
        rig.clock.advance(IDLE_WINDOW + 1)
    rig.raised.clear()


Result = SessionRecord | EndResult | TickResult | ReconcileReport


async def enter(cell: Cell, rig: Rig) -> tuple[Result | None, LemonSliceError | None]:
    """Call the entry point; only create_session and end_session may raise (typed errors)."""
    mgr = rig.manager
    try:
        if cell.entry == "create_session":
            return await mgr.create_session(agent_id="agent_matrix"), None
        if cell.entry == "end_session":
            sid = (await rig.only_row()).session_id
            assert sid is not None
            return await mgr.end_session(sid), None
    except LemonSliceError as exc:
        return None, exc
    if cell.entry == "run_once":
        return await mgr.reaper.run_once(), None
    return await mgr.reconcile(), None


@pytest.mark.parametrize("cell", MATRIX, ids=str)
async def test_fault_cell(cell: Cell, rig: Rig) -> None:
    await prepare(cell, rig)
    before = rig.requests(cell.endpoint)
    rig.fake.inject(cell.endpoint, cell.make_fault(), times=1 if cell.times == "once" else ALWAYS)
    if cell.fault == "hang":
        rig.client.timeouts = dataclasses.replace(TEST_TIMEOUTS, total=HANG_TIMEOUT)
    result, error = await enter(cell, rig)
    rig.fake.faults.clear()
    rig.client.timeouts = TEST_TIMEOUTS

    assert rig.requests(cell.endpoint) - before == cell.tries
    if cell.error is None:
        assert rig.raised == []
    else:
        assert rig.raised, "the client raised nothing"
        assert {type(e) for e in rig.raised} == {cell.error}, rig.raised
    if error is not None:  # what the caller of create_session / end_session sees
        assert type(error) is cell.error
    await CHECKS[cell.outcome](cell, rig, result, error)
    await assert_nothing_lost(rig, server_lied=cell.outcome == "gone_trusted")


# --- the outcomes -------------------------------------------------------------------------------

Check = Callable[[Cell, Rig, Any, LemonSliceError | None], Awaitable[None]]
CHECKS: dict[str, Check] = {}


def outcome(fn: Check) -> Check:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


@outcome
async def check_active(cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None) -> None:
    assert error is None
    row = await rig.only_row()
    assert result == row
    assert row.status is SessionStatus.ACTIVE
    assert rig.fake.creates == 1
    assert row.session_id in rig.fake.sessions


@outcome
async def check_failed_intent(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    row = await rig.only_row()
    assert row.status is SessionStatus.FAILED
    assert row.end_reason is EndReason.CREATE_REJECTED
    assert row.last_error
    assert cell.fault in row.last_error  # the HTTP status, for the operator
    assert rig.fake.creates == 0


@outcome
async def check_pending_found(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    row = await rig.only_row()
    assert row.status is SessionStatus.PENDING
    [sid] = rig.fake.sessions  # the server did start it, once
    assert rig.fake.live_count == 1
    rig.clock.advance(SETTLE + 1)
    report = await rig.manager.reconcile()
    assert [r.id for r in report.adopted] == [row.id]
    row = await rig.only_row()
    assert (row.status, row.end_reason, row.session_id) == (
        SessionStatus.ENDED,
        EndReason.CREATE_UNKNOWN,
        sid,
    )
    assert rig.fake.terminate_counts == {sid: 1}


@outcome
async def check_pending_none(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    row = await rig.only_row()
    assert row.status is SessionStatus.PENDING
    assert rig.fake.creates == 0
    rig.clock.advance(PENDING_GRACE + 1)
    report = await rig.manager.reconcile()
    assert [r.id for r in report.intents_failed] == [row.id]
    row = await rig.only_row()
    assert (row.status, row.end_reason) == (SessionStatus.FAILED, EndReason.CREATE_UNKNOWN)


async def ended_now(cell: Cell, rig: Rig, result: Any, reason: EndReason) -> SessionRecord:
    """The entry point ended the row (``reason``) without an error anywhere."""
    row = await rig.only_row()
    assert (row.status, row.end_reason) == (SessionStatus.ENDED, reason)
    if cell.entry == "end_session":
        assert result.changed
    elif cell.entry == "run_once":
        assert [r.id for r in result.ended] == [row.id]
    else:
        assert result.errors == []
    return row


@outcome
async def check_ended(cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None) -> None:
    row = await ended_now(cell, rig, result, CLAIMED_REASON[cell.entry])
    assert rig.fake.terminate_counts == {row.session_id: 1}


@outcome
async def check_ended_gone(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    row = await ended_now(cell, rig, result, EndReason.GONE)
    assert rig.fake.terminate_counts == {row.session_id: 1}  # the first, lost-answer try


@outcome
async def check_gone_trusted(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    if cell.endpoint == "get":
        row = await rig.only_row()
        assert [r.id for r in result.ended_remote] == [row.id]
        assert (row.status, row.end_reason) == (SessionStatus.ENDED, EndReason.GONE)
    else:
        row = await ended_now(cell, rig, result, EndReason.GONE)
    assert rig.fake.terminate_counts == {}
    assert row.session_id is not None
    assert rig.fake.sessions[row.session_id].status in REMOTE_LIVE  # the fake lied


async def rescheduled(cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None) -> str:
    """The row is ending, unleased, due again later, with the error; a clean pass finishes it."""
    row = await rig.only_row()
    assert row.session_id is not None
    if cell.entry == "end_session":
        assert error is not None
    elif cell.entry == "run_once":
        assert [r.id for r in result.outcomes[Outcome.RESCHEDULED]] == [row.id]
        assert result.auth_failed is (cell.error is errors.AuthError)
    else:
        assert len(result.errors) == 1
        assert row.session_id in result.errors[0]
    assert row.status is SessionStatus.ENDING
    assert (row.lease_owner, row.lease_until) == (None, None)
    assert row.next_attempt_at is not None
    assert row.next_attempt_at > rig.clock.now()
    if cell.fault == "429":  # the server's Retry-After (1 s) replaces the backoff
        assert row.next_attempt_at - rig.clock.now() == timedelta(seconds=1)
    assert row.last_error
    if cell.fault.isdigit():
        assert cell.fault in row.last_error
    rig.clock.advance(RETRY_AT_LATEST)
    tick = await rig.manager.reaper.run_once()
    assert [r.id for r in tick.ended] == [row.id]
    assert rig.fake.terminate_counts == {row.session_id: 1}
    return row.session_id


@outcome
async def check_rescheduled_ended(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    await rescheduled(cell, rig, result, error)
    row = await rig.only_row()
    assert (row.status, row.end_reason) == (SessionStatus.ENDED, CLAIMED_REASON[cell.entry])


@outcome
async def check_checked(cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None) -> None:
    assert (result.checked, result.errors) == (1, [])
    row = await rig.only_row()
    assert (row.status, row.remote_status) == (SessionStatus.ACTIVE, "ACTIVE")


@outcome
async def check_reported(cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None) -> None:
    assert len(result.errors) == 1
    before = await rig.only_row()
    if cell.endpoint == "get":
        assert before.session_id is not None
        assert before.session_id in result.errors[0]
        assert result.checked == 0
        assert (before.status, before.remote_status) == (SessionStatus.ACTIVE, None)
        await check_checked(cell, rig, await rig.manager.reconcile(), None)
    else:
        assert result.errors[0].startswith("listing remote sessions failed")
        assert before.status is SessionStatus.PENDING
        await check_adopted_ended(cell, rig, await rig.manager.reconcile(), None)


@outcome
async def check_adopted_ended(
    cell: Cell, rig: Rig, result: Any, error: LemonSliceError | None
) -> None:
    assert result.errors == []
    row = await rig.only_row()
    assert [r.id for r in result.adopted] == [row.id]
    assert (row.status, row.end_reason) == (SessionStatus.ENDED, EndReason.CREATE_UNKNOWN)
    assert rig.fake.terminate_counts == {row.session_id: 1}


def test_every_outcome_has_a_check() -> None:
    assert {c.outcome for c in MATRIX} == set(CHECKS)


# --- nothing is lost ----------------------------------------------------------------------------


async def assert_nothing_lost(rig: Rig, *, server_lied: bool) -> None:
    """Every session the fake holds live is live in the database (or, where the server answered
    404/410 about it, ended as gone); none was terminated twice; no row is in an impossible
    state, and every row's events are a walk through the state machine ending where it is."""
    repo = rig.manager.repository
    rows = (await repo.list(limit=100)).items
    by_sid = {r.session_id: r for r in rows if r.session_id is not None}
    for sid, remote in rig.fake.sessions.items():
        assert remote.terminate_count <= 1, f"{sid} terminated {remote.terminate_count} times"
        if remote.status in REMOTE_LIVE:
            row = by_sid.get(sid)
            assert row is not None, f"live remote session {sid} has no row"
            lied = server_lied and row.end_reason is EndReason.GONE
            assert row.live or lied, f"live remote session {sid} is {row.status} locally"
    for row in rows:
        assert_possible(row)
        events = await repo.events(row.id)
        assert events, row
        assert events[0].from_status is None
        for prev, event in itertools.pairwise(events):
            assert event.from_status is prev.to_status, events
            assert can_transition(prev.to_status, event.to_status), events
        assert events[-1].to_status is row.status, events


def assert_possible(row: SessionRecord) -> None:
    status = row.status
    if status is SessionStatus.PENDING:
        assert row.session_id is None
        assert row.end_reason is None
        assert row.ended_at is None
    elif status is SessionStatus.ACTIVE:
        assert row.session_id
        assert row.control_url
        assert row.deadline
        assert row.end_reason is None
        assert row.ended_at is None
        assert row.lease_owner is None
    elif status is SessionStatus.ENDING:
        assert row.session_id
        assert row.control_url
        assert row.end_reason is not None
        assert row.ended_at is None
        assert row.attempts >= 1
        assert (row.lease_owner is None) == (row.lease_until is None)
    elif status is SessionStatus.ENDED:
        assert row.end_reason is not None
        assert row.ended_at is not None
        assert row.lease_until is None
    else:
        assert row.session_id is None
        assert row.end_reason in (EndReason.CREATE_REJECTED, EndReason.CREATE_UNKNOWN)
        assert row.ended_at is not None
