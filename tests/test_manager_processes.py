"""Several OS processes, one database: exactly-once ends, crash recovery, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from sessionmgr import EndReason, SessionStatus
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import SYSTEM_CLOCK, FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.reconcile import SETTLE
from sessionmgr.repository import SessionRepository
from sessionmgr.testing import fake_server_process, fake_state

from .helpers import wait_for
from .proc_worker import FAKE_KEY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_url() -> Iterator[str]:
    with fake_server_process(api_key=FAKE_KEY, latency={"terminate": 0.005}) as url:
        yield url


async def seed_due(fake_url: str, db_url: str, n: int) -> list[str]:
    """n sessions live on the fake, recorded two hours ago: every one is due now."""
    past = FakeClock(SYSTEM_CLOCK.now() - timedelta(hours=2))
    ids = []
    async with (
        LemonSliceClient(FAKE_KEY, api_url=fake_url) as client,
        await SessionRepository.open(db_url, clock=past, upgrade=True) as repo,
    ):
        for i in range(n):
            answer = await client.create_session(agent_id=f"agent_{i}")
            await repo.adopt(
                session_id=answer["session_id"],
                control_url=answer["control_url"],
                idle_window=60,
                max_age=None,
            )
            ids.append(answer["session_id"])
    return ids


def worker(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.proc_worker", *args], cwd=ROOT)


async def test_two_processes_end_each_due_session_exactly_once(
    fake_url: str, repo_url: str, tmp_path: Path
):
    ids = await seed_due(fake_url, repo_url, 120)
    procs = [worker("reap", fake_url, repo_url, str(tmp_path), f"p{i}") for i in range(2)]
    await wait_for(lambda: all((tmp_path / f"p{i}.ready").exists() for i in range(2)), 60)
    (tmp_path / "go").touch()
    for p in procs:
        assert p.wait(60) == 0
    ended = [json.loads((tmp_path / f"p{i}.json").read_text())["ended"] for i in range(2)]
    assert sum(ended) == len(ids)
    state = await fake_state(fake_url)
    assert {sid: state["sessions"][sid]["terminate_count"] for sid in ids} == dict.fromkeys(ids, 1)
    async with await SessionRepository.open(repo_url) as repo:
        for sid in ids:
            row = await repo.get(sid)
            assert row.status is SessionStatus.ENDED
            assert row.end_reason is EndReason.IDLE


async def test_sigkill_between_create_and_record_is_recovered_by_reconcile(
    fake_url: str, tmp_path: Path
):
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}"
    async with await SessionRepository.open(db_url, upgrade=True):
        pass
    # The fake takes the create, then sits on the answer: the window a crash falls into.
    await fake_admin(fake_url, "faults", {"endpoint": "create", "kind": "hang", "seconds": 60})
    proc = worker("create", fake_url, db_url)
    try:

        async def taken() -> bool:
            return bool((await fake_state(fake_url))["creates"] == 1)

        while not await taken():
            assert proc.poll() is None, "worker died before its create was taken"
            await asyncio.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    state = await fake_state(fake_url)
    [remote_id] = state["sessions"]
    # A fresh process, later: reconcile finds the live session and its pending intent.
    later = FakeClock(SYSTEM_CLOCK.now() + timedelta(seconds=SETTLE + 5))
    async with (
        LemonSliceClient(FAKE_KEY, api_url=fake_url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, clock=later) as mgr,
    ):
        [intent] = (await mgr.repository.list()).items
        assert intent.status is SessionStatus.PENDING
        report = await mgr.reconcile()
        assert [r.session_id for r in report.adopted] == [remote_id]
        row = await mgr.get(intent.id)
        assert row.status is SessionStatus.ENDED
        assert row.end_reason is EndReason.CREATE_UNKNOWN
        assert row.metadata == {"bot": "crashy"}
    state = await fake_state(fake_url)
    assert state["sessions"][remote_id]["terminate_count"] == 1
    assert state["sessions"][remote_id]["status"] != "ACTIVE"


async def fake_admin(fake_url: str, route: str, body: dict[str, object]) -> None:
    base = fake_url.split("/api/")[0]
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{base}/_fake/{route}", json=body)
        resp.raise_for_status()


async def test_serve_finishes_in_flight_terminates_on_sigterm(fake_url: str, tmp_path: Path):
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"
    ids = await seed_due(fake_url, db_url, 5)
    # Slow terminates, so SIGTERM lands while all five are in flight.
    await fake_admin(fake_url, "latency", {"terminate": 1.0})
    env = {
        **os.environ,
        "LEMONSLICE_API_KEY": FAKE_KEY,
        "LEMONSLICE_API_URL": fake_url,
        "SESSIONMGR_DATABASE_URL": db_url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionmgr", "serve", "--port", "0", "--interval", "0.1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:

        async def all_in_flight() -> bool:
            state = await fake_state(fake_url)
            return bool(sum(state["terminate_requests"].values()) == len(ids))

        while not await all_in_flight():
            assert proc.poll() is None, "serve exited early"
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert err.count("ended session") == len(ids)
    assert "Traceback" not in err
    state = await fake_state(fake_url)
    assert all(state["sessions"][sid]["terminate_count"] == 1 for sid in ids)
    async with await SessionRepository.open(db_url) as repo:
        for sid in ids:
            row = await repo.get(sid)
            assert row.status is SessionStatus.ENDED
            assert row.end_reason is EndReason.IDLE
