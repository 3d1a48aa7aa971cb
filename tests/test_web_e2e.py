"""End to end: `sessionmgr serve --port 0` beside a fake-server process, sessions made through the
admin API, and the dashboard opened in Debian's headless Chromium (`make chromium` installs it).

Chromium runs the page's JavaScript under a virtual time budget, so the DOM it dumps is the one
after the first refresh filled the tables: nothing here waits on the wall clock.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from sessionmgr.testing import fake_server_process

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_KEY = "e2e-lemonslice-key-4411"
TOKEN = "e2e-admin-token-8d3e"
START_TIMEOUT = 30.0  # seconds serve may take to listen
BROWSER_TIMEOUT = 90.0  # seconds one headless Chromium run may take
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=5000",  # the page's first refresh completes inside this
]


class Serve:
    """A `sessionmgr serve` process; ``url`` from its "listening on" log line."""

    def __init__(self, tmp_path: Path, api_url: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSIONMGR_", "LEMON"))}
        env |= {
            "LEMONSLICE_API_KEY": API_KEY,
            "LEMONSLICE_API_URL": api_url,
            "SESSIONMGR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}",
            "SESSIONMGR_ADMIN_TOKEN": TOKEN,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sessionmgr", "serve", "--port", "0", "--interval", "1"],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._await_listening()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def _await_listening(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"serve did not listen within {START_TIMEOUT} s: {self.log}")
            self.log.append(line)
            if not line:
                pytest.fail(f"serve exited with {self.proc.wait()}: {''.join(self.log)}")
            if match := re.search(r"listening on (http://\S+)", line):
                return match.group(1)

    def stop(self) -> str:
        """SIGTERM, the exit code checked; returns the whole log."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        while (line := self.lines.get(timeout=10)) != "":
            self.log.append(line)
        return "".join(self.log)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium: run `make chromium` (apt-get install -y chromium)")
    with fake_server_process(api_key=API_KEY) as api_url:
        server = Serve(tmp_path, api_url)
        try:
            yield server
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


def call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"  # a profile per run: parallel runs never share one
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Tables(HTMLParser):
    """The text of each row of each table, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._in_body = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.rows[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_dashboard_shows_live_sessions_in_headless_chromium(serve: Serve, tmp_path: Path) -> None:
    made = [
        call(f"{serve.url}/api/sessions", "POST", {"agent_id": agent, "metadata": {"bot": agent}})
        for agent in ("support-bot", "sales-bot", "tutor-bot", "demo-bot")
    ]
    ended = call(f"{serve.url}/api/sessions/{made[-1]['id']}/end", "POST", {"reason": "manual"})
    assert ended["record"]["status"] == "ended"
    live = made[:3]

    dom = chromium(tmp_path, "--dump-dom", f"{serve.url}/#token={TOKEN}").stdout
    tables = Tables()
    tables.feed(dom)
    live_rows = tables.rows["live"]
    assert sorted(row[0] for row in live_rows) == sorted(str(s["id"]) for s in live)
    by_id = {row[0]: row for row in live_rows}
    for s in live:
        row = by_id[str(s["id"])]
        assert row[1] == s["session_id"]
        assert row[2] == s["agent_id"]
        assert row[3] == "active"
        assert row[6].startswith("in ")  # the deadline is ahead
        assert row[7] == s["room_url"]
    [ended_row] = tables.rows["ended"]
    assert ended_row[0] == str(made[-1]["id"])
    assert ended_row[5] == "manual"
    assert 'id="count-active">3<' in dom
    assert 'id="count-ended">1<' in dom
    assert "refresh failed" not in dom

    shot = tmp_path / "dashboard.png"
    chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1280,800", f"{serve.url}/#token={TOKEN}"
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

    log = serve.stop()
    assert "Traceback" not in log
    assert API_KEY not in log
    assert TOKEN not in log
