"""A pipecat bot process SIGKILLed mid-session has its session ended by a real ``sessionmgr
serve`` process, with FakeLemonSlice in a third process. Two bots: one whose transport is
guarded by ``manage_transport`` (it records into the shared SQLite file itself), one whose plain
transport points at serve's recording proxy (``api_url``). While alive, each bot keeps its
session busy (touches, or ``reset-idle-timeout`` control events through the proxy) and serve
must leave it alone; once killed, serve ends it (``idle``) with one terminate.

The processes coordinate through files (the bot writes its session id, then a heartbeat count)
and serve's log line; nothing waits a fixed time. serve's clock cannot be injected, so its idle
window is small (``IDLE_WINDOW``), and the test waits on conditions, not for the window."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sessionmgr.repository import SessionRepository
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import fake_server_process, fake_state

from .helpers import FAKE_API_KEY

pytestmark = pytest.mark.slow

IDLE_WINDOW = 3  # seconds serve lets a session idle
HEARTBEAT = 0.2  # seconds between the bot's activity signals
ALIVE_BEATS = 25  # beats the bot must survive unreaped (5 s: longer than the idle window)
TIMEOUT = 60.0  # seconds any one condition may take on a loaded machine

BOT = r"""
import asyncio, os, sys
from pathlib import Path
import aiohttp
from pipecat.transports.lemonslice.transport import LemonSliceNewSessionRequest, LemonSliceTransport
from sessionmgr import SessionManager
from sessionmgr.integrations.pipecat import manage_transport

mode, db_url, fake_url, proxy_url, out, idle, beat = sys.argv[1:8]
KEY = os.environ["LEMONSLICE_API_KEY"]

def publish(name, text):
    tmp = Path(out + "." + name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out + "." + name)

async def main():
    async with aiohttp.ClientSession() as http:
        if mode == "managed":
            request = LemonSliceNewSessionRequest(agent_id="agent_bot")
            transport = LemonSliceTransport("bot", http, KEY, session_request=request)
            async with SessionManager(
                database_url=db_url, api_key=KEY, api_url=fake_url, idle_window=float(idle),
                reaper=False,
            ) as manager:
                manage_transport(transport, manager)
                await transport._client._initialize()
                sid = transport._client._session_id
                publish("sid", sid)
                beats = 0
                while True:
                    manager.touch(sid)
                    beats += 1
                    publish("beats", str(beats))
                    await asyncio.sleep(float(beat))
        request = LemonSliceNewSessionRequest(agent_id="agent_bot", api_url=proxy_url)
        transport = LemonSliceTransport("bot", http, KEY, session_request=request)
        await transport._client._initialize()
        sid, control = transport._client._session_id, transport._client._control_url
        publish("sid", sid)
        beats = 0
        while True:
            async with http.post(
                control, json={"event": "reset-idle-timeout"}, headers={"x-api-key": KEY}
            ) as resp:
                resp.raise_for_status()
            beats += 1
            publish("beats", str(beats))
            await asyncio.sleep(float(beat))

asyncio.run(main())
"""


@pytest.fixture
def fake_url() -> Iterator[str]:
    with fake_server_process(FAKE_API_KEY) as url:
        yield url


async def wait_until(condition, what: str, *procs: subprocess.Popen[str]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not await condition():
            for proc in procs:
                assert proc.poll() is None, f"a process exited while waiting for {what}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def serve(fake_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A real ``sessionmgr serve``; yields (database URL, its proxy's collection URL)."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "LEMONSLICE_API_KEY": FAKE_API_KEY,
        "LEMONSLICE_API_URL": fake_url,
        "SESSIONMGR_DATABASE_URL": db_url,
    }
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sessionmgr",
                "serve",
                "--port",
                "0",
                "--interval",
                "0.2",
                "--idle-window",
                str(IDLE_WINDOW),
            ],
            env=env,
            stderr=err,
            text=True,
            cwd=tmp_path,
        )
    try:

        async def listening() -> bool:
            return "listening on http://" in log.read_text()

        await wait_until(listening, "serve to listen", proc)
        line = next(x for x in log.read_text().splitlines() if "listening on http://" in x)
        base = line.split("listening on ", 1)[1].strip()
        yield db_url, base + "/api/liveai/sessions"
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("mode", ["managed", "proxy"])
async def test_a_killed_bot_has_its_session_ended_by_serve(
    mode: str, serve: tuple[str, str], fake_url: str, tmp_path: Path
) -> None:
    db_url, proxy_url = serve
    out = str(tmp_path / "bot")
    env = {**os.environ, "LEMONSLICE_API_KEY": FAKE_API_KEY}
    args = [mode, db_url, fake_url, proxy_url, out, str(IDLE_WINDOW), str(HEARTBEAT)]
    bot = subprocess.Popen(
        [sys.executable, "-c", BOT, *args],
        env=env,
        text=True,
    )
    try:

        async def beats_at_least(n: int) -> bool:
            path = Path(out + ".beats")
            return path.exists() and int(path.read_text()) >= n

        await wait_until(lambda: beats_at_least(1), "the bot's session", bot)
        sid = Path(out + ".sid").read_text()
        await wait_until(lambda: beats_at_least(ALIVE_BEATS), "the bot to stay busy", bot)
        async with await SessionRepository.open(db_url) as repo:
            assert (await repo.get(sid)).status is SessionStatus.ACTIVE  # held: left alone
        assert (await fake_state(fake_url))["sessions"][sid]["status"] == "ACTIVE"
        bot.kill()  # SIGKILL: no cleanup, no end_session
        bot.wait(30)
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()

    async with await SessionRepository.open(db_url) as repo:

        async def ended() -> bool:
            return (await repo.get(sid)).status is SessionStatus.ENDED

        await wait_until(ended, "serve to end the session")
        record = await repo.get(sid)
    assert record.end_reason is EndReason.IDLE
    assert record.metadata["via"] == ("pipecat" if mode == "managed" else "proxy")
    state = await fake_state(fake_url)
    assert state["created"] == 1
    assert state["sessions"][sid]["terminate_count"] == 1
    assert state["sessions"][sid]["status"] == "COMPLETED"
