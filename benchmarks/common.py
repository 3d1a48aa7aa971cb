"""What every benchmark shares: results.json merging and a printed table.

Benchmarks are measurements, not tests: they print figures and targets and exit 0 either way, so
a slow, noisy machine never turns CI red; ``make bench`` is where the figures come from.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# What a profiler wraps around a benchmark's timed part (benchmarks/profile_paths.py); a no-op
# in the benchmarks themselves.
Around = Callable[[], contextlib.AbstractContextManager[object]]

RESULTS = Path(__file__).with_name("results.json")
SMOKE_RESULTS = Path(__file__).with_name("results-smoke.json")  # so smoke runs never overwrite
FAKE_KEY = "bench-key"


def record(name: str, figures: Mapping[str, Any], *, smoke: bool) -> None:
    """Merge one benchmark's figures into results.json under ``name`` (smoke runs elsewhere)."""
    path = SMOKE_RESULTS if smoke else RESULTS
    data: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text())
    data[name] = {
        **figures,
        "smoke": smoke,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu "
        f"python {platform.python_version()}",
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (figure, value, target/verdict)."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    for row in rows:
        table.add_row(*row)
    Console(width=110).print(table)


def median(values: list[float]) -> float:
    return statistics.median(values)


def timer() -> float:
    return time.perf_counter()


def runs_text(values: Iterable[float], fmt: str = "{:.3f}") -> str:
    return "runs: " + ", ".join(fmt.format(v) for v in values)


@contextlib.asynccontextmanager
async def scratch_postgres(server_url: str) -> AsyncIterator[str]:
    """A database of its own on the PostgreSQL server ``server_url`` names, dropped afterwards:
    a benchmark never writes into, or empties, a database it did not make."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"sessionmgr_bench_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await run(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        await run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
