"""Argument checks used by several layers (settings, repository, manager, reaper, CLI, web).

One rule per kind of value, one message style: the message names the setting or argument as the
caller knows it (``SESSIONMGR_LEASE / --lease``, ``idle_window``) and says what it must be. Bad
input fails here, before any row is written, the same way on SQLite and PostgreSQL. Callers that
validate configuration pass ``error=ConfigurationError``; the rest raise ``InvalidArgument`` (a
``ValueError`` and a ``TypeError``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidArgument, SessionMgrError
from .models import SESSION_ID_LENGTH
from .records import is_clean_text, redact, unclean_text

MAX_SECONDS = 100 * 365.25 * 86400  # the longest window or age accepted: 100 years
MAX_STATS_DAYS = 3660  # days of stats history at most: ten years, what any dashboard charts
DEFAULT_STATS_DAYS = 7  # days of history in `stats` and /api/stats unless asked
MAX_ERROR_CHARS = 1000  # characters of a terminate error kept in last_error
MAX_PAGE = 1000  # rows per page of list()
DEFAULT_PAGE = 50  # rows per page of list()
INT32 = 2**31  # idle_timeout is stored as a 32-bit integer
BIGINT = 2**63  # local ids are 64-bit integers


def check_seconds(
    name: str,
    value: object,
    *,
    positive: bool = True,
    error: type[SessionMgrError] = InvalidArgument,
) -> float:
    """A finite number of seconds, above 0 (``positive``) or 0 or more, and at most
    ``MAX_SECONDS``: anything longer is a mistake, and runs past the end of datetime's range."""
    low = "above 0" if positive else "0 or more"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be a number of seconds {low}, not {value!r}")
    if not (value > 0 if positive else value >= 0):  # NaN fails too
        raise error(f"{name} must be a number of seconds {low}, not {value!r}")
    if not value <= MAX_SECONDS:
        raise error(f"{name} must be at most {MAX_SECONDS:.0f} seconds (100 years), not {value!r}")
    return float(value)


def check_count(name: str, value: object, *, error: type[SessionMgrError] = InvalidArgument) -> int:
    """A count (concurrency, batch size) that must be a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a whole number of at least 1, not {value!r}")
    return value


def check_days(value: object) -> int:
    """Days of stats history: a whole number from 1 to ``MAX_STATS_DAYS``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STATS_DAYS:
        raise InvalidArgument(
            f"days must be a whole number from 1 to {MAX_STATS_DAYS}, got {value!r}"
        )
    return value


def check_windows(
    idle_window: object, max_age: object, *, error: type[SessionMgrError] = InvalidArgument
) -> None:
    """What the reaper enforces: ``idle_window`` > 0 s, ``max_age`` > 0 s or None (no limit)."""
    check_seconds("idle_window", idle_window, error=error)
    if max_age is not None:
        try:
            check_seconds("max_age", max_age, error=error)
        except SessionMgrError as exc:
            raise error(f"{exc} (None: no limit)") from None


def check_text(
    name: str, value: object, *, max_chars: int | None = None, allow_empty: bool = False
) -> str:
    """A non-empty string both databases can store: no NUL, no lone surrogate, not too long."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidArgument(f"{name} must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidArgument(f"{name} is {len(value)} characters long; at most {max_chars} fit")
    if not is_clean_text(value):
        raise InvalidArgument(
            f"{name} is not valid text (a NUL character or a lone surrogate): fix its encoding"
        )
    return value


def optional_text(name: str, value: object, *, max_chars: int | None = None) -> None:
    if value is not None:
        check_text(name, value, max_chars=max_chars)


def check_session_id(session_id: object) -> str:
    return check_text("session_id", session_id, max_chars=SESSION_ID_LENGTH)


def check_remote(session_id: object, control_url: object, room_url: object) -> None:
    """What LemonSlice answered (or ``adopt`` was given) for a session that exists remotely."""
    check_session_id(session_id)
    check_text("control_url", control_url)
    optional_text("room_url", room_url)


def aware(value: datetime, name: str) -> datetime:
    """A timezone-aware datetime, as UTC; a naive one is refused (its zone would be a guess)."""
    if not isinstance(value, datetime):
        raise InvalidArgument(
            f"{name} must be a timezone-aware datetime, not {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def metadata_tags(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata as stored: a redacted, strict-JSON mapping of tags."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(
            f"metadata must be a mapping of tags (e.g. {{'bot': 'support'}}), "
            f"not {type(metadata).__name__}"
        )
    try:
        clean = redact(metadata)
        json.dumps(clean, allow_nan=False)  # strict JSON: PostgreSQL's JSONB refuses NaN
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"metadata must be JSON-serializable tags: {exc}") from None
    if (bad := unclean_text(clean)) is not None:
        raise InvalidArgument(
            f"metadata string {bad[:40]!r} is not valid text (a NUL character or a lone "
            "surrogate): fix its encoding"
        )
    return clean
