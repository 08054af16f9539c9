"""The Vercel AI SDK UI message stream protocol, checked with the `ai` package's own client
(DefaultChatTransport + readUIMessageStream, what useChat runs) in Node, against a live server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator, ErrorReply, Reply, ToolUse

from . import binaries
from .helpers import serving

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent / "ai_sdk"
ANSWER = " ".join(f"piece{i}" for i in range(30))


async def node_check(url: str, scenario: str) -> Any:
    node = binaries.node_modules(HERE)
    process = await asyncio.create_subprocess_exec(
        node,
        str(HERE / "check.mjs"),
        url,
        scenario,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_use_chat_reads_a_full_reply_with_usage(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.01, cache_read_input_tokens=1234))
    async with serving(make_app(heartbeat_interval=0.05)) as url:
        result = await node_check(url, "reply")
    assert result["errors"] == []
    assert result["text"] == ANSWER
    assert result["metadata"]["usage"]["cache_read_input_tokens"] == 1234
    assert result["metadata"]["usage"]["output_tokens"] == 30


async def test_use_chat_shows_tool_calls_between_the_texts(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    app = make_app()
    claude = Claude.state(app).extension
    assert isinstance(claude, Claude)

    @claude.tool
    def stock(item: str) -> dict[str, int]:
        """Units in stock."""
        return {item: 3}

    @claude.tool
    def broken() -> str:
        """Always fails."""
        raise RuntimeError("the warehouse is offline")

    emulator.script(
        Reply("Checking. ", tool_calls=[ToolUse("stock", {"item": "mugs"}), ToolUse("broken")]),
        Reply("Three mugs left."),
    )
    async with serving(app) as url:
        result = await node_check(url, "tools")
    assert result["errors"] == []
    assert result["parts"] == [
        {"type": "text", "text": "Checking. "},
        {
            "type": "dynamic-tool",
            "toolName": "stock",
            "state": "output-available",
            "input": {"item": "mugs"},
            "output": {"mugs": 3},
            "errorText": None,
        },
        {
            "type": "dynamic-tool",
            "toolName": "broken",
            "state": "output-error",
            "input": {},
            "output": None,
            "errorText": "the warehouse is offline",
        },
        {"type": "text", "text": "Three mugs left."},
    ]


async def test_use_chat_sees_an_error_chunk(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    emulator.script(ErrorReply(529))
    async with serving(make_app(max_retries=0)) as url:
        result = await node_check(url, "error")
    assert result["text"] == ""
    assert any("overloaded" in error.lower() for error in result["errors"])


async def test_use_chat_is_told_about_a_refused_request(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    async with serving(make_app(api_tokens="tok-only-0123456789")) as url:
        result = await node_check(url, "refused")
    assert result["thrown"] and "unauthorized" in result["thrown"]
    assert emulator.requests == []


async def test_use_chat_resumes_a_reply_in_progress(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    async with serving(make_app()) as url:
        result = await node_check(url, "resume")
    assert result["readBeforeAbort"] == 6
    assert result["errors"] == [] and result["text"] == ANSWER  # rebuilt from the replay
    assert result["afterFinish"] is None and result["nothing"] is None  # 204s
    assert len(emulator.requests) == 1  # resumed, not asked again


async def test_the_wire_format(server: str, http: httpx2.AsyncClient) -> None:
    body = {
        "id": "chat-wire",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        "trigger": "submit-message",
    }
    response = await http.post(server + "/ai-sdk/chat", json=body)
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    kinds = [json.loads(line[6:])["type"] for line in lines[:-1] if line.startswith("data: ")]
    assert kinds[:2] == ["start", "text-start"]
    assert kinds[-2:] == ["text-end", "finish"]
    assert set(kinds[2:-2]) == {"text-delta"}


async def test_use_chat_with_conversations_sends_only_the_new_message(
    make_app: Callable[..., Quart], emulator: Emulator, tmp_path: Path
) -> None:
    """useChat's id is the conversation: the server prepends the stored history, so the
    request that sends only the last message (``prepareSendMessagesRequest``) is enough."""
    emulator.script(Reply("first reply"), Reply("second reply"))
    app = make_app(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'ai.db'}",
        authorize=lambda request: "the-user",  # whose conversations (no cookie from node)
    )
    async with serving(app) as url:
        result = await node_check(url, "conversation")
    assert result["errors"] == []
    assert [result["first"], result["second"]] == ["first reply", "second reply"]
    history = emulator.requests[1].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "hi" and history[2]["content"] == "and then?"
    assert history[1]["content"] == [{"type": "text", "text": "first reply"}]
