"""Learn that the server is stopping *before* Hypercorn waits for open streams.

Hypercorn 0.18 on Python >= 3.12 waits for every open connection before its graceful timeout
starts (pgjones/hypercorn#308), and it tells the app nothing until lifespan shutdown, which
comes after that wait. So a stream would hold a stopping server open. Two hooks end the wait:

- ``hypercorn -w N`` (N >= 1, the CLI default): the parent stops its workers by setting a
  ``multiprocessing`` event it passes to each worker as the ``shutdown_event`` keyword; the
  worker polls it every 0.1 s. We poll the same event.
- SIGTERM delivered to this process (``hypercorn -w 0``, or a signal to the whole process
  group): we chain a handler before the previous one.

Either way :meth:`ClaudeState.drain` ends every open stream with a retryable ``shutdown``
event, so connections close and Hypercorn's own shutdown proceeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

__all__ = ["VERIFIED_HYPERCORN", "ShutdownHooks", "hypercorn_verified"]

log = logging.getLogger("quart_claude")


#: The Hypercorn releases whose worker processes were checked to carry ``shutdown_event`` in
#: ``multiprocessing.Process._kwargs`` (a private attribute: there is no public seam). Outside
#: this range the hook may find nothing; ``quart_claude.serving.run`` is the public path.
VERIFIED_HYPERCORN = ((0, 18), (0, 19))  # >= 0.18, < 0.19


def hypercorn_verified(version: str) -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    low, high = VERIFIED_HYPERCORN
    return low <= parts < high


def _hypercorn_shutdown_event() -> Any:
    """The shutdown event Hypercorn's parent passed to this worker process, if any."""
    process = multiprocessing.current_process()
    kwargs = getattr(process, "_kwargs", None)  # the Process(kwargs=...) Hypercorn spawned us with
    event = kwargs.get("shutdown_event") if isinstance(kwargs, dict) else None
    return event if callable(getattr(event, "is_set", None)) else None


def _warn_if_unhooked(found: bool) -> None:
    """Say loudly when the private hook cannot work here, instead of failing silently."""
    version = importlib.metadata.version("hypercorn")
    if multiprocessing.parent_process() is None:
        return  # not a worker process: SIGTERM reaches us directly
    if not found:
        log.warning(
            "quart-claude: this worker process has no Hypercorn shutdown event (Hypercorn %s; "
            "checked on 0.18.x): open streams will not be drained before Hypercorn waits on "
            "them. Serve with quart_claude.serving.run(app) for a guaranteed drain.",
            version,
        )
    elif not hypercorn_verified(version):
        log.warning(
            "quart-claude: the shutdown hook reads a private Hypercorn attribute checked on "
            "0.18.x; this is Hypercorn %s. quart_claude.serving.run(app) is the public path.",
            version,
        )


class ShutdownHooks:
    def __init__(self, drain: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._drain = drain
        self._watcher: asyncio.Task[None] | None = None
        self._previous: Any = None
        self._installed = False
        self._draining: asyncio.Task[None] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        event = _hypercorn_shutdown_event()
        _warn_if_unhooked(event is not None)
        if event is not None:
            self._watcher = loop.create_task(self._watch(event))
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._make_handler(loop))
            self._installed = True

    def uninstall(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    async def _watch(self, event: Any) -> None:
        # a multiprocessing.Event cannot be awaited; Hypercorn polls it the same way
        while not event.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await self._drain()

    def _start_drain(self) -> asyncio.Task[None]:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return self._draining

    def _make_handler(
        self, loop: asyncio.AbstractEventLoop
    ) -> Callable[[int, FrameType | None], None]:
        previous = self._previous

        def handler(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self._after_signal, previous)
            if callable(previous):
                previous(signum, frame)

        return handler

    def _after_signal(self, previous: Any) -> None:
        task = self._start_drain()
        if previous == signal.SIG_DFL:
            # Nobody else handles SIGTERM here (a lone Hypercorn worker): the default was to
            # die at once. Die after the streams have said goodbye, unless the parent asked
            # for a normal stop meanwhile.
            task.add_done_callback(
                lambda _: asyncio.get_running_loop().call_later(1.0, self._die_unless_stopping)
            )

    def _die_unless_stopping(self) -> None:
        event = _hypercorn_shutdown_event()
        if event is not None and event.is_set():
            return
        with contextlib.suppress(Exception):
            self.uninstall()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
