"""Worker processes for the multi-process tests: ``python -m tests.proc_worker MODE ...``.

They coordinate with the test through files (a ``ready`` file they write, a ``go`` file they wait
for), never through sleeps of a guessed length.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from sessionmgr.client import LemonSliceClient
from sessionmgr.manager import SessionManager
from sessionmgr.reaper import Reaper
from sessionmgr.repository import SessionRepository

FAKE_KEY = "proc-key"


async def wait_for_file(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(0.005)


async def reap(fake_url: str, db_url: str, workdir: Path, name: str) -> None:
    """Wait for the go signal, then drain everything due; write how many this process ended."""
    async with LemonSliceClient(FAKE_KEY, api_url=fake_url) as client:
        repo = await SessionRepository.open(db_url)
        try:
            reaper = Reaper(repo, client, owner=name, concurrency=8, batch=10)
            (workdir / f"{name}.ready").touch()
            await wait_for_file(workdir / "go")
            ended = 0
            while True:  # the other process may hand back rows; stop when nothing is due
                result = await reaper.run_once()
                ended += len(result.ended)
                if not result.ended and not any(result.outcomes.values()):
                    break
        finally:
            await repo.close()
    (workdir / f"{name}.json").write_text(json.dumps({"ended": ended}))


async def create(fake_url: str, db_url: str) -> None:
    """Create one session; the test kills this process while the answer is outstanding."""
    async with (
        LemonSliceClient(FAKE_KEY, api_url=fake_url) as client,
        SessionManager(database_url=db_url, client=client, reaper=False, auto_upgrade=False) as mgr,
    ):
        await mgr.create_session(agent_id="agent_doomed", metadata={"bot": "crashy"})


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "reap":
        fake_url, db_url, workdir, name = args
        asyncio.run(reap(fake_url, db_url, Path(workdir), name))
    elif mode == "create":
        fake_url, db_url = args
        asyncio.run(create(fake_url, db_url))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
