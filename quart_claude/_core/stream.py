"""A stream: the ordered, already-encoded events of one generation, and its readers.

The producer (:mod:`._relay`) appends; every HTTP response reads from an index. Appending is
O(1) and resolves the futures its waiting readers sleep on; a reader that wakes
takes every event that is waiting as one write. Events are encoded exactly once, here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from .sse import PING, data_line, frame

__all__ = ["Reader", "StoreUnavailable", "Stream", "StreamRegistry", "new_stream_id"]


class StoreUnavailable(Exception):
    """The shared stream store (Redis) failed a lookup: answered 503, never 500."""


def new_stream_id() -> str:
    """128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


class Reader:
    """One response reading a stream. ``sending_since`` is when its current write began (0:
    not writing), so a client that stopped reading can be found and let go."""

    __slots__ = ("sending_since", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.sending_since = 0.0


class Stream:
    __slots__ = (
        "_on_finish",
        "_on_idle",
        "_retry_ms",
        "_waiters",
        "cancel_reason",
        "created_at",
        "events",
        "finished",
        "finished_at",
        "id",
        "idle_timer",
        "mirror",
        "owner",
        "producer",
        "readers",
    )

    def __init__(
        self,
        stream_id: str,
        *,
        retry_ms: int | None = None,
        owner: str | None = None,
        on_idle: Callable[[Stream], None] | None = None,
    ) -> None:
        self.id: str = stream_id
        self.owner: str | None = (
            owner  # the identity allowed to read or stop it (None: anyone with the id)
        )
        self.events: list[bytes] = []
        self.finished: bool = False
        self.finished_at: float | None = None
        self.created_at: float = time.monotonic()
        self.readers: set[Reader] = set()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.mirror: Callable[[Stream], None] | None = None  # e.g. the Redis store
        self.producer: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self._retry_ms = retry_ms
        self._waiters: list[asyncio.Future[bool]] = []
        self._on_idle = on_idle
        self._on_finish: Callable[[Stream], None] | None = None

    # -- producer side -------------------------------------------------------------------
    def append(self, payload: dict[str, Any]) -> None:
        """Encode ``payload`` as the next event (its ``id`` is its index) and wake readers."""
        self.append_data(data_line(payload))

    def append_data(self, data: bytes) -> None:
        """Append an event whose ``data: ...`` line is already encoded (the delta fast path)."""
        events = self.events
        index = len(events)
        events.append(frame(data, index, self._retry_ms if index == 0 else None))
        self._wake()
        if self.mirror is not None:
            self.mirror(self)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.finished_at = time.monotonic()
            self._wake()
            if self.mirror is not None:
                self.mirror(self)
            if self._on_finish is not None:
                self._on_finish(self)

    def cancel(self, reason: str) -> bool:
        """Ask the producer to stop; it ends the stream with an event saying why."""
        producer = self.producer
        if self.finished or producer is None or producer.done():
            return False
        if self.cancel_reason is None:
            self.cancel_reason = reason
        producer.cancel()
        return True

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)

    # -- reader side ---------------------------------------------------------------------
    async def read(self, after: int, heartbeat: float) -> AsyncIterator[bytes]:
        """Every event after index ``after``, then live ones until the stream finishes.

        Events already waiting go out as one chunk. After ``heartbeat`` seconds with nothing
        to send, a ``: ping`` comment goes out instead.
        """
        position = after + 1
        reader = Reader(asyncio.current_task())
        self.readers.add(reader)
        if self.idle_timer is not None:  # a reader is back within the grace period
            self.idle_timer.cancel()
            self.idle_timer = None
        loop = asyncio.get_running_loop()
        # One heartbeat timer per reader, re-armed lazily: sending an event only moves the
        # deadline, so the per-event cost is a float store, not a timer.
        deadline = loop.time() + heartbeat
        waiting: asyncio.Future[bool] | None = None
        timer: asyncio.TimerHandle | None = None

        def beat() -> None:
            nonlocal timer
            if loop.time() < deadline:
                timer = loop.call_at(deadline, beat)
                return
            timer = None
            if waiting is not None and not waiting.done():
                waiting.set_result(True)  # True: silent for a whole interval

        try:
            while True:
                events = self.events
                count = len(events)
                if count > position:
                    chunk = (
                        events[position]
                        if count - position == 1
                        else b"".join(events[position:count])
                    )
                    position = count
                    now = loop.time()
                    deadline = now + heartbeat
                    reader.sending_since = now
                    yield chunk
                    reader.sending_since = 0.0
                    continue
                if self.finished:
                    return
                waiting = loop.create_future()
                self._waiters.append(waiting)
                if timer is None:
                    timer = loop.call_at(deadline, beat)
                if await waiting:
                    now = loop.time()
                    deadline = now + heartbeat
                    reader.sending_since = now
                    yield PING
                    reader.sending_since = 0.0
        finally:
            if timer is not None:
                timer.cancel()
            self.readers.discard(reader)
            if not self.readers and not self.finished and self._on_idle is not None:
                self._on_idle(self)


class StreamRegistry:
    """The streams of one app in one worker: live ones, and finished ones until they expire.

    Live streams are bounded by ``CLAUDE_MAX_CONCURRENT_STREAMS`` (checked before one is
    created); finished ones by ``ttl``, by count (``max_finished``) and by the bytes of their
    events (``max_bytes``), oldest evicted first. Each ``add`` evicts what has expired, so
    memory stays flat under any load.
    """

    def __init__(
        self, *, ttl: float = 300.0, max_finished: int = 10_000, max_bytes: int = 256 << 20
    ) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        self.finished_bytes: int = 0
        self._streams: dict[str, Stream] = {}
        self._finished: deque[tuple[Stream, int]] = deque()  # in the order they finished

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream) -> None:
        self._evict()
        stream._on_finish = self._on_finish
        self._streams[stream.id] = stream

    def _on_finish(self, stream: Stream) -> None:
        size = sum(map(len, stream.events))
        self._finished.append((stream, size))
        self.finished_bytes += size
        self._evict()

    def get(self, stream_id: str) -> Stream | None:
        self._evict()
        return self._streams.get(stream_id)

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
