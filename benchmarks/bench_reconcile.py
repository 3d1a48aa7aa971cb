"""Requests per reconcile pass: it must scale with what is live, not with the remote history.

FakeLemonSlice (in process) holds ``--history`` finished sessions (default 100,000, created over
the days before) and ``--live`` sessions this database created (default 100). One reconcile pass
is run and the requests it sent are counted from the fake's own records. Reading the whole list
and sending a GET per live row (what reconcile did before) would cost ceil(total / 100) + live
requests. Target <= 5.

    python -m benchmarks.bench_reconcile [--smoke] [--history N] [--live N]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
from datetime import timedelta
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.testing import FakeLemonSlice

from .common import FAKE_KEY, print_table, record

TARGET = 5


async def bench(history: int, live: int) -> dict[str, int]:
    async with FakeLemonSlice(api_key=FAKE_KEY) as fake:
        fake.seed_history(history, before=fake.clock.now() - timedelta(hours=3), spacing=5.0)
        with tempfile.TemporaryDirectory() as tmp:
            db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'reconcile.db'}"
            async with (
                LemonSliceClient(FAKE_KEY, api_url=fake.url) as client,
                SessionManager(
                    database_url=db_url, client=client, reaper=False, auto_upgrade=True
                ) as mgr,
            ):
                await asyncio.gather(
                    *(mgr.create_session(agent_id=f"agent_{i}") for i in range(live))
                )
                before = len(fake.requests)
                report = await mgr.reconcile()
                sent = fake.requests[before:]
                assert report.checked == live, report.errors
    return {
        "requests": len(sent),
        "list_requests": sum(r.endpoint == "list" for r in sent),
        "get_requests": sum(r.endpoint == "get" for r in sent),
        "full_list_requests": math.ceil((history + live) / 100) + live,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1,000 of history, seconds")
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--live", type=int, default=100)
    args = parser.parse_args()
    history = 1_000 if args.smoke else args.history
    figures = asyncio.run(bench(history, args.live))
    n = figures["requests"]
    print_table(
        f"Reconcile: requests per pass, {history:,} sessions of history, {args.live} live",
        [
            ("requests per pass", str(n), f"<= {TARGET}: {'ok' if n <= TARGET else 'MISSED'}"),
            ("  list pages", str(figures["list_requests"]), ""),
            ("  GETs", str(figures["get_requests"]), ""),
            ("whole list + GET per row", str(figures["full_list_requests"]), "before issue 12"),
        ],
    )
    record(
        "reconcile_requests",
        {**figures, "history": history, "live": args.live, "target": TARGET},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
