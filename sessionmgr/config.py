"""Settings and their defaults. Flags win over environment, environment over these defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

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

# Reaper defaults; each has an environment variable SESSIONMGR_<NAME> (e.g. SESSIONMGR_IDLE_WINDOW).
IDLE_WINDOW = 300.0  # seconds without a touch before the reaper ends a session
MAX_AGE = 3600.0  # seconds a session may live at most, touched or not
REAPER_INTERVAL = 5.0  # seconds between reaper ticks
REAPER_CONCURRENCY = 20  # terminate requests in flight at once
REAPER_BATCH = 500  # sessions claimed per statement
LEASE = 60.0  # seconds a claim is held before another process may take it over
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
        for name, conv in (
            ("idle_window", float),
            ("max_age", _optional_seconds),
            ("reaper_interval", float),
            ("reaper_concurrency", int),
            ("reaper_batch", int),
            ("lease", float),
            ("http_port", int),
        ):
            raw = env.get(f"SESSIONMGR_{name.upper()}")
            if raw:
                try:
                    values[name] = conv(raw)
                except ValueError:
                    raise ConfigurationError(
                        f"SESSIONMGR_{name.upper()}={raw!r} is not a number; fix or unset it"
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
