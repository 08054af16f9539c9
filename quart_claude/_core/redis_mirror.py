"""The Redis mirror: every event of a stream this worker produces goes to a Redis Stream, and
is published to this worker's readers once it is there, so an event any reader has seen
survives its producer.

Entry ids are ``0-<index+1>``, so "every event after ``Last-Event-ID: N``" is exactly
``XREAD ... 0-<N+1>``. Keys, for stream ``ID`` (the hash tag: one cluster slot per stream):

- ``qc:{ID}:ev``: the events (XADD, MAXLEN-capped); field ``e`` the encoded event, ``f`` on
  the final one;
- ``qc:{ID}:meta``: hash ``owner``, ``done``, ``n`` (the event count, set when done),
  ``fence`` (the producer's fencing token), ``producer``, ``takeovers``, ``seen`` (when the
  lease was last renewed, seconds), ``renewed`` (the same, milliseconds: a claim waits a
  whole lease after it), ``handoff``, ``usage`` (the upstream usage so far, JSON) and
  ``steps`` (a tool loop's finished steps and its tools' results, JSON);
- ``qc:{ID}:req``: the validated request (JSON; never the API key), so another worker can
  continue the answer;
- ``qc:{ID}:lease``: the producer's fencing token, renewed every ``lease / 6`` s;
- ``qc:{ID}:cancel``: set by DELETE on any worker; the producer's worker polls for it;
- ``qc:{ID}:readers``: refreshed by remote readers, so the grace period counts them too.

All of a stream's keys have the live TTL while it runs and the stream TTL once it is done.

Writes are batched: one pipeline (one per node on a cluster) carries every event of every
stream that arrived within ``flush_window``, in order. Each stream's part is one Lua script,
so it is atomic and checked: it appends only if the fence is still this producer's (else the
producer was superseded: it stops and writes nothing more) and Redis still holds exactly what
this worker wrote before (else, after a Redis restart, a flushed database, a failover that
lost writes or a pipeline that failed half-way, the producer rewrites the whole stream from
its memory in one script).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .protocol import UpstreamError
from .redis_link import NotReplicated, RedisLink, ScriptCall, key
from .sse import DELTA_PREFIX, data_line, frame
from .store import Claim, Registry, Timings
from .stream import Cancel, StoreUnavailable, Stream

__all__ = ["MIRROR_SCRIPTS", "UNAVAILABLE", "RedisMirror", "error_frame", "handoff_frame"]

log = logging.getLogger("quart_claude")


def error_frame(error_class: str, *, partial: bool, **extra: Any) -> bytes:
    """An error sent to a reader that is not one of the stream's events (no id)."""
    return frame(data_line({**UpstreamError(error_class).event(partial=partial), **extra}), None)


#: What a reader is sent when the stream can no longer be followed.
UNAVAILABLE = error_frame("unavailable", partial=True)


def handoff_frame(stream_id: str, *, partial: bool, error_class: str = "shutdown") -> bytes:
    """What a reader is sent when the stream goes on elsewhere: resume it there (the
    project's clients reconnect with ``Last-Event-ID`` on ``resume: true``)."""
    return error_frame(error_class, partial=partial, stream_id=stream_id, resume=True)


def _hand_readers_off(stream: Stream, error_class: str) -> None:
    """This worker's readers of ``stream`` send what they may see, then the hand-off event:
    the stream goes on elsewhere (``partial``: they were sent some of its text)."""
    partial = any(event.startswith(DELTA_PREFIX) for event in stream.events[: stream.visible])
    stream.close(handoff_frame(stream.id, partial=partial, error_class=error_class))


# KEYS: events, meta, lease, request. ARGV: start index, owner, final (0/1), finished TTL,
# live TTL, MAXLEN, fence, request JSON (written when start is 0), usage JSON, steps JSON (a
# tool loop's, when they changed), this worker, lease milliseconds, then the encoded events
# from ``start`` on. Every write that is not the last renews the lease (a producer that
# writes is alive, even while its renewals wait behind a busy event loop); a write from 0
# (the first, or a rewrite after Redis lost the stream) takes it: a rewritten stream is never
# left without one for another worker to claim while its producer is alive.
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
end
if ARGV[3] ~= '1' then
  redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[12])
  redis.call('HSET', KEYS[2], 'renewed', now_ms())
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

MIRROR_SCRIPTS = {"append": _APPEND, "renew": _RENEW, "release": _RELEASE}


@dataclass(slots=True)
class _Record:
    """What Redis holds of one stream this worker produces: its fencing token, how many of
    its events and which version of its steps are written, and the request until the first
    write has stored it."""

    stream: Stream
    fence: int
    request: bytes = b""
    mirrored: int = 0
    steps_version: int = -1
    renewing: bool = False  # its lease is renewed here (once its first write is done)


class RedisMirror:
    """The streams this worker produces, written to Redis as they grow (see the module doc)."""

    hands_off = True

    def __init__(
        self,
        link: RedisLink,
        registry: Registry,
        timings: Timings,
        *,
        worker: str,
        max_events: int = 100_000,
    ) -> None:
        self.link = link
        self.registry = registry
        self.timings = timings
        self.worker = worker  # host:pid, the producer name other workers see
        self.max_events = max_events
        self.redis_ttl: int = max(1, int(timings.ttl))
        #: the streams this worker produces, each with what Redis holds of it
        self._records: dict[str, _Record] = {}
        self._dirty: dict[str, _Record] = {}  # the ones with something to write, in order
        self._flush_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lag_said_at = -60.0

    async def start(self) -> None:
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

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(1):
                await self.link.redis.ping()
        except Exception:
            return False
        return True

    # -- a stream's life -------------------------------------------------------------------
    async def open(self, stream: Stream, request: dict[str, Any]) -> None:
        """Write the stream with its lease and the request that continues it elsewhere (before
        its POST answers, so any worker finds it at once), then mirror its events."""
        record = self._records[stream.id] = _Record(stream, 1, json.dumps(request).encode())
        try:
            call, _ = self._write(record)
            (written,) = await self.link.run_many([call])
            if isinstance(written, Exception):
                raise written
        except Exception as exc:
            self._forget(stream.id)
            log.exception("the stream store is unavailable")
            raise StoreUnavailable(str(exc)) from exc
        self._written(record, 0)

    def adopt(self, claim: Claim, stream: Stream) -> None:
        """``stream`` (holding the claim's events) is now produced here, under its fence."""
        record = self._records[stream.id] = _Record(stream, claim.fence)
        stream.events.extend(claim.events)
        self._written(record, len(claim.events))

    def _written(self, record: _Record, mirrored: int) -> None:
        stream = record.stream
        record.mirrored, record.renewing = mirrored, True
        stream.publish(mirrored)
        if len(stream.events) > mirrored or stream.finished:
            self.changed(stream)

    def changed(self, stream: Stream) -> None:
        record = self._records.get(stream.id)
        if record is not None:
            self._dirty[stream.id] = record
            self._flush_wanted.set()

    def finished(self, stream: Stream) -> None:
        """Closed when its last event is in Redis (see :meth:`_flush`)."""

    def left(self, stream: Stream) -> None:
        """A hand-off: the relay stopped at an event boundary; :meth:`hand_off` writes what
        is left, releases the lease and tells this worker's readers to resume elsewhere."""

    def _forget(self, stream_id: str) -> None:
        self._records.pop(stream_id, None)
        self._dirty.pop(stream_id, None)

    def _drop(self, stream: Stream) -> None:
        """This worker no longer produces ``stream``: lookups go to Redis."""
        self._forget(stream.id)
        self.registry.drop(stream)

    def _superseded(self, stream: Stream) -> None:
        """Another worker took the stream over (this one was paused, say): write nothing more,
        stop the upstream request, and send this worker's readers to resume elsewhere."""
        log.warning("stream %s: taken over by another worker; stopping here", stream.id)
        self._drop(stream)
        stream.superseded = True
        stream.cancel(Cancel.SUPERSEDED)
        _hand_readers_off(stream, "unavailable")

    def _lost(self, record: _Record) -> None:
        """Redis lost (part of) the stream: rewrite it whole from memory."""
        log.warning("stream %s: Redis lost its state; rewriting it", record.stream.id)
        record.mirrored = 0
        self.changed(record.stream)

    async def hand_off(self) -> None:
        """Let every stream this worker produced and left go to other workers (draining)."""
        leaving = [r for r in self._records.values() if r.stream.left and not r.stream.closed]
        if not leaving:
            return
        releases: list[ScriptCall] = [
            ("release", [key(r.stream.id, "meta"), key(r.stream.id, "lease")], [r.fence])
            for r in leaving
        ]
        try:
            await self._flush()
            for reply in await self.link.run_many(releases):
                if isinstance(reply, Exception):
                    raise reply
        except Exception:
            log.exception("could not hand streams off through Redis")
            for record in leaving:
                record.stream.close(UNAVAILABLE)
                self._drop(record.stream)
            return
        log.info("handed off %d stream(s) to other workers", len(leaving))
        for record in leaving:
            _hand_readers_off(record.stream, "shutdown")
            self._drop(record.stream)

    # -- writing -------------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            # gather what arrives within a few ms into the same pipeline
            await asyncio.sleep(self.timings.flush_window)
            self._flush_wanted.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("could not write streams to Redis; retrying")
                await asyncio.sleep(0.5)
                self._flush_wanted.set()

    def _write(self, record: _Record) -> tuple[ScriptCall, int]:
        """The atomic, checked append of the events Redis does not have yet (and the steps,
        when they changed), and the end it writes up to."""
        stream, start = record.stream, record.mirrored
        events = stream.events
        end = len(events)
        final = stream.finished and not stream.left
        steps = ""
        if stream.steps and (start == 0 or record.steps_version != stream.steps_version):
            steps = json.dumps(stream.steps)
        stream_id = stream.id
        keys = [
            key(stream_id, "ev"),
            key(stream_id, "meta"),
            key(stream_id, "lease"),
            key(stream_id, "req"),
        ]
        args = [
            start,
            stream.owner or "",
            1 if final else 0,
            self.redis_ttl,
            self.timings.live_ttl,
            self.max_events,
            record.fence,
            record.request if start == 0 else b"",
            json.dumps(stream.usage) if stream.usage else "",
            steps,
            self.worker,
            self.timings.lease_ms,
            *events[start:end],
        ]
        return ("append", keys, args), end

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        batch = [r for sid, r in dirty.items() if self._records.get(sid) is r]
        if not batch:
            return
        writes = [(self._write(record), record.stream.steps_version) for record in batch]
        try:
            replies = await self.link.run_many([call for (call, _), _ in writes])
        except BaseException:
            for record in batch:  # nothing is marked written: all of it goes again
                self._dirty.setdefault(record.stream.id, record)
                stream = record.stream
                # Redis is away: this worker's readers are not held up by it (the stream is
                # rewritten whole when Redis is back)
                stream.publish(len(stream.events))
                if stream.finished and not stream.left:
                    stream.close()
            raise
        for record, ((_, end), steps_version), reply in zip(batch, writes, replies, strict=True):
            if isinstance(reply, Exception):  # this stream's part only: written again soon
                log.warning("stream %s: a write to Redis failed: %s", record.stream.id, reply)
                self._dirty.setdefault(record.stream.id, record)
                self._flush_wanted.set()
            else:
                self._settle(record, int(reply), end, steps_version)

    def _settle(self, record: _Record, written: int, end: int, steps_version: int) -> None:
        stream = record.stream
        if written == -1:
            self._superseded(stream)
        elif not written:
            self._lost(record)
        else:
            stream.publish(end)
            record.mirrored, record.steps_version = end, steps_version
            if stream.finished and not stream.left and end == len(stream.events):
                stream.close()
                self._forget(stream.id)

    # -- leases --------------------------------------------------------------------------
    async def _leases(self) -> None:
        """Renew the leases of local live streams; act on stop requests and on supersession."""
        while True:
            await asyncio.sleep(self.timings.lease_refresh)
            live = [r for r in self._records.values() if r.renewing and not r.stream.finished]
            if not live:
                continue
            lease_ms = self.timings.lease_ms
            parts = ("meta", "lease", "cancel")
            renewals: list[ScriptCall] = [
                ("renew", [key(r.stream.id, p) for p in parts], [r.fence, lease_ms]) for r in live
            ]
            try:  # durable: the primary a failover promotes knows these producers live
                replies = await self.link.run_many(renewals, durable=True)
            except NotReplicated as lag:  # renewed on the primary: act on the replies
                replies = lag.replies
                self._lagging(lag)
            except Exception:
                log.exception("could not renew stream leases in Redis")
                continue
            for record, reply in zip(live, replies, strict=True):
                self._renewed(record, reply)

    def _lagging(self, lag: NotReplicated) -> None:
        """Say so once a minute: a replica that lags holds nothing up, but a failover then
        may lose the renewals it did not get."""
        now = time.monotonic()
        if now - self._lag_said_at >= 60:
            self._lag_said_at = now
            log.warning("stream leases renewed, but %s", lag)

    def _renewed(self, record: _Record, reply: Any) -> None:
        stream = record.stream
        if self._records.get(stream.id) is not record:
            return  # dropped meanwhile
        if isinstance(reply, Exception):
            log.warning("stream %s: its lease could not be renewed: %s", stream.id, reply)
            return
        if reply == -1:
            self._superseded(stream)
        elif reply == 0 and stream.id not in self._dirty:  # lost while idle: repair
            self._lost(record)
        elif reply == 2:
            stream.cancel(Cancel.CANCELLED)
