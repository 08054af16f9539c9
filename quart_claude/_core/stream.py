"""A stream: the ordered, already-encoded events of one generation, and its readers.

The producer (:mod:`.relay`) appends; every HTTP response reads from an index. Appending is
O(1) and resolves the futures its waiting readers sleep on; a reader that wakes
takes every event that is waiting as one write. Events are encoded exactly once, here.

A stream tells one listener, its store (:mod:`.store`), what happens to it: an event was
added, it finished, its last reader left, a reader came back. The store owns everything
that follows from those (mirroring to Redis, the resume grace, eviction), and decides when
readers see an event: :meth:`Stream.publish` (the memory store at once; the Redis store once
the event is in Redis, so an event a reader has seen survives its producer) and
:meth:`Stream.close` (no more events here: readers end, with an ``epilogue`` frame when the
stream goes on elsewhere).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .sse import PING, data_line, frame

__all__ = [
    "Cancel",
    "Phase",
    "Reader",
    "StoreUnavailable",
    "Stream",
    "StreamListener",
    "new_stream_id",
]


class Phase(enum.Enum):
    """Where a stream's producer is: it only moves forward, from RUNNING to one of the others."""

    RUNNING = "running"
    FINISHED = "finished"  # the last event (done or error) is appended
    LEFT = "left"  # stopped without a last event: the stream goes on elsewhere


class Cancel(enum.StrEnum):
    """Why a producer was asked to stop (also the outcome its metrics and logs carry)."""

    CANCELLED = "cancelled"  # a client's DELETE: ends with ``done``, ``stop_reason: cancelled``
    DISCONNECTED = "disconnected"  # nobody came back within the resume grace
    SHUTDOWN = "shutdown"  # the worker drains and nobody can continue it: a retryable error
    HANDOFF = "handoff"  # the worker drains and another one continues it: no last event
    SUPERSEDED = "superseded"  # another worker took it over: no last event

    @property
    def goes_on(self) -> bool:
        """Whether another worker continues the stream (so this one appends no last event)."""
        return self in (Cancel.HANDOFF, Cancel.SUPERSEDED)


class StoreUnavailable(Exception):
    """The shared stream store (Redis) failed a lookup: answered 503, never 500."""


def new_stream_id() -> str:
    """128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


class StreamListener(Protocol):
    """What a stream tells its store."""

    def changed(self, stream: Stream) -> None:
        """An event was appended (or the stream finished): publish it when it is safe."""

    def finished(self, stream: Stream) -> None:
        """The stream has its last event: close it when it is published."""

    def left(self, stream: Stream) -> None:
        """The producer stopped here without a last event (hand-off, superseded)."""

    def idle(self, stream: Stream) -> None:
        """The last reader left before the end."""

    def returned(self, stream: Stream) -> None:
        """A reader started reading."""


class _Unlisted:
    """The listener of a stream no store holds (tests, tools): published and closed at once."""

    def changed(self, stream: Stream) -> None:
        stream.publish(len(stream.events))

    def finished(self, stream: Stream) -> None:
        stream.close()

    def left(self, stream: Stream) -> None:
        stream.close()

    def idle(self, stream: Stream) -> None:
        pass

    returned = idle


_UNLISTED = _Unlisted()


class Reader:
    """One response reading a stream. ``sending_since`` is when its current write began (0:
    not writing), so a client that stopped reading can be found and let go."""

    __slots__ = ("sending_since", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.sending_since = 0.0


class Stream:
    __slots__ = (
        "_retry_ms",
        "_waiters",
        "cancel_reason",
        "closed",
        "created_at",
        "epilogue",
        "events",
        "finished_at",
        "id",
        "listener",
        "owner",
        "phase",
        "producer",
        "readers",
        "steps",
        "steps_version",
        "superseded",
        "usage_of",
        "visible",
    )

    def __init__(
        self, stream_id: str, *, retry_ms: int | None = None, owner: str | None = None
    ) -> None:
        self.id: str = stream_id
        self.owner: str | None = (
            owner  # the identity allowed to read or stop it (None: anyone with the id)
        )
        self.events: list[bytes] = []
        self.visible: int = 0  # how many events readers may see (the store publishes them)
        self.phase: Phase = Phase.RUNNING
        self.closed: bool = False  # no more events will be published here: readers end
        self.epilogue: bytes | None = None  # sent to readers after the last one, if closed so
        self.finished_at: float | None = None
        self.created_at: float = time.monotonic()
        self.readers: set[Reader] = set()
        self.listener: StreamListener = _UNLISTED  # set by the store that holds it
        self.producer: asyncio.Task[None] | None = None  # the state sets it; None once done
        self.cancel_reason: Cancel | None = None
        #: the producer's answer's usage so far (every request, the current one as last
        #: reported), which the store mirrors, so another worker that takes the stream over
        #: can sum it
        self.usage_of: Callable[[], dict[str, Any]] = dict
        #: the producer's answer's steps of a tool loop (see :mod:`.answer`): each message's
        #: content and its tools' results, mirrored so nothing runs twice
        self.steps: list[dict[str, Any]] = []
        self.steps_version: int = 0  # counts changes to ``steps``, for the store to mirror
        #: another worker took the stream over: this one's end is not the stream's
        self.superseded: bool = False
        self._retry_ms = retry_ms
        self._waiters: list[asyncio.Future[bool]] = []

    @property
    def finished(self) -> bool:
        """The producer is done here: it appended its last event, or left (see :meth:`leave`)."""
        return self.phase is not Phase.RUNNING

    @property
    def usage(self) -> dict[str, Any]:
        return self.usage_of()

    @property
    def left(self) -> bool:
        """The producer stopped here without a last event: the stream goes on elsewhere."""
        return self.phase is Phase.LEFT

    # -- producer side -------------------------------------------------------------------
    def append(self, payload: dict[str, Any]) -> None:
        """Encode ``payload`` as the next event (its ``id`` is its index) and wake readers."""
        self.append_data(data_line(payload))

    def append_data(self, data: bytes) -> None:
        """Append an event whose ``data: ...`` line is already encoded (the delta fast path)."""
        events = self.events
        index = len(events)
        events.append(frame(data, index, self._retry_ms if index == 0 else None))
        self.listener.changed(self)

    def add_step(self, step: dict[str, Any]) -> None:
        self.steps.append(step)
        self.steps_version += 1

    def steps_changed(self) -> None:
        """A step recorded a result: the store mirrors it with the next event."""
        self.steps_version += 1

    def finish(self) -> None:
        """The last event is appended (done or error)."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.FINISHED
            self.finished_at = time.monotonic()
            self.listener.changed(self)
            self.listener.finished(self)

    def leave(self) -> None:
        """The producer stopped without a last event: the stream goes on elsewhere (or was
        taken over); the store decides what this worker's readers are told."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.LEFT
            self.finished_at = time.monotonic()
            self.listener.left(self)

    # -- the store's side ----------------------------------------------------------------
    def publish(self, count: int) -> None:
        """Readers may now see the first ``count`` events."""
        if count > self.visible:
            self.visible = count
            self._wake()

    def close(self, epilogue: bytes | None = None) -> None:
        """Nothing more is published here: readers send what is visible (then ``epilogue``)
        and end."""
        if not self.closed:
            self.closed = True
            self.epilogue = epilogue
            self._wake()

    async def settled(self, within: float) -> bool:
        """Wait until nothing more is published here: the last event is in the store, or
        another worker took the stream over (its end is then that worker's). Whether this
        producer's end is the stream's: True too when the store could not say in
        ``within`` seconds (then no other worker can claim it either)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.closed:
            left = deadline - loop.time()
            if left <= 0:
                break
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiters.append(waiter)
            await asyncio.wait({waiter}, timeout=left)
        return not self.superseded

    def cancel(self, reason: Cancel) -> bool:
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
        self.listener.returned(self)
        loop = asyncio.get_running_loop()
        beat = _Heartbeat(loop, heartbeat)
        try:
            while True:
                count = self.visible
                if count > position:
                    events = self.events
                    chunk = (
                        events[position]
                        if count - position == 1
                        else _joined(events, position, count)
                    )
                    position = count
                    reader.sending_since = beat.moved()
                    yield chunk
                    reader.sending_since = 0.0
                    continue
                if self.closed:
                    if self.epilogue is not None:
                        yield self.epilogue
                    return
                waiting = beat.wait()
                self._waiters.append(waiting)
                if await waiting:
                    reader.sending_since = beat.moved()
                    yield PING
                    reader.sending_since = 0.0
        finally:
            beat.cancel()
            self.readers.discard(reader)
            if not self.readers and not self.finished:
                self.listener.idle(self)


def _joined(events: list[bytes], start: int, end: int) -> bytes:
    return b"".join(events[start:end])


class _Heartbeat:
    """One reader's heartbeat: one timer, re-armed lazily (sending an event only moves the
    deadline, so the per-event cost is a float store, not a timer). The future a reader waits
    on resolves True when it has been silent for a whole interval."""

    __slots__ = ("deadline", "interval", "loop", "timer", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.deadline = loop.time() + interval
        self.waiting: asyncio.Future[bool] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def moved(self) -> float:
        """Something is sent now: the next ping is an interval away. Returns now."""
        now = self.loop.time()
        self.deadline = now + self.interval
        return now

    def wait(self) -> asyncio.Future[bool]:
        self.waiting = waiting = self.loop.create_future()
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._fire)
        return waiting

    def _fire(self) -> None:
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._fire)
            return
        self.timer = None
        waiting = self.waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(True)  # True: silent for a whole interval

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
