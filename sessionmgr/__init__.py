"""sessionmgr: LemonSlice avatar sessions as durable records that are guaranteed to end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .client import LemonSliceClient, Timeouts
from .clock import Clock, FakeClock, SystemClock
from .config import ReaperConfig, Settings, Windows
from .errors import (
    ActivationTimeout,
    AuthError,
    ClientRequestError,
    ConfigurationError,
    CreateOutcomeUnknown,
    DatabaseError,
    DatabaseLocked,
    DatabaseNotMigrated,
    IntegrationError,
    IntentTakenOver,
    InvalidArgument,
    InvalidResponseError,
    LemonSliceError,
    NoCreditsError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    SessionMgrError,
    SessionNotFound,
    SessionNotLive,
    TransportError,
)
from .manager import EndResult, SessionManager
from .reaper import Reaper
from .reconcile import ReconcileReport
from .records import Page, SessionEvent, SessionFilter, SessionRecord, Stats
from .repository import SessionRepository
from .retry import RetryPolicy
from .states import EndReason, SessionStatus

if TYPE_CHECKING:
    from .metrics import Metrics
    from .web import create_app

# The server side loads on first use, so ``import sessionmgr`` in an application costs neither
# aiohttp.web nor prometheus_client (and never click: the CLI is sessionmgr.cli).
_LAZY = {"Metrics": "metrics", "create_app": "web"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActivationTimeout",
    "AuthError",
    "ClientRequestError",
    "Clock",
    "ConfigurationError",
    "CreateOutcomeUnknown",
    "DatabaseError",
    "DatabaseLocked",
    "DatabaseNotMigrated",
    "EndReason",
    "EndResult",
    "FakeClock",
    "IntegrationError",
    "IntentTakenOver",
    "InvalidArgument",
    "InvalidResponseError",
    "LemonSliceClient",
    "LemonSliceError",
    "Metrics",
    "NoCreditsError",
    "NotFoundError",
    "Page",
    "RateLimitedError",
    "Reaper",
    "ReaperConfig",
    "ReconcileReport",
    "RetryPolicy",
    "ServerError",
    "SessionEvent",
    "SessionFilter",
    "SessionManager",
    "SessionMgrError",
    "SessionNotFound",
    "SessionNotLive",
    "SessionRecord",
    "SessionRepository",
    "SessionStatus",
    "Settings",
    "Stats",
    "SystemClock",
    "Timeouts",
    "TransportError",
    "Windows",
    "__version__",
    "create_app",
]
