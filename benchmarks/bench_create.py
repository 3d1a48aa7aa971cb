"""P1 create throughput with persistence vs without, side by side in one run.

50 concurrent callers create sessions against FakeLemonSlice in its own process with 5 ms create
latency: once through the bare ``LemonSliceClient.create_session`` and once through
``SessionManager.create_session`` (intent recorded, POST, marked active: two durable writes per
session). The figure is manager rate / bare rate, target >= 0.9. Rounds alternate the two
contenders, so a busy machine slows both alike; medians are reported.

    python -m benchmarks.bench_create [--smoke] [--sessions N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.testing import fake_server_process

from .common import FAKE_KEY, median, print_table, record, runs_text, timer

LATENCY = 0.005  # seconds per create on the fake
CALLERS = 50
TARGET = 0.9


async def rate(n: int, create: Callable[[int], Awaitable[object]]) -> float:
    """Sessions/s with CALLERS tasks calling ``create`` until n sessions exist."""
    counter = iter(range(n))

    async def caller() -> None:
        for i in counter:
            await create(i)

    started = timer()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return n / (timer() - started)


async def bare_rate(url: str, n: int) -> float:
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        return await rate(n, lambda i: client.create_session(agent_id=f"agent_{i % 10}"))


async def manager_rate(url: str, db_url: str, n: int) -> float:
    async with (
        LemonSliceClient(FAKE_KEY, api_url=url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=True) as mgr,
    ):
        return await rate(n, lambda i: mgr.create_session(agent_id=f"agent_{i % 10}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, seconds")
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = 100 if args.smoke else args.sessions
    repeat = 1 if args.smoke else args.repeat
    bare: list[float] = []
    managed: list[float] = []
    with (
        fake_server_process(FAKE_KEY, latency={"create": LATENCY}) as url,
        tempfile.TemporaryDirectory(prefix="bench_create_") as tmp,
    ):
        for r in range(repeat):
            bare.append(asyncio.run(bare_rate(url, n)))
            db_url = f"sqlite+aiosqlite:///{Path(tmp) / f'create{r}.db'}"
            managed.append(asyncio.run(manager_rate(url, db_url, n)))
    ratio = median(managed) / median(bare)
    verdict = "(judged at full size)" if args.smoke else ("met" if ratio >= TARGET else "NOT met")
    print_table(
        f"P1 create: {n} sessions, {CALLERS} concurrent, {LATENCY * 1000:.0f} ms latency",
        [
            ("bare client, creates/s", f"{median(bare):,.0f}", runs_text(bare, "{:,.0f}")),
            ("SessionManager, creates/s", f"{median(managed):,.0f}", runs_text(managed, "{:,.0f}")),
            ("manager / bare", f"{ratio:.2f}", f">= {TARGET} {verdict}"),
            ("latency limit, creates/s", f"{CALLERS / LATENCY:,.0f}", "(callers / latency)"),
        ],
    )
    record(
        "create",
        {
            "sessions": n,
            "callers": CALLERS,
            "latency_s": LATENCY,
            "bare_per_s": median(bare),
            "manager_per_s": median(managed),
            "runs_bare_per_s": bare,
            "runs_manager_per_s": managed,
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        },
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
