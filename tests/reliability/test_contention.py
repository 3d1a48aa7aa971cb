"""Contention: one `sessionmgr serve` beside the cleanup jobs (`reap`, `end-all`, `prune`, `list`,
plus `stats` and `create`), all at once, round after round, on one database (a SQLite file, and
PostgreSQL), while another process creates sessions continuously. LemonSlice is a
`sessionmgr fake-server` process.

Nobody may see "database is locked", a serialization failure, a deadlock or a traceback; every
command exits 0; no session is terminated twice (the fake counts every terminate request) and
every ended row has exactly one end event; no session ends as idle before its deadline; prune
deletes exactly the old rows and nothing else is lost. Rounds follow one another by process
exit, never by sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from sessionmgr import db
from sessionmgr.clock import FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.models import SessionEventRow, SessionRow
from sessionmgr.repository import SessionRepository
from sessionmgr.states import FINAL_STATUSES, REMOTE_LIVE, SessionStatus
from sessionmgr.testing import fake_server_process, fake_state

from ..conftest import postgres_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SESSIONMGR = str(Path(sys.executable).with_name("sessionmgr"))
CREATOR = [sys.executable, "-m", "tests.reliability.driver", "creator"]
API_KEY = "contention-key-7f3a"
ROUNDS = 3  # rounds of the five cleanup jobs at once
N_OLD = 20  # ended 40 days ago: prune deletes them
N_RECENT = 5  # ended yesterday: prune keeps them
CREATED_FIRST = 5  # sessions the creator makes before the first round starts
STEP_TIMEOUT = 60.0  # seconds any one process may take
# What no user may ever see, in any process's output (case-insensitive); nor the API key.
FORBIDDEN = ("database is locked", "could not serialize", "deadlock", "traceback", API_KEY)

JOBS = {
    "reap": ["reap", "--json", "--concurrency", "4"],
    "end-all": ["end-all", "--yes", "--json", "--concurrency", "4"],
    "prune": ["prune", "--older-than", "30d", "--batch-size", "3", "--json"],
    "list": ["list", "--agent-id", "seed", "--limit", "1000", "--json"],  # the seeded rows
    "stats": ["stats", "--json"],
    "create": ["create", "--agent-id", "cli", "--idle-window", "0.2s", "--json"],
}


@pytest.fixture
def fake_url() -> Iterator[str]:
    with fake_server_process(api_key=API_KEY, latency={"terminate": 0.005}) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated database of this test's own: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'contention.db'}"
        await db.upgrade(url)
        yield url
    else:
        async with postgres_database() as url:
            await db.upgrade(url)
            yield url


def env_for(db_url: str, fake_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(
        LEMONSLICE_API_KEY=API_KEY,
        LEMONSLICE_API_URL=fake_url,
        SESSIONMGR_DATABASE_URL=db_url,
    )
    return env


def serve_args() -> list[str]:
    """A fast-ticking serve; its HTTP side on any free port, so parallel runs never collide."""
    return [
        *("serve", "--interval", "0.1", "--reconcile-every", "1s", "--concurrency", "4"),
        *("--port", "0"),
    ]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[Any], what: str) -> None:
    """Poll ``condition()`` (files the processes write) while ``proc`` lives."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():
        assert proc.poll() is None, f"{what}: the process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: not within {STEP_TIMEOUT} s"
        await asyncio.sleep(0.01)


async def seed_ended(db_url: str, fake_url: str, count: int, ago: timedelta) -> set[str]:
    """``count`` sessions created and ended ``ago`` (prune's material); their session ids."""
    clock = FakeClock(datetime.now(UTC) - ago)
    async with SessionManager(
        database_url=db_url, api_key=API_KEY, api_url=fake_url, clock=clock, reaper=False
    ) as manager:
        ids = set()
        for _ in range(count):
            record = await manager.create_session(agent_id="seed")
            await manager.end_session(record.id)
            assert record.session_id is not None
            ids.add(record.session_id)
        return ids


async def rows_and_end_events(db_url: str) -> tuple[list[Any], collections.Counter[int]]:
    """Every session row (SQLAlchemy rows of the sessions table), and how many events moved
    each into a final status."""
    async with await SessionRepository.open(db_url) as repo, repo.engine.connect() as conn:
        rows = list((await conn.execute(select(SessionRow.__table__))).all())
        events = (await conn.execute(select(SessionEventRow.__table__))).all()
    ends = collections.Counter(e.session_pk for e in events if e.to_status in FINAL_STATUSES)
    return rows, ends


def forbidden_in(name: str, text: str) -> list[str]:
    """The lines of ``text`` that show a user something no user may see."""
    return [
        f"{name}: {line.strip()[:300]}"
        for line in text.splitlines()
        if any(word.lower() in line.lower() for word in FORBIDDEN)
    ][:5]


async def test_serve_and_cleanup_jobs_share_one_database(
    db_url: str, fake_url: str, tmp_path: Path
) -> None:
    old = await seed_ended(db_url, fake_url, N_OLD, timedelta(days=40))
    recent = await seed_ended(db_url, fake_url, N_RECENT, timedelta(days=1))
    env = env_for(db_url, fake_url)
    serve_log, creator_log = tmp_path / "serve.log", tmp_path / "creator.log"
    created, stop = tmp_path / "created", tmp_path / "stop"
    problems: list[str] = []
    outputs: dict[str, list[Any]] = collections.defaultdict(list)

    with serve_log.open("w") as serve_out, creator_log.open("w") as creator_out:
        serve = subprocess.Popen(
            [SESSIONMGR, *serve_args()], stdout=serve_out, stderr=subprocess.STDOUT, env=env
        )
        creator = subprocess.Popen(
            [*CREATOR, fake_url, db_url, API_KEY, str(created), str(stop)],
            cwd=ROOT,
            stdout=creator_out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        await wait_until(lambda: "serving" in serve_log.read_text(), serve, "serve start")
        await wait_until(lambda: len(lines_of(created)) >= CREATED_FIRST, creator, "creator")
        for _ in range(ROUNDS):
            jobs = {
                name: subprocess.Popen(
                    [SESSIONMGR, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for name, args in JOBS.items()
            }
            for name, proc in jobs.items():
                out, err = await asyncio.to_thread(proc.communicate, timeout=STEP_TIMEOUT)
                if proc.returncode != 0 or err:
                    problems.append(f"{name} exited {proc.returncode}: {err[-1500:]}")
                problems += forbidden_in(name, out + err)
                outputs[name].append(json.loads(out) if proc.returncode == 0 else None)
            assert creator.poll() is None, creator_log.read_text()
        stop.touch()
        assert await asyncio.to_thread(creator.wait, STEP_TIMEOUT) == 0, creator_log.read_text()
        # Everything still live ends now; serve may be ending some of them ("busy").
        last = subprocess.run(
            [SESSIONMGR, *JOBS["end-all"]],
            capture_output=True,
            text=True,
            env=env,
            timeout=STEP_TIMEOUT,
        )
        assert last.returncode == 0, last.stderr
        problems += forbidden_in("last end-all", last.stdout + last.stderr)
        serve.send_signal(signal.SIGTERM)  # finishes the terminates it has in flight
        assert await asyncio.to_thread(serve.wait, STEP_TIMEOUT) == 0, serve_log.read_text()
    finally:
        for background in (serve, creator):
            if background.poll() is None:
                background.kill()
                background.wait()
    problems += forbidden_in("serve", serve_log.read_text())
    problems += forbidden_in("creator", creator_log.read_text())
    assert not problems, "\n".join(problems)

    # Prune deleted exactly the old rows, once each; list never missed a row that must stay.
    assert sum(p["pruned"] for p in outputs["prune"]) == N_OLD
    state = await fake_state(fake_url)
    remote = state["sessions"]
    rows, ends = await rows_and_end_events(db_url)
    by_sid = {r.session_id: r for r in rows}
    assert set(by_sid) == set(remote) - old  # every remote session has a row but the pruned
    assert recent <= set(by_sid)
    creator_pks = {int(line) for line in lines_of(created)}
    cli_created = {r["id"] for r in outputs["create"]}
    assert len(cli_created) == ROUNDS
    assert creator_pks | cli_created <= {r.id for r in rows}
    for listing in outputs["list"]:  # read while everyone wrote: the kept rows are all there
        assert {by_sid[sid].id for sid in recent} <= {r["id"] for r in listing}
    for stats in outputs["stats"]:
        assert sum(stats["by_status"].values()) >= N_RECENT + CREATED_FIRST

    # Every session ended exactly once: one terminate request, one end event, final columns.
    assert state["terminate_requests"] == dict.fromkeys(remote, 1)
    assert all(s["status"] not in REMOTE_LIVE for s in remote.values())
    for row in rows:
        assert row.status == SessionStatus.ENDED, (row.id, row.status)
        assert row.ended_at is not None, row.id
        assert row.end_reason is not None, row.id
        assert ends[row.id] == 1, (row.id, ends[row.id])
        if row.end_reason == "idle":  # no reaper ends a session before its idle window ran out
            assert row.deadline is not None, row.id
            assert row.ended_at >= row.deadline, (row.id, row.ended_at, row.deadline)
    reaped = [r["id"] for report in outputs["reap"] for r in report["ended"]]
    assert len(reaped) == len(set(reaped))
    by_reason = collections.Counter(r.end_reason for r in rows)
    backend = db_url.split("+")[0]
    print(f"contention on {backend}: {len(rows)} rows ended once each, by reason {by_reason}")
