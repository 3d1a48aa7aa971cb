"""Settings: flags win over the environment, the environment over defaults."""

from __future__ import annotations

import pytest

from sessionmgr import config
from sessionmgr.config import Settings
from sessionmgr.errors import ConfigurationError


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
