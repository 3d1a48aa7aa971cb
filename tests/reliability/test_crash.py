"""Crash trials: SIGKILL a busy SessionManager at random moments, recover, check invariants.

Each trial: a fresh SQLite file (on PostgreSQL, when the storage tests run there: one database,
emptied between trials); the workload driver (``tests/reliability/driver.py``) creates,
touches, ends and adopts sessions while its reaper runs, against one FakeLemonSlice process that
outlives every driver (reset between trials). After K progress lines (K from a seeded RNG) it is
SIGKILLed; create answers held back by the fake put many kills between a create's POST and its
record. Then the documented recovery runs, each step its own process:

1. ``sessionmgr reconcile``: ends rows LemonSlice already finished (a terminate that landed but
   was never recorded), adopts and ends the sessions whose create answer was lost (matched to
   their pending intent), fails intents that never reached LemonSlice. No ``--end-orphans``:
   every unknown remote session must be matched to an intent of this database.
2. ``sessionmgr reap``: the cron reaper pass, not ``end-all``: the crashed backend's sessions end
   because they are due, as they would in production, not because the test ends everything.

The crashed world runs an hour behind the recovery (see driver.py), so every intent is past its
grace period, every lease expired and every session past its idle window: after recovery
nothing may be live, and nothing had to wait for that.

Invariants, from the fake's own records and the database (read with sqlite3 or asyncpg, not the
library).
At the kill: every lost create answer has a pending intent; no row is ended while its session
lives. After recovery: no live remote session; reconcile adopted exactly the lost answers and
found no orphans; every remote session has a row and every row's session exists; no session
terminated twice, and a terminate sent twice only for a row the crash left ``ending``; every row
final, its columns consistent with its status, its events a path through the state machine with
one final event.

``SESSIONMGR_CRASH_TRIALS`` (default 20) sets the count, ``SESSIONMGR_CRASH_SEED`` replays a run
(with ``SESSIONMGR_CRASH_TRIALS=1``, one trial by its own seed); ``make soak`` runs 200 and prints
the tally.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import make_url

from sessionmgr import db
from sessionmgr.states import (
    FINAL_STATUSES,
    REMOTE_LIVE,
    EndReason,
    SessionStatus,
    can_transition,
)
from sessionmgr.testing import fake_state, listening_process

from ..conftest import postgres_database
from .driver import API_KEY, LIVE_AGENT

TRIALS_ENV = "SESSIONMGR_CRASH_TRIALS"
SEED_ENV = "SESSIONMGR_CRASH_SEED"
DEFAULT_TRIALS = 20
TRIALS = int(os.environ.get(TRIALS_ENV) or DEFAULT_TRIALS)
SECONDS_PER_TRIAL = 15  # the time limit per trial: generous, for a shared, busy machine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60 + SECONDS_PER_TRIAL * TRIALS)]

ROOT = Path(__file__).resolve().parents[2]
MAX_KILL_AFTER = 60  # progress lines: K is drawn from 1..this
RECOVERY = ("reconcile", "reap")  # the documented recovery, in order, each its own process
STEP_TIMEOUT = 60.0  # seconds any one process may take

FAILED_REASONS = {EndReason.CREATE_REJECTED, EndReason.CREATE_UNKNOWN}


@dataclasses.dataclass
class Tally:
    """What the trials did, summed; ``violations`` lists every broken invariant."""

    trials: int = 0
    kills: int = 0
    remote_created: int = 0
    lost_answers: int = 0  # live remote sessions the database did not know at the kill
    recovered_by_reconcile: int = 0  # adopted from a matched intent and ended
    matched_to_a_sibling: int = 0  # of those, matched to another lost create's intent
    pending_at_kill: int = 0
    ending_at_kill: int = 0
    active_at_kill: int = 0
    intents_failed: int = 0
    reaped_in_recovery: int = 0
    terminates: int = 0  # successful terminates on the fake
    terminates_resent: int = 0  # a second terminate request for a row the crash left ending
    kills_by_last_step: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    violations: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(self.kills_by_last_step.items()))
        return (
            f"trials {self.trials}, kills {self.kills} (last step before the kill: {steps}); "
            f"remote sessions created {self.remote_created}; at the kill: "
            f"{self.pending_at_kill} pending, {self.active_at_kill} active, "
            f"{self.ending_at_kill} ending, {self.lost_answers} create answers lost; "
            f"recovered by reconcile {self.recovered_by_reconcile} "
            f"({self.matched_to_a_sibling} to a sibling intent), intents failed "
            f"{self.intents_failed}, ended by reap {self.reaped_in_recovery}; "
            f"terminates {self.terminates} (re-sent after a crash {self.terminates_resent}); "
            f"invariant violations {len(self.violations)}; {self.seconds:.1f} s"
        )


# --- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_process(*extra: str) -> Iterator[str]:
    """The driver's fake LemonSlice (on the crashed world's clock) in its own process."""
    cmd = [sys.executable, "-m", "tests.reliability.driver", "fake", *extra]
    with listening_process(cmd, cwd=ROOT, start_timeout=STEP_TIMEOUT) as url:
        yield url


def reset_fake(fake_url: str) -> None:
    async def go() -> None:
        base = fake_url.split("/api/")[0]
        async with aiohttp.ClientSession() as http, http.post(f"{base}/_fake/reset") as resp:
            resp.raise_for_status()

    asyncio.run(go())


class Driver:
    """One trial's workload process: spawned early, let go and killed by ``run_until_killed``."""

    def __init__(
        self, fake_url: str, db_url: str, progress: Path, seed: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.progress = progress
        self.err_path = progress.with_suffix(".err")
        with self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.reliability.driver",
                    "workload",
                    fake_url,
                    db_url,
                    str(progress),
                    "--seed",
                    str(seed),
                    *extra,
                ],
                cwd=ROOT,
                stderr=err,
            )

    def steps(self) -> list[str]:
        lines = self.progress.read_text().splitlines() if self.progress.exists() else []
        return [line for line in lines if line != "ready"]

    def run_until_killed(self, kill_after: int) -> str | None:
        """Start the workload, SIGKILL it once it has written ``kill_after`` steps; returns the
        step it had just done, or None if it died on its own (it runs until killed)."""
        self.progress.with_suffix(".go").touch()
        deadline = time.monotonic() + STEP_TIMEOUT
        try:
            while len(self.steps()) < kill_after:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return None
                time.sleep(0.001)
            self.proc.send_signal(signal.SIGKILL)
        finally:
            self.stop()
        return self.steps()[kill_after - 1].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STEP_TIMEOUT)

    def stderr(self) -> str:
        return self.err_path.read_text()[-2000:]


class Command:
    """``sessionmgr COMMAND --json`` in a process started early; ``run()`` lets it go."""

    def __init__(self, command: str, fake_url: str, db_url: str, go: Path) -> None:
        self.go = go
        self.ran = False
        env = {
            **os.environ,
            "LEMONSLICE_API_KEY": API_KEY,
            "LEMONSLICE_API_URL": fake_url,
            "SESSIONMGR_DATABASE_URL": db_url,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.driver", "cli", str(go), command, "--json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self) -> tuple[int, str, str]:
        self.go.touch()
        self.ran = True
        out, err = self.proc.communicate(timeout=STEP_TIMEOUT)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        """Kill it if it never ran (an earlier step failed); reap it either way."""
        if self.ran:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=STEP_TIMEOUT)


@dataclasses.dataclass
class Trial:
    """One trial's processes, all started before it begins."""

    seed: int
    db_url: str
    driver: Driver
    recovery: dict[str, Command]

    @classmethod
    def prepare(cls, fake_url: str, store: Store, seed: int) -> Trial:
        db_url = store.url_for(seed)
        driver = Driver(
            fake_url, db_url, store.workdir / f"{seed}.progress", seed, extra=store.driver_args
        )
        recovery = {
            name: Command(name, fake_url, db_url, store.workdir / f"{seed}.{name}.go")
            for name in RECOVERY
        }
        return cls(seed, db_url, driver, recovery)

    def stop(self) -> None:
        self.driver.stop()
        for command in self.recovery.values():
            command.stop()


# --- what the database and the fake hold -----------------------------------------------------


Rows = list[dict[str, Any]]


@dataclasses.dataclass
class Store:
    """Where the trials keep sessions: a fresh SQLite file each (copied from a migrated
    template), or one PostgreSQL database emptied before each trial. Read with the drivers
    themselves (sqlite3, asyncpg), not with the library under test."""

    workdir: Path
    postgres_url: str | None = None

    def __post_init__(self) -> None:
        if self.postgres_url is None:
            template = self.workdir / "template.db"
            asyncio.run(db.upgrade(f"sqlite+aiosqlite:///{template}"))
            with contextlib.closing(sqlite3.connect(template)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file

    @property
    def backend(self) -> str:
        return "sqlite" if self.postgres_url is None else "postgres"

    @property
    def driver_args(self) -> tuple[str, ...]:
        """On PostgreSQL leases follow the database's clock, which no offset moves: the
        workload takes short ones (1 s intents, 2 s claims) and ``wait_leases_out`` waits
        them out, instead of the hour-behind clock doing it as on SQLite."""
        if self.postgres_url is None:
            return ()
        return ("--intent-lease", "1", "--lease", "2")

    def wait_leases_out(self) -> None:
        """Until no lease the crashed process took is live on the database's clock."""
        if self.postgres_url is None:
            return  # its leases were stamped on the crashed world's clock, an hour ago
        query = (
            "SELECT count(*) AS n FROM sessions"
            " WHERE status IN ('pending', 'ending') AND lease_until > now()"
        )
        deadline = time.monotonic() + STEP_TIMEOUT
        while asyncio.run(self._postgres(query))[0][0]["n"]:
            if time.monotonic() > deadline:
                raise AssertionError("leases still held a minute after the kill")
            time.sleep(0.05)

    def url_for(self, seed: int) -> str:
        if self.postgres_url is not None:
            return self.postgres_url
        path = self.workdir / f"trial-{seed}.db"
        shutil.copyfile(self.workdir / "template.db", path)
        return f"sqlite+aiosqlite:///{path}"

    def empty(self) -> None:
        if self.postgres_url is not None:
            asyncio.run(self._postgres("TRUNCATE sessions, session_events RESTART IDENTITY"))

    def read(self, db_url: str) -> tuple[Rows, dict[int, Rows]]:
        """Every session row and its events."""
        queries = ("SELECT * FROM sessions ORDER BY id", "SELECT * FROM session_events ORDER BY id")
        if self.postgres_url is not None:
            rows, event_rows = asyncio.run(self._postgres(*queries))
        else:
            path = db_url.removeprefix("sqlite+aiosqlite:///")
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.row_factory = sqlite3.Row
                rows, event_rows = ([dict(r) for r in conn.execute(q)] for q in queries)
        events: dict[int, Rows] = collections.defaultdict(list)
        for e in event_rows:
            events[e["session_pk"]].append(e)
        return rows, events

    async def _postgres(self, *queries: str) -> list[Rows]:
        import asyncpg  # type: ignore[import-untyped]

        assert self.postgres_url is not None
        dsn = make_url(self.postgres_url).set(drivername="postgresql")
        conn = await asyncpg.connect(dsn.render_as_string(hide_password=False))
        try:
            return [[dict(r) for r in await conn.fetch(q)] for q in queries]
        finally:
            await conn.close()


def row_problems(row: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """What is impossible about one final row: its columns, or its event history."""
    status = SessionStatus(row["status"])
    where = f"row {row['id']} ({status}, {row['end_reason']})"
    problems = []
    if status is SessionStatus.ENDED:
        if row["session_id"] is None or row["control_url"] is None:
            problems.append(f"{where}: ended without session_id/control_url")
        if row["ended_at"] is None or row["end_reason"] is None:
            problems.append(f"{where}: ended without ended_at/end_reason")
        elif row["end_reason"] not in set(EndReason) - {EndReason.CREATE_REJECTED}:
            problems.append(f"{where}: ended for a reason no end has")
        if row["lease_until"] is not None:
            problems.append(f"{where}: ended but still leased")
    elif status is SessionStatus.FAILED:
        if row["session_id"] is not None:
            problems.append(f"{where}: failed but has a session_id")
        if row["ended_at"] is None or row["end_reason"] not in FAILED_REASONS:
            problems.append(f"{where}: failed without ended_at/a create failure reason")
    else:
        problems.append(f"{where}: still live after recovery")
    if not events:
        return [*problems, f"{where}: no events"]
    first = events[0]
    if first["from_status"] is not None or first["to_status"] not in ("pending", "active"):
        problems.append(f"{where}: history starts {first['from_status']}->{first['to_status']}")
    for before, after in itertools.pairwise(events):
        src, dst = SessionStatus(before["to_status"]), SessionStatus(after["to_status"])
        if after["from_status"] != src:
            problems.append(f"{where}: an event from {after['from_status']} after one to {src}")
        elif not can_transition(src, dst):
            problems.append(f"{where}: impossible transition {src} -> {dst}")
    finals = [e for e in events if e["to_status"] in FINAL_STATUSES]
    if len(finals) != 1 or events[-1]["to_status"] != status:
        problems.append(
            f"{where}: {len(finals)} final events, the last to {events[-1]['to_status']}"
        )
    return problems


# --- one trial -------------------------------------------------------------------------------


def run_trial(
    fake_url: str, store: Store, trial: Trial, tally: Tally, after_kill: Callable[[], None]
) -> None:
    """One trial; ``after_kill()`` runs as soon as the driver is dead (it spawns the next)."""
    seed = trial.seed
    kill_after = random.Random(seed).randint(1, MAX_KILL_AFTER)
    tag = f"{store.backend} trial seed {seed} (replay: {SEED_ENV}={seed} {TRIALS_ENV}=1)"
    problems = tally.violations
    store.empty()
    reset_fake(fake_url)
    last = trial.driver.run_until_killed(kill_after)
    after_kill()
    tally.trials += 1
    if last is None:
        problems.append(f"{tag}: the driver died before step {kill_after}: {trial.driver.stderr()}")
        return
    tally.kills += 1
    tally.kills_by_last_step[last] += 1

    # What the crash left behind.
    rows, _ = store.read(trial.db_url)
    remote = asyncio.run(fake_state(fake_url))["sessions"]
    known = {r["session_id"] for r in rows if r["session_id"] is not None}
    by_status = collections.Counter(r["status"] for r in rows)
    ending_at_kill = {r["session_id"] for r in rows if r["status"] == "ending"}
    tally.pending_at_kill += by_status["pending"]
    tally.active_at_kill += by_status["active"]
    tally.ending_at_kill += by_status["ending"]
    lost = {sid for sid, s in remote.items() if s["status"] in REMOTE_LIVE and sid not in known}
    tally.lost_answers += len(lost)
    if len(lost) > by_status["pending"]:  # each lost answer needs an intent to be matched to
        problems.append(f"{tag}: {len(lost)} lost create answers, {by_status['pending']} intents")
    for r in rows:  # a row says ended only once LemonSlice has let the session go
        if r["status"] == "ended" and remote.get(r["session_id"], {}).get("status") in REMOTE_LIVE:
            problems.append(f"{tag}: row {r['id']} ended while {r['session_id']} is live")

    # The documented recovery, each step a fresh process, once the dead process's leases ran out.
    store.wait_leases_out()
    reports = {}
    for name, command in trial.recovery.items():
        code, out, err = command.run()
        if code != 0 or err:
            problems.append(f"{tag}: {name} exited {code}: {err.strip()}")
            return
        reports[name] = json.loads(out)
    tally.recovered_by_reconcile += len(reports["reconcile"]["adopted"])
    tally.intents_failed += len(reports["reconcile"]["intents_failed"])
    tally.reaped_in_recovery += len(reports["reap"]["ended"])
    if reports["reconcile"]["orphans"]:
        problems.append(f"{tag}: reconcile found orphans {reports['reconcile']['orphans']}")
    adopted = {r["session_id"] for r in reports["reconcile"]["adopted"]}
    if adopted != lost:
        problems.append(f"{tag}: lost create answers {sorted(lost)}, adopted {sorted(adopted)}")

    # The invariants.
    state = asyncio.run(fake_state(fake_url))
    remote = state["sessions"]
    for r in reports["reconcile"]["adopted"]:  # matching is by time alone: the API says no more
        if remote[r["session_id"]]["payload"].get("agent_id") != r["agent_id"]:
            tally.matched_to_a_sibling += 1
    rows, events = store.read(trial.db_url)
    rows_by_sid = {r["session_id"]: r for r in rows if r["session_id"] is not None}
    tally.remote_created += len(remote)
    for sid, s in remote.items():
        if s["status"] in REMOTE_LIVE:
            problems.append(f"{tag}: {sid} still live on LemonSlice after recovery")
        if sid not in rows_by_sid:
            problems.append(f"{tag}: remote session {sid} has no row")
        tally.terminates += s["terminate_count"]
        if s["terminate_count"] > 1:
            problems.append(f"{tag}: {sid} terminated {s['terminate_count']} times")
    for sid, n in state["terminate_requests"].items():
        if n > 1 and sid in ending_at_kill and n == 2:
            tally.terminates_resent += 1
        elif n > 1:
            problems.append(
                f"{tag}: {n} terminate requests for {sid} (not left ending by the kill)"
            )
    for sid in rows_by_sid:
        if sid not in remote:
            problems.append(f"{tag}: row for {sid}, which LemonSlice never created")
    for row in rows:
        problems.extend(f"{tag}: {p}" for p in row_problems(row, events[row["id"]]))


def run_trials(count: int, seed: int, store: Store) -> Tally:
    tally = Tally()
    started = time.monotonic()
    rng = random.Random(seed)
    seeds = [seed] if count == 1 else [rng.getrandbits(31) for _ in range(count)]
    with fake_process() as fake_url:
        ready = [Trial.prepare(fake_url, store, seeds[0])]
        try:
            for i in range(len(seeds)):
                trial = ready.pop()

                def spawn_next(i: int = i) -> None:
                    if i + 1 < len(seeds):
                        ready.append(Trial.prepare(fake_url, store, seeds[i + 1]))

                try:
                    run_trial(fake_url, store, trial, tally, spawn_next)
                finally:
                    trial.stop()
        finally:
            for trial in ready:
                trial.stop()
    tally.seconds = time.monotonic() - started
    return tally


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def postgres_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """None for SQLite; else a migrated PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield None
    else:
        async with postgres_database() as url:
            await db.upgrade(url)
            yield url


def test_crash_trials(postgres_url: str | None, tmp_path: Path) -> None:
    count = TRIALS
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().getrandbits(31))
    store = Store(tmp_path, postgres_url)
    print(f"crash trials on {store.backend}: {SEED_ENV}={seed} {TRIALS_ENV}={count}")
    tally = run_trials(count, seed, store)
    print(f"crash trials on {store.backend}: {tally.summary()}")
    assert tally.kills == count, tally.violations[:5]
    assert not tally.violations, "\n".join(tally.violations[:20])
    # The kills reached the window the intent exists for (about 2 trials in 3 lose an answer).
    if count >= DEFAULT_TRIALS:
        assert tally.lost_answers > 0, tally.summary()


def test_invariant_checker_flags_impossible_rows() -> None:
    """The checker the trials rely on does reject what it must (else no trial could fail)."""
    ended = {
        "id": 1,
        "status": "ended",
        "session_id": "sess_1",
        "control_url": "http://x/sess_1/control",
        "ended_at": "2026-01-01 00:00:10",
        "end_reason": "idle",
        "lease_until": None,
    }

    def event(src: str | None, dst: str) -> dict[str, Any]:
        return {"from_status": src, "to_status": dst}

    history = [
        event(None, "pending"),
        event("pending", "active"),
        event("active", "ending"),
        event("ending", "ending"),  # a lease taken over
        event("ending", "ended"),
    ]
    assert row_problems(ended, history) == []
    failed = {**ended, "status": "failed", "session_id": None, "end_reason": "create_unknown"}
    failed_history = [event(None, "pending"), event("pending", "failed")]
    assert row_problems(failed, failed_history) == []

    bad_rows = [
        ({**ended, "ended_at": None}, history),
        ({**ended, "session_id": None}, history),
        ({**ended, "lease_until": "2026-01-01 00:01:00"}, history),
        ({**ended, "end_reason": "create_rejected"}, history),
        ({**ended, "end_reason": "bored"}, history),
        ({**failed, "session_id": "sess_1"}, failed_history),
        ({**failed, "end_reason": "idle"}, failed_history),
        ({**ended, "status": "active", "ended_at": None, "end_reason": None}, history[:2]),
    ]
    for row, events in bad_rows:
        assert row_problems(row, events), row
    bad_histories = [
        [],
        history[1:],  # no intent or adoption first
        [*history[:2], event("ending", "ended")],  # a gap: active, then from ending
        [*history[:2], event("active", "pending")],  # not a transition of the state machine
        [*history, event("ended", "ended")],  # ended twice
        history[:-1],  # the row says ended, its history does not
    ]
    for events in bad_histories:
        assert row_problems(ended, events), events


# --- recovery while others create -------------------------------------------------------------
#
# The trials above recover in an empty world. Here a live backend (driver ``live``: real clock,
# reaper on, so its ticks recover the crashed process's intents) keeps creating with
# multi-second creates (the fake holds every create's answer ``LIVE_HOLD_CREATE`` seconds after
# its session started) while the workload is killed, ``sessionmgr reconcile`` runs in the middle
# of it, and recovery happens. The crashed workload runs on the real clock too, with a short
# intent lease and claim lease, so recovery is seconds away.
#
# Invariants, from the fake's own records: no session the live backend was handed, or was still
# waiting for, is terminated by anyone (its idle window is 600 s, it never ends one); it never
# got an error; each session it was handed has its active row. Everything the crashed workload
# started ends (no live remote session outside the live backend's), every remote session has a
# row, and every row but the live backend's is final and consistent.

LIVE_TRIALS_ENV = "SESSIONMGR_LIVE_TRIALS"
DEFAULT_LIVE_TRIALS = 2
LIVE_TRIALS = int(os.environ.get(LIVE_TRIALS_ENV) or DEFAULT_LIVE_TRIALS)
LIVE_HOLD_CREATE = 2.0  # seconds every create takes to answer
CRASHED_INTENT_LEASE = 1.0  # seconds: the crashed workload's intents are recoverable this soon
CRASHED_LEASE = 2.0  # seconds: its ending rows are taken over this soon
CRASHED_CREATE_TIMEOUT = 4.0  # seconds: past the hold, short of the 5 s lost-answer hang
RECOVERY_DEADLINE = 60.0  # seconds for the live backend to end all the crashed one left


@dataclasses.dataclass
class LiveTally:
    trials: int = 0
    live_created: int = 0  # sessions handed to the live backend
    live_in_flight_at_stop: int = 0
    crashed_remote: int = 0
    crashed_lost_answers: int = 0
    intents_deferred: int = 0  # the crashed workload's intents that never reached LemonSlice
    recovery_seconds: list[float] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.recovery_seconds, default=0.0)
        return (
            f"trials {self.trials}; live backend handed {self.live_created} sessions "
            f"({self.live_in_flight_at_stop} more in flight at its stop), none terminated; "
            f"crashed workload: {self.crashed_remote} remote sessions, "
            f"{self.crashed_lost_answers} create answers lost, all ended within "
            f"{worst:.1f} s of the kill, {self.intents_deferred} intents that never reached "
            f"LemonSlice deferred; invariant violations {len(self.violations)}"
        )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run_live_trial(fake_url: str, store: Store, seed: int, tally: LiveTally) -> None:
    tag = f"{store.backend} live trial seed {seed} ({SEED_ENV}={seed} {LIVE_TRIALS_ENV}=1)"
    problems = tally.violations
    store.empty()
    reset_fake(fake_url)
    db_url = store.url_for(seed)
    progress = store.workdir / f"live-{seed}.progress"
    stop = store.workdir / f"live-{seed}.stop"
    live_progress = store.workdir / f"live-{seed}.live"
    live_err = live_progress.with_suffix(".err")
    with live_err.open("w") as err:
        live = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.driver",
                "live",
                fake_url,
                db_url,
                str(live_progress),
                str(stop),
            ],
            cwd=ROOT,
            stderr=err,
        )
    driver = Driver(
        fake_url,
        db_url,
        progress,
        seed,
        extra=(
            "--offset",
            "0",
            "--intent-lease",
            str(CRASHED_INTENT_LEASE),
            "--lease",
            str(CRASHED_LEASE),
            "--create-timeout",
            str(CRASHED_CREATE_TIMEOUT),
        ),
    )
    reconcile = Command("reconcile", fake_url, db_url, store.workdir / f"live-{seed}.rec.go")
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not any(line.startswith("got ") for line in _lines(live_progress)):
            if live.poll() is not None or time.monotonic() > deadline:
                problems.append(f"{tag}: the live backend never created: {live_err.read_text()}")
                return
            time.sleep(0.01)
        kill_after = random.Random(seed).randint(1, MAX_KILL_AFTER)
        tally.trials += 1
        if driver.run_until_killed(kill_after) is None:
            problems.append(f"{tag}: the driver died early: {driver.stderr()}")
            return
        killed = time.monotonic()
        crashed_rows, _ = store.read(db_url)
        crashed_known = {r["session_id"] for r in crashed_rows if r["agent_id"] != LIVE_AGENT}
        remote = asyncio.run(fake_state(fake_url))["sessions"]
        tally.crashed_lost_answers += sum(
            1
            for sid, s in remote.items()
            if s["payload"].get("agent_id") != LIVE_AGENT
            and s["status"] in REMOTE_LIVE
            and sid not in crashed_known
        )
        # the original race: a reconcile while creates are in flight and intents are lost
        code, out, stderr = reconcile.run()
        if code != 0:
            problems.append(f"{tag}: reconcile exited {code}: {stderr.strip()}")
        elif json.loads(out)["orphans"]:
            problems.append(f"{tag}: reconcile reported orphans {json.loads(out)['orphans']}")
        # the live backend's reaper recovers everything the crashed one left
        while True:
            remote = asyncio.run(fake_state(fake_url))["sessions"]
            rows, _ = store.read(db_url)
            left = [
                sid
                for sid, s in remote.items()
                if s["payload"].get("agent_id") != LIVE_AGENT and s["status"] in REMOTE_LIVE
            ]
            unfinished = [r["id"] for r in rows if _unrecovered(r)]
            if not left and not unfinished:
                tally.recovery_seconds.append(time.monotonic() - killed)
                break
            if time.monotonic() - killed > RECOVERY_DEADLINE:
                problems.append(
                    f"{tag}: {RECOVERY_DEADLINE:g} s after the kill, live {left}, rows {unfinished}"
                )
                break
            time.sleep(0.05)
    finally:
        stop.touch()
        try:
            live.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            live.kill()
            problems.append(f"{tag}: the live backend did not stop")
        driver.stop()
        reconcile.stop()
    if live.returncode != 0:
        problems.append(f"{tag}: the live backend exited {live.returncode}: {live_err.read_text()}")

    # The invariants, from the fake's own records.
    state = asyncio.run(fake_state(fake_url))
    remote = state["sessions"]
    rows, events = store.read(db_url)
    rows_by_sid = {r["session_id"]: r for r in rows if r["session_id"] is not None}
    steps = _lines(live_progress)
    handed = {line.split()[1] for line in steps if line.startswith("got ")}
    tally.live_created += len(handed)
    problems.extend(f"{tag}: live backend: {line}" for line in steps if line.startswith("error"))
    live_remote = {sid for sid, s in remote.items() if s["payload"].get("agent_id") == LIVE_AGENT}
    tally.live_in_flight_at_stop += len(live_remote - handed)
    for sid in live_remote:
        s = remote[sid]
        if s["status"] not in REMOTE_LIVE or state["terminate_requests"].get(sid):
            what = "handed to" if sid in handed else "awaited by"
            problems.append(f"{tag}: {sid}, {what} the live backend, was ended ({s['status']})")
    for sid in handed:
        row = rows_by_sid.get(sid)
        if row is None or row["status"] != "active":
            problems.append(f"{tag}: {sid} was handed over but its row is {row and row['status']}")
    for sid, s in remote.items():
        if sid in live_remote:
            continue
        tally.crashed_remote += 1
        if s["status"] in REMOTE_LIVE:
            problems.append(f"{tag}: {sid} of the crashed workload still live")
        if sid not in rows_by_sid:
            problems.append(f"{tag}: remote session {sid} has no row")
        if s["terminate_count"] > 1:
            problems.append(f"{tag}: {sid} terminated {s['terminate_count']} times")
    for row in rows:
        if row["agent_id"] == LIVE_AGENT:
            continue
        if row["status"] == "pending" and not _unrecovered(row):
            tally.intents_deferred += 1  # never reached LemonSlice: failed after the grace
            continue
        problems.extend(f"{tag}: {p}" for p in row_problems(row, events[row["id"]]))


def _unrecovered(row: dict[str, Any]) -> bool:
    """A crashed workload's row recovery has not dealt with yet. A pending intent with no
    session is done once recovery has looked and deferred it (``next_attempt_at``): it is
    failed after the 10-minute grace (the trials above check that part, an hour later)."""
    if row["agent_id"] == LIVE_AGENT or row["status"] in ("ended", "failed"):
        return False
    return not (row["status"] == "pending" and row["next_attempt_at"] is not None)


def test_recovery_while_others_create(postgres_url: str | None, tmp_path: Path) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().getrandbits(31))
    store = Store(tmp_path, postgres_url)
    rng = random.Random(seed)
    seeds = [seed] if LIVE_TRIALS == 1 else [rng.getrandbits(31) for _ in range(LIVE_TRIALS)]
    print(f"live trials on {store.backend}: {SEED_ENV}={seed} {LIVE_TRIALS_ENV}={LIVE_TRIALS}")
    tally = LiveTally()
    with fake_process("--offset", "0", "--hold-create", str(LIVE_HOLD_CREATE)) as fake_url:
        for trial_seed in seeds:
            run_live_trial(fake_url, store, trial_seed, tally)
    print(f"live trials on {store.backend}: {tally.summary()}")
    assert tally.trials == LIVE_TRIALS, tally.violations[:5]
    assert not tally.violations, "\n".join(tally.violations[:20])
    assert tally.live_created > 0, tally.summary()
