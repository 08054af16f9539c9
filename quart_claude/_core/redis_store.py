"""Redis, so a stream produced on one worker can be read, stopped and continued from any other.

:class:`RedisStore` is a :class:`~.store.MemoryStore` for the streams this worker produces
that mirrors every event into a Redis Stream, and publishes an event to this worker's own
readers once it is in Redis: an event any reader has seen survives its producer. Entry ids
are ``0-<index+1>``, so "every event after ``Last-Event-ID: N``" is exactly
``XREAD ... 0-<N+1>``. Keys, for stream ``ID``:

- ``qc:ID:ev``: the events (XADD, MAXLEN-capped); field ``e`` the encoded event, ``f`` on the
  final one;
- ``qc:ID:meta``: hash ``owner``, ``done``, ``n`` (the event count, set when done),
  ``fence`` (the producer's fencing token), ``producer``, ``takeovers``, ``seen`` (when the
  lease was last renewed, seconds), ``renewed`` (the same, milliseconds: a claim waits a
  whole lease after it), ``handoff``, ``usage`` (the upstream usage so far, JSON) and
  ``steps`` (a tool loop's finished steps and its tools' results, JSON);
- ``qc:ID:req``: the validated request (JSON; never the API key), so another worker can
  continue the answer;
- ``qc:ID:lease``: the producer's fencing token, renewed every 0.5 s (expires after 3 s);
- ``qc:ID:cancel``: set by DELETE on any worker; the producer's worker polls for it;
- ``qc:ID:readers``: refreshed by remote readers, so the grace period counts them too.

All of a stream's keys have the live TTL while it runs and the stream TTL once it is done.

Writes are batched: one pipeline carries every event of every stream that arrived within
``flush_window`` (5 ms), in order. Each stream's part is one Lua script, so it is atomic and
checked: it appends only if the fence is still this producer's (else the producer was
superseded: it stops and writes nothing more) and Redis still holds exactly what this worker
wrote before (else, after a Redis restart, a flushed database or a pipeline that failed
half-way, the producer rewrites the whole stream from its memory in one script).

Takeover: a worker reading a stream whose lease lapsed (or was released by a draining
worker: a hand-off) claims it in one script (:data:`_CLAIM`): the fence goes up by one, the
lease is its own. It loads the request and the events, and its relay continues the answer
after the last stored event. A crash loop is bounded by ``CLAUDE_MAX_TAKEOVERS``; a stream
nobody read or resumed within ``CLAUDE_RESUME_GRACE`` of its producer's end is not continued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .protocol import UpstreamError
from .sse import PING, data_line, frame
from .store import Claim, Found, MemoryStore, RemoteStream
from .stream import StoreUnavailable, Stream

__all__ = ["RedisStore"]

log = logging.getLogger("quart_claude")

LIVE_TTL = 3600  # a live stream's keys outlive any answer; finished ones get the stream TTL


def _error_frame(error_class: str, *, partial: bool, **extra: Any) -> bytes:
    """An error sent to a reader that is not one of the stream's events (no id)."""
    return frame(data_line({**UpstreamError(error_class).event(partial=partial), **extra}), None)


#: What a reader sends when the stream can no longer be followed.
_UNAVAILABLE = _error_frame("unavailable", partial=True)

# KEYS: events, meta, lease, request. ARGV: start index, owner, final (0/1), finished TTL,
# live TTL, MAXLEN, fence, request JSON (written when start is 0), usage JSON, steps JSON (a
# tool loop's, when they changed), this worker, lease milliseconds, then the encoded events
# from ``start`` on. A write from 0 (the first, or a rewrite after Redis lost the stream)
# takes the lease too: a rewritten stream is never left without one for another worker to
# claim while its producer is alive.
# Returns 1; 0 (writing nothing) when the stream in Redis is not what this worker left there
# (the caller rewrites it from 0); -1 when another producer holds the stream (the caller
# stops).
_APPEND = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local start = tonumber(ARGV[1])
local fence = redis.call('HGET', KEYS[2], 'fence')
if fence and fence ~= ARGV[7] then return -1 end
if start > 0 then
  if not fence then return 0 end
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top == 0 or top[1][1] ~= '0-' .. start then return 0 end
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'owner', ARGV[2], 'n', 0, 'done', 0, 'fence', ARGV[7],
    'producer', ARGV[11], 'seen', redis.call('TIME')[1], 'renewed', now_ms())
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  if ARGV[8] ~= '' then redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[5]) end
  if ARGV[3] ~= '1' then redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[12]) end
end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[2], 'usage', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[2], 'steps', ARGV[10]) end
local count = #ARGV - 12
for i = 1, count do
  local id = '0-' .. (start + i)
  if ARGV[3] == '1' and i == count then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'e', ARGV[12 + i], 'f', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'e', ARGV[12 + i])
  end
end
if start == 0 and count > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[2], 'n', start + count, 'done', 1)
  for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', key, ARGV[4]) end
  redis.call('DEL', KEYS[3])
end
return 1
"""

# KEYS: meta, lease, cancel. ARGV: fence, lease milliseconds. Returns 1 (renewed), 2 (renewed; a
# stop was asked), 0 (the record is gone: rewrite it) or -1 (superseded).
_RENEW = """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return 0 end
if fence ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'seen', t[1], 'renewed', t[1] * 1000 + math.floor(t[2] / 1000))
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
"""

# KEYS: meta, lease. ARGV: fence. A draining producer lets the stream go: no lease, marked as
# a hand-off (claimed at once, and not counted as a crash).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'handoff', 1, 'seen', redis.call('TIME')[1])
return 1
"""

# KEYS: meta, lease, request. ARGV: worker, max takeovers, grace seconds, lease milliseconds.
# A stream whose producer renewed (``renewed``, milliseconds of Redis's clock) within the
# last lease is not claimed even without its lease key: a failover may lose the key while
# the producer lives (a hand-off is claimed at once).
# Returns {fence, previous producer, owner, request, usage, handoff, steps} to the one
# claimant, {0} when there is nothing to claim (finished, unknown, or its producer is
# alive), {-1} when the takeovers are used up and {-2} when nobody came back for it in time.
_CLAIM = """
local m = redis.call('HMGET', KEYS[1], 'fence', 'done', 'takeovers', 'seen', 'handoff',
  'producer', 'owner', 'usage', 'steps', 'renewed')
if not m[1] or m[2] == '1' or redis.call('EXISTS', KEYS[2]) == 1 then return {0} end
local request = redis.call('GET', KEYS[3])
if not request then return {-1} end
local t = redis.call('TIME')
local now = tonumber(t[1])
local seen = tonumber(m[4] or now)
if now - seen > tonumber(ARGV[3]) + tonumber(ARGV[4]) / 1000 then return {-2} end
local handoff = m[5] == '1'
-- a lease lost with a failed-over primary, its producer alive: it renewed within a lease
local renewed = tonumber(m[10] or 0)
if not handoff and now * 1000 + math.floor(t[2] / 1000) - renewed < tonumber(ARGV[4]) then
  return {0}
end
if not handoff and tonumber(m[3] or 0) >= tonumber(ARGV[2]) then return {-1} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
if not handoff then redis.call('HINCRBY', KEYS[1], 'takeovers', 1) end
redis.call('HSET', KEYS[1], 'producer', ARGV[1], 'handoff', 0, 'seen', now,
  'renewed', now * 1000 + math.floor(t[2] / 1000))
redis.call('SET', KEYS[2], fence, 'PX', ARGV[4])
return {fence, m[6] or '', m[7] or '', request, m[8] or '{}', handoff and 1 or 0, m[9] or '[]'}
"""


def _key(stream_id: str, part: str) -> str:
    return f"qc:{stream_id}:{part}"


@dataclass(slots=True)
class _Mirror:
    """What Redis holds of one stream this worker produces: its fencing token, how many of
    its events and which version of its steps are written, and the request until the
    first write has stored it."""

    stream: Stream
    fence: int
    request: bytes = b""
    mirrored: int = 0
    steps_version: int = -1
    produced: bool = False  # registered here (open's first write done, or adopted)


class RedisStore(MemoryStore):
    """Streams any worker can find, read, stop and continue; the ones produced here stay in
    memory too."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        max_events: int = 100_000,
        max_takeovers: int = 2,
        lease: float = 3.0,
        flush_window: float = 0.005,
        **memory: Any,
    ) -> None:
        super().__init__(ttl=ttl, **memory)
        self.url = url
        #: a producer renews its streams' lease every ``lease / 6`` s; a lease that lapses
        #: (the producer died or froze) lets another worker take the stream over
        self.lease_ms: int = max(1, int(lease * 1000))
        self.lease_refresh: float = lease / 6
        #: how often a remote reader looks at the producer's lease while the stream is silent
        self.liveness_interval: float = min(1.0, lease / 3)
        #: what arrives within this window goes to Redis in one pipeline
        self.flush_window = flush_window
        self.redis_ttl: int = max(1, int(ttl))
        self.max_events = max_events
        self.max_takeovers = max_takeovers
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # typed Any: redis-py's reply unions cover decode_responses=True, which we never use
        self.redis: Any = None
        self._blocking: Any = None  # XREAD BLOCK holds a connection while it waits
        #: the streams this worker produces, each with what Redis holds of it
        self._mirrors: dict[str, _Mirror] = {}
        self._dirty: dict[str, _Mirror] = {}  # the ones with something to write, in order
        self._flush_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts: dict[str, Any] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # a pooled connection that went stale (Redis restarted) is retried once on a new one
        # (the asyncio Retry: the sync one never runs; retry_on_error: redis-py 5 needs it)
        retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
        self.redis = aioredis.from_url(self.url, **retry)
        self._blocking = aioredis.from_url(self.url, max_connections=10_000, **retry)
        self._scripts = {
            name: self.redis.register_script(source)
            for name, source in (
                ("append", _APPEND),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("claim", _CLAIM),
            )
        }
        try:
            await self.redis.ping()
        except BaseException:  # unreachable, or refused our credentials: nothing left open
            for client in (self.redis, self._blocking):
                await client.aclose()
            raise
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
    async def open(self, stream: Stream, request: dict[str, Any] | None = None) -> None:
        """Register a stream this worker produces, with the request that continues it
        elsewhere (before its POST answers, so any worker can find it at once), then mirror
        its events as they come."""
        self._mirrors[stream.id] = _Mirror(stream, 1, json.dumps(request or {}).encode())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._write(pipe, self._mirrors[stream.id])  # with its lease
                await pipe.execute()
        except Exception as exc:
            self._forget(stream.id)
            log.exception("the stream store is unavailable")
            raise StoreUnavailable(str(exc)) from exc
        self._adopt(stream, 0)

    def _adopt(self, stream: Stream, mirrored: int) -> None:
        mirror = self._mirrors[stream.id]
        mirror.produced, mirror.mirrored = True, mirrored
        self.add(stream)
        stream.publish(mirrored)
        if len(stream.events) > mirrored or stream.finished:
            self.changed(stream)

    def _forget(self, stream_id: str) -> None:
        self._mirrors.pop(stream_id, None)
        self._dirty.pop(stream_id, None)

    def _produced(self) -> list[Stream]:
        return [mirror.stream for mirror in self._mirrors.values() if mirror.produced]

    def changed(self, stream: Stream) -> None:
        mirror = self._mirrors.get(stream.id)
        if mirror is not None:
            self._dirty[stream.id] = mirror
            self._flush_wanted.set()

    hands_off = True

    def _finished_published(self, stream: Stream) -> None:
        pass  # closed when its last event is in Redis (see _flush)

    def left(self, stream: Stream) -> None:
        """A hand-off: the relay stopped at an event boundary; :meth:`hand_off` writes what
        is left, releases the lease and tells this worker's readers to resume elsewhere."""

    async def hand_off(self) -> None:
        """Let every stream this worker produced and left go to other workers (draining)."""
        leaving = [s for s in self._produced() if s.left and not s.closed]
        if not leaving:
            return
        try:
            await self._flush()
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in leaving:
                    await self._scripts["release"](
                        keys=[_key(stream.id, "meta"), _key(stream.id, "lease")],
                        args=[self._mirrors[stream.id].fence],
                        client=pipe,
                    )
                await pipe.execute()
        except Exception:
            log.exception("could not hand streams off through Redis")
            for stream in leaving:
                stream.close(_UNAVAILABLE)
                self._drop(stream)
            return
        log.info("handed off %d stream(s) to other workers", len(leaving))
        for stream in leaving:
            partial = any(b'"type":"delta"' in event for event in stream.events)
            stream.close(
                _error_frame("shutdown", partial=partial, stream_id=stream.id, resume=True)
            )
            self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        """This worker no longer produces ``stream``: lookups go to Redis."""
        self._forget(stream.id)
        self._streams.pop(stream.id, None)

    def _superseded(self, stream: Stream) -> None:
        """Another worker took the stream over (this one was paused, say): write nothing more,
        stop the upstream request, and send this worker's readers to resume elsewhere."""
        log.warning("stream %s: taken over by another worker; stopping here", stream.id)
        self._drop(stream)
        stream.cancel("superseded")
        stream.close(_UNAVAILABLE)

    def _unread(self, stream: Stream) -> None:
        """Readers on other workers count too: ask Redis before stopping the producer."""
        task = asyncio.get_running_loop().create_task(self._stop_unless_read_elsewhere(stream))
        self._background.add(task)  # a reference, so it is not collected mid-flight
        task.add_done_callback(self._background.discard)

    async def _stop_unless_read_elsewhere(self, stream: Stream) -> None:
        if await self.has_remote_readers(stream.id):
            if not stream.readers and stream.id not in self._grace:  # look again later
                self._arm_grace(stream, self.lease_refresh * 4)
        elif not stream.readers and stream.id not in self._grace:
            stream.cancel("disconnected")

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            # gather what arrives within a few ms into the same pipeline
            await asyncio.sleep(self.flush_window)
            self._flush_wanted.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("could not write streams to Redis; retrying")
                await asyncio.sleep(0.5)
                self._flush_wanted.set()

    async def _write(self, pipe: Any, mirror: _Mirror) -> int:
        """Queue the atomic, checked append of the stream's events Redis does not have yet
        (and its steps, when they changed); the end."""
        stream, start = mirror.stream, mirror.mirrored
        events = stream.events
        end = len(events)
        final = stream.finished and not stream.left
        steps = ""
        if stream.steps and (start == 0 or mirror.steps_version != stream.steps_version):
            steps = json.dumps(stream.steps)
        await self._scripts[
            "append"
        ](  # with a pipeline: queued, sent by its execute()
            keys=[
                _key(stream.id, "ev"),
                _key(stream.id, "meta"),
                _key(stream.id, "lease"),
                _key(stream.id, "req"),
            ],
            args=[
                start,
                stream.owner or "",
                1 if final else 0,
                self.redis_ttl,
                LIVE_TTL,
                self.max_events,
                mirror.fence,
                mirror.request if start == 0 else b"",
                json.dumps(stream.usage) if stream.usage else "",
                steps,
                self.worker,
                self.lease_ms,
                *events[start:end],
            ],
            client=pipe,
        )
        return end

    async def _flush(self) -> None:
        assert self.redis is not None
        dirty, self._dirty = self._dirty, {}
        dirty = {sid: m for sid, m in dirty.items() if self._mirrors.get(sid) is m}
        if not dirty:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                batch = [
                    (mirror, await self._write(pipe, mirror), mirror.stream.steps_version)
                    for mirror in dirty.values()
                ]
                results = await pipe.execute()
        except BaseException:
            for sid, mirror in dirty.items():  # nothing is marked written: all of it goes again
                self._dirty.setdefault(sid, mirror)
                stream = mirror.stream
                # Redis is away: this worker's readers are not held up by it (the stream is
                # rewritten whole when Redis is back)
                stream.publish(len(stream.events))
                if stream.finished and not stream.left:
                    stream.close()
            raise
        for (mirror, end, steps_version), written in zip(batch, results, strict=True):
            stream = mirror.stream
            if written == -1:
                self._superseded(stream)
            elif not written:  # Redis lost (part of) it: rewrite it whole from memory
                log.warning("stream %s: Redis lost its state; rewriting it", stream.id)
                mirror.mirrored = 0
                self.changed(stream)
            else:
                stream.publish(end)
                mirror.mirrored, mirror.steps_version = end, steps_version
                if stream.finished and not stream.left and end == len(stream.events):
                    stream.close()
                    self._forget(stream.id)

    async def _leases(self) -> None:
        """Renew the leases of local live streams; act on stop requests and on supersession."""
        assert self.redis is not None
        while True:
            await asyncio.sleep(self.lease_refresh)
            live = [m for m in self._mirrors.values() if m.produced and not m.stream.finished]
            if not live:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for mirror in live:
                        stream_id = mirror.stream.id
                        await self._scripts["renew"](
                            keys=[
                                _key(stream_id, "meta"),
                                _key(stream_id, "lease"),
                                _key(stream_id, "cancel"),
                            ],
                            args=[mirror.fence, self.lease_ms],
                            client=pipe,
                        )
                    replies = await pipe.execute()
            except Exception:
                log.exception("could not renew stream leases in Redis")
                continue
            for mirror, reply in zip(live, replies, strict=True):
                stream = mirror.stream
                if self._mirrors.get(stream.id) is not mirror:
                    continue  # dropped meanwhile
                if reply == -1:
                    self._superseded(stream)
                elif reply == 0 and stream.id not in self._dirty:  # lost while idle: repair
                    log.warning("stream %s: Redis lost its state; rewriting it", stream.id)
                    mirror.mirrored = 0
                    self.changed(stream)
                elif reply == 2:
                    stream.cancel("cancelled")

    # -- takeover ------------------------------------------------------------------------
    async def _claim(self, stream_id: str) -> Claim | str | None:
        """Try to become the producer of a stream whose producer is gone: the claim, or
        "unavailable" (it cannot be continued), or None (someone produces it)."""
        if self.take_over is None or self.closing.is_set():
            return None
        reply = await self._scripts["claim"](
            keys=[_key(stream_id, "meta"), _key(stream_id, "lease"), _key(stream_id, "req")],
            args=[self.worker, self.max_takeovers, self.resume_grace, self.lease_ms],
        )
        status = int(reply[0])
        if status == 0:
            return None
        if status < 0:
            return "unavailable"
        fence, previous, owner, request, usage, handoff, steps = reply
        entries = await self.redis.xrange(_key(stream_id, "ev"))
        claim = Claim(
            stream_id,
            int(fence),
            previous.decode(),
            owner.decode() or None,
            json.loads(request),
            json.loads(usage),
            [fields[b"e"] for _, fields in entries],
            bool(int(handoff)),
            json.loads(steps),
        )
        log.info(
            "stream %s taken over: producer %s -> %s, %d events already stored%s",
            stream_id,
            claim.previous or "?",
            self.worker,
            len(claim.events),
            " (hand-off)" if claim.handoff else "",
        )
        return claim

    def adopt(self, claim: Claim, stream: Stream) -> None:
        """``stream`` (holding the claim's events) is now produced here, under its fence."""
        self._mirrors[stream.id] = _Mirror(stream, claim.fence)
        stream.events.extend(claim.events)
        self._adopt(stream, len(claim.events))
        self.idle(stream)  # no reader here yet: the grace counts readers everywhere

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

        While the stream is silent it looks at the producer's lease every second; when the
        producer is gone it claims the stream (see :meth:`_claim`) and goes on reading what
        its own producer writes. Ends with a retryable ``unavailable`` error when the stream
        cannot go on or Redis is gone, and with a retryable ``shutdown`` error when this
        worker drains.
        """
        assert self._blocking is not None and self.redis is not None
        events_key = _key(stream_id, "ev")
        position = f"0-{after + 1}" if after >= 0 else "0-0"
        block_ms = max(1, int(min(heartbeat, self.liveness_interval) * 1000))
        presence = max(2, int(heartbeat * 2) + 1)
        loop = asyncio.get_running_loop()
        ping_at = loop.time() + heartbeat
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                claimed: Claim | str | None = None
                try:
                    await self.redis.set(_key(stream_id, "readers"), b"1", ex=presence)
                    xread = asyncio.ensure_future(
                        self._blocking.xread({events_key: position}, count=1000, block=block_ms)
                    )
                    await asyncio.wait({xread, closing}, return_when=asyncio.FIRST_COMPLETED)
                    if closing.done():
                        xread.cancel()
                        partial = position not in ("0-0", "0-1")  # text may have been sent
                        yield _error_frame("shutdown", partial=partial)
                        return
                    reply = xread.result()
                    if not reply:  # silence: is anyone still producing this stream?
                        alive, done = await self._alive(stream_id)
                        if not alive and not done:
                            claimed = await self._claim(stream_id)
                except Exception:  # Redis went away: say so, retryably, instead of cutting off
                    log.exception("stream %s: Redis failed while reading", stream_id)
                    yield _UNAVAILABLE
                    return
                if reply:
                    entries = reply[0][1]
                    position = entries[-1][0].decode()
                    ping_at = loop.time() + heartbeat
                    yield b"".join(fields[b"e"] for _, fields in entries)
                    if b"f" in entries[-1][1]:
                        return
                    continue
                if done:  # finished: what the primary holds after this reader's position
                    rest = await self._rest(events_key, position)
                    if rest:  # XREAD read a stale node (a primary just failed over)
                        position = rest[-1][0].decode()
                        yield b"".join(fields[b"e"] for _, fields in rest)
                        if b"f" in rest[-1][1]:
                            return
                        continue
                    return
                if claimed == "unavailable":
                    yield _UNAVAILABLE
                    return
                if isinstance(claimed, Claim):
                    assert self.take_over is not None
                    if not await self.take_over(claimed):
                        yield _UNAVAILABLE  # e.g. at capacity: the claim is let go
                        return
                if loop.time() >= ping_at:
                    ping_at = loop.time() + heartbeat
                    yield PING
        finally:
            closing.cancel()

    async def _rest(self, events_key: str, position: str) -> list[Any]:
        """The entries after ``position`` on the primary (the blocking reads' connection may
        may have read a node that is a replica now, after a failover)."""
        try:
            entries: list[Any] = await self.redis.xrange(events_key, min="(" + position)
        except Exception:
            log.exception("could not read the end of %s from Redis", events_key)
            return []
        return entries

    async def _alive(self, stream_id: str) -> tuple[bool, bool]:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(_key(stream_id, "lease"))
            pipe.hget(_key(stream_id, "meta"), "done")
            lease, done = await pipe.execute()
        return bool(lease), done == b"1"
