"""Redis, so a stream produced on one worker can be read and stopped from any other.

The producing worker keeps its in-memory :class:`Stream` (its own readers never touch Redis)
and mirrors every event into a Redis Stream. Entry ids are ``0-<index+1>``, so "every event
after ``Last-Event-ID: N``" is exactly ``XREAD ... 0-<N+1>``. Keys, for stream ``ID``:

- ``qc:ID:ev``: the events (XADD, MAXLEN-capped); field ``e`` the encoded event, ``f`` on the
  final one;
- ``qc:ID:meta``: hash ``owner``, ``done`` and ``n`` (the event count, set when done);
  TTL ``CLAUDE_STREAM_TTL`` once finished;
- ``qc:ID:lease``: refreshed every 0.5 s while the producer lives (expires after 3 s);
- ``qc:ID:cancel``: set by DELETE on any worker; the producer's worker polls for it;
- ``qc:ID:readers``: refreshed by remote readers, so the grace period counts them too.

Writes are batched: one pipeline carries every event of every stream that arrived within
``FLUSH_WINDOW`` (5 ms), in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from ._errors import UpstreamError
from ._sse import PING, data_line, frame
from ._stream import Stream

__all__ = ["RedisStore", "RemoteStream"]

log = logging.getLogger("quart_claude")

LEASE_SECONDS = 3
LEASE_REFRESH = 0.5
FLUSH_WINDOW = 0.005
LIVE_TTL = 3600  # a live stream's keys outlive any answer; finished ones get the stream TTL


#: What a reader on another worker sends when the stream can no longer be followed (no id:
#: it is not one of the stream's events).
_UNAVAILABLE = frame(data_line(UpstreamError("unavailable").event(partial=True)), None)


def _key(stream_id: str, part: str) -> str:
    return f"qc:{stream_id}:{part}"


class RemoteStream:
    """What a worker that does not produce a stream knows of it."""

    __slots__ = ("count", "done", "id", "owner")

    def __init__(self, stream_id: str, owner: str | None, count: int, done: bool) -> None:
        self.id = stream_id
        self.owner = owner
        self.count = count
        self.done = done


class RedisStore:
    def __init__(self, url: str, *, ttl: float, max_events: int = 100_000) -> None:
        self.url = url
        self.ttl = max(1, int(ttl))
        self.max_events = max_events
        # typed Any: redis-py's reply unions cover decode_responses=True, which we never use
        self.redis: Any = None
        self._blocking: Any = None  # XREAD BLOCK holds a connection while it waits
        self._local: dict[str, Stream] = {}  # streams this worker produces
        self._mirrored: dict[str, int] = {}
        self._dirty: dict[str, Stream] = {}
        self._flush_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.redis = aioredis.from_url(self.url)
        self._blocking = aioredis.from_url(self.url, max_connections=10_000)
        await self.redis.ping()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flusher()), loop.create_task(self._leases())]

    async def close(self) -> None:
        if self._dirty:
            with contextlib.suppress(Exception):
                await self._flush()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in (self.redis, self._blocking):
            if client is not None:
                await client.aclose()
        self.redis = self._blocking = None

    # -- producer side -------------------------------------------------------------------
    async def attach(self, stream: Stream) -> None:
        """Register a stream this worker produces (before its POST answers, so any worker
        can find it at once), then mirror its events as they come."""
        meta_key = _key(stream.id, "meta")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(meta_key, mapping={"owner": stream.owner or "", "n": 0, "done": 0})
        pipe.expire(meta_key, LIVE_TTL)
        pipe.set(_key(stream.id, "lease"), b"1", ex=LEASE_SECONDS)
        await pipe.execute()
        self._local[stream.id] = stream
        self._mirrored[stream.id] = 0
        stream.mirror = self._changed
        if stream.events or stream.finished:
            self._changed(stream)

    def _changed(self, stream: Stream) -> None:
        self._dirty[stream.id] = stream
        self._flush_wanted.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            # gather what arrives within a few ms into the same pipeline: remote readers see
            # events at most this much later; this worker's own readers never wait on Redis
            await asyncio.sleep(FLUSH_WINDOW)
            self._flush_wanted.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("could not write streams to Redis; retrying")
                await asyncio.sleep(0.5)
                self._flush_wanted.set()

    async def _flush(self) -> None:
        assert self.redis is not None
        dirty, self._dirty = self._dirty, {}
        pipe = self.redis.pipeline(transaction=False)
        done_ids = []
        for stream_id, stream in dirty.items():
            start = self._mirrored.get(stream_id, 0)
            events = stream.events
            end = len(events)
            final = stream.finished
            events_key, meta_key = _key(stream_id, "ev"), _key(stream_id, "meta")
            for index in range(start, end):
                fields: dict[str, bytes] = {"e": events[index]}
                if final and index == end - 1:
                    fields["f"] = b"1"
                pipe.xadd(
                    events_key,
                    fields,
                    id=f"0-{index + 1}",
                    maxlen=self.max_events,
                    approximate=True,
                )
            if start == 0:
                pipe.expire(events_key, LIVE_TTL)
            if final:  # meta changes only at the end (attach wrote it at the start)
                pipe.hset(meta_key, mapping={"n": end, "done": 1})
                pipe.expire(meta_key, self.ttl)
                pipe.expire(events_key, self.ttl)
            self._mirrored[stream_id] = end
            if final:
                pipe.delete(_key(stream_id, "lease"))
                done_ids.append(stream_id)
        await pipe.execute()
        for stream_id in done_ids:
            self._local.pop(stream_id, None)
            self._mirrored.pop(stream_id, None)

    async def _leases(self) -> None:
        """Keep the leases of local live streams alive; act on remote stop requests."""
        assert self.redis is not None
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            ids = [sid for sid, stream in self._local.items() if not stream.finished]
            if not ids:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for stream_id in ids:
                    pipe.set(_key(stream_id, "lease"), b"1", ex=LEASE_SECONDS)
                pipe.mget([_key(stream_id, "cancel") for stream_id in ids])
                *_, cancels = await pipe.execute()
            except Exception:
                log.exception("could not refresh stream leases in Redis")
                continue
            for stream_id, cancel in zip(ids, cancels, strict=True):
                if cancel is not None and stream_id in self._local:
                    self._local[stream_id].cancel("cancelled")

    # -- any worker ----------------------------------------------------------------------
    async def lookup(self, stream_id: str) -> RemoteStream | None:
        assert self.redis is not None
        meta = await self.redis.hgetall(_key(stream_id, "meta"))
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode() or None
        return RemoteStream(stream_id, owner, int(meta.get(b"n", 0)), meta.get(b"done") == b"1")

    async def request_cancel(self, stream_id: str) -> None:
        assert self.redis is not None
        await self.redis.set(_key(stream_id, "cancel"), b"1", ex=60)

    async def has_remote_readers(self, stream_id: str) -> bool:
        assert self.redis is not None
        return bool(await self.redis.exists(_key(stream_id, "readers")))

    async def read(self, stream_id: str, after: int, heartbeat: float) -> AsyncIterator[bytes]:
        """Events after ``after`` from Redis, then live ones, until the final one."""
        assert self._blocking is not None and self.redis is not None
        events_key = _key(stream_id, "ev")
        position = f"0-{after + 1}" if after >= 0 else "0-0"
        block_ms = max(1, int(heartbeat * 1000))
        presence = max(2, int(heartbeat * 2) + 1)
        while True:
            try:
                await self.redis.set(_key(stream_id, "readers"), b"1", ex=presence)
                reply = await self._blocking.xread(
                    {events_key: position}, count=1000, block=block_ms
                )
                if not reply:  # silence: is anyone still producing this stream?
                    alive, done = await self._alive(stream_id)
            except Exception:  # Redis went away: say so, retryably, instead of cutting off
                log.exception("stream %s: Redis failed while reading", stream_id)
                yield _UNAVAILABLE
                return
            if reply:
                entries = reply[0][1]
                position = entries[-1][0]
                yield b"".join(fields[b"e"] for _, fields in entries)
                if b"f" in entries[-1][1]:
                    return
            elif not done:  # (if it finished meanwhile, the next XREAD has the final event)
                if not alive:
                    yield _UNAVAILABLE
                    return
                yield PING

    async def _alive(self, stream_id: str) -> tuple[bool, bool]:
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(_key(stream_id, "lease"))
        pipe.hget(_key(stream_id, "meta"), "done")
        lease, done = await pipe.execute()
        return bool(lease), done == b"1"
