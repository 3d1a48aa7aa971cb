"""click parameter types and options shared by the commands; the parsing itself is parsing.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from .checks import MAX_SECONDS
from .parsing import OFF_WORDS, parse_duration, parse_key_value, parse_moment, shown


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
        if self.allow_off and str(value).strip().lower() in OFF_WORDS:
            return math.inf
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            hint = " (or 'off')" if self.allow_off else ""
            self.fail(f"{exc}{hint}", param, ctx)
        if not seconds <= MAX_SECONDS:  # inf too (a long enough string of digits)
            self.fail(f"{shown(value)} is longer than 100 years: use less", param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value!r} must be longer than 0 seconds", param, ctx)
        return seconds


class Moment(click.ParamType[datetime, Any]):
    """An ISO 8601 time (naive means UTC), or a duration meaning "that long ago"."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        try:
            return parse_moment(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class KeyValue(click.ParamType[tuple[str, Any], Any]):
    """``KEY=VALUE``; with ``json_values`` the value is parsed as JSON when it is JSON."""

    name = "KEY=VALUE"

    def __init__(self, *, json_values: bool = False) -> None:
        self.json_values = json_values

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Any]:
        try:
            return parse_key_value(value, json_values=self.json_values)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
POSITIVE_DURATION = Duration(positive=True)
DURATION_OR_OFF = Duration(positive=True, allow_off=True)
MOMENT = Moment()
KEY_VALUE = KeyValue()
KEY_JSON = KeyValue(json_values=True)


def off_to_none(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else seconds


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
