"""The installed `sessionmgr` entry point in real processes. LemonSlice is a
`sessionmgr fake-server` process. Concurrent use (serve beside the cleanup jobs, on SQLite and
PostgreSQL) is tests/reliability/test_contention.py."""

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
from sessionmgr.records import SessionRecord

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
    env = clean_env() | ({"LEMONSLICE_API_KEY": api_key} if api_key else {})
    return subprocess.run(
        [*base, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env
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
            env=clean_env() | {"LEMONSLICE_API_KEY": API_KEY},
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
