"""Rate limits per client (``CLAUDE_RATE_LIMIT``), on the maintained ``limits`` library.

Each chat request counts against every limit in the spec (``20/minute;500/day``), keyed by
the identity, else by the client address. Counters live in this worker's memory, or in Redis
when ``CLAUDE_STREAM_STORE`` is Redis (then every worker and host shares them).
"""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

__all__ = ["RateLimiter", "parse_rate_limit"]


def parse_rate_limit(key: str, value: str) -> tuple[RateLimitItem, ...]:
    """``"20/minute;500/day"`` -> limits; raises ``ValueError`` naming ``key``."""
    try:
        return tuple(parse_many(value))
    except ValueError as exc:
        raise ValueError(
            f"{key} must look like '20/minute' or '20/minute;500/day': {exc}"
        ) from None


class RateLimiter:
    def __init__(self, items: tuple[RateLimitItem, ...], redis_pool: Any = None) -> None:
        self.items = items
        storage: Storage = (
            RedisStorage("async+redis://", implementation="redispy", connection_pool=redis_pool)
            if redis_pool is not None
            else MemoryStorage()
        )
        self._limiter = MovingWindowRateLimiter(storage)

    async def hit(self, key: str) -> tuple[bool, dict[str, str]]:
        """Count one request for ``key``: whether it is allowed, and the headers to send
        (``RateLimit-*`` for the tightest limit; ``Retry-After`` when refused)."""
        allowed = True
        for item in self.items:
            allowed = await self._limiter.hit(item, "quart-claude", key) and allowed
        tightest = None
        for item in self.items:
            stats = await self._limiter.get_window_stats(item, "quart-claude", key)
            if tightest is None or stats.remaining < tightest[1].remaining:
                tightest = (item, stats)
        assert tightest is not None
        item, stats = tightest
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        headers = {
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(stats.remaining),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(reset)
        return allowed, headers
