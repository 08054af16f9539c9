"""Serve an app with Hypercorn so that shutdown drains open streams first.

Hypercorn 0.18 on Python >= 3.12 waits for every open connection before its graceful timeout
starts (pgjones/hypercorn#308), so a long stream holds a SIGTERM'd server open. :func:`run`
serves with a shutdown trigger that first ends every open stream with a retryable
``shutdown`` error event, then lets Hypercorn stop.

    from quart_claude.serving import run
    run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from ._quart import Claude

__all__ = ["drain", "run", "serve_app"]


async def drain(app: Quart) -> None:
    """End every open stream of ``app`` with a ``shutdown`` error event; refuse new ones."""
    await Claude.state(app).drain()


async def serve_app(app: Quart, config: Config, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain streams, then shut Hypercorn down."""

    async def trigger() -> None:
        await stop.wait()
        await drain(app)

    await serve(app, config, shutdown_trigger=trigger)


def run(app: Quart, *, host: str = "127.0.0.1", port: int = 8000, **config: Any) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, on uvloop when it is installed.

    Extra keyword arguments set Hypercorn config attributes (``graceful_timeout=5``, ...).
    """
    hypercorn_config = Config()
    hypercorn_config.bind = [f"{host}:{port}"]
    for name, value in config.items():
        setattr(hypercorn_config, name, value)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve_app(app, hypercorn_config, stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
