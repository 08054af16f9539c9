"""This worker's producer tasks: one per stream it produces, counted per worker (the
``CLAUDE_MAX_CONCURRENT_STREAMS`` check) and per client (``CLAUDE_MAX_STREAMS_PER_CLIENT``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .stream import Stream

__all__ = ["Producers"]


class Producers:
    """The tasks producing streams here, and how many each client has."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self._per_client: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.tasks)

    def of(self, client: str) -> int:
        """Open streams this worker produces for ``client`` (an identity or an address)."""
        return self._per_client.get(client, 0)

    def start(self, stream: Stream, work: Coroutine[Any, Any, None], client: str) -> None:
        """Run ``work`` as the stream's producer task, counted per worker and per client."""
        task = asyncio.get_running_loop().create_task(work)
        stream.producer = task
        self.tasks.add(task)
        self._per_client[client] = self._per_client.get(client, 0) + 1

        def done(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            # a finished stream is kept for resume (CLAUDE_STREAM_TTL); its task is not: the
            # task holds the context it was created in, and so the whole request (Quart's
            # request context, its headers, the server's connection state)
            if stream.producer is task:
                stream.producer = None
            left = self._per_client.pop(client, 1) - 1
            if left:
                self._per_client[client] = left

        task.add_done_callback(done)
