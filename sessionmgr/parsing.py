"""Parsing of human-typed values (durations, times, KEY=VALUE), shared by the CLI and the web API.

Neutral on purpose: no click, no aiohttp. Each parser raises ``ValueError`` with a one-line message
that says what to type instead; ``cli_params`` turns it into a usage error, ``web`` into a 400.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from .checks import MAX_SECONDS
from .records import is_secret_key

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}  # seconds

_DURATION_PLAIN = re.compile(r"\d+(?:\.\d+)?")
_DURATION_COMPOUND = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
OFF_WORDS = frozenset({"none", "off", "never"})


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``, ``7d``, ``1w`` or ``1h30m``."""
    raw = text.strip().lower()
    if _DURATION_PLAIN.fullmatch(raw):
        return float(raw)
    if _DURATION_COMPOUND.fullmatch(raw):
        return sum(float(n) * DURATION_UNITS[u] for n, u in _DURATION_PART.findall(raw))
    raise ValueError(f"{text!r} is not a duration: use e.g. 90, 90s, 10m, 2h or 7d")


def parse_moment(value: object, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC), or a duration meaning "that long ago", as UTC."""
    if isinstance(value, datetime):
        return value
    text = str(value).strip()
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        if not ago <= MAX_SECONDS:
            raise ValueError(f"{shown(value)} is more than 100 years ago")
        return (now or datetime.now(UTC)) - timedelta(seconds=ago)
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. year 1 with a positive offset: before datetime.min in UTC
        raise ValueError(
            f"{shown(value)} is out of range: use a time between years 2 and 9998"
        ) from None
    except ValueError:
        raise ValueError(
            f"{shown(value)} is neither an ISO 8601 time (e.g. 2026-01-31T12:00:00Z) "
            "nor a duration ago (e.g. 2h, 7d)"
        ) from None


def parse_key_value(value: object, *, json_values: bool = False) -> tuple[str, Any]:
    """``KEY=VALUE``; with ``json_values`` the value is parsed as JSON when it is JSON."""
    if isinstance(value, tuple):
        return value
    key, sep, raw = str(value).partition("=")
    key = key.strip()
    if not sep or not key:
        what = "<redacted>" if is_secret_key(value) else repr(value)
        raise ValueError(f"{what} is not KEY=VALUE (e.g. user=alice)")
    parsed: Any = raw
    if json_values:
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON (or nested absurdly deep): text
            parsed = raw
    return key, parsed


def shown(value: Any) -> str:
    """A value for an error line: quoted, and cut short (a 400-digit number is not news)."""
    text = repr(str(value))
    return text if len(text) <= 40 else text[:37] + "…'"
