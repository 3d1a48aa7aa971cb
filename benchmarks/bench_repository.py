"""Repository throughput and query costs on SQLite, side by side in one run (issue 3).

1. Write rate: the repository with 50 concurrent writers, each session recorded as an intent
   and then marked active (two transitions, each awaited until committed, each with its event
   row), against its limit: raw sqlite3 running the same batched statements (per batch of 50:
   one transaction with the INSERT executemany and its events' executemany, then one with the
   conditional UPDATE executemany and its events'). Reported as repository / limit; raw
   single-row transactions and naive SQLAlchemy async (one transaction per write) for context.
2. ``claim_due``, and a whole reaper tick (``Reaper.run_once``: flush touches, claim), with
   nothing due on 10k rows and on 1M rows. Target: ratio <= 1.5.
3. ``stats`` and ``list --status active --limit 50`` on 1M rows against the very same SQL
   (captured from the repository) run through raw sqlite3. Targets: stats <= 2x, list (P4) <= 3x.

Big tables are filled with raw sqlite3 ``executemany`` into a migrated file.

    python -m benchmarks.bench_repository [--smoke] [--only writes|claims|stats|list]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import event, insert

from sessionmgr import db
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.models import sessions
from sessionmgr.reaper import Reaper
from sessionmgr.records import SessionFilter
from sessionmgr.repository import SessionRepository
from sessionmgr.states import SessionStatus

from .common import median, print_table, record, timer

WRITERS = 50  # concurrent tasks writing through one repository
BATCH = WRITERS  # ops per transaction of the raw limit: what 50 writers give the group writer
CLAIM_TARGET = 1.5  # claim_due time on the big table over the small one
STATS_TARGET = 2.0  # repository stats over the same SQL in raw sqlite3
LIST_TARGET = 3.0  # P4: repository list over the same SQL in raw sqlite3

FULL = {"raw": 30_000, "naive": 3_000, "sessions": 10_000, "small": 10_000, "big": 1_000_000}
SMOKE = {"raw": 500, "naive": 200, "sessions": 300, "small": 1_000, "big": 5_000}
WRITE_ROUNDS = {"full": 3, "smoke": 1}
CLAIM_RUNS = {"full": 300, "smoke": 30}
STATS_RUNS = {"full": 5, "smoke": 2}
LIST_RUNS = {"full": 200, "smoke": 20}

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(db.BUSY_TIMEOUT * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _row(i: int, status: str, created: datetime) -> tuple[Any, ...]:
    """A plausible row: ended history, or live sessions whose deadline is far away."""
    ended = status in ("ended", "failed")
    deadline = None if status == "pending" else created + timedelta(days=3650)
    return (
        None if status == "pending" else f"sess_{i:09d}",
        status,
        f"agent_{i % 20}",
        60.0,
        3600.0,
        _ts(created),
        _ts(created),
        _ts(created),
        _ts(deadline),
        _ts(created + timedelta(hours=1)),
        _ts(created + timedelta(minutes=5 + i % 50)) if ended else None,
        ("idle" if i % 3 else "manual") if ended else None,
        0.01 * (i % 100) if ended else None,
        1 if status in ("ended", "ending") else 0,
        json.dumps({"user": f"u{i % 1000}"}),
        "https://control.example/x" if status != "pending" else None,
        "lease" if status == "ending" else None,
        _ts(created + timedelta(days=3650)) if status == "ending" else None,
    )


_ROW_SQL = (
    "INSERT INTO sessions (session_id, status, agent_id, idle_window, max_age, created_at,"
    " updated_at, last_activity_at, deadline, expires_at, ended_at, end_reason, cost, attempts,"
    " metadata, control_url, lease_owner, lease_until)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _rows(n: int) -> Iterator[tuple[Any, ...]]:
    """n rows spread over 30 days before NOW: 99% finished, the rest live and not due."""
    span = 30 * 86400
    for i in range(n):
        created = NOW - timedelta(seconds=span * (n - i) / n)
        kind = i % 100
        status = (
            "active"
            if kind == 0
            else "ending"
            if kind == 1 and i % 1000 == 1
            else "failed"
            if kind == 2
            else "ended"
        )
        yield _row(i, status, created)


async def _migrated(path: Path) -> None:
    await db.upgrade(_url(path))


def _populate(path: Path, n: int) -> None:
    conn = _raw(path)
    conn.execute("BEGIN")
    conn.executemany(_ROW_SQL, _rows(n))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


# --- 1. write rates ------------------------------------------------------------------------------


def trivial_rate(path: Path, n: int) -> float:
    """The machine's single-row transaction rate with no indexes to maintain (for context)."""
    conn = _raw(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT)")
    started = timer()
    for _ in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (x) VALUES ('x')")
        conn.execute("COMMIT")
    elapsed = timer() - started
    conn.close()
    return n / elapsed


def raw_rate(path: Path, n: int) -> float:
    """Single-row transactions inserting the row a session starts as, into the real schema."""
    conn = _raw(path)
    row = _row(0, "pending", NOW)
    started = timer()
    for _ in range(n):
        conn.execute("BEGIN")
        conn.execute(_ROW_SQL, row)
        conn.execute("COMMIT")
    elapsed = timer() - started
    conn.close()
    return n / elapsed


_EVENT_SQL = (
    "INSERT INTO session_events (session_pk, at, from_status, to_status, reason, detail)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_ACTIVE_SQL = (
    "UPDATE sessions SET status = 'active', session_id = ?, control_url = ?,"
    " last_activity_at = ?, deadline = ?, updated_at = ? WHERE id = ? AND status = 'pending'"
)


def batched_limit_rate(path: Path, n: int) -> float:
    """Transitions/s of raw sqlite3 writing what the repository writes for ``n`` creates, in
    batches of ``BATCH``: the limit of any group-committed writer on this machine."""
    conn = _raw(path)
    at = _ts(NOW)
    deadline = _ts(NOW + timedelta(seconds=60))
    started = timer()
    for first in range(1, n + 1, BATCH):
        ids = range(first, min(first + BATCH, n + 1))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO sessions (id, status, agent_id, idle_window, max_age, created_at,"
            " updated_at, last_activity_at, expires_at, attempts, metadata, transport_type)"
            " VALUES (?, 'pending', 'agent', 60.0, 3600.0, ?, ?, ?, ?, 0, ?, 'daily')",
            [(i, at, at, at, _ts(NOW + timedelta(hours=1)), f'{{"user": "u{i}"}}') for i in ids],
        )
        conn.executemany(_EVENT_SQL, [(i, at, None, "pending", "create", None) for i in ids])
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            _ACTIVE_SQL, [(f"bench_{i}", "https://c/x", at, deadline, at, i) for i in ids]
        )
        conn.executemany(_EVENT_SQL, [(i, at, "pending", "active", None, None) for i in ids])
        conn.execute("COMMIT")
    elapsed = timer() - started
    conn.close()
    return 2 * n / elapsed


async def naive_rate(path: Path, n: int) -> float:
    engine = db.create_engine(_url(path))
    values = {
        "status": "pending",
        "idle_window": 60.0,
        "created_at": NOW,
        "updated_at": NOW,
        "last_activity_at": NOW,
        "attempts": 0,
        "metadata": {},
    }
    stmt = insert(sessions)
    try:
        started = timer()
        for _ in range(n):
            async with engine.begin() as conn:
                await conn.execute(stmt, values)
        return n / (timer() - started)
    finally:
        await engine.dispose()


async def repository_rate(path: Path, n_sessions: int) -> tuple[float, float]:
    """Transitions/s with WRITERS concurrent writers, and the mean ops per transaction."""
    repo = await SessionRepository.open(_url(path), clock=FakeClock(NOW))
    counter = iter(range(n_sessions))

    async def writer() -> None:
        for i in counter:
            intent = await repo.record_intent(
                agent_id="agent", idle_window=60, max_age=3600, metadata={"user": f"u{i}"}
            )
            active = await repo.mark_active(
                intent.id, session_id=f"bench_{i}", room_url=None, control_url="https://c/x"
            )
            assert active is not None

    try:
        started = timer()
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
        elapsed = timer() - started
        per_txn = repo.writer.ops / max(repo.writer.batches, 1)
    finally:
        await repo.close()
    return 2 * n_sessions / elapsed, per_txn


# --- 2. claim cost -------------------------------------------------------------------------------


async def claim_time(path: Path, runs: int) -> float:
    """Median seconds of one claim_due that finds nothing due."""
    repo = await SessionRepository.open(_url(path), clock=FakeClock(NOW))
    try:
        times = []
        for _ in range(runs):
            started = timer()
            claimed = await repo.claim_due(owner="bench", limit=500, lease=60)
            times.append(timer() - started)
            assert not claimed, "the benchmark table has nothing due"
        return median(times)
    finally:
        await repo.close()


async def tick_time(path: Path, runs: int) -> float:
    """Median seconds of one reaper tick that finds nothing due (no HTTP is sent)."""
    clock = FakeClock(NOW)
    repo = await SessionRepository.open(_url(path), clock=clock)
    try:
        # Nothing is due, so the client never connects; the port is a closed one on purpose.
        async with LemonSliceClient("unused", api_url="http://127.0.0.1:9/sessions") as client:
            reaper = Reaper(repo, client, clock=clock, owner="bench")
            times = []
            for _ in range(runs):
                started = timer()
                result = await reaper.run_once()
                times.append(timer() - started)
                assert not result.ended, "the benchmark table has nothing due"
            return median(times)
    finally:
        await repo.close()


# --- 3. stats and list against raw sqlite3 -------------------------------------------------------

Call = Callable[[SessionRepository], Awaitable[object]]


async def versus_raw(path: Path, call: Call, runs: int) -> dict[str, float]:
    """Median seconds of ``call(repo)``, of the same SELECTs through raw sqlite3, and through
    bare aiosqlite (the floor of any asyncio access: every call hops to the driver's thread),
    the three alternating call by call so a busy machine slows them alike; and the repository
    call's CPU: on the event-loop thread and in the whole process (the read threads too)."""
    repo = await SessionRepository.open(_url(path), clock=FakeClock(NOW))
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, params))

    conn = _raw(path)
    try:
        await call(repo)  # warm the statement cache and the page cache
        # the reads' own engine on SQLite (sessionmgr/reader.py), made by the first read, and
        # its prepared SELECTs, which run on the driver without SQLAlchemy
        engine = repo._reader.sync_engine or repo.engine.sync_engine
        event.listen(engine, "before_cursor_execute", capture)
        repo._reader.trace = lambda sql, args: captured.append((sql, tuple(args)))
        await call(repo)
        event.remove(engine, "before_cursor_execute", capture)
        repo._reader.trace = None
        assert captured, "no SELECT captured"

        def raw_call() -> None:
            conn.execute("BEGIN")
            for statement, params in captured:
                conn.execute(statement, params).fetchall()
            conn.execute("COMMIT")

        times: dict[str, list[float]] = {"repo": [], "raw": [], "floor": []}
        loop_cpu = process_cpu = 0.0
        async with aiosqlite.connect(path, isolation_level=None) as aconn:
            for _ in range(runs):
                cpu_loop, cpu_all, started = time.thread_time(), time.process_time(), timer()
                await call(repo)
                times["repo"].append(timer() - started)
                loop_cpu += time.thread_time() - cpu_loop
                process_cpu += time.process_time() - cpu_all
                started = timer()
                raw_call()
                times["raw"].append(timer() - started)
                started = timer()
                await aconn.execute("BEGIN")
                for statement, params in captured:
                    await (await aconn.execute(statement, params)).fetchall()
                await aconn.execute("COMMIT")
                times["floor"].append(timer() - started)
    finally:
        conn.close()
        await repo.close()
    return {
        "repo": median(times["repo"]),
        "raw": median(times["raw"]),
        "floor": median(times["floor"]),
        "loop_cpu": loop_cpu / runs,
        "process_cpu": process_cpu / runs,
    }


async def _stats(repo: SessionRepository) -> object:
    return await repo.stats(now=NOW)


async def _list_active(repo: SessionRepository) -> object:
    """What ``sessionmgr list --status active --limit 50`` asks the repository."""
    page = await repo.list(SessionFilter(statuses=[SessionStatus.ACTIVE]), limit=50)
    assert len(page.items) == 50
    return page


# --- main ----------------------------------------------------------------------------------------


PARTS = ("writes", "claims", "stats", "list")


async def main(smoke: bool, only: str | None = None) -> dict[str, float]:
    """Every part (``only``: that one alone, printed and not recorded in results.json)."""
    size = SMOKE if smoke else FULL
    mode = "smoke" if smoke else "full"
    parts = [only] if only else list(PARTS)
    figures: dict[str, float] = {}
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool, target: str) -> str:
        if smoke:  # tiny tables measure fixed overheads, not the targets
            return f"{target} (judged at full size)"
        return f"{target} {'ok' if ok else 'MISSED'}"

    with tempfile.TemporaryDirectory(prefix="bench_repository_") as tmp:
        base = Path(tmp)
        if "writes" in parts:
            rows += await _writes(base, size, mode, figures)
        if parts != ["writes"]:
            for name in ("small", "big"):
                await _migrated(base / f"{name}.db")
            if "claims" in parts:
                _populate(base / "small.db", size["small"])
            _populate(base / "big.db", size["big"])
        if "claims" in parts:
            small = await claim_time(base / "small.db", CLAIM_RUNS[mode])
            big = await claim_time(base / "big.db", CLAIM_RUNS[mode])
            figures["claim_small_ms"] = small * 1000
            figures["claim_big_ms"] = big * 1000
            figures["claim_ratio"] = big / small
            tick_small = await tick_time(base / "small.db", CLAIM_RUNS[mode])
            tick_big = await tick_time(base / "big.db", CLAIM_RUNS[mode])
            figures["tick_small_ms"] = tick_small * 1000
            figures["tick_big_ms"] = tick_big * 1000
            figures["tick_ratio"] = tick_big / tick_small
            rows += [
                (f"claim_due, {size['small']:,} rows, ms", f"{small * 1000:.3f}", ""),
                (f"claim_due, {size['big']:,} rows, ms", f"{big * 1000:.3f}", ""),
                (
                    "claim big / small",
                    f"{figures['claim_ratio']:.2f}",
                    verdict(figures["claim_ratio"] <= CLAIM_TARGET, f"<= {CLAIM_TARGET}"),
                ),
                (f"reaper tick, {size['small']:,} rows, ms", f"{tick_small * 1000:.3f}", ""),
                (f"reaper tick, {size['big']:,} rows, ms", f"{tick_big * 1000:.3f}", ""),
                (
                    "reaper tick big / small",
                    f"{figures['tick_ratio']:.2f}",
                    verdict(figures["tick_ratio"] <= CLAIM_TARGET, f"<= {CLAIM_TARGET}"),
                ),
            ]
        if "stats" in parts:
            st = await versus_raw(base / "big.db", _stats, STATS_RUNS[mode])
            figures["stats_repository_ms"] = st["repo"] * 1000
            figures["stats_raw_sqlite3_ms"] = st["raw"] * 1000
            figures["stats_ratio"] = st["repo"] / st["raw"]
            rows += [
                (f"stats, {size['big']:,} rows, repository ms", f"{st['repo'] * 1000:.1f}", ""),
                (f"stats, {size['big']:,} rows, raw sqlite3 ms", f"{st['raw'] * 1000:.1f}", ""),
                (
                    "stats repository / raw",
                    f"{figures['stats_ratio']:.2f}",
                    verdict(figures["stats_ratio"] <= STATS_TARGET, f"<= {STATS_TARGET}"),
                ),
            ]
        if "list" in parts:
            ls = await versus_raw(base / "big.db", _list_active, LIST_RUNS[mode])
            figures["list_repository_ms"] = ls["repo"] * 1000
            figures["list_raw_sqlite3_ms"] = ls["raw"] * 1000
            figures["list_aiosqlite_ms"] = ls["floor"] * 1000
            figures["list_ratio"] = ls["repo"] / ls["raw"]
            figures["list_loop_cpu_ms"] = ls["loop_cpu"] * 1000
            figures["list_process_cpu_ms"] = ls["process_cpu"] * 1000
            what = f"list active limit 50, {size['big']:,} rows"
            rows += [
                (f"{what}, repository ms", f"{ls['repo'] * 1000:.3f}", ""),
                (f"{what}, raw ms", f"{ls['raw'] * 1000:.3f}", ""),
                (
                    f"{what}, bare aiosqlite ms",
                    f"{ls['floor'] * 1000:.3f}",
                    "(the floor of async access)",
                ),
                (
                    "list repository: CPU ms per call, loop thread / process",
                    f"{ls['loop_cpu'] * 1000:.3f} / {ls['process_cpu'] * 1000:.3f}",
                    "(where the time goes)",
                ),
                (
                    "list repository / raw",
                    f"{figures['list_ratio']:.2f}",
                    verdict(figures["list_ratio"] <= LIST_TARGET, f"P4 <= {LIST_TARGET}"),
                ),
            ]
    print_table(f"repository ({mode}{', ' + only if only else ''})", rows)
    if only is None:
        record("repository", {**figures, "sizes": size, "writers": WRITERS}, smoke=smoke)
    return figures


async def _writes(
    base: Path, size: dict[str, int], mode: str, figures: dict[str, float]
) -> list[tuple[str, str, str]]:
    """Part 1, the write rates (see the module docstring); its rows of the table."""
    raw, trivial, naive, limit, rate, per_txn = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    # Rounds alternate the contenders and keep each one's best, so a busy machine slows
    # them alike instead of whichever happened to run during the burst.
    for r in range(WRITE_ROUNDS[mode]):
        for name in ("raw", "limit", "naive", "repo"):
            await _migrated(base / f"{name}{r}.db")
        raw = max(raw, raw_rate(base / f"raw{r}.db", size["raw"]))
        limit = max(limit, batched_limit_rate(base / f"limit{r}.db", size["sessions"]))
        trivial = max(trivial, trivial_rate(base / f"trivial{r}.db", size["raw"]))
        naive = max(naive, await naive_rate(base / f"naive{r}.db", size["naive"]))
        r_rate, r_per_txn = await repository_rate(base / f"repo{r}.db", size["sessions"])
        if r_rate > rate:
            rate, per_txn = r_rate, r_per_txn
    figures["raw_sqlite3_txn_per_s"] = raw
    figures["raw_sqlite3_trivial_txn_per_s"] = trivial
    figures["naive_sqlalchemy_writes_per_s"] = naive
    figures["repository_transitions_per_s"] = rate
    figures["repository_ops_per_transaction"] = per_txn
    figures["raw_sqlite3_batched_transitions_per_s"] = limit
    figures["write_ratio"] = rate / limit
    return [
        ("raw sqlite3, single-row txn/s", f"{raw:,.0f}", "(the same row in sessions)"),
        ("raw sqlite3, trivial table txn/s", f"{trivial:,.0f}", "(id + text: context only)"),
        ("naive SQLAlchemy, writes/s", f"{naive:,.0f}", "(one transaction per write)"),
        (
            f"repository, {WRITERS} writers, transitions/s",
            f"{rate:,.0f}",
            f"({per_txn:.1f} per transaction)",
        ),
        (
            f"raw sqlite3, same statements, {BATCH} per txn, transitions/s",
            f"{limit:,.0f}",
            "(the limit)",
        ),
        ("repository / limit", f"{figures['write_ratio']:.2f}", "(report)"),
    ]


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    parser.add_argument(
        "--only", choices=PARTS, help="run this part alone (printed, not recorded in results.json)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.smoke, args.only))


if __name__ == "__main__":
    cli()
