"""``sessionmgr demo``: the whole loop in a few seconds, with no API key and no network.

A local ``FakeLemonSlice`` plays LemonSlice; a manager with a short idle window creates a handful
of sessions, a "backend" keeps touching some of them, and the reaper ends the idle ones (and the
one past its max age) while a live table shows it happening.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .manager import SessionManager
from .records import SessionRecord
from .states import SessionStatus
from .testing import FakeLemonSlice

DEMO_DB = Path("sessionmgr-demo.db")
IDLE_WINDOW = 3.0  # seconds: short, so the demo shows reaping quickly
MAX_AGE = 8.0  # seconds
SHORT_MAX_AGE = 5.0  # seconds, for the one busy session that still hits its max age
TOUCH_EVERY = 0.5  # seconds between the fake backend's touches
DEMO_LIMIT = 25.0  # seconds before the demo ends whatever is still live
DEMO_KEY = "demo-key"

AGENTS = [
    ("agent_ada", "support-bot", True, None),
    ("agent_bob", "sales-bot", True, None),
    ("agent_cyd", "tutor-bot", True, SHORT_MAX_AGE),
    ("agent_dee", "support-bot", False, None),
    ("agent_eve", "sales-bot", False, None),
    ("agent_fay", "tutor-bot", False, None),
]


def _table(records: list[SessionRecord], now: datetime, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("id", "session_id", "agent", "bot", "status", "idle for", "ends in", "reason"):
        table.add_column(col)
    for r in records:
        idle = f"{(now - r.last_activity_at).total_seconds():.1f}s" if r.live else ""
        ends = ""
        if r.status is SessionStatus.ACTIVE and r.deadline is not None:
            ends = f"{max(0.0, (r.deadline - now).total_seconds()):.1f}s"
        style = {"active": "green", "ending": "yellow", "ended": "dim", "failed": "red"}.get(
            r.status, ""
        )
        table.add_row(
            str(r.id),
            r.session_id or "-",
            r.agent_id or "-",
            str(r.metadata.get("bot", "")),
            f"[{style}]{r.status}[/]",
            idle,
            ends,
            r.end_reason or "",
        )
    return table


def _fresh_database(db_path: Path) -> Path:
    """Remove an earlier demo's database (and its WAL files); return the absolute path."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{db_path}{suffix}").unlink()
    return db_path.resolve()


async def run_demo(db_path: Path = DEMO_DB, console: Console | None = None) -> Path:
    """Run the demo; returns the database file it wrote."""
    console = console or Console()
    path = _fresh_database(db_path)
    url = f"sqlite+aiosqlite:///{path}"
    async with (
        FakeLemonSlice(api_key=DEMO_KEY) as fake,
        SessionManager(
            database_url=url,
            api_key=DEMO_KEY,
            api_url=fake.url,
            idle_window=IDLE_WINDOW,
            max_age=MAX_AGE,
            reaper_interval=0.5,
            auto_upgrade=True,
        ) as mgr,
    ):
        console.print(
            f"FakeLemonSlice on {fake.url}\nidle window {IDLE_WINDOW:g}s, max age {MAX_AGE:g}s",
            soft_wrap=True,
        )
        busy: list[str] = []
        for agent, bot, touched, max_age in AGENTS:
            record = await mgr.create_session(
                agent_id=agent,
                idle_timeout=60,
                daily_room_url="https://demo.daily.co/room",
                daily_token="demo-secret-token",
                max_age=max_age,
                metadata={"bot": bot},
            )
            if touched and record.session_id:
                busy.append(record.session_id)
        console.print(
            f"created {len(AGENTS)} sessions; the backend keeps touching {len(busy)} of them"
        )

        async def backend() -> None:
            while True:
                for session_id in busy:
                    mgr.touch(session_id)
                await asyncio.sleep(TOUCH_EVERY)

        toucher = asyncio.create_task(backend())
        started = asyncio.get_running_loop().time()
        try:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    records = (await mgr.repository.list(limit=50, sort="created_at")).items
                    live.update(_table(records, mgr.clock.now(), "sessions (live)"))
                    idle_done = all(not r.live for r in records if r.session_id not in busy[:2])
                    elapsed = asyncio.get_running_loop().time() - started
                    if idle_done or elapsed > DEMO_LIMIT:
                        break
                    await asyncio.sleep(0.25)
        finally:
            toucher.cancel()
        console.line()  # off a terminal, Live leaves its last frame without a newline
        for session_id in busy:
            result = await mgr.end_session(session_id, reason="manual")
            console.print(f"end {session_id}: {result.message}")
        records = (await mgr.repository.list(limit=50, sort="created_at")).items
        console.print(_table(records, mgr.clock.now(), "sessions (final)"))
        console.print(
            f"LemonSlice (fake) saw {fake.creates} creates, "
            f"{sum(fake.terminate_counts.values())} terminates, {fake.live_count} still live"
        )
    command = command_hint()
    hint = f"try: {command} --database-url sqlite+aiosqlite:///{path} list --status ended"
    if command != "sessionmgr" and sys.prefix != sys.base_prefix:
        activate = Path(sys.prefix) / "bin" / "activate"
        hint += f"\n (or `sessionmgr ...` after `. {_shown_path(activate)}`)"
    console.print(f"database: {path}\n{hint}", soft_wrap=True)
    return path


def command_hint() -> str:
    """``sessionmgr`` as whoever ran the demo can type it now: the bare name when that is what
    the shell finds, else the script's path (``.venv/bin/sessionmgr`` after ``make demo``)."""
    script = Path(sys.argv[0])
    if script.name != "sessionmgr" or not script.exists():  # python -m sessionmgr, or embedded
        return f"{_shown_path(Path(sys.executable))} -m sessionmgr"
    found = shutil.which("sessionmgr")
    if found is not None and Path(found).resolve() == script.resolve():
        return "sessionmgr"
    return _shown_path(script)


def _shown_path(path: Path) -> str:
    """Relative to the working directory when under it (short, and what a user types)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path.absolute())
