"""The relay served by a real Hypercorn, talking to the emulator through the real SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply
from quart_claude.testing._emulator import billed

from .conftest import HTTP_CLIENT
from .helpers import serving, stream_chat

pytestmark = pytest.mark.server


@pytest.fixture
async def server(serve: Callable[..., Any]) -> AsyncIterator[str]:
    """Each front end's server (conftest's ``serve``): the acceptance tests run on both."""
    async with serve() as url:
        yield url


TRICKY = (
    "Line one\nline two\r\nthree\rfour\n\n"
    'quotes " and \\ backslashes, data: not a field\n'
    "id: 99\nretry: 1\n: not a comment\n"
    "emoji 🎉👩‍👩‍👧 CJK 中文字符 RTL עברית and a tab\there \u2028 \u2029 \x00 end"
)


async def test_streams_text_byte_exact_in_the_v1_protocol(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(TRICKY, tokens=[TRICKY[i : i + 3] for i in range(0, len(TRICKY), 3)]))
    result = await stream_chat(http, server + "/chat/stream", {"message": "hi"})

    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.text == TRICKY
    assert result.types[0] == "start"
    assert result.types[-1] == "done"
    assert set(result.types[1:-1]) == {"delta"}
    assert result.ids == [str(i) for i in range(len(result.events))]

    start, done = result.events[0], result.events[-1]
    assert start["stream_id"] == result.headers["x-stream-id"]
    assert len(start["stream_id"]) >= 22
    assert start["model"] == "claude-sonnet-5-5"
    assert start["message_id"].startswith("msg_")
    assert start["usage"]["input_tokens"] >= 1
    assert "cache_read_input_tokens" in start["usage"]
    assert done["stop_reason"] == "end_turn"
    # a word (an ASCII piece) is a token; pieces of emoji, CJK or Hebrew bill by character
    assert done["usage"]["output_tokens"] == billed(e["text"] for e in result.events[1:-1])
    assert done["usage"]["output_tokens"] > len(result.events) - 2

    # the wire format itself: data line first, then id, then a blank line
    first_block = result.raw.split(b"\n\n")[0].split(b"\n")
    assert first_block[0].startswith(b"data: {")
    assert first_block[1] == b"id: 0"
    assert first_block[2].startswith(b"retry: ")
    for block in result.raw.split(b"\n\n")[1:-1]:
        lines = block.split(b"\n")
        assert lines[0].startswith(b"data: ") and lines[1].startswith(b"id: ")


async def test_request_reaches_upstream_as_asked(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    async with serve(allow_client_system=True) as url:
        result = await stream_chat(
            http,
            url + "/chat/stream",
            {"messages": messages, "max_tokens": 77, "system": "Be terse."},
        )
    assert result.types[-1] == "done"
    (request,) = emulator.requests
    assert request.body["messages"] == messages
    assert request.body["max_tokens"] == 77
    assert request.body["system"] == "Be terse."
    assert request.body["stream"] is True
    assert request.headers["authorization"].startswith("Bearer sk-test")
    if HTTP_CLIENT == "httpx":  # the SDK sends the first-party request: its retries are off
        assert request.headers["x-stainless-retry-count"] == "0"
    else:  # ours (quart_claude/_core/first_party.py), checked against the SDK's in its tests
        assert request.headers["user-agent"].startswith("quart-claude/")


async def test_first_delta_arrives_long_before_the_upstream_finishes(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("one two three four five six seven eight nine ten", token_delay=0.15))
    result = await stream_chat(http, server + "/chat/stream", {"message": "count"})
    (request,) = emulator.requests
    await asyncio.wait_for(request.ended.wait(), 5)  # the emulator records its end after
    assert request.outcome == "completed" and request.ended_at is not None
    first_delta_at = result.received_at[result.types.index("delta")]
    # ten tokens 150 ms apart: the first must arrive more than a second before the last
    assert first_delta_at < request.ended_at - 1.0
    assert result.text == "one two three four five six seven eight nine ten"


async def test_thinking_blocks_are_not_relayed_as_text(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("The answer is 4.", thinking="2 + 2 = 4, obviously"))
    result = await stream_chat(http, server + "/chat/stream", {"message": "2+2?"})
    assert result.text == "The answer is 4."


async def test_max_tokens_stop_reason_is_passed_through(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("a b c d e f g"))
    result = await stream_chat(http, server + "/chat/stream", {"message": "x", "max_tokens": 3})
    assert result.text == "a b c "
    assert result.events[-1]["stop_reason"] == "max_tokens"


async def test_a_full_context_window_is_a_stop_reason_on_both_routes(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """``model_context_window_exceeded`` passes through; the AI SDK route calls it length."""
    emulator.script(*[Reply("so far", stop_reason="model_context_window_exceeded")] * 2)
    result = await stream_chat(http, server + "/chat/stream", {"message": "x"})
    assert result.events[-1]["type"] == "done"
    assert result.events[-1]["stop_reason"] == "model_context_window_exceeded"
    body = {
        "id": "c1",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "x"}]}],
    }
    response = await http.post(server + "/ai-sdk/chat", json=body)
    chunks = [
        json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")
    ]
    assert chunks[-1]["type"] == "finish" and chunks[-1]["finishReason"] == "length"


async def test_health_and_ready(server: str, http: httpx2.AsyncClient) -> None:
    before = int(time.time())
    health = (await http.get(server + "/health")).json()
    assert health["status"] == "ok" and before <= health["timestamp"] <= time.time() + 1
    ready = await http.get(server + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_url_prefix_mounts_under_it(
    serve: Callable[..., Any], http: httpx2.AsyncClient
) -> None:
    async with serve(url_prefix="/ai") as url:
        result = await stream_chat(http, url + "/ai/chat/stream", {"message": "hi"})
        assert result.types[-1] == "done"
        assert (await http.post(url + "/chat/stream", json={"message": "hi"})).status_code == 404


async def test_host_app_routes_are_untouched(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    app = make_app()

    @app.get("/")
    async def index() -> str:
        return "host page"

    async with serving(app) as url:
        assert (await http.get(url + "/")).text == "host page"


async def test_response_timeout_never_cuts_a_stream(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Quart's RESPONSE_TIMEOUT (60 s by default, 1 s here) must not stall the stream."""
    app = make_app()
    app.config["RESPONSE_TIMEOUT"] = 1
    emulator.script(Reply("slow " * 12, token_delay=0.25))
    async with serving(app) as url:
        result = await asyncio.wait_for(
            stream_chat(http, url + "/chat/stream", {"message": "hi"}), 20
        )
    assert result.types[-1] == "done"
    assert result.text == "slow " * 12
