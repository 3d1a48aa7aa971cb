"""Where a managed create's extra CPU goes, by layer: cProfile of ``bench_create``'s two
contenders (10,000 creates each, 50 callers, the fake at 5 ms in its own process), the manager's
total time per function minus the bare client's, summed per layer. epoll's idle wait is left
out; cProfile inflates Python ~1.5-2x and C calls much less, so read the shares, not the sums.
A profile, not a figure: nothing is recorded in results.json.

    python -m benchmarks.profile_create [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from sessionmgr.testing import fake_server_process

from .bench_create import bare_rate, manager_rate
from .common import FAKE_KEY


def layer(key: tuple[str, int, str]) -> str:
    path, _, name = key
    if path == "~":
        return "SQLite (C: execute, executemany, commit)" if "sqlite3" in name else "builtins"
    for part, label in (
        ("/sessionmgr/writer.py", "sessionmgr writer"),
        ("/sessionmgr/models.py", "time formatting"),
        ("/sessionmgr/repository.py", "repository + records"),
        ("/sessionmgr/queries.py", "repository + records"),
        ("/sessionmgr/records.py", "repository + records"),
        ("<string>", "repository + records"),
        ("/sessionmgr/manager.py", "manager + leases"),
        ("/sessionmgr/leases.py", "manager + leases"),
        ("/sessionmgr/", "sessionmgr other (client, checks)"),
        ("sqlalchemy", "SQLAlchemy"),
        ("asyncio", "asyncio"),
        ("aiohttp", "aiohttp"),
        ("yarl", "aiohttp"),
        ("multidict", "aiohttp"),
    ):
        if part in path:
            return label
    return "other"


def profile(run: Any) -> dict[str, float]:
    """Seconds of own time per layer while ``run()`` runs its loop."""
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run())
    profiler.disable()
    layers: dict[str, float] = defaultdict(float)
    stats: Any = pstats.Stats(profiler)
    for key, (_, _, own, _, _) in stats.stats.items():
        if "epoll" not in key[2]:  # the loop's idle wait, not CPU
            layers[layer(key)] += own
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="200 creates, seconds")
    n = 200 if parser.parse_args().smoke else 10_000
    with (
        fake_server_process(FAKE_KEY, latency={"create": 0.005}) as url,
        tempfile.TemporaryDirectory(prefix="profile_create_") as tmp,
    ):
        asyncio.run(bare_rate(url, 500, 50))  # warm the fake
        db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'p.db'}"
        bare = profile(lambda: bare_rate(url, n, 50))
        managed = profile(lambda: manager_rate(url, db_url, n, 50))
    us = 1e6 / n
    print(
        f"per create under cProfile: bare {sum(bare.values()) * us:.0f} us, "
        f"manager {sum(managed.values()) * us:.0f} us"
    )
    for name in sorted(set(bare) | set(managed), key=lambda k: bare.get(k, 0) - managed.get(k, 0)):
        extra = (managed.get(name, 0) - bare.get(name, 0)) * us
        print(f"  {name:42s} extra {extra:7.1f} us")


if __name__ == "__main__":
    main()
