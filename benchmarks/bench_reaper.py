"""P2 reaper drain: N sessions due at once, terminate latency L, concurrency C.

The figure (P2) is floor / drain, target >= 0.85: side by side in each round, the same number
of terminates sent with bare aiohttp (no database, no reaper) to the same fake at the same
concurrency, the HTTP floor of this machine, over the reaper's drain time; what separates them is
what sessionmgr itself costs. The limit N x L / C (every slot busy all the time; 10,000 sessions,
20 ms, 100 -> 2.0 s) is shown too. The fake server runs in its own process, as LemonSlice would;
every session must be terminated exactly once. The drain's CPU time per session (process, and
the event-loop thread alone) says where the remaining gap goes. ``--postgres URL`` drains a
scratch database made on that server (and dropped afterwards) instead of a SQLite file.

    python -m benchmarks.bench_reaper [--smoke] [--sessions N] [--repeat R] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aiohttp

from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import SYSTEM_CLOCK, FakeClock
from sessionmgr.reaper import Reaper
from sessionmgr.repository import SessionRepository
from sessionmgr.testing import fake_server_process, fake_state

from .common import (
    FAKE_KEY,
    Around,
    median,
    print_table,
    record,
    runs_text,
    scratch_postgres,
    timer,
)

LATENCY = 0.020  # seconds per terminate
CONCURRENCY = 100
TARGET = 0.85  # floor / drain


async def seed(url: str, db_url: str, n: int) -> None:
    """n sessions live on the fake and recorded two hours ago in the database: all due now."""
    past = FakeClock(SYSTEM_CLOCK.now() - timedelta(hours=2))
    gate = asyncio.Semaphore(100)
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        repo = await SessionRepository.open(db_url, clock=past, upgrade=True)
        try:

            async def one(i: int) -> None:
                async with gate:
                    answer = await client.create_session(agent_id=f"agent_{i % 10}")
                    await repo.adopt(
                        session_id=answer["session_id"],
                        control_url=answer["control_url"],
                        room_url=answer.get("room_url"),
                        idle_window=60,
                        max_age=None,
                    )

            await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await repo.close()


async def drain(
    url: str, db_url: str, n: int, around: Around = contextlib.nullcontext
) -> tuple[float, int, float, float]:
    """(seconds, sessions ended, process CPU us per session, loop-thread CPU us per session)."""
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        repo = await SessionRepository.open(db_url)
        try:
            reaper = Reaper(repo, client, concurrency=CONCURRENCY)
            with around():
                cpu, loop_cpu = time.process_time(), time.thread_time()
                started = timer()
                result = await reaper.run_once()
                elapsed = timer() - started
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        finally:
            await repo.close()
    return elapsed, len(result.ended), cpu / n * 1e6, loop_cpu / n * 1e6


async def http_floor(
    url: str, n: int, around: Around = contextlib.nullcontext
) -> tuple[float, float]:
    """(seconds, loop-thread CPU us per terminate) of n terminates of live sessions with bare
    aiohttp, CONCURRENCY at a time."""
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        ids = [(await client.create_session(agent_id="floor"))["session_id"] for _ in range(n)]
    gate = asyncio.Semaphore(CONCURRENCY)
    body = {"event": "terminate"}
    headers = {"x-api-key": FAKE_KEY}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(sid: str) -> None:
            async with gate, http.post(f"{url}/{sid}/control", json=body, headers=headers) as r:
                r.raise_for_status()
                await r.read()

        with around():
            started, loop_cpu = timer(), time.thread_time()
            await asyncio.gather(*(one(sid) for sid in ids))
            return timer() - started, (time.thread_time() - loop_cpu) / n * 1e6


async def one_run(
    n: int, workdir: Path, postgres: str | None
) -> tuple[float, float, float, float, float]:
    """(reaper drain seconds, bare HTTP floor seconds, CPU us and loop CPU us per session, the
    floor's loop CPU us per terminate) against one fake server process; ``postgres``: in a
    scratch database on that server instead of a SQLite file."""
    async with contextlib.AsyncExitStack() as stack:
        if postgres:
            db_url = await stack.enter_async_context(scratch_postgres(postgres))
        else:
            db_url = f"sqlite+aiosqlite:///{workdir / 'reaper.db'}"
        with fake_server_process(FAKE_KEY, latency={"terminate": LATENCY}) as url:
            await seed(url, db_url, n)
            elapsed, ended, cpu_us, loop_us = await drain(url, db_url, n)
            state = await fake_state(url)
            floor, floor_us = await http_floor(url, n)
    counts = [s["terminate_count"] for s in state["sessions"].values()]
    if ended != n or len(counts) != n or any(c != 1 for c in counts):
        raise SystemExit(f"drain incorrect: ended {ended}/{n}, terminate counts {set(counts)}")
    return elapsed, floor, cpu_us, loop_us, floor_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, seconds")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL", help="drain a scratch database on this server")
    args = parser.parse_args()
    n = 300 if args.smoke else args.sessions
    repeat = 1 if args.smoke else args.repeat
    runs: list[tuple[float, float, float, float, float]] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(asyncio.run(one_run(n, Path(tmp), args.postgres)))
    drain_s = median([r[0] for r in runs])
    floor_s = median([r[1] for r in runs])
    cpu_us = median([r[2] for r in runs])
    loop_us = median([r[3] for r in runs])
    floor_us = median([r[4] for r in runs])
    limit = n * LATENCY / CONCURRENCY
    ratio = floor_s / drain_s
    verdict = "(judged at full size)" if args.smoke else ("met" if ratio >= TARGET else "NOT met")
    print_table(
        f"P2 reaper drain ({'PostgreSQL' if args.postgres else 'SQLite'}): {n} due,"
        f" {LATENCY * 1000:.0f} ms, concurrency {CONCURRENCY}",
        [
            ("limit N*L/C (s)", f"{limit:.3f}", ""),
            ("reaper drain, median (s)", f"{drain_s:.3f}", runs_text(r[0] for r in runs)),
            ("bare aiohttp floor, median (s)", f"{floor_s:.3f}", runs_text(r[1] for r in runs)),
            ("floor / drain", f"{ratio:.2f}", f">= {TARGET} {verdict}"),
            ("limit / drain", f"{limit / drain_s:.2f}", ""),
            ("limit / floor", f"{limit / floor_s:.2f}", "the best this machine's HTTP allows"),
            (
                "drain CPU per session, us",
                f"{cpu_us:,.0f}",
                runs_text((r[2] for r in runs), "{:,.0f}"),
            ),
            ("  of it on the loop thread, us", f"{loop_us:,.0f}", ""),
            ("bare aiohttp loop CPU per terminate, us", f"{floor_us:,.0f}", "(the floor's)"),
        ],
    )
    record(
        "reaper_drain" + ("_postgres" if args.postgres else ""),
        {
            "sessions": n,
            "latency_s": LATENCY,
            "concurrency": CONCURRENCY,
            "limit_s": limit,
            "drain_s": drain_s,
            "http_floor_s": floor_s,
            "runs_s": [r[:2] for r in runs],
            "cpu_us_per_session": cpu_us,
            "loop_cpu_us_per_session": loop_us,
            "floor_loop_cpu_us_per_terminate": floor_us,
            "limit_over_drain": limit / drain_s,
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        },
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
