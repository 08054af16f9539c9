"""Rate limits per client (``CLAUDE_RATE_LIMIT``), on the maintained ``limits`` library.

Each chat request counts against every limit in the spec (``20/minute;500/day``), keyed by
the identity, else by the client address. Counters live in this worker's memory, or in Redis
when ``CLAUDE_STREAM_STORE`` is Redis (then every worker and host shares them).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

if TYPE_CHECKING:
    from .redis_link import RedisLink

__all__ = ["RateLimiter", "parse_rate_limit", "storage_for"]


def parse_rate_limit(key: str, value: str) -> tuple[RateLimitItem, ...]:
    """``"20/minute;500/day"`` -> limits; raises ``ValueError`` naming ``key``."""
    try:
        return tuple(parse_many(value))
    except ValueError as exc:
        raise ValueError(
            f"{key} must look like '20/minute' or '20/minute;500/day': {exc}"
        ) from None


def storage_for(link: RedisLink | None) -> Storage:
    """The counters' home: the stream store's Redis (its connection pool; a cluster's own
    client from the same URL, which ``limits`` builds), else this worker's memory."""
    if link is None:
        return MemoryStorage()
    if not link.cluster:
        pool = link.redis.connection_pool
        return RedisStorage("async+redis://", implementation="redispy", connection_pool=pool)
    parts = urlsplit(link.url)
    options: dict[str, Any] = dict(parse_qsl(parts.query))
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    uri = f"async+redis+cluster://{parts.netloc}"
    storage = RedisClusterStorage(uri, implementation="redispy", **options)
    _own_client(storage)  # checked now: a limits release that moved it fails the start
    return storage


def _own_client(storage: Storage) -> Any:
    """The cluster client ``limits`` built for ``storage`` (None: it shares ours), which it
    never closes and has no public way to. A private name (``bridge.storage``), checked on
    limits 5.0 to 5.8 (pinned ``<6`` in pyproject.toml) and by tests/test_redis_cluster.py."""
    if not isinstance(storage, RedisClusterStorage):
        return None
    client = getattr(getattr(storage, "bridge", None), "storage", None)
    if client is None or not hasattr(client, "aclose"):
        raise RuntimeError(
            "this limits release keeps its Redis Cluster client elsewhere: quart-claude was "
            "checked on limits 5.0 to 5.8 (pip install 'limits>=5,<6')"
        )
    return client


class RateLimiter:
    def __init__(self, items: tuple[RateLimitItem, ...], storage: Storage) -> None:
        self.items = items
        self.storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    async def aclose(self) -> None:
        """Close the client ``limits`` made for a cluster (the store's own is closed with
        the store)."""
        client = _own_client(self.storage)
        if client is not None:
            await client.aclose()

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
