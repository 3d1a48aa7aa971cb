"""Settings: flags win over the environment, the environment over defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from sessionmgr import config
from sessionmgr.cli import cli
from sessionmgr.client import LemonSliceClient
from sessionmgr.config import Settings
from sessionmgr.errors import ConfigurationError
from sessionmgr.manager import SessionManager
from sessionmgr.reaper import Reaper
from sessionmgr.repository import SessionRepository


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert s.api_key is None
    assert s.api_url == config.DEFAULT_API_URL
    assert s.database_url == config.DEFAULT_DATABASE_URL
    assert s.idle_window == config.IDLE_WINDOW
    assert s.max_age == config.MAX_AGE


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    env = {
        "LEMONSLICE_API_KEY": "env-key",
        "SESSIONMGR_DATABASE_URL": "sqlite+aiosqlite:///env.db",
        "SESSIONMGR_IDLE_WINDOW": "45",
        "SESSIONMGR_MAX_AGE": "off",
        "SESSIONMGR_REAPER_CONCURRENCY": "7",
        "SESSIONMGR_REAPER_BATCH": "50",
    }
    s = Settings.from_env(env, idle_window=30.0, api_url=None)
    assert s.api_key == "env-key"
    assert s.database_url == "sqlite+aiosqlite:///env.db"
    assert s.idle_window == 30.0  # the flag
    assert s.max_age is None  # "off" disables the limit
    assert s.reaper_concurrency == 7
    assert s.reaper_batch == 50
    assert s.api_url == config.DEFAULT_API_URL  # a None flag does not override


def test_the_key_never_shows_in_repr() -> None:
    assert "env-key" not in repr(Settings.from_env({"LEMONSLICE_API_KEY": "env-key"}))


def test_a_malformed_number_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="SESSIONMGR_LEASE='soon'"):
        Settings.from_env({"SESSIONMGR_LEASE": "soon"})


# --- every setting checked, wherever it comes from ---------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "needle"),
    [
        ("SESSIONMGR_LEASE", "0", "SESSIONMGR_LEASE / --lease must be a number of seconds above 0"),
        ("SESSIONMGR_LEASE", "-5", "SESSIONMGR_LEASE / --lease must be"),
        ("SESSIONMGR_LEASE", "nan", "not nan"),
        ("SESSIONMGR_REAPER_INTERVAL", "0", "SESSIONMGR_REAPER_INTERVAL / --interval must be"),
        ("SESSIONMGR_REAPER_INTERVAL", "inf", "not inf"),
        ("SESSIONMGR_IDLE_WINDOW", "-1", "SESSIONMGR_IDLE_WINDOW / --idle-window must be"),
        ("SESSIONMGR_MAX_AGE", "-1", "SESSIONMGR_MAX_AGE / --max-age must be"),
        (
            "SESSIONMGR_REAPER_CONCURRENCY",
            "0",
            "--concurrency must be a whole number of at least 1",
        ),
        (
            "SESSIONMGR_REAPER_CONCURRENCY",
            "2.5",
            "SESSIONMGR_REAPER_CONCURRENCY='2.5' is not a whole",
        ),
        ("SESSIONMGR_REAPER_BATCH", "0", "SESSIONMGR_REAPER_BATCH must be a whole number"),
        ("SESSIONMGR_IDLE_WINDOW", "ten", "SESSIONMGR_IDLE_WINDOW='ten' is not a number"),
    ],
)
def test_a_bad_setting_in_the_environment_is_named(variable: str, raw: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: raw})
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigurationError, match="SESSIONMGR_LEASE / --lease"):
        Settings(lease=0)
    with pytest.raises(ConfigurationError, match="--concurrency"):
        dataclasses.replace(Settings(), reaper_concurrency=0)
    assert Settings(max_age=None).max_age is None  # no limit stays allowed


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lease": 0}, "lease must be a number of seconds above 0, not 0"),
        ({"reaper_interval": -1}, "reaper_interval must be"),
        ({"touch_flush_interval": 0}, "touch_flush_interval must be"),
        ({"reconcile_interval": 0}, "reconcile_interval must be"),
        ({"reaper_concurrency": 0}, "reaper_concurrency must be a whole number of at least 1"),
        ({"reaper_batch": 0}, "reaper_batch must be"),
        ({"lease": float("nan")}, "not nan"),
    ],
)
def test_the_manager_refuses_a_bad_setting_before_opening(
    kwargs: dict[str, float], needle: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SessionManager(database_url="sqlite+aiosqlite:///never-opened.db", **kwargs)  # type: ignore[arg-type]
    assert needle in str(caught.value)


async def test_the_reaper_refuses_a_bad_setting(tmp_path: Path) -> None:
    repo = await SessionRepository.open(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", upgrade=True)
    try:
        client = LemonSliceClient("k", api_url="http://127.0.0.1:9/api")
        for kwargs, needle in (
            ({"interval": 0}, "Reaper interval must be"),
            ({"lease": -1}, "Reaper lease must be"),
            ({"concurrency": 0}, "Reaper concurrency must be"),
            ({"batch": 0}, "Reaper batch must be"),
        ):
            with pytest.raises(ConfigurationError, match=needle):
                Reaper(repo, client, **kwargs)  # type: ignore[arg-type]
    finally:
        await repo.close()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["serve"], {"SESSIONMGR_LEASE": "0"}, "SESSIONMGR_LEASE / --lease must be"),
        (["serve"], {"SESSIONMGR_REAPER_INTERVAL": "soon"}, "SESSIONMGR_REAPER_INTERVAL='soon'"),
        (["serve", "--grace", "0"], {}, "'0' must be longer than 0 seconds"),
        (["serve", "--lease", "0"], {}, "'0' must be longer than 0 seconds"),
        (["serve", "--interval", "-1"], {}, "--interval"),
        (["serve", "--concurrency", "0"], {}, "--concurrency"),
        (["serve", "--reconcile-every", "0"], {}, "'0' must be longer than 0 seconds"),
        (["serve", "--server-keepalive", "0"], {}, "'0' must be longer than 0 seconds"),
        (["list"], {"SESSIONMGR_REAPER_CONCURRENCY": "0"}, "SESSIONMGR_REAPER_CONCURRENCY"),
    ],
)
def test_the_cli_names_a_bad_setting_in_one_line_before_starting(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    database = tmp_path / "never.db"
    result = CliRunner().invoke(
        cli,
        ["--database-url", f"sqlite+aiosqlite:///{database}", *args],
        env={"LEMONSLICE_API_KEY": "k", "SESSIONMGR_ADMIN_TOKEN": None, **env},
    )
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert needle in line
    assert not database.exists()


def test_secrets_and_lists_from_the_environment(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("file-key-123\n")
    token = tmp_path / "token"
    token.write_text("file-token-456")
    s = Settings.from_env(
        {
            "LEMONSLICE_API_KEY_FILE": str(key),
            "SESSIONMGR_ADMIN_TOKEN_FILE": str(token),
            "SESSIONMGR_ALLOWED_HOSTS": "a.example, b.example,,",
            "LEMONSLICE_CONTROL_ORIGINS": "https://control.example",
        }
    )
    assert (s.api_key, s.admin_token) == ("file-key-123", "file-token-456")
    assert s.allowed_hosts == ("a.example", "b.example")
    assert s.control_origins == ("https://control.example",)
    assert "file-key-123" not in repr(s)
    assert "file-token-456" not in repr(s)
    with pytest.raises(ConfigurationError, match="SESSIONMGR_ADMIN_TOKEN or SESSIONMGR_ADMIN"):
        Settings.from_env(
            {"SESSIONMGR_ADMIN_TOKEN_FILE": str(token), "SESSIONMGR_ADMIN_TOKEN": "x"}
        )
    with pytest.raises(ConfigurationError, match="not an http"):
        LemonSliceClient("k", api_url="http://127.0.0.1:9/api", control_origins=["ftp://x"])


def test_the_manager_takes_grouped_settings_and_the_old_keywords() -> None:
    from sessionmgr import ReaperConfig, Windows

    url = "sqlite+aiosqlite:///never-opened.db"
    grouped = SessionManager(
        database_url=url, windows=Windows(idle=60, max_age=None), reaper=ReaperConfig(lease=30)
    )
    assert (grouped.idle_window, grouped.max_age) == (60, None)
    assert grouped.reaper_config.lease == 30
    assert grouped.reaper_config.interval == ReaperConfig().interval
    flat = SessionManager(database_url=url, idle_window=60, max_age=None, lease=30)
    assert (flat.windows, flat.reaper_config) == (grouped.windows, grouped.reaper_config)
    # an old keyword overrides its field of a given object; both are validated the same way
    mixed = SessionManager(database_url=url, reaper=ReaperConfig(lease=30), reaper_batch=7)
    assert (mixed.reaper_config.lease, mixed.reaper_config.batch) == (30, 7)
    assert SessionManager(database_url=url).max_age == Windows().max_age
    with pytest.raises(ConfigurationError, match="lease must be a number of seconds above 0"):
        ReaperConfig(lease=0)
    with pytest.raises(ConfigurationError, match=r"max_age .*\(None: no limit\)"):
        Windows(max_age=-1)
    with pytest.raises(ConfigurationError, match="idle_window must be"):
        SessionManager(database_url=url, windows=Windows(), idle_window=0)
