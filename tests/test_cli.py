"""The `sessionmgr` CLI driven through click's CliRunner, against a SQLite file and FakeLemonSlice.

CliRunner runs the command (and its ``asyncio.run``) in the test's thread, so these tests are
synchronous and the fake LemonSlice runs on its own event loop in a background thread. Sessions
that must look old are seeded through a ``SessionManager`` whose ``FakeClock`` starts in the past:
nothing here sleeps through a deadline.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from sessionmgr import cli_cleanup, cli_output, cli_params, db, parsing
from sessionmgr import client as client_module
from sessionmgr.cli import cli
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import Clock, FakeClock
from sessionmgr.manager import SessionManager
from sessionmgr.records import SessionRecord
from sessionmgr.repository import SessionRepository
from sessionmgr.retry import RetryPolicy
from sessionmgr.states import SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault

T = TypeVar("T")

API_KEY = "cli-test-key-7f3a9c"
FAST_RETRY = RetryPolicy(attempts=3, base=0.001, cap=0.01, deadline=2.0)
# The environment a user might have set must not leak into these tests; COLUMNS unset makes
# rich use its non-TTY width of 80 columns.
CLEAN_ENV: dict[str, str | None] = {
    "LEMONSLICE_API_KEY": None,
    "LEMONSLICE_API_URL": None,
    "SESSIONMGR_DATABASE_URL": None,
    "COLUMNS": None,
    "FORCE_COLOR": None,
}
RECORD_FIELDS = list(SessionRecord.__dataclass_fields__)
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00"
    b"\x00\x00IEND\xaeB`\x82"
)


class FakeThread:
    """FakeLemonSlice on its own event loop in a thread (CliRunner owns the test's thread)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._fake: FakeLemonSlice | None = None

    def start(self) -> None:
        self.thread.start()

        async def start() -> FakeLemonSlice:
            fake = FakeLemonSlice(api_key=API_KEY, clock=self.clock)
            await fake.start()
            return fake

        self._fake = self.run(start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def on_loop(self, fn: Callable[[FakeLemonSlice], T]) -> T:
        """Call ``fn(fake)`` on the fake's loop, where its state lives."""

        async def call() -> T:
            assert self._fake is not None
            return fn(self._fake)

        result: T = self.run(call())
        return result

    @property
    def url(self) -> str:
        assert self._fake is not None
        return self._fake.url

    def stop(self) -> None:
        if self._fake is not None:
            self.run(self._fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def terminates(self, session_id: str | None) -> int:
        assert session_id is not None
        return self.on_loop(lambda f: f.terminate_counts.get(session_id, 0))

    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        self.on_loop(lambda f: f.inject(endpoint, fault, times))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeThread]:
    thread = FakeThread()
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's client retries in milliseconds here, so unreachable-API cases stay fast."""
    monkeypatch.setattr(client_module, "RetryPolicy", lambda: FAST_RETRY)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "sessions.db"
    asyncio.run(db.upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite+aiosqlite:///{db_path}"


@pytest.fixture
def dead_url() -> str:
    """A LemonSlice URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/liveai/sessions"


class Cli:
    """``sessionmgr --database-url ... --api-url ... ARGS`` via CliRunner, key in the env."""

    def __init__(self, db_url: str, api_url: str) -> None:
        self.db_url = db_url
        self.api_url = api_url

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        api_key: str | None = API_KEY,
        api_url: str | None = None,
        db_url: str | None = None,
    ) -> Result:
        base = ["--database-url", db_url or self.db_url, "--api-url", api_url or self.api_url]
        env = {**CLEAN_ENV, "LEMONSLICE_API_KEY": api_key}  # the flag would warn on stderr
        return CliRunner().invoke(cli, [*base, *args], input=input, env=env, catch_exceptions=False)

    def json(self, *args: str, **kw: Any) -> Any:
        result = ok(self(*args, "--json", **kw))
        return json.loads(result.stdout)


@pytest.fixture
def sm(db_url: str, fake: FakeThread) -> Cli:
    return Cli(db_url, fake.url)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def error_line(result: Result, code: int, *needles: str) -> str:
    """The run failed with ``code`` and exactly one ``error:`` line on stderr naming the fix."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, line
    return line


def seed(
    db_url: str,
    fake: FakeThread,
    count: int = 1,
    *,
    ago: float = 0.0,
    idle_window: float = 3600.0,
    max_age: float | None = None,
    agent_id: str = "agent_seed",
    metadata: dict[str, Any] | None = None,
    end: bool = False,
) -> list[SessionRecord]:
    """Real sessions on the fake, recorded as if created ``ago`` seconds ago (and maybe ended)."""

    async def go() -> list[SessionRecord]:
        clock = FakeClock(datetime.now(UTC) - timedelta(seconds=ago))
        async with SessionManager(
            database_url=db_url,
            api_key=API_KEY,
            api_url=fake.url,
            clock=clock,
            reaper=False,
            idle_window=idle_window,
            max_age=max_age,
        ) as manager:
            records = [
                await manager.create_session(agent_id=agent_id, metadata=metadata)
                for _ in range(count)
            ]
            if end:
                records = [(await manager.end_session(r.id)).record for r in records]
            return records

    return asyncio.run(go())


def get(db_url: str, key: int | str) -> SessionRecord | None:
    async def go() -> SessionRecord | None:
        async with await SessionRepository.open(db_url) as repo:
            return await repo.find(key)

    return asyncio.run(go())


def assert_fits(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"


# --- global options, help, parameter types ---------------------------------------------------


def test_version_and_help_document_exit_codes(sm: Cli) -> None:
    assert "sessionmgr, version" in ok(sm("--version")).stdout
    help_text = ok(sm("--help")).stdout
    assert "Exit codes: 0 ok, 1 runtime failure" in help_text
    for command in ("create", "end", "touch", "adopt", "list", "show", "stats", "reap"):
        assert command in help_text
    for command in ("end-all", "reconcile", "prune", "serve", "demo"):
        assert command in help_text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list", "--bogus"], "No such option"),
        (["list", "--status", "alive"], "--status"),
        (["list", "--idle-for", "10x"], "use e.g. 90, 90s, 10m, 2h or 7d"),
        (["list", "--since", "yesterday-ish"], "ISO 8601"),
        (["list", "--meta", "user"], "KEY=VALUE"),
        (["list", "--limit", "0"], "--limit"),
        (["list", "--sort", "cost"], "--sort"),
        (["prune"], "--older-than"),
        (["prune", "--older-than", "soon"], "not a duration"),
        (["create", "--agent-id", "a", "--idle-window", "0"], "longer than 0"),
        (["create", "--agent-id", "a", "--max-age", "99999999999"], "100 years"),
        (["list", "--idle-for", "99999999999"], "--idle-for"),
        (["create", "--agent-id", "a", "--property", "nokey"], "KEY=VALUE"),
        (["show"], "SESSION_ID"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(sm: Cli, args: list[str], needle: str) -> None:
    line = error_line(sm(*args), 2, needle)
    assert "--help" in line  # names where to read more


def test_malformed_secret_pair_is_not_echoed(sm: Cli) -> None:
    line = error_line(sm("create", "--agent-id", "a", "--property", "api_key:s3cr3t"), 2)
    assert "s3cr3t" not in line


def test_durations_and_times() -> None:
    assert parsing.parse_duration("90") == 90
    assert parsing.parse_duration("90s") == 90
    assert parsing.parse_duration("10m") == 600
    assert parsing.parse_duration("2h") == 7200
    assert parsing.parse_duration("7d") == 7 * 86400
    assert parsing.parse_duration("1h30m") == 5400
    assert parsing.parse_duration("1.5h") == 5400
    for bad in ("", "h", "10x", "-5", "1h 30m", "m10"):
        with pytest.raises(ValueError, match="not a duration"):
            parsing.parse_duration(bad)
    moment = cli_params.Moment()
    assert moment.convert("2026-01-31T12:00:00Z", None, None) == datetime(
        2026, 1, 31, 12, tzinfo=UTC
    )
    assert moment.convert("2026-01-31T12:00:00", None, None).tzinfo is not None  # naive = UTC
    ago = moment.convert("2h", None, None)
    assert abs((datetime.now(UTC) - ago).total_seconds() - 7200) < 60


def test_verbose_json_logs_go_to_stderr(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, ago=7200, idle_window=60)
    result = ok(sm("-v", "--log-format", "json", "reap", "--json"))
    logs = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(entry["msg"].startswith("ended session") for entry in logs)
    assert len(json.loads(result.stdout)["ended"]) == 1
    assert API_KEY not in result.stderr


def test_missing_api_key_is_a_usage_error(sm: Cli) -> None:
    for args in (["create", "--agent-id", "a"], ["end", "1"], ["reap"], ["reconcile"], ["serve"]):
        error_line(sm(*args, api_key=None), 2, "LEMONSLICE_API_KEY", "--api-key")


def test_api_key_from_environment(sm: Cli, fake: FakeThread) -> None:
    result = CliRunner().invoke(
        cli,
        ["--database-url", sm.db_url, "create", "--agent-id", "env", "--json"],
        env={**CLEAN_ENV, "LEMONSLICE_API_KEY": API_KEY, "LEMONSLICE_API_URL": fake.url},
        catch_exceptions=False,
    )
    assert json.loads(ok(result).stdout)["status"] == "active"
    assert API_KEY not in result.output


# --- database errors -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["list"], ["stats"], ["show", "1"], ["touch", "x"]])
def test_missing_database_is_not_created(sm: Cli, tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nope" / "missing.db"
    result = sm(*command, db_url=f"sqlite+aiosqlite:///{missing}")
    error_line(result, 1, f"no database at {missing}", "sessionmgr db upgrade", "--database-url")
    assert not missing.exists()
    assert not missing.parent.exists()


def test_unmigrated_database_names_db_upgrade(sm: Cli, tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    error_line(sm("list", db_url=f"sqlite+aiosqlite:///{path}"), 1, "sessionmgr db upgrade")


def test_not_a_database(sm: Cli, tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database " * 100)
    error_line(sm("stats", db_url=f"sqlite+aiosqlite:///{path}"), 1, "not a SQLite database")


def test_locked_database(
    sm: Cli, db_path: Path, fake: FakeThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(sm.db_url, fake, ago=40 * 86400, end=True)
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.05)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-way through a long write
    try:
        error_line(sm("prune", "--older-than", "30d"), 1, "locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "deleted 1 session" in ok(sm("prune", "--older-than", "30d")).stdout


def test_in_memory_database_is_refused(sm: Cli) -> None:
    error_line(sm("list", db_url="sqlite+aiosqlite:///:memory:"), 2, "in-memory")


# --- create ----------------------------------------------------------------------------------


def test_create_prints_the_record_and_starts_a_session(sm: Cli, fake: FakeThread) -> None:
    record = sm.json(
        "create",
        "--agent-id",
        "agent_cli",
        "--agent-prompt",
        "Be brief.",
        "--idle-timeout",
        "-1",
        "--daily-room-url",
        "https://x.daily.co/room",
        "--property",
        "lang=en",
        "--property",
        'limits={"minutes": 5}',
        "--extra",
        "simulcast=true",
        "--idle-window",
        "10m",
        "--max-age",
        "2h",
        "--meta",
        "user=alice",
        "--meta",
        "bot=support",
    )
    assert list(record) == RECORD_FIELDS
    assert record["status"] == "active"
    assert record["agent_id"] == "agent_cli"
    assert record["idle_timeout"] == -1
    assert record["idle_window"] == 600
    assert record["max_age"] == 7200
    assert record["metadata"] == {"user": "alice", "bot": "support"}
    assert record["created_at"].endswith("Z")
    payload = fake.on_loop(lambda f: f.sessions[record["session_id"]].payload)
    assert payload["agent_prompt"] == "Be brief."
    assert payload["properties"]["lang"] == "en"
    assert payload["properties"]["limits"] == {"minutes": 5}  # JSON value
    assert payload["properties"]["daily_url"] == "https://x.daily.co/room"
    assert payload["simulcast"] is True


def test_create_table_output_fits_80_columns(sm: Cli) -> None:
    result = ok(sm("create", "--agent-id", "agent_" + "x" * 70, "--meta", "team=" + "y" * 90))
    assert "session_id" in result.stdout
    assert "active" in result.stdout
    assert_fits(result.stdout)


def test_create_with_an_image_file(sm: Cli, fake: FakeThread, tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    image.write_bytes(PNG)
    record = sm.json("create", "--agent-image", str(image))
    assert record["status"] == "active"
    assert fake.on_loop(lambda f: record["session_id"] in f.sessions)


def test_create_rejects_a_non_png_image(sm: Cli, tmp_path: Path) -> None:
    image = tmp_path / "face.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 not a png")
    error_line(sm("create", "--agent-image", str(image)), 2, "PNG")


@pytest.mark.parametrize(
    "sources",
    [[], ["--agent-id", "a", "--agent-image-url", "https://img.example/a.png"]],
)
def test_create_needs_exactly_one_agent_source(
    sm: Cli, fake: FakeThread, sources: list[str]
) -> None:
    before = fake.on_loop(lambda f: f.creates)
    error_line(sm("create", *sources), 2, "exactly one of --agent-id")
    assert fake.on_loop(lambda f: f.creates) == before


def test_secrets_never_reach_output_or_database(sm: Cli, db_path: Path) -> None:
    daily_token = "daily-SECRET-4242"
    prop_secret = "prop-SECRET-5353"
    meta_secret = "meta-SECRET-6464"
    result = ok(
        sm(
            "create",
            "--agent-id",
            "a",
            "--daily-room-url",
            "https://x.daily.co/r",
            "--daily-token",
            daily_token,
            "--property",
            f"auth_token={prop_secret}",
            "--meta",
            f"api_key={meta_secret}",
            "--json",
        )
    )
    record = json.loads(result.stdout)
    assert record["metadata"] == {"api_key": "***"}
    outputs = [
        result.output,
        ok(sm("list", "--json")).output,
        ok(sm("list", "--csv")).output,
        ok(sm("list", "--wide")).output,
        ok(sm("show", str(record["id"]))).output,
        ok(sm("show", str(record["id"]), "--json")).output,
    ]
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob("sessions.db*"))
    for secret in (daily_token, prop_secret, meta_secret, API_KEY):
        assert all(secret not in out for out in outputs), secret
        assert secret.encode() not in stored, secret


def test_create_auth_error_is_one_line(sm: Cli) -> None:
    line = error_line(
        sm("create", "--agent-id", "a", api_key="wrong-key-123"), 1, "LEMONSLICE_API_KEY"
    )
    assert "wrong-key-123" not in line


def test_create_with_api_unreachable(sm: Cli, dead_url: str) -> None:
    error_line(sm("create", "--agent-id", "a", api_url=dead_url), 1, "LEMONSLICE_API_URL")
    failed = json.loads(ok(sm("list", "--json")).stdout)
    assert [r["status"] for r in failed] == ["failed"]  # never sent: the intent is closed


def test_a_short_api_key_does_not_blank_out_words_of_errors(sm: Cli, dead_url: str) -> None:
    line = error_line(sm("create", "--agent-id", "a", api_url=dead_url, api_key="k"), 1, "check")
    assert "***" not in line


def test_create_outcome_unknown_leaves_the_intent_pending(sm: Cli, fake: FakeThread) -> None:
    fake.inject("create", Fault.lost_answer())
    line = error_line(sm("create", "--agent-id", "lost"), 1, "sessionmgr reconcile")
    assert "pending" in line
    rows = json.loads(ok(sm("list", "--json")).stdout)
    assert [r["status"] for r in rows] == ["pending"]


# --- end, touch, adopt -----------------------------------------------------------------------


def test_end_by_session_id_and_by_local_id(sm: Cli, fake: FakeThread) -> None:
    first, second = seed(sm.db_url, fake, 2)
    result = ok(sm("end", str(first.session_id)))
    assert f"#{first.id} {first.session_id}: ended" in result.stdout
    outcomes = sm.json("end", str(second.id), str(first.id))
    assert [o["outcome"] for o in outcomes] == ["ended", "unchanged"]
    assert outcomes[0]["session"]["status"] == "ended"
    assert outcomes[0]["session"]["end_reason"] == "manual"
    assert "already ended" in outcomes[1]["message"]
    assert fake.terminates(first.session_id) == 1
    assert fake.terminates(second.session_id) == 1


def test_end_with_reason(sm: Cli, fake: FakeThread) -> None:
    (record,) = seed(sm.db_url, fake)
    ok(sm("end", str(record.id), "--reason", "shutdown"))
    ended = get(sm.db_url, record.id)
    assert ended is not None
    assert ended.end_reason == "shutdown"


def test_end_unknown_id_exits_3(sm: Cli, fake: FakeThread) -> None:
    error_line(sm("end", "sess_nope"), 3, "sess_nope", "sessionmgr list")
    (record,) = seed(sm.db_url, fake)
    result = sm("end", str(record.id), "sess_nope")
    assert result.exit_code == 3
    assert "ended" in result.stdout
    assert get(sm.db_url, record.id).status is SessionStatus.ENDED  # type: ignore[union-attr]


def test_end_partial_batch_exits_4(sm: Cli, fake: FakeThread) -> None:
    records = seed(sm.db_url, fake, 2)
    fake.inject("terminate", Fault.status(400))  # not retried: this one fails now
    result = sm("end", *(str(r.id) for r in records), "--concurrency", "1")
    assert result.exit_code == 4, result.output
    assert "1 of 2 sessions could not be ended" in result.stderr
    statuses = sorted(get(sm.db_url, r.id).status for r in records)  # type: ignore[union-attr]
    assert statuses == [SessionStatus.ENDED, SessionStatus.ENDING]  # the reaper retries it


def test_end_with_api_unreachable_exits_1(sm: Cli, dead_url: str) -> None:
    far = f"{dead_url}/sess_far/control"
    record = sm.json("adopt", "sess_far", "--control-url", far, api_url=dead_url)
    error_line(sm("end", "sess_far", api_url=dead_url), 1, "sess_far")
    after = get(sm.db_url, record["id"])
    assert after is not None
    assert after.status is SessionStatus.ENDING
    assert after.last_error


def test_touch(sm: Cli, fake: FakeThread) -> None:
    (old,) = seed(sm.db_url, fake, ago=600)
    (done,) = seed(sm.db_url, fake, end=True)
    result = ok(sm("touch", str(old.session_id)))
    assert f"#{old.id} {old.session_id}: touched" in result.stdout
    touched = get(sm.db_url, old.id)
    assert touched is not None
    assert touched.last_activity_at > old.last_activity_at
    report = sm.json("touch", str(old.id), str(done.session_id))
    assert [r["id"] for r in report["touched"]] == [old.id]
    assert [r["id"] for r in report["not_active"]] == [done.id]
    assert report["unknown"] == []
    unknown = sm("touch", str(old.id), "sess_ghost")
    assert unknown.exit_code == 3
    assert "sess_ghost" in unknown.stderr


def test_adopt(sm: Cli, fake: FakeThread) -> None:
    (other,) = seed(sm.db_url, fake)  # created on the fake; pretend pipecat made it
    sm2 = Cli(sm.db_url.replace("sessions.db", "other.db"), sm.api_url)
    asyncio.run(db.upgrade(sm2.db_url))
    result = ok(
        sm2(
            "adopt",
            str(other.session_id),
            "--agent-id",
            "pipecat",
            "--idle-window",
            "2m",
            "--meta",
            "source=pipecat",
        )
    )
    assert "adopted as #1" in result.stdout
    record = sm2.json("show", str(other.session_id))
    assert record["status"] == "active"
    assert record["control_url"] == f"{fake.url}/{other.session_id}/control"
    assert record["idle_window"] == 120
    assert record["metadata"] == {"source": "pipecat"}
    assert "already known as #1" in ok(sm2("adopt", str(other.session_id))).stdout


# --- list ------------------------------------------------------------------------------------


def test_list_formats_parse_back(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 3, metadata={"user": "alice", "n": "1"})
    as_json = sm.json("list")
    assert len(as_json) == 3
    assert all(list(r) == RECORD_FIELDS for r in as_json)
    assert [r["id"] for r in as_json] == [3, 2, 1]  # newest first

    lines = ok(sm("list", "--jsonl")).stdout.splitlines()
    assert [json.loads(line) for line in lines] == as_json

    rows = list(csv.DictReader(io.StringIO(ok(sm("list", "--csv")).stdout)))
    assert [int(r["id"]) for r in rows] == [3, 2, 1]
    assert list(rows[0]) == RECORD_FIELDS
    assert json.loads(rows[0]["metadata"]) == {"user": "alice", "n": "1"}
    assert rows[0]["session_id"] == as_json[0]["session_id"]
    assert rows[0]["ended_at"] == ""  # None is empty

    table = ok(sm("list")).stdout
    assert "SESSION ID" in table
    for record in as_json:
        assert record["session_id"] in table
    assert "\x1b[" not in table  # no colour when not a terminal


def test_list_table_fits_80_columns_and_wide_shows_all(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 2, agent_id="agent_" + "z" * 60, metadata={"team": "t" * 80})
    seed(sm.db_url, fake, end=True)
    table = ok(sm("list")).stdout
    assert_fits(table)
    wide = ok(sm("list", "--wide")).stdout
    control_urls = [r["control_url"] for r in sm.json("list")]
    assert all(url in wide for url in control_urls)
    assert "t" * 80 in wide


def test_list_filters(sm: Cli, fake: FakeThread) -> None:
    (old,) = seed(sm.db_url, fake, ago=3 * 3600, agent_id="old", metadata={"bot": "a"})
    (new,) = seed(sm.db_url, fake, agent_id="new", metadata={"bot": "b"})
    (done,) = seed(sm.db_url, fake, agent_id="new", metadata={"bot": "a"}, end=True)

    def ids(*args: str) -> list[int]:
        return sorted(r["id"] for r in sm.json("list", *args))

    assert ids("--status", "active") == [old.id, new.id]
    assert ids("--status", "ended", "--status", "failed") == [done.id]
    assert ids("--agent-id", "new") == [new.id, done.id]
    assert ids("--since", "1h") == [new.id, done.id]
    assert ids("--until", "1h") == [old.id]
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    assert ids("--since", two_hours_ago) == [new.id, done.id]
    assert ids("--meta", "bot=a") == [old.id, done.id]
    assert ids("--meta", "bot=a", "--agent-id", "old") == [old.id]
    assert ids("--idle-for", "2h", "--status", "active") == [old.id]
    assert ids("--meta", "bot=zzz") == []
    assert "no sessions match" in ok(sm("list", "--meta", "bot=zzz")).stderr


def test_list_pages_with_a_cursor(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 5)
    seen: list[int] = []
    cursor: str | None = None
    for _ in range(5):
        args = ["list", "--limit", "2", "--sort", "created_at", "--json"]
        result = ok(sm(*args, *(["--after", cursor] if cursor else [])))
        seen += [r["id"] for r in json.loads(result.stdout)]
        cursor = None
        for line in result.stderr.splitlines():
            if line.startswith("more: add --after "):
                cursor = line.removeprefix("more: add --after ")
        if cursor is None:
            break
    assert seen == [1, 2, 3, 4, 5]
    error_line(sm("list", "--after", "not-a-cursor"), 2, "cursor")


# --- show, stats -----------------------------------------------------------------------------


def test_show_record_and_events(sm: Cli, fake: FakeThread) -> None:
    (record,) = seed(sm.db_url, fake, end=True)
    shown = sm.json("show", str(record.session_id))
    assert shown["id"] == record.id
    assert shown["status"] == "ended"
    assert [field for field in shown if field != "events"] == RECORD_FIELDS
    transitions = [(e["from_status"], e["to_status"]) for e in shown["events"]]
    assert transitions[0] == (None, "pending")
    assert ("pending", "active") in transitions
    assert transitions[-1][1] == "ended"
    assert sm.json("show", str(record.id)) == shown

    text = ok(sm("show", str(record.id))).stdout
    assert_fits(text)
    assert "control_url" in text
    assert "AT (UTC)" in text
    assert "ended" in text
    assert (
        str(record.control_url) not in text or len(str(record.control_url)) <= cli_output.URL_WIDTH
    )
    assert str(record.control_url) in ok(sm("show", str(record.id), "--wide")).stdout


def test_show_unknown_exits_3(sm: Cli) -> None:
    error_line(sm("show", "sess_missing"), 3, "sess_missing", "sessionmgr list")


def test_stats(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 2)
    seed(sm.db_url, fake, end=True)
    stats = sm.json("stats", "--days", "3")
    assert stats["by_status"]["active"] == 2
    assert stats["by_status"]["ended"] == 1
    assert stats["live"] == 2
    assert stats["oldest_live"]["id"] == 1
    assert len(stats["per_day"]) == 3
    assert stats["per_day"][-1]["created"] == 3
    assert stats["per_day"][-1]["ended"] == 1
    assert stats["end_reasons"] == {"manual": 1}
    text = ok(sm("stats")).stdout
    assert "live now" in text
    assert "DAY (UTC)" in text
    assert_fits(text)


# --- reap ------------------------------------------------------------------------------------


def test_reap_dry_run_then_reap(sm: Cli, fake: FakeThread) -> None:
    due = seed(sm.db_url, fake, 2, ago=7200, idle_window=60)
    (aged,) = seed(sm.db_url, fake, ago=7200, idle_window=86400, max_age=3600)
    (fresh,) = seed(sm.db_url, fake)

    dry = sm.json("reap", "--dry-run")
    assert sorted(r["id"] for r in dry["due"]) == sorted([*(r.id for r in due), aged.id])
    assert all(fake.terminates(r.session_id) == 0 for r in [*due, aged])
    text = ok(sm("reap", "--dry-run", api_key=None)).stdout  # a dry run needs no key
    assert "would end 3 session(s)" in text
    assert "max_age" in text

    report = sm.json("reap")
    reasons = {r["id"]: r["end_reason"] for r in report["ended"]}
    assert reasons == {due[0].id: "idle", due[1].id: "idle", aged.id: "max_age"}
    assert report["failed"] == []
    assert all(fake.terminates(r.session_id) == 1 for r in [*due, aged])
    assert get(sm.db_url, fresh.id).status is SessionStatus.ACTIVE  # type: ignore[union-attr]
    assert "ended 0 session(s)" in ok(sm("reap")).stdout


def test_reap_partial_exits_4(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 2, ago=7200, idle_window=60)
    fake.inject("terminate", Fault.status(400))
    result = sm("reap", "--concurrency", "1")
    assert result.exit_code == 4, result.output
    assert "1 due session(s) could not be ended now" in result.stderr
    assert "ended 1 session(s)" in result.stdout


def test_reap_with_api_unreachable_exits_1(sm: Cli, dead_url: str) -> None:
    async def adopt_due() -> None:
        clock = FakeClock(datetime.now(UTC) - timedelta(hours=2))
        async with await SessionRepository.open(sm.db_url, clock=clock) as repo:
            await repo.adopt(
                session_id="sess_dead",
                control_url=f"{dead_url}/sess_dead/control",
                idle_window=60,
                max_age=None,
            )

    asyncio.run(adopt_due())
    error_line(sm("reap", api_url=dead_url), 1, "could not be ended", "retried")
    record = get(sm.db_url, "sess_dead")
    assert record is not None
    assert record.status is SessionStatus.ENDING


# --- end-all ---------------------------------------------------------------------------------


def test_end_all_refuses_without_a_terminal_or_yes(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 2)
    error_line(sm("end-all"), 2, "--yes")
    assert len(sm.json("list", "--status", "active")) == 2


def test_end_all_dry_run_and_filters(sm: Cli, fake: FakeThread) -> None:
    targets = seed(sm.db_url, fake, 2, agent_id="a", metadata={"env": "staging"})
    (other_meta,) = seed(sm.db_url, fake, agent_id="a", metadata={"env": "prod"})
    (other_agent,) = seed(sm.db_url, fake, agent_id="b", metadata={"env": "staging"})
    dry = sm.json("end-all", "--agent-id", "a", "--meta", "env=staging", "--dry-run")
    assert sorted(r["id"] for r in dry["would_end"]) == [r.id for r in targets]
    assert "would end 3 session(s)" in ok(sm("end-all", "--agent-id", "a", "--dry-run")).stdout

    done = sm.json("end-all", "--agent-id", "a", "--meta", "env=staging", "--yes")
    assert [o["outcome"] for o in done["results"]] == ["ended", "ended"]
    assert all(fake.terminates(r.session_id) == 1 for r in targets)
    for survivor in (other_meta, other_agent):
        assert get(sm.db_url, survivor.id).status is SessionStatus.ACTIVE  # type: ignore[union-attr]
    assert (
        "no live sessions match"
        in ok(sm("end-all", "--agent-id", "a", "--meta", "env=staging", "--yes")).stdout
    )


def test_end_all_confirmation(sm: Cli, fake: FakeThread, monkeypatch: pytest.MonkeyPatch) -> None:
    records = seed(sm.db_url, fake, 2)
    monkeypatch.setattr(cli_cleanup, "stdin_is_tty", lambda: True)
    declined = sm("end-all", input="n\n")
    assert declined.exit_code == 1
    assert "End 2 live session(s)?" in declined.stderr
    assert "aborted: nothing ended" in declined.stderr
    assert len(sm.json("list", "--status", "active")) == 2
    accepted = ok(sm("end-all", input="y\n"))
    assert "ended 2 of 2 session(s)" in accepted.stdout
    assert all(fake.terminates(r.session_id) == 1 for r in records)


def test_end_all_partial_exits_4(sm: Cli, fake: FakeThread) -> None:
    seed(sm.db_url, fake, 3)
    fake.inject("terminate", Fault.status(400))
    result = sm("end-all", "--yes", "--concurrency", "1")
    assert result.exit_code == 4, result.output
    assert "ended 2 of 3 session(s)" in result.stdout


# --- reconcile -------------------------------------------------------------------------------


def test_reconcile_ends_what_lemonslice_finished(sm: Cli, fake: FakeThread) -> None:
    finished, alive = seed(sm.db_url, fake, 2)
    fake.on_loop(lambda f: f.set_status(str(finished.session_id), "COMPLETED", cost=12.5))
    dry = sm.json("reconcile", "--dry-run")
    assert [r["id"] for r in dry["ended_remote"]] == [finished.id]
    assert get(sm.db_url, finished.id).status is SessionStatus.ACTIVE  # type: ignore[union-attr]

    report = sm.json("reconcile")
    assert report["checked"] == 2
    assert [r["id"] for r in report["ended_remote"]] == [finished.id]
    after = get(sm.db_url, finished.id)
    assert after is not None
    assert after.end_reason == "remote_completed"
    assert after.cost == 12.5
    assert get(sm.db_url, alive.id).status is SessionStatus.ACTIVE  # type: ignore[union-attr]
    assert "checked 1 live session(s)" in ok(sm("reconcile")).stdout


def test_reconcile_terminates_again_what_it_ended_but_still_runs(sm: Cli, fake: FakeThread) -> None:
    fake.inject("terminate", Fault.status(404))  # not LemonSlice speaking
    (ended,) = seed(sm.db_url, fake, ago=3600, end=True)
    assert ended.end_reason == "gone"
    sid = str(ended.session_id)
    assert fake.terminates(sid) == 0
    out = ok(sm("reconcile")).stdout
    assert "terminated again 1 session(s) ended here that LemonSlice still listed as live" in out
    assert fake.terminates(sid) == 1
    assert sm.json("reconcile")["still_live"] == []


def test_reconcile_with_api_unreachable_exits_1(sm: Cli, fake: FakeThread, dead_url: str) -> None:
    seed(sm.db_url, fake)
    error_line(sm("reconcile", api_url=dead_url), 1, "LEMONSLICE_API_URL")


def test_reconcile_reports_orphans_and_ends_them_on_request(db_url: str) -> None:
    """A live remote session this database does not know is left alone unless asked."""
    old_fake = FakeThread(clock=FakeClock(datetime.now(UTC) - timedelta(hours=1)))
    old_fake.start()
    try:
        sm = Cli(db_url, old_fake.url)

        async def create_elsewhere() -> str:
            async with LemonSliceClient(API_KEY, api_url=old_fake.url) as client:
                answer = await client.create_session(agent_id="someone_else")
                return str(answer["session_id"])

        orphan = asyncio.run(create_elsewhere())
        report = sm.json("reconcile")
        assert [o["session_id"] for o in report["orphans"]] == [orphan]
        assert report["orphans_ended"] == []
        assert "--end-orphans ends them" in ok(sm("reconcile")).stdout
        assert old_fake.terminates(orphan) == 0

        report = sm.json("reconcile", "--end-orphans")
        assert report["orphans_ended"] == [orphan]
        assert old_fake.terminates(orphan) == 1
        record = get(db_url, orphan)
        assert record is not None
        assert record.end_reason == "orphan"
    finally:
        old_fake.stop()


# --- prune -----------------------------------------------------------------------------------


def test_prune(sm: Cli, fake: FakeThread) -> None:
    old = seed(sm.db_url, fake, 3, ago=40 * 86400, end=True)
    (recent,) = seed(sm.db_url, fake, ago=5 * 86400, end=True)
    (live,) = seed(sm.db_url, fake, ago=40 * 86400)
    dry = sm.json("prune", "--older-than", "30d", "--dry-run")
    assert dry["pruned"] == 3
    assert dry["dry_run"] is True
    assert len(sm.json("list")) == 5
    result = ok(sm("prune", "--older-than", "30d", "--batch-size", "2"))
    assert "deleted 3 session(s)" in result.stdout
    remaining = sorted(r["id"] for r in sm.json("list"))
    assert remaining == sorted([recent.id, live.id])
    error_line(sm("show", str(old[0].id)), 3)
    assert sm.json("prune", "--older-than", "30d")["pruned"] == 0


# --- serve, demo, progress -------------------------------------------------------------------


def test_serve_rejects_bad_settings(sm: Cli) -> None:
    error_line(sm("serve", "--interval", "0"), 2, "--interval")
    error_line(sm("serve", "--max-age", "later"), 2, "--max-age")


def test_demo_writes_a_database_the_cli_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sessionmgr import demo

    # the demo's pace, quickened: the same story in about a second
    monkeypatch.setattr(demo, "IDLE_WINDOW", 0.3)
    monkeypatch.setattr(demo, "MAX_AGE", 1.0)
    monkeypatch.setattr(demo, "TOUCH_EVERY", 0.05)
    agents = [(a, bot, busy, 0.6 if max_age else None) for a, bot, busy, max_age in demo.AGENTS]
    monkeypatch.setattr(demo, "AGENTS", agents)
    path = tmp_path / "demo.db"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["demo", "--database", str(path)], env=CLEAN_ENV, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "sessions (final)" in result.stdout
    rows = Cli(f"sqlite+aiosqlite:///{path}", "http://unused").json("list")
    assert len(rows) == len(demo.AGENTS)
    assert all(r["status"] == "ended" for r in rows)


def test_progress_bars_on_a_terminal(
    sm: Cli, fake: FakeThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    buffer = io.StringIO()
    for module in (cli_cleanup, cli_output):  # prune asks cli_cleanup, progress_bar cli_output
        monkeypatch.setattr(
            module,
            "stderr_console",
            lambda: Console(file=buffer, force_terminal=True, width=80),
        )
    seed(sm.db_url, fake, 2, ago=7200, idle_window=60)
    seed(sm.db_url, fake, 2, ago=40 * 86400, end=True)
    assert "ended 2 session(s)" in ok(sm("reap")).stdout
    assert "deleted 2 session(s)" in ok(sm("prune", "--older-than", "30d")).stdout
    assert buffer.getvalue()  # the bars were drawn
