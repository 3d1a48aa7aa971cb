"""Parsing of command-line values (durations, times, KEY=VALUE), apart from the commands."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from .checks import MAX_SECONDS

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}  # seconds

_DURATION_PLAIN = re.compile(r"\d+(?:\.\d+)?")
_DURATION_COMPOUND = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_OFF_WORDS = frozenset({"none", "off", "never"})
SECRET_HINT = re.compile(r"token|secret|key", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``, ``7d``, ``1w`` or ``1h30m``."""
    raw = text.strip().lower()
    if _DURATION_PLAIN.fullmatch(raw):
        return float(raw)
    if _DURATION_COMPOUND.fullmatch(raw):
        return sum(float(n) * DURATION_UNITS[u] for n, u in _DURATION_PART.findall(raw))
    raise ValueError(f"{text!r} is not a duration: use e.g. 90, 90s, 10m, 2h or 7d")


class Duration(click.ParamType[float, Any]):
    """A duration in seconds; ``allow_off`` also takes none/off/never (returned as ``inf``)."""

    name = "duration"

    def __init__(self, *, positive: bool = False, allow_off: bool = False) -> None:
        self.positive = positive
        self.allow_off = allow_off

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        if self.allow_off and str(value).strip().lower() in _OFF_WORDS:
            return math.inf
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            hint = " (or 'off')" if self.allow_off else ""
            self.fail(f"{exc}{hint}", param, ctx)
        if not seconds <= MAX_SECONDS:  # inf too (a long enough string of digits)
            self.fail(f"{_shown(value)} is longer than 100 years: use less", param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value!r} must be longer than 0 seconds", param, ctx)
        return seconds


class Moment(click.ParamType[datetime, Any]):
    """An ISO 8601 time (naive means UTC), or a duration meaning "that long ago"."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            ago = parse_duration(text)
        except ValueError:
            pass
        else:
            if not ago <= MAX_SECONDS:
                self.fail(f"{_shown(value)} is more than 100 years ago", param, ctx)
            return datetime.now(UTC) - timedelta(seconds=ago)
        try:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.astimezone(UTC)
        except OverflowError:  # e.g. year 1 with a positive offset: before datetime.min in UTC
            self.fail(
                f"{_shown(value)} is out of range: use a time between years 2 and 9998", param, ctx
            )
        except ValueError:
            self.fail(
                f"{_shown(value)} is neither an ISO 8601 time (e.g. 2026-01-31T12:00:00Z) "
                "nor a duration ago (e.g. 2h, 7d)",
                param,
                ctx,
            )


class KeyValue(click.ParamType[tuple[str, Any], Any]):
    """``KEY=VALUE``; with ``json_values`` the value is parsed as JSON when it is JSON."""

    name = "KEY=VALUE"

    def __init__(self, *, json_values: bool = False) -> None:
        self.json_values = json_values

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        key, sep, raw = str(value).partition("=")
        key = key.strip()
        if not sep or not key:
            shown = "<redacted>" if SECRET_HINT.search(str(value)) else repr(value)
            self.fail(f"{shown} is not KEY=VALUE (e.g. user=alice)", param, ctx)
        parsed: Any = raw
        if self.json_values:
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON (or nested absurdly deep): text
                parsed = raw
        return key, parsed


DURATION = Duration()
POSITIVE_DURATION = Duration(positive=True)
DURATION_OR_OFF = Duration(positive=True, allow_off=True)
MOMENT = Moment()
KEY_VALUE = KeyValue()
KEY_JSON = KeyValue(json_values=True)


def _shown(value: Any) -> str:
    """A value for an error line: quoted, and cut short (a 400-digit number is not news)."""
    text = repr(str(value))
    return text if len(text) <= 40 else text[:37] + "…'"


def off_to_none(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else seconds


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def latency_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, float]:
    from .testing import ENDPOINTS

    out: dict[str, float] = {}
    for value in values:
        endpoint, sep, seconds = value.partition("=")
        try:
            if not sep or endpoint not in ENDPOINTS:
                raise ValueError
            out[endpoint] = float(seconds)
            if not out[endpoint] >= 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not ENDPOINT=SECONDS with ENDPOINT one of {', '.join(ENDPOINTS)} "
                f"and SECONDS >= 0 (e.g. terminate=0.02)"
            ) from None
    return out
