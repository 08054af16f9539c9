"""The Flask front end's event loop thread ends as ``asyncio.run`` ends a loop: what is still
pending when the backend has shut down (a grace timer, a Redis reader) is cancelled and let
run its ``finally``, so nothing it holds is left open for the collector to warn about."""

from __future__ import annotations

import asyncio
import threading

import pytest
from flask import Flask

from quart_claude.flask import Claude

pytestmark = pytest.mark.core


def test_stopping_the_loop_thread_cancels_what_is_pending_and_lets_it_clean_up() -> None:
    app = Flask(__name__)
    Claude(app, api_key="sk-test", base_url="http://127.0.0.1:9")
    runner = app.extensions["claude.loop"]
    loop = runner.ensure_started()
    cleaned = threading.Event()

    async def holds_a_connection() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    async def start() -> None:
        asyncio.get_running_loop().create_task(holds_a_connection())

    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    runner.stop()
    assert cleaned.is_set()
    assert loop.is_closed()
