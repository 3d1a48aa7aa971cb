"""When to try again: exponential backoff with full jitter, bounded by attempts and a deadline.

A small strategy object with no I/O: the client uses it between HTTP attempts (tenths of a second),
the reaper reuses it with a larger base and cap to reschedule failed terminates (minutes).
"""

from __future__ import annotations

import dataclasses
import math
import random

DEFAULT_ATTEMPTS = 4  # tries in all, the first one included
DEFAULT_BASE = 0.2  # seconds, the ceiling of the first wait; doubles each attempt
DEFAULT_CAP = 5.0  # seconds, the longest single wait (Retry-After included)
DEFAULT_DEADLINE = 30.0  # seconds across all tries and waits

_MAX_EXPONENT = 60  # 2**60 * any sane base is far past any cap; keeps the float finite


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times, how long apart, and for how long in total to retry a failed operation.

    ``attempt`` below is the 1-based number of the attempt that just failed. Without jitter the
    waits are ``base, 2*base, 4*base, ...`` up to ``cap``; with full jitter each wait is uniform in
    ``[0, that]``, which spreads the retries of many clients hit by the same outage.
    """

    attempts: int = DEFAULT_ATTEMPTS
    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP
    deadline: float = DEFAULT_DEADLINE
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base < 0 or self.cap < 0:
            raise ValueError("RetryPolicy.base and .cap must be >= 0 seconds")
        if self.cap < self.base:
            raise ValueError(f"RetryPolicy.cap ({self.cap}) must be >= base ({self.base})")
        if not self.deadline > 0:
            raise ValueError(f"RetryPolicy.deadline must be > 0 seconds, got {self.deadline}")

    def backoff(self, attempt: int) -> float:
        """The jitter-free wait after ``attempt``: ``base * 2**(attempt-1)``, at most ``cap``."""
        exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
        return min(self.cap, self.base * math.ldexp(1.0, exponent))

    def delay(
        self, attempt: int, retry_after: float | None = None, *, elapsed: float = 0.0
    ) -> float:
        """Seconds to wait after failed ``attempt``.

        A server's ``retry_after`` replaces the backoff (the server knows better than our guess),
        but no wait exceeds ``cap`` nor the time left before the deadline (``elapsed`` is how long
        the operation has been running).
        """
        if retry_after is not None:
            wait = min(max(retry_after, 0.0), self.cap)
        else:
            wait = self.backoff(attempt)
            if self.jitter:
                wait = random.uniform(0.0, wait)
        return max(0.0, min(wait, self.remaining(elapsed)))

    def remaining(self, elapsed: float) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - elapsed)

    def should_retry(self, attempt: int, *, elapsed: float, delay: float = 0.0) -> bool:
        """Whether another attempt may start after failed ``attempt`` and a wait of ``delay``."""
        return attempt < self.attempts and elapsed + delay < self.deadline
