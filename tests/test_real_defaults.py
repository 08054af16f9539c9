"""What holds on the shipped defaults, in real time: a stream longer than the 60 seconds that
Quart's ``RESPONSE_TIMEOUT`` and Gunicorn's worker ``timeout`` could cut. One test, both front
ends at once (Hypercorn in this process, Gunicorn with deploy/gunicorn.conf.py), so the minute
is paid once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply

from .conftest import API_KEY
from .helpers import gunicorn_serving, serving, stream_chat

pytestmark = [pytest.mark.system, pytest.mark.deps]

TICKS = "tick " * 32  # 2 s apart: 62 s in all


async def test_a_stream_longer_than_60_seconds_completes_on_both_front_ends(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.default = Reply(TICKS, token_delay=2.0)
    options = {"api_key": API_KEY, "base_url": emulator.url}
    async with serving(make_app()) as quart_url, gunicorn_serving(options) as flask_url:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    stream_chat(http, url + "/chat/stream", {"message": "slow"})
                    for url in (quart_url, flask_url)
                )
            ),
            120,
        )
    assert time.monotonic() - started > 60
    for result in results:
        assert result.types[-1] == "done"
        assert result.text == TICKS
