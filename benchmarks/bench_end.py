"""P8 manual end throughput with persistence vs without, side by side in one run.

20 concurrent callers end sessions against FakeLemonSlice in its own process with 5 ms terminate
latency: once through the bare ``LemonSliceClient.end_session`` and once through
``SessionManager.end_session`` (claim, terminate, the end recorded). The sessions are created
first, untimed. The figure is manager rate / bare rate, target >= 0.75. Rounds alternate the two
contenders, so a busy machine slows both alike; medians are reported, with the CPU time per end
(process and event-loop thread) of the managed runs.

    python -m benchmarks.bench_end [--smoke] [--sessions N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.testing import fake_server_process

from .common import FAKE_KEY, Around, median, print_table, record, runs_text, timer

LATENCY = 0.005  # seconds per terminate on the fake
CALLERS = 20
TARGET = 0.75


async def rate(
    items: Sequence[object],
    end: Callable[[object], Awaitable[object]],
    around: Around = contextlib.nullcontext,
) -> float:
    """Ends/s with CALLERS tasks calling ``end`` until every item is ended."""
    todo = iter(items)

    async def caller() -> None:
        for item in todo:
            await end(item)

    with around():
        started = timer()
        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return len(items) / (timer() - started)


async def bare_rate(url: str, n: int, around: Around = contextlib.nullcontext) -> float:
    async with LemonSliceClient(FAKE_KEY, api_url=url) as client:
        made = await asyncio.gather(
            *(client.create_session(agent_id=f"agent_{i % 10}") for i in range(n))
        )

        async def end(answer: object) -> object:
            assert isinstance(answer, dict)
            return await client.end_session(answer["session_id"], answer["control_url"])

        return await rate(made, end, around)


async def manager_rate(
    url: str, db_url: str, n: int, around: Around = contextlib.nullcontext
) -> tuple[float, float, float]:
    """(ends/s, process CPU us per end, loop-thread CPU us per end)."""
    async with (
        LemonSliceClient(FAKE_KEY, api_url=url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=True) as mgr,
    ):
        made = []
        for start in range(0, n, 50):
            made += await asyncio.gather(
                *(
                    mgr.create_session(agent_id=f"agent_{i % 10}")
                    for i in range(start, min(n, start + 50))
                )
            )

        async def end(record: object) -> object:
            result = await mgr.end_session(record.id)  # type: ignore[attr-defined]
            assert result.changed, result.message
            return result

        cpu, loop_cpu = time.process_time(), time.thread_time()
        per_s = await rate(made, end, around)
        cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        return per_s, cpu / n * 1e6, loop_cpu / n * 1e6


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
    cpu: list[float] = []
    loop_cpu: list[float] = []
    with (
        fake_server_process(FAKE_KEY, latency={"terminate": LATENCY}) as url,
        tempfile.TemporaryDirectory(prefix="bench_end_") as tmp,
    ):
        for r in range(repeat):
            bare.append(asyncio.run(bare_rate(url, n)))
            db_url = f"sqlite+aiosqlite:///{Path(tmp) / f'end{r}.db'}"
            per_s, us, loop_us = asyncio.run(manager_rate(url, db_url, n))
            managed.append(per_s)
            cpu.append(us)
            loop_cpu.append(loop_us)
    ratio = median(managed) / median(bare)
    verdict = "(judged at full size)" if args.smoke else ("met" if ratio >= TARGET else "NOT met")
    print_table(
        f"P8 end: {n} sessions, {CALLERS} concurrent, {LATENCY * 1000:.0f} ms latency",
        [
            ("bare client, ends/s", f"{median(bare):,.0f}", runs_text(bare, "{:,.0f}")),
            ("SessionManager, ends/s", f"{median(managed):,.0f}", runs_text(managed, "{:,.0f}")),
            ("manager / bare", f"{ratio:.2f}", f">= {TARGET} {verdict}"),
            ("managed CPU per end, us", f"{median(cpu):,.0f}", runs_text(cpu, "{:,.0f}")),
            ("  of it on the loop thread, us", f"{median(loop_cpu):,.0f}", ""),
        ],
    )
    record(
        "end",
        {
            "sessions": n,
            "callers": CALLERS,
            "latency_s": LATENCY,
            "bare_per_s": median(bare),
            "manager_per_s": median(managed),
            "runs_bare_per_s": bare,
            "runs_manager_per_s": managed,
            "cpu_us_per_end": median(cpu),
            "loop_cpu_us_per_end": median(loop_cpu),
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        },
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
