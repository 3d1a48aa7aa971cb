"""The shared argument checks: one rule per kind of value, whichever layer asks."""

from __future__ import annotations

import math

import pytest

from sessionmgr import checks
from sessionmgr.config import Settings
from sessionmgr.errors import ConfigurationError, InvalidArgument


@pytest.mark.parametrize("value", [0, -1, math.nan, "5", True, None])
def test_seconds_below_or_not_a_number_names_the_setting(value: object) -> None:
    with pytest.raises(InvalidArgument, match=r"^lease must be a number of seconds above 0, not "):
        checks.check_seconds("lease", value)


def test_seconds_past_a_century_are_refused_by_settings_and_arguments_alike() -> None:
    too_long = checks.MAX_SECONDS * 2
    with pytest.raises(InvalidArgument, match="100 years"):
        checks.check_seconds("idle_window", too_long)
    with pytest.raises(ConfigurationError, match=r"SESSIONMGR_IDLE_WINDOW .*100 years"):
        Settings(idle_window=too_long)
    assert checks.check_seconds("grace", 0, positive=False) == 0.0


def test_stats_days_have_one_bound() -> None:
    assert checks.check_days(checks.MAX_STATS_DAYS) == checks.MAX_STATS_DAYS
    with pytest.raises(InvalidArgument, match=f"from 1 to {checks.MAX_STATS_DAYS}"):
        checks.check_days(checks.MAX_STATS_DAYS + 1)


def test_counts_are_whole_and_positive() -> None:
    assert checks.check_count("batch", 3) == 3
    with pytest.raises(ConfigurationError, match="batch must be a whole number of at least 1"):
        checks.check_count("batch", 0, error=ConfigurationError)
