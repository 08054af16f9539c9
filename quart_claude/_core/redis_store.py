"""Redis, so a stream produced on one worker can be read and stopped from any other.

:class:`RedisStore` is a :class:`~.store.MemoryStore` for the streams this worker produces
(their own readers never touch Redis) that mirrors every event into a Redis Stream. Entry ids
are ``0-<index+1>``, so "every event after ``Last-Event-ID: N``" is exactly
``XREAD ... 0-<N+1>``. Keys, for stream ``ID``:

- ``qc:ID:ev``: the events (XADD, MAXLEN-capped); field ``e`` the encoded event, ``f`` on the
  final one;
- ``qc:ID:meta``: hash ``owner``, ``done`` and ``n`` (the event count, set when done);
  TTL ``CLAUDE_STREAM_TTL`` once finished;
- ``qc:ID:lease``: refreshed every 0.5 s while the producer lives (expires after 3 s);
- ``qc:ID:cancel``: set by DELETE on any worker; the producer's worker polls for it;
- ``qc:ID:readers``: refreshed by remote readers, so the grace period counts them too.

Writes are batched: one pipeline carries every event of every stream that arrived within
``FLUSH_WINDOW`` (5 ms), in order. Each stream's part is one Lua script, so it is atomic and
checked: it appends only if Redis still holds exactly what this worker wrote before (the meta
record, and the last entry id it expects). After a Redis restart, a flushed database or a
pipeline that failed half-way, the check fails, and the producer rewrites the whole stream
from its memory in one script: readers elsewhere see the exact answer or, while Redis is
away, a retryable error; never a hole, and never a stream without its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .protocol import UpstreamError
from .sse import PING, data_line, frame
from .store import Found, MemoryStore, RemoteStream
from .stream import StoreUnavailable, Stream

__all__ = ["RedisStore", "RemoteStream"]

log = logging.getLogger("quart_claude")

LEASE_SECONDS = 3
LEASE_REFRESH = 0.5
FLUSH_WINDOW = 0.005
LIVE_TTL = 3600  # a live stream's keys outlive any answer; finished ones get the stream TTL


#: What a reader on another worker sends when the stream can no longer be followed (no id:
#: it is not one of the stream's events).
_UNAVAILABLE = frame(data_line(UpstreamError("unavailable").event(partial=True)), None)

# KEYS: events, meta, lease. ARGV: start index, owner, final (0/1), finished TTL, live TTL,
# MAXLEN, then the encoded events from ``start`` on. Returns 0 (and writes nothing) when the
# stream in Redis is not what this worker left there: the caller then rewrites it from 0.
_APPEND = """
local start = tonumber(ARGV[1])
if start > 0 then
  if redis.call('HEXISTS', KEYS[2], 'owner') == 0 then return 0 end
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top == 0 or top[1][1] ~= '0-' .. start then return 0 end
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'owner', ARGV[2], 'n', 0, 'done', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
local count = #ARGV - 6
for i = 1, count do
  local id = '0-' .. (start + i)
  if ARGV[3] == '1' and i == count then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'e', ARGV[6 + i], 'f', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'e', ARGV[6 + i])
  end
end
if start == 0 and count > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[2], 'n', start + count, 'done', 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('DEL', KEYS[3])
end
return 1
"""


def _key(stream_id: str, part: str) -> str:
    return f"qc:{stream_id}:{part}"


class RedisStore(MemoryStore):
    """Streams any worker can find, read and stop; the ones produced here stay in memory too."""

    def __init__(self, url: str, *, ttl: float, max_events: int = 100_000, **memory: Any) -> None:
        super().__init__(ttl=ttl, **memory)
        self.url = url
        self.redis_ttl: int = max(1, int(ttl))
        self.max_events = max_events
        # typed Any: redis-py's reply unions cover decode_responses=True, which we never use
        self.redis: Any = None
        self._blocking: Any = None  # XREAD BLOCK holds a connection while it waits
        self._local: dict[str, Stream] = {}  # streams this worker produces
        self._mirrored: dict[str, int] = {}
        self._dirty: dict[str, Stream] = {}
        self._flush_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._append: Any = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # a pooled connection that went stale (Redis restarted) is retried once on a new one
        # (the asyncio Retry: the sync one never runs; retry_on_error: redis-py 5 needs it)
        retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
        self.redis = aioredis.from_url(self.url, **retry)
        self._blocking = aioredis.from_url(self.url, max_connections=10_000, **retry)
        self._append = self.redis.register_script(_APPEND)
        await self.redis.ping()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flusher()), loop.create_task(self._leases())]

    @property
    def connection_pool(self) -> Any:
        return self.redis.connection_pool if self.redis is not None else None

    async def close(self) -> None:
        await super().close()
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
    async def open(self, stream: Stream) -> None:
        """Register a stream this worker produces (before its POST answers, so any worker
        can find it at once), then mirror its events as they come."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._write(pipe, stream, 0)
                pipe.set(_key(stream.id, "lease"), b"1", ex=LEASE_SECONDS)
                await pipe.execute()
        except Exception as exc:
            log.exception("the stream store is unavailable")
            raise StoreUnavailable(str(exc)) from exc
        self._local[stream.id] = stream
        self._mirrored[stream.id] = 0
        self.add(stream)
        if stream.events or stream.finished:
            self.changed(stream)

    def changed(self, stream: Stream) -> None:
        self._dirty[stream.id] = stream
        self._flush_wanted.set()

    def _unread(self, stream: Stream) -> None:
        """Readers on other workers count too: ask Redis before stopping the producer."""
        task = asyncio.get_running_loop().create_task(self._stop_unless_read_elsewhere(stream))
        self._background.add(task)  # a reference, so it is not collected mid-flight
        task.add_done_callback(self._background.discard)

    async def _stop_unless_read_elsewhere(self, stream: Stream) -> None:
        if await self.has_remote_readers(stream.id):
            if not stream.readers and stream.id not in self._grace:  # look again later
                self._arm_grace(stream, LEASE_REFRESH * 4)
        elif not stream.readers and stream.id not in self._grace:
            stream.cancel("disconnected")

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

    async def _write(self, pipe: Any, stream: Stream, start: int) -> int:
        """Queue the atomic, checked append of ``stream``'s events from ``start``; the end."""
        events = stream.events
        end = len(events)
        final = stream.finished
        await self._append(  # with a pipeline: queued, sent by its execute()
            keys=[_key(stream.id, "ev"), _key(stream.id, "meta"), _key(stream.id, "lease")],
            args=[
                start,
                stream.owner or "",
                1 if final else 0,
                self.redis_ttl,
                LIVE_TTL,
                self.max_events,
                *events[start:end],
            ],
            client=pipe,
        )
        return end

    async def _flush(self) -> None:
        assert self.redis is not None
        dirty, self._dirty = self._dirty, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                batch = [
                    (
                        stream,
                        await self._write(pipe, stream, self._mirrored.get(sid, 0)),
                        stream.finished,
                    )
                    for sid, stream in dirty.items()
                ]
                results = await pipe.execute()
        except BaseException:
            for sid, stream in dirty.items():  # nothing is marked written: all of it goes again
                self._dirty.setdefault(sid, stream)
            raise
        for (stream, end, final), written in zip(batch, results, strict=True):
            if not written:  # Redis lost (part of) it: rewrite it whole from memory
                log.warning("stream %s: Redis lost its state; rewriting it", stream.id)
                self._mirrored[stream.id] = 0
                self.changed(stream)
            elif final:
                self._local.pop(stream.id, None)
                self._mirrored.pop(stream.id, None)
            else:
                self._mirrored[stream.id] = end

    async def _leases(self) -> None:
        """Keep the leases of local live streams alive; act on remote stop requests."""
        assert self.redis is not None
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            ids = [sid for sid, stream in self._local.items() if not stream.finished]
            if not ids:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for stream_id in ids:
                        pipe.set(_key(stream_id, "lease"), b"1", ex=LEASE_SECONDS)
                        pipe.exists(_key(stream_id, "meta"))
                    pipe.mget([_key(stream_id, "cancel") for stream_id in ids])
                    *replies, cancels = await pipe.execute()
            except Exception:
                log.exception("could not refresh stream leases in Redis")
                continue
            for stream_id, present, cancel in zip(ids, replies[1::2], cancels, strict=True):
                stream = self._local.get(stream_id)
                if stream is None:
                    continue
                if not present and stream_id not in self._dirty:  # lost while idle: repair
                    log.warning("stream %s: Redis lost its state; rewriting it", stream_id)
                    self._mirrored[stream_id] = 0
                    self.changed(stream)
                if cancel is not None:
                    stream.cancel("cancelled")

    # -- any worker ----------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            assert self.redis is not None
            async with asyncio.timeout(1):
                await self.redis.ping()
        except Exception:
            return False
        return True

    async def lookup(self, stream_id: str) -> Found | None:
        local = self.get(stream_id)
        if local is not None:
            return local
        assert self.redis is not None
        try:
            meta = await self.redis.hgetall(_key(stream_id, "meta"))
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode() or None
        return RemoteStream(stream_id, owner, int(meta.get(b"n", 0)), meta.get(b"done") == b"1")

    async def remember_chat(self, key: str, stream_id: str) -> None:
        """The AI SDK chat ``key`` is answered by ``stream_id`` (for its resume route)."""
        await super().remember_chat(key, stream_id)
        assert self.redis is not None
        await self.redis.set(f"qc:chat:{key}", stream_id.encode(), ex=LIVE_TTL)

    async def active_chat(self, key: str) -> str | None:
        assert self.redis is not None
        try:
            value = await self.redis.get(f"qc:chat:{key}")
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        return value.decode() if value else await super().active_chat(key)

    async def cancel(self, found: Found) -> bool:
        if isinstance(found, Stream):
            return await super().cancel(found)
        if found.done:
            return False
        assert self.redis is not None  # produced on another worker: it polls within 0.5 s
        try:
            await self.redis.set(_key(found.id, "cancel"), b"1", ex=60)
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        return True

    def read(
        self, found: Found, after: int, heartbeat: float, *, live_only: bool = False
    ) -> AsyncIterator[bytes] | None:
        if isinstance(found, Stream):
            return super().read(found, after, heartbeat, live_only=live_only)
        if found.done and (live_only or after >= found.count - 1):
            return None
        return self._read_remote(found.id, after, heartbeat)

    async def has_remote_readers(self, stream_id: str) -> bool:
        assert self.redis is not None
        return bool(await self.redis.exists(_key(stream_id, "readers")))

    async def _read_remote(
        self, stream_id: str, after: int, heartbeat: float
    ) -> AsyncIterator[bytes]:
        """Events after ``after`` from Redis, then live ones, until the final one.

        Ends with a retryable ``unavailable`` error when the producer or Redis is gone, and
        with a retryable ``shutdown`` error when this worker drains.
        """
        assert self._blocking is not None and self.redis is not None
        events_key = _key(stream_id, "ev")
        position = f"0-{after + 1}" if after >= 0 else "0-0"
        block_ms = max(1, int(heartbeat * 1000))
        presence = max(2, int(heartbeat * 2) + 1)
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                try:
                    await self.redis.set(_key(stream_id, "readers"), b"1", ex=presence)
                    xread = asyncio.ensure_future(
                        self._blocking.xread({events_key: position}, count=1000, block=block_ms)
                    )
                    await asyncio.wait({xread, closing}, return_when=asyncio.FIRST_COMPLETED)
                    if closing.done():
                        xread.cancel()
                        partial = position not in ("0-0", "0-1")  # text may have been sent
                        yield frame(
                            data_line(UpstreamError("shutdown").event(partial=partial)), None
                        )
                        return
                    reply = xread.result()
                    if not reply:  # silence: is anyone still producing this stream?
                        alive, done = await self._alive(stream_id)
                except Exception:  # Redis went away: say so, retryably, instead of cutting off
                    log.exception("stream %s: Redis failed while reading", stream_id)
                    yield _UNAVAILABLE
                    return
                if reply:
                    entries = reply[0][1]
                    position = entries[-1][0].decode()
                    yield b"".join(fields[b"e"] for _, fields in entries)
                    if b"f" in entries[-1][1]:
                        return
                elif done:  # finished, and nothing after this reader's position: the end
                    return
                elif not alive:
                    yield _UNAVAILABLE
                    return
                else:
                    yield PING
        finally:
            closing.cancel()

    async def _alive(self, stream_id: str) -> tuple[bool, bool]:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(_key(stream_id, "lease"))
            pipe.hget(_key(stream_id, "meta"), "done")
            lease, done = await pipe.execute()
        return bool(lease), done == b"1"
