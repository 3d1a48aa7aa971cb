"""The installed `sessionmgr` entry point in real processes, including concurrent use.

A `serve` process reaps while `list`, `stats`, `reap`, `prune` and `create` run in other processes
on the same SQLite file: nobody sees an error, no row is lost, every due session is terminated
exactly once. LemonSlice is a `sessionmgr fake-server` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sessionmgr import db
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.records import SessionFilter, SessionRecord
from sessionmgr.repository import SessionRepository
from sessionmgr.states import SessionStatus
from sessionmgr.testing import fake_state

pytestmark = pytest.mark.slow

SESSIONMGR = str(Path(sys.executable).with_name("sessionmgr"))
API_KEY = "proc-test-key-19c2"
START_TIMEOUT = 30.0  # seconds a process may take to come up
RUN_TIMEOUT = 60.0  # seconds any one command may take


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LEMONSLICE_API_KEY", "LEMONSLICE_API_URL", "SESSIONMGR_DATABASE_URL")
    }
    env.pop("COLUMNS", None)
    return env


def wait_for_line(path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float) -> str:
    """The first line of ``path`` containing ``needle``, polling the file the process writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}: {path.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no {needle!r} within {timeout}s: {path.read_text()}")


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("fake") / "fake.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [SESSIONMGR, "fake-server", "--port", "0", "--api-key", API_KEY],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    try:
        line = wait_for_line(out, "fake-server listening on ", proc, START_TIMEOUT)
        yield line.split("fake-server listening on ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    asyncio.run(db.upgrade(url))
    return url


def sessionmgr(
    *args: str, db_url: str, api_url: str, api_key: str | None = API_KEY
) -> subprocess.CompletedProcess[str]:
    base = [SESSIONMGR, "--database-url", db_url, "--api-url", api_url]
    if api_key:
        base += ["--api-key", api_key]
    return subprocess.run(
        [*base, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env()
    )


def seed(
    db_url: str,
    api_url: str,
    count: int,
    *,
    ago: float,
    idle_window: float,
    end: bool = False,
    agent_id: str = "seed",
) -> list[SessionRecord]:
    async def go() -> list[SessionRecord]:
        clock = FakeClock(datetime.now(UTC) - timedelta(seconds=ago))
        async with SessionManager(
            database_url=db_url,
            api_key=API_KEY,
            api_url=api_url,
            clock=clock,
            reaper=False,
            idle_window=idle_window,
            max_age=None,
        ) as manager:
            records = [await manager.create_session(agent_id=agent_id) for _ in range(count)]
            if end:
                records = [(await manager.end_session(r.id)).record for r in records]
            return records

    return asyncio.run(go())


def all_rows(db_url: str, flt: SessionFilter | None = None) -> list[SessionRecord]:
    async def go() -> list[SessionRecord]:
        async with await SessionRepository.open(db_url) as repo:
            return (await repo.list(flt, limit=1000, sort="id")).items

    return asyncio.run(go())


# --- the entry point -------------------------------------------------------------------------


def test_entry_point_basics(tmp_path: Path, fake_url: str) -> None:
    version = subprocess.run([SESSIONMGR, "--version"], capture_output=True, text=True)
    assert version.returncode == 0
    assert "sessionmgr, version" in version.stdout
    module = subprocess.run(
        [sys.executable, "-m", "sessionmgr", "--help"], capture_output=True, text=True
    )
    assert module.returncode == 0
    assert "Exit codes" in module.stdout

    missing = tmp_path / "missing.db"
    result = sessionmgr("list", db_url=f"sqlite+aiosqlite:///{missing}", api_url=fake_url)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: no database at {missing}: run `sessionmgr db upgrade` (or check --database-url)"
    ]
    assert not missing.exists()

    no_key = sessionmgr(
        "serve", db_url=f"sqlite+aiosqlite:///{missing}", api_url=fake_url, api_key=None
    )
    assert no_key.returncode == 2
    assert len(no_key.stderr.splitlines()) == 1
    assert "LEMONSLICE_API_KEY" in no_key.stderr


def test_output_is_plain_when_piped(db_url: str, fake_url: str) -> None:
    seed(db_url, fake_url, 2, ago=0, idle_window=600)
    table = sessionmgr("list", db_url=db_url, api_url=fake_url)
    assert table.returncode == 0, table.stderr
    assert "\x1b[" not in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    rows = json.loads(sessionmgr("list", "--json", db_url=db_url, api_url=fake_url).stdout)
    assert len(rows) == 2


def test_serve_stops_cleanly_on_sigterm(db_url: str, fake_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                SESSIONMGR,
                "--database-url",
                db_url,
                "--api-url",
                fake_url,
                "--api-key",
                API_KEY,
                "serve",
                "--port",
                "0",
                "--interval",
                "0.2",
                "--reconcile-every",
                "off",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    try:
        wait_for_line(log, "serving", proc, START_TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopped" in text
    assert API_KEY not in text


# --- concurrent use --------------------------------------------------------------------------

N_DUE = 30  # sessions idle for 2 h with a 60 s window: serve and reap race to end them
N_FRESH = 8  # sessions nowhere near due
N_OLD = 20  # ended 40 days ago: prune deletes them
N_RECENT = 5  # ended yesterday: prune keeps them
ROUNDS = 2  # rounds of concurrent commands
CREATES_PER_ROUND = 2


def test_serve_beside_list_stats_reap_prune(db_url: str, fake_url: str, tmp_path: Path) -> None:
    due = seed(db_url, fake_url, N_DUE, ago=7200, idle_window=60, agent_id="due")
    fresh = seed(db_url, fake_url, N_FRESH, ago=0, idle_window=3600, agent_id="fresh")
    old = seed(db_url, fake_url, N_OLD, ago=40 * 86400, idle_window=60, end=True, agent_id="old")
    recent = seed(db_url, fake_url, N_RECENT, ago=86400, idle_window=60, end=True, agent_id="new")
    keep = {r.id for r in [*due, *fresh, *recent]}  # rows no command may lose

    log = tmp_path / "serve.log"
    base = [SESSIONMGR, "--database-url", db_url, "--api-url", fake_url, "--api-key", API_KEY]
    with log.open("w") as sink:
        args = ["--port", "0", "--interval", "0.2", "--reconcile-every", "1s", "--concurrency", "4"]
        serve = subprocess.Popen(
            [*base, "serve", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    try:
        wait_for_line(log, "serving", serve, START_TIMEOUT)
        commands: list[tuple[str, list[str]]] = []
        for _ in range(ROUNDS):
            commands += [
                ("list", ["list", "--limit", "1000", "--json"]),
                ("stats", ["stats", "--json"]),
                ("reap", ["reap", "--json", "--concurrency", "4"]),
                ("prune", ["prune", "--older-than", "30d", "--batch-size", "3", "--json"]),
            ]
            commands += [
                ("create", ["create", "--agent-id", "racer", "--json"])
            ] * CREATES_PER_ROUND
        procs = [
            (
                name,
                subprocess.Popen(
                    [*base, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=clean_env(),
                ),
            )
            for name, args in commands
        ]
        results = [(name, *p.communicate(timeout=RUN_TIMEOUT), p.returncode) for name, p in procs]

        for name, _out, err, code in results:
            assert code == 0, f"{name} exited {code}: {err}"
            assert err == "", f"{name} wrote to stderr: {err}"
        outputs: dict[str, list[Any]] = {}
        for name, out, _, _ in results:
            outputs.setdefault(name, []).append(json.loads(out))
        for listing in outputs["list"]:
            assert keep <= {r["id"] for r in listing}  # nothing lost while others write
        for stats in outputs["stats"]:
            assert sum(stats["by_status"].values()) >= len(keep)
        assert sum(p["pruned"] for p in outputs["prune"]) == N_OLD  # each deleted exactly once
        created = [r["id"] for r in outputs["create"]]
        assert len(created) == ROUNDS * CREATES_PER_ROUND
        reaped = [r["id"] for report in outputs["reap"] for r in report["ended"]]
        assert len(reaped) == len(set(reaped))  # no session ended by two reaps

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # serve and the reaps finish the due sessions
            live = all_rows(
                db_url,
                SessionFilter(
                    agent_id="due", statuses=[SessionStatus.ACTIVE, SessionStatus.ENDING]
                ),
            )
            if not live:
                break
            time.sleep(0.1)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
    finally:
        if serve.poll() is None:
            serve.kill()

    rows = {r.id: r for r in all_rows(db_url)}
    assert set(rows) == keep | set(created)  # old rows pruned, nothing else lost
    for r in due:
        assert rows[r.id].status is SessionStatus.ENDED
        assert rows[r.id].end_reason == "idle"
    for r in fresh:
        assert rows[r.id].status is SessionStatus.ACTIVE
    for i in created:
        assert rows[i].status is SessionStatus.ACTIVE
    assert not {r.id for r in old} & set(rows)

    state = asyncio.run(fake_state(fake_url))
    sessions = state["sessions"]
    for r in due:
        assert sessions[r.session_id]["terminate_count"] == 1, r.session_id
    text = log.read_text()
    assert "Traceback" not in text
    assert "locked" not in text
