"""Claims from 4 OS processes at once on one database (a SQLite file, or PostgreSQL).

Each worker process opens its own repository, says it is ready, waits at a barrier file, then
claims in a loop (ending what it claimed, and writing new sessions meanwhile so the writers
contend for the lock) until nothing is left. Every due session must be claimed exactly once,
expired leases of a dead owner included, and no worker may see "database is locked".

Run as a script, this file is the worker: ``python test_repository_processes.py URL DIR NAME``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sessionmgr.clock import FakeClock
from sessionmgr.repository import SessionRepository
from sessionmgr.states import EndReason, SessionStatus

WORKERS = 4
DUE = 150  # sessions past their deadline when the workers start
ORPHANED = 30  # of those, already claimed by a "dead" owner whose lease has run out
NOT_DUE = 20
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # the workers' "now"
LEASE = 60.0  # seconds
BARRIER_TIMEOUT = 60.0  # seconds a worker waits for the go file
WORKER_TIMEOUT = 90.0  # seconds the test waits for the workers


# --- the worker ----------------------------------------------------------------------------------


async def worker(url: str, directory: Path, name: str) -> None:
    repo = await SessionRepository.open(url, clock=FakeClock(T0))
    claimed: list[int] = []
    try:
        (directory / f"{name}.ready").write_text("")
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while not (directory / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no go file")
            await asyncio.sleep(0.005)

        async def churn() -> None:  # unrelated writes from the same process, never due
            for _ in range(20):
                intent = await repo.record_intent(idle_window=3600, max_age=None)
                await repo.mark_active(
                    intent.id, session_id=f"{name}-{intent.id}", room_url=None, control_url="c"
                )

        churning = asyncio.create_task(churn())
        while batch := await repo.claim_due(owner=name, limit=7, lease=LEASE):
            claimed += [r.id for r in batch]
            ended = await asyncio.gather(*(repo.mark_ended(r.id, owner=name) for r in batch))
            assert all(ended), "a claimed session could not be ended by its owner"
        await churning
    finally:
        await repo.close()
        (directory / f"{name}.json").write_text(json.dumps(claimed))


# --- the test ------------------------------------------------------------------------------------


async def seed(url: str) -> tuple[set[int], set[int]]:
    """DUE due sessions (ORPHANED of them leased by a dead owner) and NOT_DUE fresh ones."""
    clock = FakeClock(T0 - timedelta(hours=1))
    async with await SessionRepository.open(url, clock=clock, upgrade=True) as repo:

        async def start(i: int) -> int:
            intent = await repo.record_intent(idle_window=60, max_age=None)
            await repo.mark_active(intent.id, session_id=f"due-{i}", room_url=None, control_url="c")
            return intent.id

        due = set(await asyncio.gather(*(start(i) for i in range(DUE))))
        clock.advance(3600 - 2 * LEASE)  # the dead owner claims, then never comes back
        dead = await repo.claim_due(owner="dead", limit=ORPHANED, lease=LEASE)
        assert len(dead) == ORPHANED
        clock.advance(2 * LEASE)
        adopted = await asyncio.gather(
            *(
                repo.adopt(session_id=f"fresh-{i}", control_url="c", idle_window=3600, max_age=None)
                for i in range(NOT_DUE)
            )
        )
        return due, {record.id for record, _ in adopted}


def spawn(url: str, directory: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, url, str(directory), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
async def test_four_processes_claim_each_due_session_exactly_once(repo_url: str, tmp_path: Path):
    due, fresh = await seed(repo_url)
    names = [f"w{i}" for i in range(WORKERS)]
    procs = [spawn(repo_url, tmp_path, name) for name in names]
    try:
        async with asyncio.timeout(WORKER_TIMEOUT):
            while not all((tmp_path / f"{n}.ready").exists() for n in names):
                if any(p.poll() is not None for p in procs):
                    break  # a worker died early: its output says why (below)
                await asyncio.sleep(0.01)
            (tmp_path / "go").write_text("")
            outputs = await asyncio.gather(
                *(asyncio.to_thread(p.communicate, timeout=WORKER_TIMEOUT) for p in procs)
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in (out + err).lower()

    per_worker = [json.loads((tmp_path / f"{n}.json").read_text()) for n in names]
    claims = [pk for ids in per_worker for pk in ids]
    assert len(claims) == len(set(claims)), "a session was claimed twice"
    assert set(claims) == due

    async with await SessionRepository.open(repo_url) as repo:
        for pk in due:
            record = await repo.get(pk)
            assert record.status is SessionStatus.ENDED
            assert record.end_reason is EndReason.IDLE
        for pk in fresh:
            assert (await repo.get(pk)).status is SessionStatus.ACTIVE
        churned = (await repo.stats()).by_status["active"] - NOT_DUE
        assert churned == WORKERS * 20


if __name__ == "__main__":
    asyncio.run(worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
