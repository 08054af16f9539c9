"""Where streams live, behind one small interface the state calls and never branches on.

:class:`MemoryStore` holds the streams this worker produces, and only those;
:class:`~.redis_store.RedisStore` extends it so any worker can find, read and stop any
stream. A store is each stream's listener (:class:`~.stream.StreamListener`), so it owns
what follows from a stream's life: the resume grace when its last reader leaves (a reader
that comes back in time keeps it; otherwise the producer is stopped: nobody pays for tokens
nobody reads), the eviction of finished streams, and (Redis) the mirroring of its events.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .stream import Reader, Stream

__all__ = ["Claim", "Found", "MemoryStore", "RemoteStream", "TakeOver"]


class RemoteStream:
    """What a worker that does not produce a stream knows of it (from the shared store)."""

    __slots__ = ("count", "done", "id", "owner")

    def __init__(self, stream_id: str, owner: str | None, count: int, done: bool) -> None:
        self.id: str = stream_id
        self.owner: str | None = owner
        self.count: int = count
        self.done: bool = done


#: A stream as a lookup finds it: produced here, or (Redis) elsewhere.
Found = Stream | RemoteStream


@dataclass(frozen=True, slots=True)
class Claim:
    """A stream this worker now produces after another worker's end: what it needs to go on."""

    stream_id: str
    fence: int
    previous: str  # the producer before (host:pid)
    owner: str | None
    request: dict[str, Any]  # as :meth:`RedisStore.open` stored it
    usage: dict[str, Any]  # upstream usage of every request so far
    events: list[bytes]  # every stored event, encoded
    handoff: bool  # released by a draining worker (not a crash)
    steps: list[dict[str, Any]] = field(default_factory=list)  # a tool loop's, so far


#: What the state does with a claim: start a producer that continues the stream (False when
#: it cannot, e.g. at capacity; the claim then lapses and another worker may take it).
TakeOver = Callable[[Claim], Awaitable[bool]]


class MemoryStore:
    """The streams of one app in one worker: live ones, and finished ones until they expire.

    Live streams are bounded by ``CLAUDE_MAX_CONCURRENT_STREAMS`` (the state checks before it
    opens one); finished ones by ``ttl``, by count (``max_finished``) and by the bytes of
    their events (``max_bytes``), oldest evicted first. Each ``add`` evicts what has expired,
    so memory stays flat under any load.
    """

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        max_finished: int = 10_000,
        max_bytes: int = 256 << 20,
        resume_grace: float = 30.0,
        chats: int = 10_000,
    ) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        self.resume_grace = resume_grace
        self.finished_bytes: int = 0
        #: set when the worker drains: readers of other workers' streams end with shutdown
        self.closing: asyncio.Event = asyncio.Event()
        self._streams: dict[str, Stream] = {}
        self._finished: deque[tuple[Stream, int]] = deque()  # in the order they finished
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._chats: OrderedDict[str, str] = OrderedDict()
        self._chat_limit = chats
        #: set by the state: how a stream this store claimed is continued (None: never claim)
        self.take_over: TakeOver | None = None

    def __len__(self) -> int:
        return len(self._streams)

    # -- lifetime ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (nothing to do in memory)."""

    async def close(self) -> None:
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()

    async def ping(self) -> bool:
        """Whether the store can serve (``/ready``)."""
        return True

    @property
    def connection_pool(self) -> Any:
        """A Redis connection pool other features may share (the rate limiter), or None."""
        return None

    #: Whether a draining worker hands its streams to others (else it ends them).
    hands_off = False

    # -- streams -------------------------------------------------------------------------
    async def open(self, stream: Stream, request: dict[str, Any] | None = None) -> None:
        """Hold a new stream this worker produces (``request``: what another worker would
        need to continue it). Raises :class:`~.stream.StoreUnavailable` when a shared store
        cannot take it."""
        self.add(stream)

    async def hand_off(self) -> None:
        """Let the streams this worker left go on elsewhere (nothing to do in memory)."""

    def adopt(self, claim: Claim, stream: Stream) -> None:
        """Produce ``stream`` here from now on, holding the claim's events."""
        raise NotImplementedError("only a shared store claims other workers' streams")

    def add(self, stream: Stream) -> None:
        self._evict()
        stream.listener = self
        self._streams[stream.id] = stream

    def get(self, stream_id: str) -> Stream | None:
        """A stream this worker holds."""
        self._evict()
        return self._streams.get(stream_id)

    async def lookup(self, stream_id: str) -> Found | None:
        """The stream wherever it is produced, or None."""
        return self.get(stream_id)

    def read(
        self, found: Found, after: int, heartbeat: float, *, live_only: bool = False
    ) -> AsyncIterator[bytes] | None:
        """The encoded events after index ``after``, then live ones with heartbeats; None
        when there is nothing more, ever (or, ``live_only``, when the stream has finished)."""
        assert isinstance(found, Stream), "a memory store holds only its own streams"
        if found.closed and (live_only or after >= found.visible - 1):
            return None
        return found.read(after, heartbeat)

    async def cancel(self, found: Found) -> bool:
        """Stop a stream wherever it is produced: whether it was still running."""
        assert isinstance(found, Stream), "a memory store holds only its own streams"
        return found.cancel("cancelled")

    def live(self) -> list[Stream]:
        return [stream for stream in self._streams.values() if not stream.finished]

    def stalled_readers(self, since: float) -> list[Reader]:
        """Readers whose current write began before ``since`` (loop time)."""
        return [
            reader
            for stream in self._streams.values()
            for reader in stream.readers
            if 0.0 < reader.sending_since < since
        ]

    # -- which stream answers an AI SDK chat (for its resume route) ----------------------
    async def remember_chat(self, key: str, stream_id: str) -> None:
        chats = self._chats
        chats[key] = stream_id
        chats.move_to_end(key)
        while len(chats) > self._chat_limit:
            chats.popitem(last=False)

    async def active_chat(self, key: str) -> str | None:
        return self._chats.get(key)

    # -- a stream's listener -------------------------------------------------------------
    def changed(self, stream: Stream) -> None:
        stream.publish(len(stream.events))  # memory: the stream is its own record

    def finished(self, stream: Stream) -> None:
        timer = self._grace.pop(stream.id, None)
        if timer is not None:
            timer.cancel()
        size = sum(map(len, stream.events))
        self._finished.append((stream, size))
        self.finished_bytes += size
        self._evict()
        self._finished_published(stream)

    def _finished_published(self, stream: Stream) -> None:
        """The last event is where readers can see it: they end after it."""
        stream.close()

    def left(self, stream: Stream) -> None:
        stream.close()

    def idle(self, stream: Stream) -> None:
        """The last reader left before the end: ``CLAUDE_RESUME_GRACE`` seconds to return."""
        self._arm_grace(stream, self.resume_grace)

    def returned(self, stream: Stream) -> None:
        timer = self._grace.pop(stream.id, None)
        if timer is not None:
            timer.cancel()

    def _arm_grace(self, stream: Stream, delay: float) -> None:
        previous = self._grace.pop(stream.id, None)
        if previous is not None:
            previous.cancel()
        self._grace[stream.id] = asyncio.get_running_loop().call_later(
            delay, self._grace_over, stream
        )

    def _grace_over(self, stream: Stream) -> None:
        self._grace.pop(stream.id, None)
        if not stream.readers and not stream.finished:
            self._unread(stream)

    def _unread(self, stream: Stream) -> None:
        """Nobody came back within the grace: stop paying for tokens nobody will read."""
        stream.cancel("disconnected")

    def _evict(self) -> None:
        finished = self._finished
        if not finished:
            return
        horizon = time.monotonic() - self.ttl
        while finished and (
            len(finished) > self.max_finished
            or self.finished_bytes > self.max_bytes
            or (finished[0][0].finished_at or 0) < horizon
        ):
            stream, size = finished.popleft()
            self.finished_bytes -= size
            self._streams.pop(stream.id, None)
