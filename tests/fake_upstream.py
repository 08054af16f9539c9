"""A scripted upstream for the core tier: the relay itself, with no socket. Each request the
relay makes takes the next :class:`Reply` of the script: an error at once (its HTTP status,
classified as the real client would), or SSE bytes as the API frames them, which may stop
short with a dropped connection. Every request's parameters are kept, to assert on."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from quart_claude._core.answer import Answer
from quart_claude._core.config import ClaudeConfig, load_config
from quart_claude._core.errors import UpstreamError, classify_status
from quart_claude._core.first_party import UpstreamResponse
from quart_claude._core.framing import UpstreamFramer
from quart_claude._core.policy import AnswerContext, PolicyMaker
from quart_claude._core.providers import Endpoint, Upstream
from quart_claude._core.relay import Relay
from quart_claude._core.request import ChatRequest
from quart_claude._core.sse import payload_of
from quart_claude._core.stream import Stream
from quart_claude._core.telemetry import Telemetry


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def message(
    *texts: str,
    stop_reason: str = "end_turn",
    model: str = "claude-sonnet-5-5",
    input_tokens: int = 10,
    drop_after: int | None = None,
    tool_use: dict[str, Any] | None = None,
) -> Reply:
    """One message: a text block of ``texts`` (one delta each), then an optional tool call,
    then its stop reason. ``drop_after``: the connection drops after that many deltas."""
    chunks = [
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
    ]
    for count, text in enumerate(texts):
        if drop_after is not None and count == drop_after:
            return Reply(chunks=chunks, drop=True)
        delta = {"type": "text_delta", "text": text}
        chunks.append(
            sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    chunks.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if tool_use is not None:
        block = {"type": "tool_use", "id": tool_use["id"], "name": tool_use["name"], "input": {}}
        chunks.append(
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": 1, "content_block": block},
            )
        )
        partial = {"type": "input_json_delta", "partial_json": json.dumps(tool_use["input"])}
        chunks.append(
            sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": 1, "delta": partial},
            )
        )
        chunks.append(sse("content_block_stop", {"type": "content_block_stop", "index": 1}))
    output = max(1, sum(len(text) for text in texts) // 4)
    chunks.append(
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason},
                "usage": {"output_tokens": output},
            },
        )
    )
    chunks.append(sse("message_stop", {"type": "message_stop"}))
    return Reply(chunks=chunks)


def failure(status: int = 529, kind: str = "overloaded_error") -> Reply:
    return Reply(status=status, error_type=kind)


@dataclass
class Reply:
    chunks: list[bytes] = field(default_factory=list)
    drop: bool = False  # the connection drops after the chunks
    status: int = 200
    error_type: str | None = None
    message: str = "scripted"


class ScriptedUpstreams:
    """Every endpoint answers from one script, in order."""

    def __init__(self, *script: Reply) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.closed_early = 0  # responses the relay left before their end (a cut)

    def __getitem__(self, endpoint: Endpoint) -> Upstream:
        return Upstream(endpoint, self._open, UpstreamFramer)

    @asynccontextmanager
    async def _open(self, params: Mapping[str, Any]) -> AsyncIterator[UpstreamResponse]:
        self.requests.append(dict(params))
        reply = self.script.pop(0)
        if reply.status != 200:
            raise classify_status(reply.status, reply.error_type, reply.message, None, {})
        finished = False

        async def body() -> AsyncGenerator[bytes, None]:
            nonlocal finished
            for chunk in reply.chunks:
                yield chunk
            if reply.drop:
                raise UpstreamError("network_error", detail="scripted drop")
            finished = True

        chunks = body()
        try:
            yield UpstreamResponse("req_1", chunks)
        finally:
            if not finished and not reply.drop:
                self.closed_early += 1
            await chunks.aclose()

    async def close(self) -> None:
        return None


def config(**options: Any) -> ClaudeConfig:
    options.setdefault("api_key", "sk-test")
    options.setdefault("retry_base_delay", 0)
    options.setdefault("retry_max_delay", 0)
    return load_config(options, {}, environ={})


def request(
    text: str = "hi", *, max_tokens: int = 256, model: str = "claude-sonnet-5-5"
) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], model, max_tokens, "be brief")


@dataclass
class Run:
    """What one answer did: its events (decoded), how it ended, the requests made."""

    events: list[dict[str, Any]]
    ended: Any
    upstreams: ScriptedUpstreams
    answer: Answer

    @property
    def text(self) -> str:
        return "".join(event["text"] for event in self.events if event["type"] == "delta")

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]


def relay_for(
    upstreams: ScriptedUpstreams,
    settings: ClaudeConfig,
    makers: list[PolicyMaker] | None = None,
    telemetry: Telemetry | None = None,
) -> Relay:
    return Relay(upstreams, settings, telemetry or Telemetry(None, None), policies=makers or [])


async def run(
    upstreams: ScriptedUpstreams,
    settings: ClaudeConfig,
    makers: list[PolicyMaker] | None = None,
    *,
    chat: ChatRequest | None = None,
    relay: Relay | None = None,
    stream: Stream | None = None,
) -> Run:
    """One answer, begun and produced, as the state does it."""
    relay = relay or relay_for(upstreams, settings, makers)
    chat = chat or request()
    stream = stream or Stream("s1")
    answer = await relay.begin(stream, chat, AnswerContext("user-1", stream.id, chat))
    ended = await relay.produce(answer)
    return Run([payload_of(event) for event in stream.events], ended, upstreams, answer)
