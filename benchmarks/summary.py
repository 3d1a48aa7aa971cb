"""One table of every target, read back from results.json (``make bench`` prints it last).

python -m benchmarks.summary [--smoke]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .common import RESULTS, SMOKE_RESULTS, print_table

# (figure, results section, value key, format, target text, met?)
Check = tuple[str, str, str, str, str, Callable[[float], bool] | None]

CHECKS: list[Check] = [
    (
        "P1 create: manager / bare client",
        "create",
        "ratio",
        "{:.2f}",
        ">= 0.75",
        lambda v: v >= 0.75,
    ),
    (
        "P1b create: 200 callers, 300 ms",
        "create_wide",
        "ratio",
        "{:.2f}",
        ">= 0.98",
        lambda v: v >= 0.98,
    ),
    (
        "P8 end: manager / bare client",
        "end",
        "ratio",
        "{:.2f}",
        ">= 0.75",
        lambda v: v >= 0.75,
    ),
    (
        "P2 drain: bare aiohttp floor / drain",
        "reaper_drain",
        "ratio",
        "{:.2f}",
        ">= 0.85",
        lambda v: v >= 0.85,
    ),
    (
        "P3 touches accepted/s",
        "touch",
        "touches_per_s",
        "{:,.0f}",
        ">= 100,000",
        lambda v: v >= 1e5,
    ),
    (
        "P3 flush of 10,000 touched sessions, ms",
        "touch",
        "flush_ms",
        "{:.1f}",
        "<= 50",
        lambda v: v <= 50,
    ),
    (
        "P4 reaper tick 1M / 10k rows",
        "repository",
        "tick_ratio",
        "{:.2f}",
        "<= 1.5",
        lambda v: v <= 1.5,
    ),
    ("P4 claim 1M / 10k rows", "repository", "claim_ratio", "{:.2f}", "<= 1.5", lambda v: v <= 1.5),
    ("P4 stats vs raw sqlite3", "repository", "stats_ratio", "{:.2f}", "<= 2", lambda v: v <= 2),
    ("P4 list vs raw sqlite3", "repository", "list_ratio", "{:.2f}", "<= 3", lambda v: v <= 3),
    ("P5 RSS growth, MiB", "memory", "growth_mb", "{:.1f}", "<= 10", lambda v: v <= 10),
    (
        "R1 recovery: SIGKILL mid-create -> terminate, s",
        "recovery",
        "median_seconds",
        "{:.1f}",
        "<= 30",
        lambda v: v <= 30,
    ),
    (
        "R2 requests per reconcile pass (100k history)",
        "reconcile_requests",
        "requests",
        "{:.0f}",
        "<= 5",
        lambda v: v <= 5,
    ),
    (
        "writes: repository / raw sqlite3, same batched statements",
        "repository",
        "write_ratio",
        "{:.2f}",
        "report",
        None,
    ),
]


def rows(data: dict[str, Any], smoke: bool) -> list[tuple[str, str, str]]:
    out = []
    for label, section, key, fmt, target, ok in CHECKS:
        value = data.get(section, {}).get(key)
        if value is None:
            out.append((label, "not run", target))
            continue
        if ok is None:  # a figure to report, with no target
            out.append((label, fmt.format(value), target))
            continue
        verdict = "(smoke size)" if smoke else ("met" if ok(value) else "NOT met")
        out.append((label, fmt.format(value), f"{target} {verdict}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="summarize the smoke run")
    args = parser.parse_args()
    path = SMOKE_RESULTS if args.smoke else RESULTS
    data = json.loads(path.read_text()) if path.exists() else {}
    print_table(f"summary ({path.name})", rows(data, args.smoke))


if __name__ == "__main__":
    main()
