"""P3 touch: how many touches a backend may send, and what they cost the database.

10,000 live sessions; one task touches them at random for 10 s through ``SessionManager.touch``
(pausing 0.1 ms every 1,000 touches, see PAUSE) while the manager's flush loop writes buffered
touches every ``touch_flush_interval`` (1 s).
Figures: touches accepted per second (target >= 100,000/s) and the time to flush every session
touched once (10,000: target <= 50 ms, the median of FLUSH_ROUNDS flushes, each of all the
sessions touched again: the wall time a caller of ``flush_touches`` waits, every chunk's
transaction included), with raw sqlite3 beside it: one executemany of the UPDATE by session_id,
and the flush's own statements (read, then one UPDATE per chunk) with preformatted times. (Writes
per session per flush are still shown: a dict coalesces, so that figure cannot exceed 1.) No HTTP
is involved (a touch never calls LemonSlice).

    python -m benchmarks.bench_touch [--smoke] [--sessions N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import event

from sessionmgr.manager import SessionManager
from sessionmgr.repository import SessionRepository

from .common import Around, median, print_table, record, runs_text, timer

RATE_TARGET = 100_000.0  # touches accepted per second
WRITES_TARGET = 1.0  # database writes per session per flush interval
FLUSH_TARGET_MS = 50.0  # one flush of 10,000 touched sessions
FLUSH_ROUNDS = 5
FLUSH_INTERVAL = 1.0
# Every YIELD_EVERY touches the toucher pauses PAUSE seconds, as a backend's touches come between
# awaits on real I/O. A loop that only yields with sleep(0) keeps this thread busy without a break,
# and then aiosqlite's thread waits up to the 5 ms GIL switch interval for every row it steps
# through: a flush of 10k rows would stall for the whole run. Pauses count in the elapsed time.
YIELD_EVERY = 1_000
PAUSE = 0.0001


async def seed(db_url: str, n: int) -> list[str]:
    """n active sessions with a long idle window (none becomes due during the run)."""
    repo = await SessionRepository.open(db_url, upgrade=True)
    ids = [f"touch_{i:06d}" for i in range(n)]
    gate = asyncio.Semaphore(50)

    async def one(sid: str) -> None:
        async with gate:
            await repo.adopt(
                session_id=sid, control_url="https://c/x", idle_window=86400, max_age=None
            )

    try:
        await asyncio.gather(*(one(sid) for sid in ids))
    finally:
        await repo.close()
    return ids


async def run(db_url: str, ids: list[str], seconds: float) -> dict[str, Any]:
    rows_written = 0
    per_flush: list[tuple[int, int]] = []  # (sessions buffered, rows written) per flush

    def count(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        """The rows each UPDATE changed (one statement per chunk, or an executemany)."""
        nonlocal rows_written
        if statement.lstrip().upper().startswith("UPDATE SESSIONS"):
            rows_written += max(cursor.rowcount, 0)

    async with SessionManager(
        database_url=db_url,
        api_key="unused",  # touches never reach LemonSlice
        reaper=False,  # so the manager's own flush loop writes touches, every FLUSH_INTERVAL
        touch_flush_interval=FLUSH_INTERVAL,
        idle_window=86400,
    ) as mgr:
        repo = mgr.repository
        flush = repo.flush_touches

        async def counted_flush() -> int:
            buffered = len(repo._touches)  # what this flush has to write, for the ratio
            before = rows_written
            updated = await flush()
            per_flush.append((buffered, rows_written - before))
            return updated

        setattr(repo, "flush_touches", counted_flush)  # noqa: B010 (instance attribute on purpose)
        # the writer's own engine runs the flush (SQLite: its inline connection)
        event.listen(repo.writer.sync_engine, "after_cursor_execute", count)
        rng = random.Random(1)
        touches = 0
        started = timer()
        deadline = started + seconds
        while timer() < deadline:
            for sid in rng.choices(ids, k=YIELD_EVERY):
                mgr.touch(sid)
            touches += YIELD_EVERY
            await asyncio.sleep(PAUSE)
        elapsed = timer() - started
    flushes = [(b, w) for b, w in per_flush if b]
    return {
        "touches": touches,
        "seconds": elapsed,
        "touches_per_s": touches / elapsed,
        "flushes": len(flushes),
        "writes_per_session_per_flush": (
            sum(w for _, w in flushes) / sum(b for b, _ in flushes) if flushes else 0.0
        ),
        "max_writes_per_session_per_flush": max((w / b for b, w in flushes), default=0.0),
        "median_sessions_per_flush": median([float(b) for b, _ in flushes]) if flushes else 0.0,
    }


async def flush_ms(
    db_url: str, ids: list[str], around: Around = contextlib.nullcontext
) -> list[float]:
    """Milliseconds of each of FLUSH_ROUNDS flushes of every session, each touched once since."""
    repo = await SessionRepository.open(db_url)
    times: list[float] = []
    try:
        for _ in range(FLUSH_ROUNDS):
            for sid in ids:
                repo.touch(sid)
            with around():
                started = timer()
                updated = await repo.flush_touches()
                times.append((timer() - started) * 1000)
            assert updated == len(ids), f"flushed {updated} of {len(ids)}"
            await asyncio.sleep(0.001)  # the next round's touches are later
    finally:
        await repo.close()
    return times


def raw_flush_ms(path: Path, ids: list[str]) -> tuple[float, float]:
    """The median milliseconds of raw sqlite3 writing the UPDATE for every session (by
    session_id, one executemany), and of it doing the flush's own statements a chunk per
    transaction as the repository does: the read of the windows (500 ids per SELECT) then one
    ``UPDATE ... FROM (VALUES ...)`` by rowid. Times are preformatted text: what SQLite costs."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
    update = (
        "UPDATE sessions SET last_activity_at = ?, deadline = ?, updated_at = ?"
        " WHERE session_id = ? AND status = 'active' AND last_activity_at < ?"
    )
    read = (
        "SELECT id, session_id, idle_window, expires_at, last_activity_at FROM sessions"
        " WHERE session_id IN ({}) AND +status = 'active'"
    )
    update_from = (
        "UPDATE sessions SET last_activity_at = t.column2, deadline = t.column3, updated_at = ?"
        " FROM (VALUES {}) AS t WHERE sessions.id = t.column1"
        " AND sessions.status = 'active' AND sessions.last_activity_at < t.column2"
    )
    chunks = [sorted(ids)[i : i + 500] for i in range(0, len(ids), 500)]
    updates: list[float] = []
    flushes: list[float] = []
    try:
        for r in range(2 * FLUSH_ROUNDS):
            at = f"2100-01-{1 + r:02d} 00:00:00.000000"
            started = timer()
            if r % 2:
                for chunk in chunks:
                    con.execute("BEGIN IMMEDIATE")
                    rows = con.execute(read.format(",".join("?" * len(chunk))), chunk).fetchall()
                    params: list[Any] = [at]
                    for row in rows:
                        params += (row[0], at, at)
                    con.execute(update_from.format(",".join(["(?,?,?)"] * len(rows))), params)
                    con.execute("COMMIT")
            else:
                con.execute("BEGIN IMMEDIATE")
                con.executemany(update, [(at, at, at, sid, at) for sid in ids])
                con.execute("COMMIT")
            (flushes if r % 2 else updates).append((timer() - started) * 1000)
    finally:
        con.close()
    return median(updates), median(flushes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, seconds")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = 500 if args.smoke else args.sessions
    seconds = 2.5 if args.smoke else args.seconds
    with tempfile.TemporaryDirectory(prefix="bench_touch_") as tmp:
        db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'touch.db'}"
        ids = asyncio.run(seed(db_url, n))
        runs = [
            asyncio.run(run(db_url, ids, seconds)) for _ in range(1 if args.smoke else args.repeat)
        ]
        flushes = asyncio.run(flush_ms(db_url, ids))
        raw_ms, raw_all_ms = raw_flush_ms(Path(tmp) / "touch.db", ids)
    # the run with the median rate stands for all; the worst write ratio of any run is kept
    figures = sorted(runs, key=lambda f: f["touches_per_s"])[len(runs) // 2]
    figures["runs_touches_per_s"] = [f["touches_per_s"] for f in runs]
    figures["max_writes_per_session_per_flush"] = max(
        f["max_writes_per_session_per_flush"] for f in runs
    )
    figures["flush_ms"] = median(flushes)
    figures["runs_flush_ms"] = flushes
    figures["raw_flush_ms"] = raw_ms
    figures["raw_read_flush_ms"] = raw_all_ms
    rate_ok = figures["touches_per_s"] >= RATE_TARGET
    writes_ok = figures["max_writes_per_session_per_flush"] <= WRITES_TARGET
    flush_ok = figures["flush_ms"] <= FLUSH_TARGET_MS
    met = "(judged at full size)" if args.smoke else None
    print_table(
        f"P3 touch: {n:,} sessions, {seconds:g} s, flush every {FLUSH_INTERVAL:g} s",
        [
            ("touches accepted", f"{figures['touches']:,.0f}", ""),
            (
                "touches accepted per second (median run)",
                f"{figures['touches_per_s']:,.0f}",
                f">= {RATE_TARGET:,.0f} {met or ('met' if rate_ok else 'NOT met')}",
            ),
            ("flushes that wrote", f"{figures['flushes']:.0f}", ""),
            ("sessions per flush, median", f"{figures['median_sessions_per_flush']:,.0f}", ""),
            (
                "DB writes per session per flush, mean",
                f"{figures['writes_per_session_per_flush']:.2f}",
                "",
            ),
            (
                "DB writes per session per flush, worst",
                f"{figures['max_writes_per_session_per_flush']:.2f}",
                f"<= {WRITES_TARGET:g} (a dict coalesces: cannot fail)",
            ),
            (
                f"flush of {n:,} touched sessions, median ms",
                f"{figures['flush_ms']:.1f}",
                f"<= {FLUSH_TARGET_MS:g} {met or ('met' if flush_ok else 'NOT met')} "
                + runs_text(flushes, "{:.1f}"),
            ),
            ("  raw sqlite3, one executemany by session_id, ms", f"{raw_ms:.1f}", ""),
            ("  raw sqlite3, the same reads and UPDATEs, ms", f"{raw_all_ms:.1f}", "the same work"),
        ],
    )
    record(
        "touch",
        {
            **figures,
            "sessions": n,
            "flush_interval_s": FLUSH_INTERVAL,
            "rate_target": RATE_TARGET,
            "writes_target": WRITES_TARGET,
            "flush_target_ms": FLUSH_TARGET_MS,
            "met": rate_ok and writes_ok and flush_ok,
        },
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
