"""The documented loop for httpx-sse (docs/deployment.md), a client users reach for, against
a real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from quart import Quart

from quart_claude.testing import Emulator, Reply

from .helpers import serving

pytestmark = pytest.mark.server

ANSWER = "one two three four five"


async def test_httpx_sse_with_the_documented_loop(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.3))  # pings flow between tokens
    events: list[dict[str, Any]] = []
    empty = 0
    async with serving(make_app(heartbeat_interval=0.1)) as url, httpx.AsyncClient() as client:
        async with aconnect_sse(
            client, "POST", url + "/chat/stream", json={"message": "hi"}
        ) as source:
            async for sse in source.aiter_sse():
                if not sse.data:
                    empty += 1
                    continue  # a heartbeat, not an event
                event = json.loads(sse.data)
                events.append(event)
                if event["type"] in ("done", "error"):
                    break
    assert empty > 0  # the trap is real: json.loads(sse.data) would have raised here
    assert "".join(e["text"] for e in events if e["type"] == "delta") == ANSWER
    assert events[-1]["type"] == "done"
