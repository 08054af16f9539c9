"""The retry policy: which failures to retry, and how long to wait before each retry."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import UpstreamError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, where the upstream's ``retry-after`` wins.

    ``max_retries`` counts retries after the first attempt: 2 means at most 3 requests.
    Retry *n* (from 1) waits ``min(base * 2**(n-1), max)`` scaled by a jitter in (0.75, 1].
    When the upstream asks for longer than ``max_delay`` the policy does not sleep: the
    failure goes to the client at once, carrying ``retry_after``.
    """

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The jittered delay before retry number ``retry`` (1-based), ignoring the upstream."""
        exponent = min(max(retry - 1, 0), 64)
        ceiling = min(self.base_delay * 2.0**exponent, self.max_delay)
        return ceiling * (1.0 - 0.25 * rand())

    def delay(
        self,
        error: UpstreamError,
        retry: int,
        rand: Callable[[], float] = random.random,
        *,
        limit: int | None = None,
    ) -> float | None:
        """Seconds to wait before retry ``retry`` after ``error``, or ``None`` to give up now.

        ``limit`` replaces ``max_retries`` for another budget (mid-stream recoveries).
        """
        if not error.retryable or retry > (self.max_retries if limit is None else limit):
            return None
        wait = self.backoff(retry, rand)
        if error.retry_after is not None:
            if error.retry_after > self.max_delay:
                return None
            wait = max(wait, error.retry_after)
        return wait
