"""A stream store any worker can find, read, stop and continue: the composition on Redis.

This worker's streams stay in its :class:`~.store.Registry`; :class:`~.redis_mirror.RedisMirror`
writes them to Redis as they grow, :class:`~.redis_remote.RedisRemote` reads and takes over
the others, both on one :class:`~.redis_link.RedisLink` (one server or a cluster).
"""

from __future__ import annotations

import os
import socket

from .redis_link import RedisLink
from .redis_mirror import MIRROR_SCRIPTS, RedisMirror
from .redis_remote import REMOTE_SCRIPTS, RedisRemote
from .store import Registry, StreamStore, Timings

__all__ = ["redis_store"]


def redis_store(
    url: str,
    timings: Timings,
    *,
    max_finished: int,
    max_bytes: int,
    max_takeovers: int = 2,
    max_events: int = 100_000,
) -> StreamStore:
    link = RedisLink(url, {**MIRROR_SCRIPTS, **REMOTE_SCRIPTS})
    worker = f"{socket.gethostname()}:{os.getpid()}"
    registry = Registry(timings.ttl, max_finished, max_bytes)
    mirror = RedisMirror(link, registry, timings, worker=worker, max_events=max_events)
    remote = RedisRemote(link, timings, worker=worker, max_takeovers=max_takeovers)
    return StreamStore(registry, mirror, remote, timings, link=link)
