"""P1 create throughput with persistence vs without, side by side in one run.

50 concurrent callers create sessions against FakeLemonSlice in its own process with 5 ms create
latency: once through the bare ``LemonSliceClient.create_session`` and once through
``SessionManager.create_session`` (intent recorded, POST, marked active: two durable writes per
session). The figure is manager rate / bare rate, target >= 0.75 (goal 0.9). Rounds alternate
the two contenders, so a busy machine slows both alike; medians are reported.

``--wide`` is P1b: 200 concurrent callers, 300 ms latency, target 0.98 (nothing may serialize
the creates). ``--postgres URL`` records the manager's sessions in that PostgreSQL database
instead of a SQLite file (P1 on PostgreSQL: reported).

    python -m benchmarks.bench_create [--smoke] [--wide] [--postgres URL] [--sessions N]
                                      [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.testing import fake_server_process

from .common import FAKE_KEY, Around, median, print_table, record, runs_text, timer


@dataclasses.dataclass(frozen=True)
class Setup:
    """One figure's conditions."""

    name: str  # the figure's id
    callers: int  # concurrent create callers
    latency: float  # seconds per create on the fake
    target: float  # manager rate / bare rate at least
    sessions: int  # default sessions per contender and round


P1 = Setup("P1", callers=50, latency=0.005, target=0.75, sessions=2_000)
P1B = Setup("P1b", callers=200, latency=0.3, target=0.98, sessions=2_000)
GOAL = 0.9  # P1's goal beyond its target


async def rate(
    n: int,
    callers: int,
    create: Callable[[int], Awaitable[object]],
    around: Around = contextlib.nullcontext,
) -> float:
    """Sessions/s with ``callers`` tasks calling ``create`` until n sessions exist."""
    counter = iter(range(n))

    async def caller() -> None:
        for i in counter:
            await create(i)

    with around():
        started = timer()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return n / (timer() - started)


async def bare_rate(
    url: str, n: int, callers: int, around: Around = contextlib.nullcontext
) -> float:
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        return await rate(
            n, callers, lambda i: client.create_session(agent_id=f"agent_{i % 10}"), around
        )


BATCHES: list[float] = []  # the manager's ops per write transaction, one per round


async def manager_rate(
    url: str, db_url: str, n: int, callers: int, around: Around = contextlib.nullcontext
) -> float:
    async with (
        LemonSliceClient(FAKE_KEY, api_url=url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=True) as mgr,
    ):
        writer = mgr.repository.writer
        ops, batches = writer.ops, writer.batches
        per_s = await rate(
            n, callers, lambda i: mgr.create_session(agent_id=f"agent_{i % 10}"), around
        )
        BATCHES.append((writer.ops - ops) / max(writer.batches - batches, 1))
        return per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, seconds")
    parser.add_argument("--wide", action="store_true", help="P1b: 200 callers, 300 ms latency")
    parser.add_argument("--postgres", metavar="URL", help="record in this PostgreSQL database")
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    setup = P1B if args.wide else P1
    n = 100 if args.smoke else (args.sessions or setup.sessions)
    if args.smoke and args.wide:
        n = 400  # two waves of 200 callers
    repeat = 1 if args.smoke else args.repeat
    backend = "PostgreSQL" if args.postgres else "SQLite"
    bare: list[float] = []
    managed: list[float] = []
    with (
        fake_server_process(FAKE_KEY, latency={"create": setup.latency}) as url,
        tempfile.TemporaryDirectory(prefix="bench_create_") as tmp,
    ):
        for r in range(repeat):  # alternating contenders, a fresh database each round
            bare.append(asyncio.run(bare_rate(url, n, setup.callers)))
            db_url = args.postgres or f"sqlite+aiosqlite:///{Path(tmp) / f'create{r}.db'}"
            managed.append(asyncio.run(manager_rate(url, db_url, n, setup.callers)))
    ratio = median(managed) / median(bare)
    met = ratio >= setup.target
    verdict = "(judged at full size)" if args.smoke else ("met" if met else "NOT met")
    goal = f", goal {GOAL}" if setup is P1 else ""
    print_table(
        f"{setup.name} create on {backend}: {n} sessions, {setup.callers} concurrent, "
        f"{setup.latency * 1000:.0f} ms latency",
        [
            ("bare client, creates/s", f"{median(bare):,.0f}", runs_text(bare, "{:,.0f}")),
            ("SessionManager, creates/s", f"{median(managed):,.0f}", runs_text(managed, "{:,.0f}")),
            ("manager / bare", f"{ratio:.2f}", f">= {setup.target}{goal} {verdict}"),
            (
                "manager: writes per transaction",
                f"{median(BATCHES):.1f}",
                "(group commit; two per create)",
            ),
            (
                "latency limit, creates/s",
                f"{setup.callers / setup.latency:,.0f}",
                "(callers / latency)",
            ),
        ],
    )
    name = "create" + ("_wide" if args.wide else "") + ("_postgres" if args.postgres else "")
    record(
        name,
        {
            "sessions": n,
            "callers": setup.callers,
            "latency_s": setup.latency,
            "backend": backend,
            "bare_per_s": median(bare),
            "manager_per_s": median(managed),
            "runs_bare_per_s": bare,
            "runs_manager_per_s": managed,
            "ratio": ratio,
            "writes_per_transaction": median(BATCHES),
            "target": setup.target,
            "met": met,
        },
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
