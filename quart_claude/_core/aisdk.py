"""The Vercel AI SDK's UI message stream protocol (v1), for ``useChat`` frontends.

The same producer, store and resilience as ``/chat/stream``; only the request shape and the
encoding differ. A request is ``useChat``'s ``{id, messages: [{role, parts}], trigger}``; the
answer is ``start``, ``text-start``, ``text-delta``s, ``text-end``, ``finish`` (usage as
message metadata) and ``data: [DONE]``, errors as ``error`` chunks, heartbeats as comments.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .request import RequestError
from .sse import SSEParser

__all__ = ["HEADERS", "chat_id_of", "to_chat_body", "to_ui_message_stream"]

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "x-vercel-ai-ui-message-stream": "v1",
}

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool-calls",
    "refusal": "content-filter",
}
_DONE = b"data: [DONE]\n\n"
_REASONING_ID = "reasoning-0"
_TEXT_ID = "t0"


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


def chat_id_of(body: Any) -> str:
    chat_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(chat_id, str) or not chat_id or len(chat_id) > 200:
        raise _invalid("'id' (the chat id, a string of 1 to 200 characters) is required")
    return chat_id


def to_chat_body(body: Any) -> dict[str, Any]:
    """``useChat``'s request as this API's ``{"messages": [...]}`` (text parts joined; other
    parts, and any extra fields the frontend adds, are not sent upstream)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise _invalid("'messages' (useChat's UI messages) is required")
    messages = []
    for index, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("parts"), list):
            raise _invalid(f"'messages[{index}]' must be an object with 'parts'")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _invalid(f"'messages[{index}].role' must be 'user' or 'assistant'")
        text = "".join(
            part["text"]
            for part in message["parts"]
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
        if text.strip():
            messages.append({"role": role, "content": text})
    return {"messages": messages}


def _data(chunk: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    )


def _ending(event: dict[str, Any]) -> bytes:
    """A ``done`` or ``error`` event as the chunk that ends a UI message stream."""
    if event["type"] == "done":
        reason = _FINISH_REASONS.get(event.get("stop_reason") or "", "other")
        finish = {"usage": event.get("usage", {})}
        return _data({"type": "finish", "finishReason": reason, "messageMetadata": finish})
    text = event.get("message", "")
    if event.get("retry_after"):
        text += f" Try again in {event['retry_after']} s."
    # useChat shows errorText; the other keys are for clients that want them
    return _data({**event, "type": "error", "errorText": text})


async def to_ui_message_stream(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Our protocol's frames (from a stream or its Redis mirror) as UI message chunks."""
    parser = SSEParser()
    open_text = open_reasoning = False
    async for chunk in frames:
        pings = parser.comments
        out: list[bytes] = []
        for raw in parser.feed(chunk):
            event = json.loads(raw.data)
            kind = event.get("type")
            if kind == "thinking":  # protocol v1.1: the AI SDK's reasoning parts
                if not open_reasoning:
                    out.append(_data({"type": "reasoning-start", "id": _REASONING_ID}))
                    open_reasoning = True
                if event.get("text"):
                    delta = {"type": "reasoning-delta", "id": _REASONING_ID, "delta": event["text"]}
                    out.append(_data(delta))
                continue
            if open_reasoning:
                out.append(_data({"type": "reasoning-end", "id": _REASONING_ID}))
                open_reasoning = False
            if kind == "delta":
                if not open_text:
                    out.append(_data({"type": "text-start", "id": _TEXT_ID}))
                    open_text = True
                out.append(_data({"type": "text-delta", "id": _TEXT_ID, "delta": event["text"]}))
            elif kind == "start":
                out.append(
                    _data(
                        {
                            "type": "start",
                            "messageId": event.get("message_id"),
                            "messageMetadata": {"usage": event.get("usage", {})},
                        }
                    )
                )
            elif kind in ("done", "error"):
                if open_text:
                    out.append(_data({"type": "text-end", "id": _TEXT_ID}))
                out += (_ending(event), _DONE)
                yield b"".join(out)
                return
        if parser.comments > pings and not out:
            out.append(b": keep-alive\n\n")
        if out:
            yield b"".join(out)
