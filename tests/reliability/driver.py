"""Processes for the reliability tests: ``python -m tests.reliability.driver MODE ...``.

``fake`` runs a FakeLemonSlice that outlives every driver; ``workload`` runs a SessionManager
under a mixed load until the test SIGKILLs it. Both run on a clock ``--offset`` seconds behind
the real one, so the recovery processes (which use the real clock) run, in effect, an hour after
the crash: every grace period, lease and idle window the crashed process stamped has run out,
and nothing has to wait for it.

The workload starts when its ``.go`` file appears (the test spawns the next trial's driver
while the previous one recovers, to hide Python's start-up), then appends one line per step to
its progress file (``create>`` before a create, ``create<`` after it, ``end>``/``end<``,
``touch``, ``adopt``, ``ended <reason>``...). The test picks the kill moment as "after K
lines", K drawn from a seeded RNG: no sleeps decide when it dies.

``cli`` is ``sessionmgr ARGS`` (its real entry point) in a process started early that waits for
its go file, so a recovery step costs its work and not Python's start-up. ``creator`` creates
sessions continuously for the contention test.

``live`` is the healthy backend of the "recovery while others create" trials: on the real clock,
its reaper on (so it recovers the crashed process's intents on its ticks), it creates sessions
with multi-second creates that it keeps (long idle window) until its stop file appears, one
progress line per step (``want``, ``got <session_id>``, ``error <type> <message>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import aiohttp
from yarl import URL

from sessionmgr import config
from sessionmgr.client import LemonSliceClient, Timeouts
from sessionmgr.errors import CreateOutcomeUnknown
from sessionmgr.manager import SessionManager
from sessionmgr.records import SessionRecord
from sessionmgr.retry import RetryPolicy
from sessionmgr.testing import LISTENING_PREFIX, FakeLemonSlice

API_KEY = "crash-trial-key"
OFFSET = 3600.0  # seconds the crashed world runs behind the recovery processes
WORKERS = 4  # concurrent operations in the workload
IDLE_WINDOWS = (0.2, 2.0)  # seconds, range of the sessions' idle windows: the reaper ends some
MAX_AGE = 30.0  # seconds
REAPER_INTERVAL = 0.05  # seconds
ANSWER_DELAY = (0.01, 0.15)  # seconds a create answer is held after the session exists
TERMINATE_LATENCY = 0.03  # seconds before the fake handles a terminate
LOST_ANSWER_DELAY = 5.0  # seconds, past the client's timeout: the create outcome is unknown
# Per-attempt limits short enough that an unknown create outcome costs two seconds, long enough
# that a busy machine never times out (and so retries) a terminate.
TIMEOUTS = Timeouts(connect=2.0, total=2.0)
RETRY = RetryPolicy(attempts=3, base=0.005, cap=0.02, deadline=5.0)
CREATOR_IDLE_WINDOWS = (0.1, 0.3, 600.0)  # seconds: due within a tick or two, or never
INTENT_LEASE = config.INTENT_LEASE  # seconds, the library's default
LEASE = config.LEASE
LIVE_AGENT = "live_backend"  # agent_id of every session the live backend creates
LIVE_WORKERS = 3  # creates in flight at once in the live backend
LIVE_TIMEOUTS = Timeouts(connect=2.0, total=30.0)  # its creates take seconds: wait for them


class OffsetClock:
    """The real clock, ``offset`` seconds behind."""

    def __init__(self, offset: float) -> None:
        self._offset = timedelta(seconds=offset)

    def now(self) -> datetime:
        return datetime.now(UTC) - self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# --- the fake ------------------------------------------------------------------------------------


async def run_fake(offset: float, hold_create: float = 0.0) -> None:
    """Serve until SIGTERM; print the listening line the test waits for. ``hold_create``: every
    create's answer is held that long after its session started (multi-second creates)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fake = FakeLemonSlice(
        api_key=API_KEY,
        clock=OffsetClock(offset),
        latency={"terminate": TERMINATE_LATENCY},  # so kills land while terminates are in flight
        record_requests=False,
    )
    if hold_create:
        fake.configure_realism(hold={"create": hold_create})
    async with fake:
        print(f"{LISTENING_PREFIX}{fake.url}", flush=True)
        await stop.wait()


# --- the workload --------------------------------------------------------------------------------


class Workload:
    """WORKERS tasks doing creates, touches, manual ends and adopts while the reaper runs."""

    def __init__(self, manager: SessionManager, fake_url: str, rng: random.Random, out: IO[str]):
        self.manager = manager
        self.rng = rng
        self.out = out
        self.live: list[SessionRecord] = []
        self.admin = URL(fake_url).origin().with_path("/_fake/faults")
        self.http = aiohttp.ClientSession()

    def mark(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    async def delay_next_create(self, seconds: float) -> None:
        """The fake creates the next session, then holds its answer ``seconds``."""
        body = {"endpoint": "create", "kind": "hang", "seconds": seconds}
        async with self.http.post(self.admin, json=body) as resp:
            resp.raise_for_status()

    async def create(self, worker: int, n: int) -> None:
        roll = self.rng.random()
        if roll < 0.1:
            await self.delay_next_create(LOST_ANSWER_DELAY)
        elif roll < 0.7:
            await self.delay_next_create(self.rng.uniform(*ANSWER_DELAY))
        self.mark("create>")
        try:
            record = await self.manager.create_session(
                agent_id=f"agent_{worker}",
                idle_window=self.rng.uniform(*IDLE_WINDOWS),
                metadata={"worker": worker, "n": n},
            )
        except CreateOutcomeUnknown:
            self.mark("create?")  # left pending for reconcile, by design
            return
        self.live.append(record)
        self.mark("create<")

    async def end(self) -> None:
        record = self.pick()
        if record is None:
            return
        self.mark("end>")
        result = await self.manager.end_session(record.id)
        self.mark("end<" if result.changed else "end=")

    async def adopt(self) -> None:
        """Re-adopting a known session is a no-op that must return the same row."""
        record = self.pick()
        if record is None or record.session_id is None:
            return
        again = await self.manager.adopt_session(record.session_id)
        if again.id != record.id:
            raise AssertionError(f"adopt of {record.session_id} made row {again.id}")
        self.mark("adopt")

    def touch(self) -> None:
        record = self.pick()
        if record is not None and record.session_id is not None:
            self.manager.touch(record.session_id)
            self.mark("touch")

    def pick(self) -> SessionRecord | None:
        return self.rng.choice(self.live) if self.live else None

    async def worker(self, worker: int) -> None:
        for n in range(sys.maxsize):
            roll = self.rng.random()
            if roll < 0.45:
                await self.create(worker, n)
            elif roll < 0.7:
                self.touch()
                await asyncio.sleep(0.005)  # touches are O(1): let the others run
            elif roll < 0.9:
                await self.end()
            else:
                await self.adopt()

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self.worker(w) for w in range(WORKERS)))
        finally:
            await self.http.close()


async def run_workload(
    fake_url: str,
    db_url: str,
    progress: Path,
    seed: int,
    offset: float,
    intent_lease: float = INTENT_LEASE,
    lease: float | None = None,
    create_timeout: float | None = None,
) -> None:
    rng = random.Random(seed)
    clock = OffsetClock(offset)
    go = progress.with_suffix(".go")
    while not go.exists():  # started early, so the trial does not wait for our imports
        await asyncio.sleep(0.002)
    with progress.open("a") as out:

        async def ended(record: SessionRecord) -> None:  # by the reaper or end_session
            out.write(f"ended {record.end_reason}\n")
            out.flush()

        async with (
            LemonSliceClient(
                API_KEY,
                api_url=fake_url,
                timeouts=Timeouts(connect=2.0, total=create_timeout)
                if create_timeout
                else TIMEOUTS,
                retry=RETRY,
            ) as client,
            SessionManager(
                database_url=db_url,
                client=client,
                clock=clock,
                lease=lease or LEASE,
                idle_window=IDLE_WINDOWS[1],
                max_age=MAX_AGE,
                reaper_interval=REAPER_INTERVAL,
                touch_flush_interval=REAPER_INTERVAL,
                intent_lease=intent_lease,
                on_ended=ended,
            ) as manager,
        ):
            out.write("ready\n")
            out.flush()
            await Workload(manager, fake_url, rng, out).run()


# --- the contention test's creator ---------------------------------------------------------------


async def run_creator(
    fake_url: str, db_url: str, api_key: str, progress: Path, stop: Path, seed: int
) -> None:
    """Create sessions one after another until ``stop`` exists: some due within a reaper tick
    or two, the rest only ended by ``end-all``. One progress line per session."""
    rng = random.Random(seed)
    async with SessionManager(
        database_url=db_url, api_key=api_key, api_url=fake_url, reaper=False, max_age=None
    ) as manager:
        with progress.open("a") as out:
            while not stop.exists():
                idle = rng.choice(CREATOR_IDLE_WINDOWS)
                record = await manager.create_session(agent_id="creator", idle_window=idle)
                out.write(f"{record.id}\n")
                out.flush()


# --- the live backend of the "recovery while others create" trials ------------------------------


async def run_live(fake_url: str, db_url: str, progress: Path, stop: Path) -> None:
    """Create and keep sessions until ``stop`` exists, then leave (sessions left live)."""
    async with (
        LemonSliceClient(API_KEY, api_url=fake_url, timeouts=LIVE_TIMEOUTS, retry=RETRY) as client,
        SessionManager(
            database_url=db_url,
            client=client,
            idle_window=600.0,
            max_age=None,
            reaper_interval=REAPER_INTERVAL,
            touch_flush_interval=REAPER_INTERVAL,
        ) as manager,
    ):
        with progress.open("a") as out:
            out.write("ready\n")
            out.flush()

            async def worker() -> None:
                while not stop.exists():
                    out.write("want\n")
                    out.flush()
                    try:
                        record = await manager.create_session(agent_id=LIVE_AGENT)
                    except Exception as exc:  # every error is a finding of the trial
                        message = " ".join(str(exc).split())
                        out.write(f"error {type(exc).__name__} {message}\n")
                    else:
                        out.write(f"got {record.session_id}\n")
                    out.flush()

            await asyncio.gather(*(worker() for _ in range(LIVE_WORKERS)))
            out.write("stopped\n")
            out.flush()


# --- a CLI command, started early -----------------------------------------------------------------


def run_cli_when_told(go: Path, args: list[str]) -> None:
    """``sessionmgr ARGS`` in this process once ``go`` exists (imports done beforehand)."""
    from sessionmgr.cli import main as sessionmgr_main

    while not go.exists():
        time.sleep(0.002)
    sys.argv = ["sessionmgr", *args]
    sessionmgr_main()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.driver")
    sub = parser.add_subparsers(dest="mode", required=True)
    fake = sub.add_parser("fake", help="run the fake LemonSlice until SIGTERM")
    fake.add_argument("--offset", type=float, default=OFFSET)
    fake.add_argument("--hold-create", type=float, default=0.0)
    work = sub.add_parser("workload", help="run the workload until killed")
    work.add_argument("fake_url")
    work.add_argument("db_url")
    work.add_argument("progress", type=Path)
    work.add_argument("--seed", type=int, required=True)
    work.add_argument("--offset", type=float, default=OFFSET)
    work.add_argument("--intent-lease", type=float, default=INTENT_LEASE)
    work.add_argument("--lease", type=float, default=None)
    work.add_argument("--create-timeout", type=float, default=None)
    live = sub.add_parser("live", help="create and keep sessions until the STOP file exists")
    live.add_argument("fake_url")
    live.add_argument("db_url")
    live.add_argument("progress", type=Path)
    live.add_argument("stop", type=Path)
    creator = sub.add_parser("creator", help="create sessions until the STOP file exists")
    creator.add_argument("fake_url")
    creator.add_argument("db_url")
    creator.add_argument("api_key")
    creator.add_argument("progress", type=Path)
    creator.add_argument("stop", type=Path)
    creator.add_argument("--seed", type=int, default=0)
    cli = sub.add_parser("cli", help="run `sessionmgr ARGS` once the GO file exists")
    cli.add_argument("go", type=Path)
    cli.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.mode == "cli":
        run_cli_when_told(args.go, args.args)
    elif args.mode == "creator":
        asyncio.run(
            run_creator(
                args.fake_url, args.db_url, args.api_key, args.progress, args.stop, args.seed
            )
        )
    elif args.mode == "fake":
        asyncio.run(run_fake(args.offset, args.hold_create))
    elif args.mode == "live":
        asyncio.run(run_live(args.fake_url, args.db_url, args.progress, args.stop))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                run_workload(
                    args.fake_url,
                    args.db_url,
                    args.progress,
                    args.seed,
                    args.offset,
                    args.intent_lease,
                    args.lease,
                    args.create_timeout,
                )
            )


if __name__ == "__main__":
    main()
