"""sessionmgr: LemonSlice avatar sessions as durable records that are guaranteed to end."""

from __future__ import annotations

__version__ = "0.1.0"

from .clock import Clock, FakeClock, SystemClock
from .config import Settings
from .errors import (
    AuthError,
    ClientRequestError,
    ConfigurationError,
    CreateOutcomeUnknown,
    DatabaseError,
    DatabaseLocked,
    DatabaseNotMigrated,
    InvalidResponseError,
    LemonSliceError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    SessionMgrError,
    SessionNotFound,
    TransportError,
)
from .records import SessionEvent, SessionRecord
from .states import EndReason, SessionStatus

__all__ = [
    "AuthError",
    "ClientRequestError",
    "Clock",
    "ConfigurationError",
    "CreateOutcomeUnknown",
    "DatabaseError",
    "DatabaseLocked",
    "DatabaseNotMigrated",
    "EndReason",
    "FakeClock",
    "InvalidResponseError",
    "LemonSliceError",
    "NotFoundError",
    "RateLimitedError",
    "ServerError",
    "SessionEvent",
    "SessionMgrError",
    "SessionNotFound",
    "SessionRecord",
    "SessionStatus",
    "Settings",
    "SystemClock",
    "TransportError",
    "__version__",
]
