"""The group writer's one-hop design: blind ``mark_active`` (both backends), and on SQLite a
batch that waits for another process's write lock without blocking the event loop, and WAL
checkpoints that happen off the writer's connection."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sqlite3
from datetime import timedelta
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from sessionmgr import db, writer
from sessionmgr.records import SessionRecord
from sessionmgr.repository import SessionRepository
from sessionmgr.states import EndReason, SessionStatus

IDLE = 60.0  # seconds


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# --- gathering a batch ---------------------------------------------------------------------


async def test_ops_arriving_over_a_few_loop_turns_share_one_commit(repo: SessionRepository):
    """Callers woken one loop turn apart (HTTP answers read in successive turns) still share a
    transaction: the writer waits while each turn brings more, up to ``GATHER_TURNS``."""
    loop = asyncio.get_running_loop()
    writes: list[asyncio.Future[SessionRecord]] = []

    def one_more(left: int) -> None:
        writes.append(asyncio.ensure_future(repo.record_intent(idle_window=IDLE, max_age=None)))
        if left:
            loop.call_soon(one_more, left - 1)

    before = repo.writer.batches
    one_more(writer.GATHER_TURNS - 1)  # one op per turn, GATHER_TURNS turns in all
    await asyncio.sleep(0)
    while len(writes) < writer.GATHER_TURNS:
        await asyncio.sleep(0)
    records = await asyncio.gather(*writes)
    assert repo.writer.batches - before == 1
    assert [r.status for r in records] == [SessionStatus.PENDING] * writer.GATHER_TURNS


async def test_a_lone_op_is_not_held_back(repo: SessionRepository):
    """With nothing else coming the writer commits after one quiet turn: a single create waits
    for no timer."""
    record = await asyncio.wait_for(repo.record_intent(idle_window=IDLE, max_age=None), 5)
    assert await repo.get(record.id) == record


# --- blind mark_active -----------------------------------------------------------------------


async def test_blind_mark_active_returns_the_stored_record(repo: SessionRepository):
    intents = [await repo.record_intent(idle_window=IDLE, max_age=600.0) for _ in range(5)]
    results = await asyncio.gather(
        *(
            repo.mark_active(i.id, session_id=f"s{i.id}", room_url="r", control_url="c", intent=i)
            for i in intents
        )
    )
    for result in results:
        assert result is not None
        assert result == await repo.get(result.id)  # built from the intent: what is stored
        assert result.status is SessionStatus.ACTIVE


async def test_a_blind_change_writes_every_kind_of_column(repo: SessionRepository):
    """A blind change binds its values itself (SQLite: the driver's executemany; PostgreSQL:
    one typed array per column, ``UPDATE ... FROM unnest``): JSON, times, text and numbers all
    arrive as the record reads them back, without the loading path."""
    record, _ = await repo.adopt(
        session_id="s_blind", control_url="https://c/x", idle_window=IDLE, max_age=None
    )
    later = record.updated_at + timedelta(seconds=5)
    changes = {
        "metadata": {"user": "ada", "note": "é ünïcode"},
        "updated_at": later,
        "last_error": 'it\'s "quoted"',
        "cost": 1.25,
    }

    def blind(uow: writer.UnitOfWork) -> writer.Thunk:
        uow.blind_change(record.id, "active", changes, at=later, reason=None, detail="test")
        return lambda: True

    def loading(uow: writer.UnitOfWork) -> writer.Thunk:
        raise AssertionError("the blind change failed and fell back to loading its row")

    assert await repo.writer.submit(writer.Op(loading, pks=(record.id,), blind=blind)) is True
    stored = await repo.get(record.id)
    assert stored.metadata == changes["metadata"]
    assert (stored.updated_at, stored.last_error, stored.cost) == (later, 'it\'s "quoted"', 1.25)
    assert stored.status is SessionStatus.ACTIVE


async def test_blind_mark_active_fails_alone_when_its_intent_was_resolved(
    repo: SessionRepository,
):
    """One intent failed meanwhile, another answer names a session recorded already: those two
    are "not applied" (None), the rest of their batch goes through."""
    intents = [await repo.record_intent(idle_window=IDLE, max_age=None) for _ in range(6)]
    assert await repo.mark_failed(intents[2].id, reason=EndReason.CREATE_REJECTED)
    results = await asyncio.gather(
        *(
            repo.mark_active(
                i.id,
                session_id="same" if n in (1, 4) else f"s{n}",
                room_url=None,
                control_url="c",
                intent=i,
            )
            for n, i in enumerate(intents)
        ),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert results[2] is None
    assert results.count(None) == 2
    assert sum(isinstance(r, SessionRecord) for r in results) == 4
    assert (await repo.get(intents[2].id)).status is SessionStatus.FAILED
    assert (await repo.get("same")).status is SessionStatus.ACTIVE


# --- SQLite: locks and checkpoints never block the loop --------------------------------------


def _hold_write_lock(path: str, locked: Event, release: Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    locked.set()
    release.wait(60)
    conn.execute("COMMIT")
    conn.close()


async def test_a_batch_waiting_for_another_process_lock_does_not_block_the_loop(
    tmp_path: Path,
):
    path = tmp_path / "s.db"
    async with await SessionRepository.open(sqlite_url(path), upgrade=True) as repo:
        await repo.record_intent(idle_window=IDLE, max_age=None)  # the writer's connection open
        ctx = multiprocessing.get_context("spawn")
        locked, release = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold_write_lock, args=(str(path), locked, release))
        holder.start()
        try:
            assert await asyncio.to_thread(locked.wait, 60)
            write = asyncio.create_task(repo.record_intent(idle_window=IDLE, max_age=None))
            ticks = 0
            while ticks < 200:  # the loop keeps turning while the write waits for the lock
                await asyncio.sleep(0)
                ticks += 1
            assert not write.done()
            before = repo.writer.batches
            release.set()
            record = await asyncio.wait_for(write, 60)
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 60)
        assert record.status is SessionStatus.PENDING
        assert repo.writer.batches == before + 1
        assert holder.exitcode == 0


async def test_the_writer_keeps_its_temporary_tables_in_memory(tmp_path: Path):
    """Every claim and bulk end is an UPDATE ... RETURNING, whose rows SQLite gathers in a
    temporary table: on the default temp_store each one opened a temporary file (~50 us, twice
    the UPDATE). The writer's are a batch's rows at most; the readers keep the default."""
    path = tmp_path / "s.db"
    async with await SessionRepository.open(sqlite_url(path), upgrade=True) as repo:
        await repo.record_intent(idle_window=IDLE, max_age=None)
        conn = repo.writer._connection()
        assert conn.exec_driver_sql("PRAGMA temp_store").scalar() == 2  # MEMORY
    with contextlib.closing(db.sqlite_read_connection(path)) as reader:
        assert reader.execute("PRAGMA temp_store").fetchone()[0] == 0  # the default


async def test_the_wal_is_checkpointed_off_the_writer_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(writer, "CHECKPOINT_BYTES", 256 << 10)
    path = tmp_path / "s.db"
    wal = Path(f"{path}-wal")
    async with await SessionRepository.open(sqlite_url(path), upgrade=True) as repo:
        await repo.record_intent(idle_window=IDLE, max_age=None)
        conn = repo.writer._connection()
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0
        prompt = "p" * 4000
        while repo.writer.checkpointing is None:  # write until the WAL outgrows the limit
            await asyncio.gather(
                *(
                    repo.record_intent(idle_window=IDLE, max_age=None, agent_prompt=prompt)
                    for _ in range(20)
                )
            )
        grown = os.stat(wal).st_size
        assert grown >= writer.CHECKPOINT_BYTES
        await repo.writer.checkpointing
        assert repo.writer.checkpoints == 1
        await repo.record_intent(idle_window=IDLE, max_age=None)  # restarts the checkpointed WAL
        assert os.stat(wal).st_size < grown  # journal_size_limit: it shrank back
        assert len((await repo.list(limit=1000)).items) > 20
