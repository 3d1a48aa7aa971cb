"""Where the time of each hot path goes, by layer: cProfile around the timed part of a benchmark's
contenders, the managed path's own time per function minus its bare contender's, summed per layer
and per operation, with the functions that cost most.

- ``create`` (P1): ``bench_create``'s two contenders, 50 callers, the fake at 5 ms in its own
  process; bare = the bare client's create.
- ``end`` (P8): ``bench_end``'s two contenders, 20 callers, 5 ms; bare = the bare client's end.
- ``drain`` (P2): ``bench_reaper``'s drain, 20 ms, concurrency 100; bare = the same terminates
  with bare aiohttp (the floor).
- ``flush`` (P3): ``bench_touch``'s flush of every session touched once; no bare contender, so
  its layers are absolute ("SQLite" is the C work raw sqlite3 would also do).

epoll's idle wait is left out; cProfile inflates Python ~1.5-2x and C calls much less, so read
the shares, not the sums. A profile, not a figure: nothing is recorded in results.json.

    python -m benchmarks.profile_paths [--smoke] [--path create|end|drain|flush] [--top N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sessionmgr.testing import fake_server_process

from . import bench_create, bench_end, bench_reaper, bench_touch
from .common import FAKE_KEY

Key = tuple[str, int, str]  # cProfile's (file, line, function)
Own = dict[Key, float]  # seconds of own time per function


def layer(key: Key) -> str:
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
        ("/sessionmgr/reaper.py", "reaper"),
        ("/sessionmgr/client.py", "client"),
        ("/sessionmgr/", "sessionmgr other (checks, clock, transitions)"),
        ("sqlalchemy", "SQLAlchemy"),
        ("asyncio", "asyncio"),
        ("aiohttp", "aiohttp"),
        ("yarl", "aiohttp"),
        ("multidict", "aiohttp"),
    ):
        if part in path:
            return label
    return "other"


class Profiled:
    """One cProfile that a benchmark switches on around its timed part, as often as it likes."""

    def __init__(self) -> None:
        self.profiler = cProfile.Profile()

    @contextlib.contextmanager
    def around(self) -> Iterator[None]:
        self.profiler.enable()
        try:
            yield
        finally:
            self.profiler.disable()

    def own(self) -> Own:
        stats: Any = pstats.Stats(self.profiler)
        return {k: v[2] for k, v in stats.stats.items() if "epoll" not in k[2]}


def contenders(path: str, smoke: bool) -> tuple[int, str, Own, Own | None]:
    """(operations, what one is, the managed path's own times, the bare contender's or None)."""
    managed, bare = Profiled(), Profiled()
    with tempfile.TemporaryDirectory(prefix="profile_paths_") as tmp:
        db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'p.db'}"
        if path == "create":
            n = 200 if smoke else 10_000
            with fake_server_process(FAKE_KEY, latency={"create": 0.005}) as url:
                asyncio.run(bench_create.bare_rate(url, min(n, 500), 50))  # warm the fake
                asyncio.run(bench_create.bare_rate(url, n, 50, bare.around))
                asyncio.run(bench_create.manager_rate(url, db_url, n, 50, managed.around))
            return n, "create", managed.own(), bare.own()
        if path == "end":
            n = 100 if smoke else 4_000
            with fake_server_process(FAKE_KEY, latency={"terminate": bench_end.LATENCY}) as url:
                asyncio.run(bench_end.bare_rate(url, n, bare.around))
                asyncio.run(bench_end.manager_rate(url, db_url, n, managed.around))
            return n, "end", managed.own(), bare.own()
        if path == "drain":
            n = 300 if smoke else 5_000
            latency = {"terminate": bench_reaper.LATENCY}
            with fake_server_process(FAKE_KEY, latency=latency) as url:
                asyncio.run(bench_reaper.seed(url, db_url, n))
                asyncio.run(bench_reaper.drain(url, db_url, n, managed.around))
                asyncio.run(bench_reaper.http_floor(url, n, bare.around))
            return n, "session", managed.own(), bare.own()
        n = 500 if smoke else 10_000
        ids = asyncio.run(bench_touch.seed(db_url, n))
        asyncio.run(bench_touch.flush_ms(db_url, ids, managed.around))
        return n * bench_touch.FLUSH_ROUNDS, "session flushed", managed.own(), None


def report(path: str, smoke: bool, top: int) -> None:
    n, unit, managed, bare = contenders(path, smoke)
    us = 1e6 / n
    base = bare or {}

    def extra(key: Key) -> float:
        return (managed.get(key, 0.0) - base.get(key, 0.0)) * us

    layers: dict[str, float] = defaultdict(float)
    for key in set(managed) | set(base):
        layers[layer(key)] += extra(key)
    total = sum(managed.values()) * us
    if bare is None:
        print(f"\n{path}: per {unit} under cProfile: {total:.1f} us")
    else:
        print(
            f"\n{path}: per {unit} under cProfile: bare {sum(bare.values()) * us:.0f} us, "
            f"managed {total:.0f} us, extra {total - sum(bare.values()) * us:.0f} us"
        )
    word = "own" if bare is None else "extra"
    for name, value in sorted(layers.items(), key=lambda item: -item[1]):
        print(f"  {name:46s} {word} {value:7.1f} us")
    what = "own time" if bare is None else "extra own time"
    print(f"  the {top} functions that cost most ({what} per {unit}):")
    for key in sorted(set(managed) | set(base), key=extra, reverse=True)[:top]:
        file, line, name = key
        where = file.split("site-packages/")[-1].split("/sessionmgr/")[-1].split("python3.11/")[-1]
        print(f"    {extra(key):7.1f} us  {where}:{line} {name}")


PATHS = ("create", "end", "drain", "flush")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--path", choices=PATHS, action="append", help="default: all four")
    parser.add_argument("--top", type=int, default=12, help="functions listed per path")
    args = parser.parse_args()
    for path in args.path or PATHS:
        report(path, args.smoke, args.top)


if __name__ == "__main__":
    main()
