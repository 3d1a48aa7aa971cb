"""Settings and their defaults. Flags win over environment, environment over these defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from .checks import check_count, check_seconds, check_windows
from .errors import ConfigurationError

DEFAULT_API_URL = "https://lemonslice.com/api/liveai/sessions"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./sessionmgr.db"

ENV_API_KEY = "LEMONSLICE_API_KEY"
ENV_API_URL = "LEMONSLICE_API_URL"
ENV_DATABASE_URL = "SESSIONMGR_DATABASE_URL"
ENV_ADMIN_TOKEN = "SESSIONMGR_ADMIN_TOKEN"  # enables the HTTP API's changing routes
ENV_HTTP_HOST = "SESSIONMGR_HTTP_HOST"
ENV_HTTP_PORT = "SESSIONMGR_HTTP_PORT"
ENV_LIVEKIT_TOKEN = "SESSIONMGR_LIVEKIT_TOKEN"  # `create --livekit-token` without the command line
# Secrets can come from files instead (no value in the environment or on a command line):
ENV_API_KEY_FILE = "LEMONSLICE_API_KEY_FILE"
ENV_ADMIN_TOKEN_FILE = "SESSIONMGR_ADMIN_TOKEN_FILE"
ENV_ALLOWED_HOSTS = "SESSIONMGR_ALLOWED_HOSTS"  # comma-separated Host names `serve` answers to
ENV_CONTROL_ORIGINS = "LEMONSLICE_CONTROL_ORIGINS"  # comma-separated extra origins for control_url

# Reaper defaults; each has an environment variable env_var(setting) (e.g. SESSIONMGR_IDLE_WINDOW).
IDLE_WINDOW = 300.0  # seconds without a touch before the reaper ends a session
MAX_AGE = 3600.0  # seconds a session may live at most, touched or not
REAPER_INTERVAL = 5.0  # seconds between reaper ticks
REAPER_CONCURRENCY = 20  # terminate requests in flight at once
REAPER_BATCH = 500  # sessions claimed per statement
LEASE = 60.0  # seconds a claim is held before another process may take it over
INTENT_LEASE = 15.0  # seconds a creator's lease on its pending intent lasts (renewed every 5 s
# while the POST is in flight); a crashed create is recovered soon after it runs out
RETRY_BASE = 5.0  # seconds before the first retry of a failed terminate; doubles each attempt
RETRY_MAX = 300.0  # seconds, the cap on that backoff
TOUCH_FLUSH_INTERVAL = 1.0  # seconds between writes of buffered touches
HTTP_HOST = "127.0.0.1"  # where `serve` answers HTTP (health, metrics, API, dashboard)
HTTP_PORT = 8787  # 0 picks a free port


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_url: str = DEFAULT_API_URL
    database_url: str = DEFAULT_DATABASE_URL
    idle_window: float = IDLE_WINDOW
    max_age: float | None = MAX_AGE
    reaper_interval: float = REAPER_INTERVAL
    reaper_concurrency: int = REAPER_CONCURRENCY
    reaper_batch: int = REAPER_BATCH
    lease: float = LEASE
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    http_host: str = HTTP_HOST
    http_port: int = HTTP_PORT
    allowed_hosts: tuple[str, ...] = ()  # Host names `serve` answers to beyond its own address
    control_origins: tuple[str, ...] = ()  # origins besides the API URL's a control_url may use

    def __post_init__(self) -> None:
        """Refuse a setting that would misbehave (``SESSIONMGR_LEASE=0`` makes every claim
        instantly stealable), naming where it is set, before anything starts."""
        for name in ("idle_window", "max_age", "reaper_interval", "lease"):
            value = getattr(self, name)
            if value is not None:
                check_seconds(setting_label(name), value, error=ConfigurationError)
        for name in ("reaper_concurrency", "reaper_batch"):
            check_count(setting_label(name), getattr(self, name), error=ConfigurationError)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then the environment, then explicit ``overrides`` that are not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if key := env.get(ENV_API_KEY):
            values["api_key"] = key
        if url := env.get(ENV_API_URL):
            values["api_url"] = url
        if db := env.get(ENV_DATABASE_URL):
            values["database_url"] = db
        if token := env.get(ENV_ADMIN_TOKEN):
            values["admin_token"] = token
        if host := env.get(ENV_HTTP_HOST):
            values["http_host"] = host
        for name, env_name, file_env in (
            ("api_key", ENV_API_KEY, ENV_API_KEY_FILE),
            ("admin_token", ENV_ADMIN_TOKEN, ENV_ADMIN_TOKEN_FILE),
        ):
            if secret_file := env.get(file_env):
                if env.get(env_name):
                    raise ConfigurationError(f"set {env_name} or {file_env}, not both")
                values[name] = read_secret_file(secret_file, file_env)
        for name, env_name in (
            ("allowed_hosts", ENV_ALLOWED_HOSTS),
            ("control_origins", ENV_CONTROL_ORIGINS),
        ):
            if raw_list := env.get(env_name):
                values[name] = split_list(raw_list)
        for name, conv in (
            ("idle_window", float),
            ("max_age", _optional_seconds),
            ("reaper_interval", float),
            ("reaper_concurrency", int),
            ("reaper_batch", int),
            ("lease", float),
            ("http_port", int),
        ):
            raw = env.get(env_var(name))
            if raw:
                try:
                    values[name] = conv(raw)
                except ValueError:
                    what = "a whole number" if conv is int else "a number"
                    raise ConfigurationError(
                        f"{env_var(name)}={raw!r} is not {what}; fix or unset it"
                    ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        port = values.get("http_port", HTTP_PORT)
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ConfigurationError(
                f"{ENV_HTTP_PORT}={port!r} is not a port (0-65535; 0 picks a free one)"
            )
        return cls(**values)  # type: ignore[arg-type]


def _optional_seconds(raw: str) -> float | None:
    """``none``/``0`` disables a limit; otherwise seconds."""
    if raw.strip().lower() in ("none", "off", "0"):
        return None
    return float(raw)


# --- how errors name settings (the checks themselves are in checks.py) ---------------------

FLAGS = {  # setting -> the `sessionmgr serve` flag that sets it
    "idle_window": "--idle-window",
    "max_age": "--max-age",
    "reaper_interval": "--interval",
    "reaper_concurrency": "--concurrency",
    "lease": "--lease",
}


def setting_label(name: str) -> str:
    """How an error names a setting: its environment variable, and its flag when it has one."""
    flag = FLAGS.get(name)
    return env_var(name) + (f" / {flag}" if flag else "")


def env_var(setting: str) -> str:
    """The environment variable of a numeric setting: ``lease`` -> ``SESSIONMGR_LEASE``."""
    return f"SESSIONMGR_{setting.upper()}"


def read_secret_file(path: str | Path, source: str) -> str:
    """A key or token kept in a file (one line, trailing newline ignored), so it never shows in
    ``ps``, a shell history or the environment of other processes."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(f"cannot read {source} {str(path)!r}: {reason}") from None
    value = text.strip()
    if not value or "\n" in value:
        raise ConfigurationError(
            f"{source} {str(path)!r} must hold the secret on one line (it is "
            f"{'empty' if not value else 'several lines'})"
        )
    return value


def split_list(raw: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``: the form of the list-valued environment variables."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# --- SessionManager's grouped settings (as httpx groups Timeout and Limits) ----------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Windows:
    """How long a session may live: ``idle`` seconds without a touch, ``max_age`` seconds in all
    (None: no limit). The reaper ends it at whichever comes first. Validated on construction."""

    idle: float = IDLE_WINDOW
    max_age: float | None = MAX_AGE

    def __post_init__(self) -> None:
        check_windows(self.idle, self.max_age, error=ConfigurationError)


@dataclasses.dataclass(frozen=True, slots=True)
class ReaperConfig:
    """How a manager's reaper runs: seconds between ticks, terminates in flight, rows claimed per
    statement, how long a claim is held, how often buffered touches are written, and how often a
    full reconcile runs (None: never). Validated on construction; an error names the setting as
    ``Settings`` and SessionManager's keywords do (``reaper_interval``, ``lease``)."""

    interval: float = REAPER_INTERVAL
    concurrency: int = REAPER_CONCURRENCY
    batch: int = REAPER_BATCH
    lease: float = LEASE
    touch_flush_interval: float = TOUCH_FLUSH_INTERVAL
    reconcile_interval: float | None = None

    def __post_init__(self) -> None:
        for name in ("interval", "lease", "touch_flush_interval", "reconcile_interval"):
            value = getattr(self, name)
            if value is not None or name != "reconcile_interval":
                check_seconds(_KEYWORDS.get(name, name), value, error=ConfigurationError)
        for name in ("concurrency", "batch"):
            check_count(_KEYWORDS[name], getattr(self, name), error=ConfigurationError)


_KEYWORDS = {
    "interval": "reaper_interval",
    "concurrency": "reaper_concurrency",
    "batch": "reaper_batch",
}
