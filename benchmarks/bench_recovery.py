"""Recovery time: a backend SIGKILLed mid-create has its remote session terminated how fast?

Real processes, default settings: ``sessionmgr fake-server --hold-create 60`` (creates take a
minute to answer, their session started and listed at once), ``sessionmgr serve`` (reaper every
5 s, recovery on each tick), and per run a ``sessionmgr create`` that is SIGKILLed as soon as the
fake has started its session. The figure is the time from the kill until the fake records the
terminate; target <= 30 s (LemonSlice's own idle timeout is 60 s). Median of the runs.

    python -m benchmarks.bench_recovery [--smoke] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from sessionmgr.repository import SessionRepository
from sessionmgr.testing import fake_state, listening_process

from .common import FAKE_KEY, median, print_table, record, runs_text

TARGET = 30.0  # seconds
POLL = 0.05  # seconds between looks at the fake's state
RUN_TIMEOUT = 120.0  # seconds a run may take before it counts as never recovered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(port: int, deadline: float) -> None:
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("serve did not become healthy")


async def one_run(url: str, env: dict[str, str]) -> float:
    before = set((await fake_state(url))["sessions"])
    creator = subprocess.Popen(
        [sys.executable, "-m", "sessionmgr", "create", "--agent-id", "agent_bench"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            sessions = (await fake_state(url))["sessions"]
            new = set(sessions) - before
            if new:
                break
            if time.monotonic() > deadline or creator.poll() is not None:
                raise RuntimeError("the creator never reached the fake")
            await asyncio.sleep(POLL)
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait(10)
    killed = time.monotonic()
    [sid] = new
    while time.monotonic() - killed < RUN_TIMEOUT:
        session = (await fake_state(url))["sessions"][sid]
        if session["terminate_count"]:
            return time.monotonic() - killed
        await asyncio.sleep(POLL)
    return float("inf")


async def bench(runs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'recovery.db'}"
        async with await SessionRepository.open(db_url, upgrade=True):
            pass
        cmd = [sys.executable, "-m", "sessionmgr", "fake-server", "--api-key", FAKE_KEY]
        cmd += ["--hold-create", "60"]
        with listening_process(cmd) as url:
            port = free_port()
            env = {
                **os.environ,
                "LEMONSLICE_API_KEY": FAKE_KEY,
                "LEMONSLICE_API_URL": url,
                "SESSIONMGR_DATABASE_URL": db_url,
            }
            serve = subprocess.Popen(
                [sys.executable, "-m", "sessionmgr", "serve", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await wait_healthy(port, time.monotonic() + 60)
                return [await one_run(url, env) for _ in range(runs)]
            finally:
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(30)
                except subprocess.TimeoutExpired:
                    serve.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one run (about 20 s)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = 1 if args.smoke else args.runs
    times = asyncio.run(bench(runs))
    mid = median(times)
    print_table(
        "Recovery: SIGKILL mid-create -> remote session terminated (default settings)",
        [
            (
                "median seconds",
                f"{mid:.1f}",
                f"<= {TARGET:g} s: {'ok' if mid <= TARGET else 'MISSED'}",
            ),
            ("runs", runs_text(times, "{:.1f}"), f"{runs} run(s)"),
        ],
    )
    record(
        "recovery",
        {"median_seconds": round(mid, 2), "runs": [round(t, 2) for t in times], "target": TARGET},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
