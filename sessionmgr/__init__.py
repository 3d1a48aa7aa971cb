"""sessionmgr: LemonSlice avatar sessions as durable records that are guaranteed to end."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import LemonSliceClient, Timeouts
from .clock import Clock, FakeClock, SystemClock
from .config import Settings
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
from .metrics import Metrics
from .reaper import Reaper
from .reconcile import ReconcileReport
from .records import Page, SessionEvent, SessionFilter, SessionRecord, Stats
from .repository import SessionRepository
from .retry import RetryPolicy
from .states import EndReason, SessionStatus
from .web import create_app

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
    "__version__",
    "create_app",
]
