"""Where streams live: one :class:`StreamStore` the state calls and never branches on.

A store is a composition of three parts, each with one job:

- a :class:`Registry` of the streams this worker produces, live and (until they expire)
  finished, so a reader here finds them without a round trip;
- a :class:`Mirror`, where a stream's events go before readers may see them: nowhere
  (:class:`NoMirror`, memory: published at once) or Redis (``redis_mirror.RedisMirror``:
  published once stored, so an event any reader has seen survives its producer);
- a :class:`Remote`, how other workers' streams are found, read and stopped: none
  (:class:`NoRemote`) or Redis (``redis_remote.RedisRemote``, which also claims a stream
  whose producer died and hands it to :attr:`StreamStore.take_over`).

The store is each stream's listener (:class:`~.stream.StreamListener`): it owns what follows
from a stream's life, the resume grace when its last reader leaves (a reader that comes back
in time keeps it; otherwise the producer is stopped: nobody pays for tokens nobody reads),
the eviction of finished streams, and handing events to the mirror. Its timings come in as
one :class:`Timings`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .stream import Cancel, Reader, Stream

if TYPE_CHECKING:
    from .redis_link import RedisLink

__all__ = [
    "Claim",
    "Found",
    "Mirror",
    "NoMirror",
    "NoRemote",
    "Registry",
    "Remote",
    "RemoteStream",
    "StreamStore",
    "TakeOver",
    "Timings",
    "memory_store",
]


@dataclass(frozen=True, slots=True)
class Timings:
    """How long things last (seconds): the store's, its mirror's and its remote reader's."""

    ttl: float = 300.0  # a finished stream is kept for resume
    resume_grace: float = 30.0  # an unread live stream waits for a reader to come back
    lease: float = 3.0  # a producer that has not renewed within it is gone (Redis)
    flush_window: float = 0.005  # what arrives within it goes to Redis in one round trip
    live_ttl: int = 3600  # a live stream's keys outlive any answer (Redis)

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease * 1000))

    @property
    def lease_refresh(self) -> float:
        """A producer renews its leases this often: a lease survives five missed renewals."""
        return self.lease / 6

    @property
    def liveness_interval(self) -> float:
        """How often a remote reader of a silent stream looks at its producer's lease."""
        return min(1.0, self.lease / 3)


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
    request: dict[str, Any]  # as the first write stored it
    usage: dict[str, Any]  # upstream usage of every request so far
    events: list[bytes]  # every stored event, encoded
    handoff: bool  # released by a draining worker (not a crash)
    steps: list[dict[str, Any]] = field(default_factory=list)  # a tool loop's, so far


#: What the state does with a claim: start a producer that continues the stream (False when
#: it cannot, e.g. at capacity; the claim then lapses and another worker may take it).
TakeOver = Callable[[Claim], Awaitable[bool]]


class Registry:
    """The streams this worker produces: live ones, and finished ones until they expire.

    Live streams are bounded by ``CLAUDE_MAX_CONCURRENT_STREAMS`` (the state checks before it
    opens one); finished ones by ``ttl``, by count (``max_finished``) and by the bytes of
    their events (``max_bytes``), oldest evicted first. Each ``add`` evicts what has expired,
    so memory stays flat under any load.
    """

    def __init__(self, ttl: float, max_finished: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        self.finished_bytes: int = 0
        self._streams: dict[str, Stream] = {}
        self._finished: deque[tuple[Stream, int]] = deque()  # in the order they finished

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream) -> None:
        self.evict()
        self._streams[stream.id] = stream

    def get(self, stream_id: str) -> Stream | None:
        self.evict()
        return self._streams.get(stream_id)

    def drop(self, stream: Stream) -> None:
        """This worker no longer produces ``stream`` (it goes on elsewhere)."""
        self._streams.pop(stream.id, None)

    def finished(self, stream: Stream) -> None:
        size = sum(map(len, stream.events))
        self._finished.append((stream, size))
        self.finished_bytes += size
        self.evict()

    def live(self) -> list[Stream]:
        return [stream for stream in self._streams.values() if not stream.finished]

    def readers(self) -> list[Reader]:
        return [reader for stream in self._streams.values() for reader in stream.readers]

    def evict(self) -> None:
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


class Mirror(Protocol):
    """Where a stream's events go before its readers may see them (see the module doc)."""

    #: whether a draining worker hands its streams to others (else it ends them)
    hands_off: bool

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...

    async def open(self, stream: Stream, request: dict[str, Any]) -> None:
        """A new stream produced here (``request``: what another worker needs to continue
        it). Raises :class:`~.stream.StoreUnavailable` when it cannot be stored."""

    def adopt(self, claim: Claim, stream: Stream) -> None:
        """``stream``, holding the claim's events, is produced here from now on."""

    def changed(self, stream: Stream) -> None:
        """Events were appended (or the stream finished): publish them once stored."""

    def finished(self, stream: Stream) -> None:
        """The last event is appended: close the stream once it is stored."""

    def left(self, stream: Stream) -> None:
        """The producer stopped without a last event (a hand-off or a takeover)."""

    async def hand_off(self) -> None:
        """Let the streams this draining worker left go on elsewhere."""


class Remote(Protocol):
    """How this worker finds, reads and stops streams other workers produce."""

    def bind(self, store: StreamStore) -> None:
        """The store it serves: its ``closing`` and its ``take_over`` (for claims)."""

    async def lookup(self, stream_id: str) -> RemoteStream | None: ...

    def read(
        self, found: RemoteStream, after: int, heartbeat: float, *, live_only: bool
    ) -> AsyncIterator[bytes] | None: ...

    async def cancel(self, found: RemoteStream) -> bool: ...

    async def read_elsewhere(self, stream_id: str) -> bool:
        """Whether a reader on another worker follows the stream (the grace counts them)."""

    async def remember_chat(self, key: str, stream_id: str) -> None: ...
    async def active_chat(self, key: str) -> str | None: ...


class NoMirror:
    """One worker's memory: events are published the moment they are appended."""

    hands_off = False

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def open(self, stream: Stream, request: dict[str, Any]) -> None:
        pass

    def adopt(self, claim: Claim, stream: Stream) -> None:
        stream.events.extend(claim.events)
        stream.publish(len(stream.events))

    def changed(self, stream: Stream) -> None:
        stream.publish(len(stream.events))

    def finished(self, stream: Stream) -> None:
        stream.close()

    def left(self, stream: Stream) -> None:
        stream.close()

    async def hand_off(self) -> None:
        pass


class NoRemote:
    """No other worker's streams: a stream not produced here does not exist."""

    def bind(self, store: StreamStore) -> None:
        pass

    async def lookup(self, stream_id: str) -> RemoteStream | None:
        return None

    def read(
        self, found: RemoteStream, after: int, heartbeat: float, *, live_only: bool
    ) -> AsyncIterator[bytes] | None:
        return None

    async def cancel(self, found: RemoteStream) -> bool:
        return False

    async def read_elsewhere(self, stream_id: str) -> bool:
        return False

    async def remember_chat(self, key: str, stream_id: str) -> None:
        pass

    async def active_chat(self, key: str) -> str | None:
        return None


class StreamStore:
    """The streams of one app in one worker, and (with a shared mirror) of every worker."""

    def __init__(
        self,
        registry: Registry,
        mirror: Mirror,
        remote: Remote,
        timings: Timings,
        *,
        link: RedisLink | None = None,
        chats: int = 10_000,
    ) -> None:
        self.registry = registry
        self.mirror = mirror
        self.remote = remote
        self.timings = timings
        #: the Redis connection the mirror and the remote share (None: memory), which other
        #: features share too (rate limits, budgets, fallback cooldowns)
        self.link: RedisLink | None = link
        #: set when the worker drains: readers of other workers' streams end with shutdown
        self.closing: asyncio.Event = asyncio.Event()
        #: set by the state: how a stream the remote reader claimed is continued
        self.take_over: TakeOver | None = None
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._chats: OrderedDict[str, str] = OrderedDict()
        self._chat_limit = chats
        self._background: set[asyncio.Task[None]] = set()
        #: the hot path (one per appended event) goes straight to the mirror
        self.changed: Callable[[Stream], None] = mirror.changed
        remote.bind(self)

    def __len__(self) -> int:
        return len(self.registry)

    @property
    def hands_off(self) -> bool:
        """Whether a draining worker hands its streams to others (else it ends them)."""
        return self.mirror.hands_off

    # -- lifetime ------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        """The shared Redis client (connected while the store is started), or None."""
        return self.link.redis if self.link is not None else None

    async def start(self) -> None:
        if self.link is not None:
            await self.link.connect()
        await self.mirror.start()

    async def close(self) -> None:
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()
        await self.mirror.close()
        if self.link is not None:
            await self.link.close()

    async def ping(self) -> bool:
        """Whether the store can serve (``/ready``)."""
        return await self.mirror.ping()

    # -- streams -------------------------------------------------------------------------
    async def open(self, stream: Stream, request: dict[str, Any] | None = None) -> None:
        """Hold a new stream this worker produces (``request``: what another worker would
        need to continue it). Raises :class:`~.stream.StoreUnavailable` when a shared store
        cannot take it."""
        stream.listener = self
        await self.mirror.open(stream, request or {})
        self.registry.add(stream)

    def adopt(self, claim: Claim, stream: Stream) -> None:
        """Produce ``stream`` here from now on, holding the claim's events."""
        stream.listener = self
        self.registry.add(stream)
        self.mirror.adopt(claim, stream)
        self.idle(stream)  # no reader here yet: the grace counts readers everywhere

    def get(self, stream_id: str) -> Stream | None:
        """A stream this worker holds."""
        return self.registry.get(stream_id)

    async def lookup(self, stream_id: str) -> Found | None:
        """The stream wherever it is produced, or None."""
        local = self.registry.get(stream_id)
        return local if local is not None else await self.remote.lookup(stream_id)

    def read(
        self, found: Found, after: int, heartbeat: float, *, live_only: bool = False
    ) -> AsyncIterator[bytes] | None:
        """The encoded events after index ``after``, then live ones with heartbeats; None
        when there is nothing more, ever (or, ``live_only``, when the stream has finished)."""
        if isinstance(found, RemoteStream):
            return self.remote.read(found, after, heartbeat, live_only=live_only)
        if found.closed and (live_only or after >= found.visible - 1):
            return None
        return found.read(after, heartbeat)

    async def cancel(self, found: Found) -> bool:
        """Stop a stream wherever it is produced: whether it was still running."""
        if isinstance(found, RemoteStream):
            return await self.remote.cancel(found)
        return found.cancel(Cancel.CANCELLED)

    def live(self) -> list[Stream]:
        return self.registry.live()

    def stalled_readers(self, since: float) -> list[Reader]:
        """Readers whose current write began before ``since`` (loop time)."""
        return [r for r in self.registry.readers() if 0.0 < r.sending_since < since]

    async def hand_off(self) -> None:
        """Let the streams this draining worker left go on elsewhere (with a shared store)."""
        await self.mirror.hand_off()

    # -- which stream answers an AI SDK chat (for its resume route) ----------------------
    async def remember_chat(self, key: str, stream_id: str) -> None:
        chats = self._chats
        chats[key] = stream_id
        chats.move_to_end(key)
        while len(chats) > self._chat_limit:
            chats.popitem(last=False)
        await self.remote.remember_chat(key, stream_id)

    async def active_chat(self, key: str) -> str | None:
        shared = await self.remote.active_chat(key)
        return shared if shared is not None else self._chats.get(key)

    # -- a stream's listener -------------------------------------------------------------
    def finished(self, stream: Stream) -> None:
        self._cancel_grace(stream)
        self.registry.finished(stream)
        self.mirror.finished(stream)

    def left(self, stream: Stream) -> None:
        self.mirror.left(stream)

    def idle(self, stream: Stream) -> None:
        """The last reader left before the end: ``CLAUDE_RESUME_GRACE`` seconds to return."""
        self._arm_grace(stream, self.timings.resume_grace)

    def returned(self, stream: Stream) -> None:
        self._cancel_grace(stream)

    def _cancel_grace(self, stream: Stream) -> None:
        timer = self._grace.pop(stream.id, None)
        if timer is not None:
            timer.cancel()

    def _arm_grace(self, stream: Stream, delay: float) -> None:
        self._cancel_grace(stream)
        self._grace[stream.id] = asyncio.get_running_loop().call_later(
            delay, self._grace_over, stream
        )

    def _grace_over(self, stream: Stream) -> None:
        self._grace.pop(stream.id, None)
        if stream.readers or stream.finished:
            return
        # readers on other workers count too: ask before stopping the producer
        task = asyncio.get_running_loop().create_task(self._stop_unless_read(stream))
        self._background.add(task)  # a reference, so it is not collected mid-flight
        task.add_done_callback(self._background.discard)

    async def _stop_unless_read(self, stream: Stream) -> None:
        """Nobody came back within the grace: stop paying for tokens nobody will read."""
        elsewhere = await self.remote.read_elsewhere(stream.id)
        if stream.readers or stream.finished or stream.id in self._grace:
            return  # a reader came back meanwhile
        if elsewhere:
            self._arm_grace(stream, self.timings.lease_refresh * 4)  # look again later
        else:
            stream.cancel(Cancel.DISCONNECTED)


def memory_store(timings: Timings, *, max_finished: int, max_bytes: int) -> StreamStore:
    """The streams of one worker, in its memory."""
    registry = Registry(timings.ttl, max_finished, max_bytes)
    return StreamStore(registry, NoMirror(), NoRemote(), timings)
