"""Thinking (protocol v1.1): set by the operator, streamed as its own events before the text,
signatures and redacted blocks kept server-side, and kept from the browser on request."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply

from .helpers import serving, stream_chat

pytestmark = pytest.mark.server

THOUGHT = "The user greets me. A short, friendly answer fits."
ANSWER = "Hello there, how can I help?"


async def test_thinking_streams_before_the_text_in_order(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, thinking=THOUGHT, redacted_thinking=True, token_delay=0.01))
    async with serving(make_app(thinking=2048, model="claude-sonnet-5-5")) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    types = result.types
    assert types[0] == "start" and types[-1] == "done"
    thinking = [e for e in result.events if e["type"] == "thinking"]
    assert "".join(e["text"] for e in thinking) == THOUGHT
    assert len(thinking) > 3  # streamed as it came, not at the end
    assert types.index("delta") > max(i for i, t in enumerate(types) if t == "thinking")
    assert result.text == ANSWER
    raw = result.raw.decode()
    assert "signature" not in raw and "redacted" not in raw and "RW5jcnlwdGVk" not in raw
    sent = emulator.requests[0].body
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["max_tokens"] == 2048 + 1024  # the budget on top of the answer's default


async def test_adaptive_thinking_and_the_browser_cannot_choose(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, thinking=THOUGHT))
    async with serving(make_app(thinking="adaptive")) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        refused = await http.post(url + "/chat/stream", json={"message": "hi", "thinking": 1})
        hot = await http.post(url + "/chat/stream", json={"message": "hi", "temperature": 0.5})
    assert result.types[-1] == "done" and "thinking" in result.types
    assert emulator.requests[0].body["thinking"] == {"type": "adaptive"}
    assert refused.status_code == 400 and "'thinking'" in refused.json()["message"]
    assert hot.status_code == 400 and "CLAUDE_THINKING" in hot.json()["message"]
    assert len(emulator.requests) == 1


async def test_expose_thinking_false_keeps_it_from_the_browser(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, thinking=THOUGHT))
    async with serving(make_app(thinking=1024, expose_thinking=False)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.types[-1] == "done" and result.text == ANSWER
    assert "thinking" not in result.types
    assert "greets" not in result.raw.decode()
    assert emulator.requests[0].body["thinking"]["type"] == "enabled"


async def test_a_retry_after_thinking_says_the_thinking_restarts(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The upstream fails after thinking but before any text: the retry thinks again, and a
    ``restart`` marker tells the client to drop the first thoughts."""
    emulator.script(
        Reply(ANSWER, thinking=THOUGHT, fault="drop", fault_after=0),
        Reply(ANSWER, thinking="Second thoughts."),
    )
    async with serving(make_app(thinking=1024)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.types[-1] == "done" and result.text == ANSWER
    thinking = [e for e in result.events if e["type"] == "thinking"]
    restart = next(i for i, e in enumerate(thinking) if e.get("restart"))
    assert "".join(e["text"] for e in thinking[:restart]) == THOUGHT
    assert "".join(e["text"] for e in thinking[restart + 1 :]) == "Second thoughts."


async def test_recovery_with_thinking_never_prefills(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """A pre-4.6 model would get a prefill, which the API refuses with thinking on: the
    continuation is the "continue" turn instead (the emulator answers a prefill with 400)."""
    emulator.script(
        Reply(ANSWER, thinking=THOUGHT, fault="drop", fault_after=3),
        Reply(ANSWER),
    )
    app = make_app(thinking=1024, model="claude-sonnet-4-5", allowed_models="")
    async with serving(app) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.types[-1] == "done", result.events[-1]
    assert result.text == ANSWER
    continuation = emulator.requests[1].body["messages"]
    assert continuation[-1]["role"] == "user"  # the continue turn, not a prefill
    assert emulator.requests[1].body["thinking"]["type"] == "enabled"  # it thought again...
    first_text = result.types.index("delta")
    assert "thinking" not in result.types[first_text:]  # ...but not in the middle of the answer
