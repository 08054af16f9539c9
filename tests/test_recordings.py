"""Real Messages API streams, recorded by other projects (``../shared/recorded-streams``,
sources in its SOURCES.md), replayed byte for byte by the emulator through a real Hypercorn:
what the relay passes on, and what it sends back to the API, is what the API sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude, SSEParser
from quart_claude.testing import Emulator, Replay, Reply, ToolUse

from . import binaries
from .helpers import serving, stream_chat

pytestmark = pytest.mark.server

RECORDINGS = binaries.recordings() or Path("/nonexistent/recorded-streams")
ANSWERS = sorted(
    path.name
    for path in RECORDINGS.glob("*.sse")
    if not path.name.startswith("spliced__") and not path.name.endswith(".2.sse")
) or ["(the recordings are missing)"]


@dataclass
class Recorded:
    """What one recording says, read with the plainest SSE rules."""

    text: str = ""
    thinking: str = ""
    blocks: list[dict[str, Any]] = field(default_factory=list)  # content_block_start, in order
    stop_reason: str | None = None
    output_tokens: int | None = None
    usage: dict[str, Any] = field(default_factory=dict)  # message_start's, then message_delta's
    reported: dict[str, Any] = field(default_factory=dict)  # stop_details, container
    citations: list[dict[str, Any]] = field(default_factory=list)


def read_recording(name: str) -> Recorded:
    recorded = Recorded()
    for sse in SSEParser().feed((RECORDINGS / name).read_bytes()):
        event = sse.json()
        kind = event.get("type")
        if kind == "content_block_start":
            recorded.blocks.append(event["content_block"])
        elif kind == "content_block_delta":
            _delta(recorded, event["delta"])
        elif kind == "message_start":
            recorded.usage = dict(event["message"].get("usage") or {})
        elif kind == "message_delta":
            _message_delta(recorded, event)
    return recorded


def _delta(recorded: Recorded, delta: dict[str, Any]) -> None:
    if delta["type"] == "text_delta":
        recorded.text += delta["text"]
    elif delta["type"] == "thinking_delta":
        recorded.thinking += delta["thinking"]
    elif delta["type"] == "citations_delta":
        recorded.citations.append(delta["citation"])


def _message_delta(recorded: Recorded, event: dict[str, Any]) -> None:
    recorded.stop_reason = event["delta"].get("stop_reason")
    recorded.output_tokens = (event.get("usage") or {}).get("output_tokens")
    recorded.usage.update(event.get("usage") or {})
    for name in ("stop_details", "container"):
        if event["delta"].get(name) is not None:
            recorded.reported[name] = event["delta"][name]


@pytest.fixture(autouse=True)
def recordings_present() -> None:
    binaries.need_recordings()  # a skip naming the group when they are not here


def test_the_recordings_are_all_here() -> None:
    assert len(ANSWERS) >= 15, ANSWERS


@pytest.mark.parametrize("name", ANSWERS)
async def test_a_recorded_answer_is_relayed_exactly(
    name: str, make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    recorded = read_recording(name)
    # the model's own tool calls name tools this app does not have, and it has none: the
    # answer ends there (a tool result without tools is a 400 upstream); a pause goes on
    follow_up = recorded.stop_reason == "pause_turn"
    emulator.script(Replay.file(RECORDINGS / name, chunk=777), Reply("And that is all."))
    async with serving(make_app()) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    done = result.events[-1]
    assert done["type"] == "done", done
    expected = recorded.text + (" And that is all."[1:] if follow_up else "")
    assert result.text == expected  # byte for byte, padding and all
    thinking = "".join(e["text"] for e in result.events if e["type"] == "thinking")
    assert thinking == recorded.thinking
    server_calls = [b["id"] for b in recorded.blocks if b["type"] == "server_tool_use"]
    shown = [e["id"] for e in result.events if e["type"] == "tool_call" and e.get("server")]
    assert shown == server_calls  # in order
    server_results = [
        b["tool_use_id"] for b in recorded.blocks if b["type"].endswith("_tool_result")
    ]
    results = [e["id"] for e in result.events if e["type"] == "tool_result" and e.get("server")]
    assert results == server_results  # in order, each after its call
    order = [e["id"] for e in result.events if e["type"] in ("tool_call", "tool_result")]
    assert all(order.index(i) < len(order) - order[::-1].index(i) - 1 for i in server_results)
    cited = [e for e in result.events if e["type"] == "citation"]
    assert [e["citation"] for e in cited] == recorded.citations  # each, as the API gave it
    assert all(e["text"] and e["text"] in result.text for e in cited)
    if not follow_up:
        assert done["stop_reason"] == recorded.stop_reason
        assert done["usage"]["output_tokens"] == recorded.output_tokens
        assert done["usage"] == recorded.usage  # every field, as the API last reported it
        for name in ("stop_details", "container"):
            assert done.get(name) == recorded.reported.get(name)
        assert len(emulator.requests) == 1
    else:  # the next step's request carries the message back, block for block, in order
        sent = emulator.requests[1].body["messages"][
            -2 if recorded.stop_reason == "tool_use" else -1
        ]
        assert sent["role"] == "assistant"
        types = [block["type"] for block in sent["content"]]
        assert types == [b["type"] for b in recorded.blocks if _kept(b, recorded)]


def with_tool(app: Quart, tool: Callable[[], str]) -> Quart:
    """``app`` with ``tool`` registered, as ``@claude.tool`` would."""
    claude = Claude.state(app).extension
    assert isinstance(claude, Claude)
    claude.tool(tool)
    return app


def _kept(block: dict[str, Any], recorded: Recorded) -> bool:
    return block["type"] != "text" or bool(recorded.text)


@pytest.mark.parametrize(
    "name", ["anthropic-sdk-python__text_then_tool_use.sse", "vercel-ai__tool_use_no_args.sse"]
)
async def test_a_call_of_a_tool_the_app_lacks_gets_an_error_result_the_api_accepts(
    name: str, make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The recorded model calls a tool of another app: with tools of its own, this app
    answers with an ``is_error`` result, the message goes back as it came, and the API (the
    emulator, which refuses tool blocks without tools) accepts the follow-up."""
    recorded = read_recording(name)

    def unrelated() -> str:
        """A tool the model did not ask for."""
        return "never"

    app = with_tool(make_app(), unrelated)
    emulator.script(Replay.file(RECORDINGS / name), Reply("Sorry, I cannot do that."))
    async with serving(app) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.events[-1]["type"] == "done", result.events[-1]
    assert result.text == recorded.text + "Sorry, I cannot do that."
    (failed,) = [e for e in result.events if e["type"] == "tool_result"]
    assert failed["is_error"] is True
    back, answer = emulator.requests[1].body["messages"][-2:]
    assert [b["type"] for b in back["content"]] == [
        b["type"] for b in recorded.blocks if _kept(b, recorded)
    ]
    assert answer["content"][0]["type"] == "tool_result" and answer["content"][0]["is_error"]


async def test_without_tools_a_tool_call_ends_the_answer(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    name = "vercel-ai__tool_use_json_only.sse"
    emulator.script(Replay.file(RECORDINGS / name), Reply("must not be asked"))
    async with serving(make_app()) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.events[-1]["type"] == "done"
    assert result.events[-1]["stop_reason"] == "tool_use"
    assert len(emulator.requests) == 1  # a tool result without tools would be a 400


async def test_sources_reach_every_route(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Web search citations: ``citation`` events, the AI SDK's ``source-url`` parts (each page
    once), and ``citations`` in ``POST /chat``."""
    name = "vercel-ai__web_search_citations.sse"
    recorded = read_recording(name)
    urls = list(dict.fromkeys(c["url"] for c in recorded.citations))
    emulator.script(*[Replay.file(RECORDINGS / name)] * 2)
    body = {
        "id": "c1",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "x"}]}],
    }
    async with serving(make_app()) as url:
        ui = (await http.post(url + "/ai-sdk/chat", json=body)).text
        whole = (await http.post(url + "/chat", json={"message": "x"})).json()
    chunks = [json.loads(line[6:]) for line in ui.split("\n\n") if line.startswith("data: {")]
    sources = [c for c in chunks if c["type"] == "source-url"]
    assert [c["url"] for c in sources] == urls and all(c["title"] for c in sources)
    assert [c["citation"] for c in whole["citations"]] == recorded.citations
    assert whole["text"] == recorded.text


async def test_a_refusal_says_why_on_both_routes(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    name = "vercel-ai__refusal_stop_details.sse"
    details = read_recording(name).reported["stop_details"]
    assert details["category"]
    emulator.script(Replay.file(RECORDINGS / name), Replay.file(RECORDINGS / name))
    async with serving(make_app()) as url:
        streamed = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        whole = (await http.post(url + "/chat", json={"message": "hi"})).json()
    assert streamed.events[-1]["stop_reason"] == whole["stop_reason"] == "refusal"
    assert streamed.events[-1]["stop_details"] == whole["stop_details"] == details


async def test_the_container_is_passed_on_and_goes_back_on_the_next_request(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Code execution's container reaches ``done``; the answer's next request (a tool step
    here) names it, so the model keeps its files."""
    name = "vercel-ai__code_execution_emoji_long_tool_input.sse"
    container = read_recording(name).reported["container"]

    def today() -> str:
        """Today's date."""
        return "2026-12-01"

    app = with_tool(make_app(), today)
    emulator.script(
        Replay.file(RECORDINGS / name),
        Reply("Checking. ", tool_calls=[ToolUse("today")], container=container),
        Reply("It is December."),
    )
    async with serving(app) as url:
        first = await stream_chat(http, url + "/chat/stream", {"message": "run it"})
        second = await stream_chat(http, url + "/chat/stream", {"message": "what day?"})
    assert first.events[-1]["container"] == container
    assert second.events[-1]["container"] == container
    assert "container" not in emulator.requests[1].body  # a new answer: nothing to go back
    assert emulator.requests[2].body["container"] == container["id"]


async def test_a_paused_turn_goes_back_block_for_block_and_the_api_continues_it(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The model wrote text between its searches; the continuation request sends the paused
    message back exactly: every block in its place, with its fields."""
    first, second = (f"pydantic-ai__pause_turn_web_search.{n}.sse" for n in (1, 2))
    paused, continued = read_recording(first), read_recording(second)
    emulator.script(Replay.file(RECORDINGS / first), Replay.file(RECORDINGS / second))
    async with serving(make_app()) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "search"})
    assert result.events[-1]["type"] == "done"
    assert result.events[-1]["stop_reason"] == continued.stop_reason == "end_turn"
    assert result.text == paused.text + continued.text
    (_, follow_up) = emulator.requests
    back = follow_up.body["messages"][-1]
    assert back["role"] == "assistant"
    assert [b["type"] for b in back["content"]] == [b["type"] for b in paused.blocks]
    texts = [b["text"] for b in back["content"] if b["type"] == "text"]
    assert "".join(texts) == paused.text and len(texts) > 1
    calls = [b for b in back["content"] if b["type"] == "server_tool_use"]
    assert all(isinstance(call["input"], dict) and call["input"] for call in calls)
    thinking = [b for b in back["content"] if b["type"] == "thinking"]
    assert thinking and all(b["signature"] for b in thinking)


def _shape(events: list[dict[str, Any]]) -> list[str]:
    """The order of events and block types, text deltas folded into one."""
    shape: list[str] = []
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            kind += ":" + event["content_block"]["type"]
        elif kind == "content_block_delta":
            kind += ":" + event["delta"]["type"]
        if kind != "ping" and (not shape or shape[-1] != kind):
            shape.append(kind)
    return shape


async def test_the_emulators_compaction_is_shaped_like_the_recorded_one(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    name = "vercel-ai__long_multibyte_text_compaction_block.sse"
    recorded = [sse.json() for sse in SSEParser().feed((RECORDINGS / name).read_bytes())]
    emulator.script(Reply("Here is the summary you asked for.", input_tokens=160_000))
    response = await http.post(
        emulator.url + "/v1/messages",
        headers={"x-api-key": "sk-test", "anthropic-beta": "compact-2026-01-12"},
        json={
            "model": "claude-opus-4-6",
            "max_tokens": 100,
            "stream": True,
            "context_management": {"edits": [{"type": "compact_20260112"}]},
            "messages": [{"role": "user", "content": "Summarize our long talk."}],
        },
    )
    emulated = [sse.json() for sse in SSEParser().feed(response.content)]
    recorded_shape, emulated_shape = _shape(recorded), _shape(emulated)
    assert emulated_shape == recorded_shape
    for got, want in zip(emulated, recorded, strict=False):
        if want["type"] == "content_block_start" and want["content_block"]["type"] == "compaction":
            assert got["content_block"] == want["content_block"]  # content: null at the start
    delta = next(e for e in emulated if e["type"] == "message_delta")
    recorded_delta = next(e for e in recorded if e["type"] == "message_delta")
    assert set(recorded_delta["usage"]) >= set(delta["usage"]) >= {"input_tokens", "iterations"}
    assert [i["type"] for i in delta["usage"]["iterations"]] == [
        i["type"] for i in recorded_delta["usage"]["iterations"]
    ]
    start = next(e for e in emulated if e["type"] == "message_start")
    assert start["message"]["usage"]["input_tokens"] > delta["usage"]["input_tokens"]
