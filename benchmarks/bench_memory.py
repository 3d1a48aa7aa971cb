"""P5 memory: RSS growth of one process over 100,000 create/end cycles.

One ``SessionManager`` (SQLite file, no reaper) creates and ends sessions, 20 at a time, against
FakeLemonSlice in its own process (whose memory is not ours). RSS is read from /proc after a
warm-up (the first 5% of cycles fill caches, pools and the statement cache) and at the end, each
after a ``gc.collect()``. The figure is the growth after warm-up, target <= 10 MB; the growth from
the very start is printed for context.

    python -m benchmarks.bench_memory [--smoke] [--cycles N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.testing import fake_server_process

from .common import FAKE_KEY, print_table, record, timer

TARGET_MB = 10.0
WORKERS = 20
WARMUP = 0.05  # fraction of the cycles run before the baseline is taken


def rss_mb() -> float:
    """Resident set size now (not the peak), in MiB."""
    gc.collect()
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def cycles(url: str, db_url: str, n: int) -> dict[str, float]:
    start = rss_mb()
    async with (
        LemonSliceClient(FAKE_KEY, api_url=url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=True) as mgr,
    ):

        async def run(count: int) -> None:
            counter = iter(range(count))

            async def worker() -> None:
                for i in counter:
                    record = await mgr.create_session(agent_id=f"agent_{i % 10}")
                    result = await mgr.end_session(record.id)
                    assert result.changed, result.message

            await asyncio.gather(*(worker() for _ in range(WORKERS)))

        warm = max(int(n * WARMUP), WORKERS)
        await run(warm)
        baseline = rss_mb()
        started = timer()
        await run(n - warm)
        elapsed = timer() - started
        end = rss_mb()
    return {
        "cycles": n,
        "rss_start_mb": start,
        "rss_baseline_mb": baseline,
        "rss_end_mb": end,
        "growth_mb": end - baseline,
        "growth_from_start_mb": end - start,
        "cycles_per_s": (n - warm) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, seconds")
    parser.add_argument("--cycles", type=int, default=100_000)
    args = parser.parse_args()
    n = 400 if args.smoke else args.cycles
    with (
        fake_server_process(FAKE_KEY) as url,
        tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp,
    ):
        figures = asyncio.run(cycles(url, f"sqlite+aiosqlite:///{Path(tmp) / 'memory.db'}", n))
    ok = figures["growth_mb"] <= TARGET_MB
    verdict = "(judged at full size)" if args.smoke else ("met" if ok else "NOT met")
    print_table(
        f"P5 memory: {n:,} create/end cycles, {WORKERS} at a time",
        [
            ("RSS at start (MiB)", f"{figures['rss_start_mb']:.1f}", ""),
            (
                "RSS after warm-up (MiB)",
                f"{figures['rss_baseline_mb']:.1f}",
                f"{WARMUP:.0%} of cycles",
            ),
            ("RSS at end (MiB)", f"{figures['rss_end_mb']:.1f}", ""),
            (
                "growth after warm-up (MiB)",
                f"{figures['growth_mb']:.1f}",
                f"<= {TARGET_MB:g} {verdict}",
            ),
            ("growth from start (MiB)", f"{figures['growth_from_start_mb']:.1f}", "(context)"),
            ("cycles/s", f"{figures['cycles_per_s']:,.0f}", ""),
        ],
    )
    record(
        "memory",
        {**figures, "workers": WORKERS, "target_mb": TARGET_MB, "met": ok},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
