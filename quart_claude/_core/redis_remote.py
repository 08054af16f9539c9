"""Other workers' streams, through Redis: found, read, stopped, and taken over.

A remote reader follows a stream with ``XREAD BLOCK`` from the position after the client's
``Last-Event-ID``. While the stream is silent it looks at the producer's lease; a lease
that lapsed (the producer died or froze) or was released by a draining worker (a hand-off)
lets it claim the stream in one script (:data:`_CLAIM`): the fence goes up by one, the
lease is this worker's, and the store's ``take_over`` continues the answer after the last
stored event. A crash loop is bounded by ``CLAUDE_MAX_TAKEOVERS``; a stream nobody read or
resumed within ``CLAUDE_RESUME_GRACE`` of its producer's end is not continued.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .redis_link import RedisLink, key
from .redis_mirror import UNAVAILABLE, handoff_frame
from .sse import PING
from .store import Claim, RemoteStream, Timings
from .stream import StoreUnavailable

if TYPE_CHECKING:
    from .store import StreamStore

__all__ = ["REMOTE_SCRIPTS", "RedisRemote"]

log = logging.getLogger("quart_claude")

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

REMOTE_SCRIPTS = {"claim": _CLAIM}

#: A remote read that fails is tried again from its position, this far apart at first, then
#: twice as far each time up to a second, for as long as a lease lasts: a slot migrating or a
#: replica being promoted is a retry, not an ``unavailable``.
_READ_RETRY_FIRST = 0.05


def _shutdown(stream_id: str, position: str) -> bytes:
    """What a reader of another worker's stream ends with when this worker drains: the
    stream goes on there, so the hand-off event (resume it elsewhere)."""
    return handoff_frame(stream_id, partial=position not in ("0-0", "0-1"))  # text was sent?


def _retry_delay(failing_for: float) -> float:
    """0.05 s after a first failure, doubling with how long reads have failed, at most 1 s."""
    return min(1.0, max(_READ_RETRY_FIRST, failing_for))


@dataclass(slots=True)
class _Poll:
    """What one wait on a remote stream found."""

    entries: list[Any] = field(default_factory=list)
    done: bool = False
    closing: bool = False
    claimed: Claim | str | None = None


@dataclass(frozen=True, slots=True)
class _Step:
    """What a reader does after one poll: send ``chunk`` (if any), then end or read on from
    ``position``."""

    chunk: bytes | None
    position: str
    end: bool


@dataclass(slots=True)
class _Failing:
    """Since when reads of a stream have failed (None: the last one worked)."""

    since: float | None = None


class RedisRemote:
    """Streams other workers produce (see the module doc)."""

    def __init__(
        self, link: RedisLink, timings: Timings, *, worker: str, max_takeovers: int = 2
    ) -> None:
        self.link = link
        self.timings = timings
        self.worker = worker
        self.max_takeovers = max_takeovers
        self.store: StreamStore | None = None  # bound by the store: closing, take_over

    def bind(self, store: StreamStore) -> None:
        self.store = store

    async def lookup(self, stream_id: str) -> RemoteStream | None:
        try:
            meta = await self.link.redis.hgetall(key(stream_id, "meta"))
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode() or None
        return RemoteStream(stream_id, owner, int(meta.get(b"n", 0)), meta.get(b"done") == b"1")

    async def cancel(self, found: RemoteStream) -> bool:
        if found.done:
            return False
        try:  # its producer's worker polls for it with every lease renewal
            await self.link.redis.set(key(found.id, "cancel"), b"1", ex=60)
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        return True

    async def read_elsewhere(self, stream_id: str) -> bool:
        return bool(await self.link.redis.exists(key(stream_id, "readers")))

    async def remember_chat(self, key_: str, stream_id: str) -> None:
        """The AI SDK chat ``key_`` is answered by ``stream_id`` (for its resume route)."""
        await self.link.redis.set(f"qc:chat:{key_}", stream_id.encode(), ex=self.timings.live_ttl)

    async def active_chat(self, key_: str) -> str | None:
        try:
            value = await self.link.redis.get(f"qc:chat:{key_}")
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        return value.decode() if value else None

    def read(
        self, found: RemoteStream, after: int, heartbeat: float, *, live_only: bool
    ) -> AsyncIterator[bytes] | None:
        if found.done and (live_only or after >= found.count - 1):
            return None
        return self._read(found.id, after, heartbeat)

    async def _read(self, stream_id: str, after: int, heartbeat: float) -> AsyncIterator[bytes]:
        """Events after ``after`` from Redis, then live ones, until the final one.

        While the stream is silent it looks at the producer's lease every second; when the
        producer is gone it claims the stream (see :meth:`_claim`) and goes on reading what
        its own producer writes. Ends with a retryable ``unavailable`` error when the stream
        cannot go on or Redis is gone, and with a retryable ``shutdown`` error when this
        worker drains.
        """
        assert self.store is not None
        position = f"0-{after + 1}" if after >= 0 else "0-0"
        block_ms = max(1, int(min(heartbeat, self.timings.liveness_interval) * 1000))
        presence = max(2, int(heartbeat * 2) + 1)
        loop = asyncio.get_running_loop()
        ping_at = loop.time() + heartbeat
        closing = asyncio.ensure_future(self.store.closing.wait())
        failing = _Failing()
        try:
            while True:
                if loop.time() >= ping_at:  # silence (or Redis failing): the proxy hears us
                    ping_at = loop.time() + heartbeat
                    yield PING
                try:
                    poll = await self._poll(stream_id, position, block_ms, presence, closing)
                except Exception:  # a slot moving, a node failing over, or Redis gone
                    last = await self._failed(stream_id, position, closing, failing)
                    if last is not None:
                        yield last
                        return
                    continue
                failing.since = None
                step = await self._step(poll, stream_id, position)
                if step.chunk:
                    ping_at = loop.time() + heartbeat
                    yield step.chunk
                if step.end:
                    return
                position = step.position
        finally:
            closing.cancel()

    async def _failed(
        self, stream_id: str, position: str, closing: asyncio.Future[Any], failing: _Failing
    ) -> bytes | None:
        """A read failed: the last frame to send when it cannot go on, else None once it
        is time to read again."""
        if closing.done():  # the store closed under the read: no retry
            return _shutdown(stream_id, position)
        now = asyncio.get_running_loop().time()
        failing.since = now if failing.since is None else failing.since
        if now - failing.since > self.timings.lease:  # gone: retryably, not a cut
            log.exception("stream %s: Redis failed while reading", stream_id)
            return UNAVAILABLE
        log.warning("stream %s: a read from Redis failed; again", stream_id)
        # the same position again, soon: sooner if the store closes meanwhile
        await asyncio.wait({closing}, timeout=_retry_delay(now - failing.since))
        return None

    async def _step(self, poll: _Poll, stream_id: str, position: str) -> _Step:
        """What one poll gives the reader: events, the end, or a stream to take over."""
        if poll.closing:
            return _Step(_shutdown(stream_id, position), position, True)
        entries = poll.entries
        if entries:
            chunk = b"".join(fields[b"e"] for _, fields in entries)
            return _Step(chunk, entries[-1][0].decode(), b"f" in entries[-1][1])
        if poll.done:  # nothing after this position (a Last-Event-ID past the end)
            return _Step(None, position, True)
        if poll.claimed == "unavailable":
            return _Step(UNAVAILABLE, position, True)
        if isinstance(poll.claimed, Claim):
            assert self.store is not None
            take_over = self.store.take_over
            if take_over is None or not await take_over(poll.claimed):
                return _Step(UNAVAILABLE, position, True)  # e.g. at capacity: let go
        return _Step(None, position, False)

    async def _poll(
        self,
        stream_id: str,
        position: str,
        block_ms: int,
        presence: int,
        closing: asyncio.Future[Any],
    ) -> _Poll:
        """One wait for the events after ``position``: what came, or (in silence) whether the
        stream is done or this worker claimed it."""
        link = self.link
        await link.redis.set(key(stream_id, "readers"), b"1", ex=presence)
        xread = asyncio.ensure_future(
            link.blocking.xread({key(stream_id, "ev"): position}, count=1000, block=block_ms)
        )
        await asyncio.wait({xread, closing}, return_when=asyncio.FIRST_COMPLETED)
        if closing.done():
            xread.cancel()
            return _Poll(closing=True)
        reply = xread.result()
        if reply:
            return _Poll(entries=reply[0][1])
        alive, done = await self._alive(stream_id)  # silence: is anyone still producing it?
        if done:  # what the primary holds after this position (XREAD may have read a stale
            # node, a primary that just failed over); a failure here is retried like any read
            rest = await link.redis.xrange(key(stream_id, "ev"), min="(" + position)
            return _Poll(entries=rest, done=True)
        return _Poll(claimed=None if alive else await self._claim(stream_id))

    async def _alive(self, stream_id: str) -> tuple[bool, bool]:
        async with self.link.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key(stream_id, "lease"))
            pipe.hget(key(stream_id, "meta"), "done")
            lease, done = await pipe.execute()
        return bool(lease), done == b"1"

    async def _claim(self, stream_id: str) -> Claim | str | None:
        """Try to become the producer of a stream whose producer is gone: the claim, or
        "unavailable" (it cannot be continued), or None (someone produces it)."""
        store = self.store
        if store is None or store.take_over is None or store.closing.is_set():
            return None
        reply = await self.link.call(
            "claim",
            [key(stream_id, "meta"), key(stream_id, "lease"), key(stream_id, "req")],
            [self.worker, self.max_takeovers, self.timings.resume_grace, self.timings.lease_ms],
        )
        status = int(reply[0])
        if status == 0:
            return None
        if status < 0:
            return "unavailable"
        fence, previous, owner, request, usage, handoff, steps = reply
        entries = await self.link.redis.xrange(key(stream_id, "ev"))
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
