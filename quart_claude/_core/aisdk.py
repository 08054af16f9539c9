"""The Vercel AI SDK's UI message stream protocol (v1), for ``useChat`` frontends.

The same producer, store and resilience as ``/chat/stream``; only the request shape and the
encoding differ. A request is ``useChat``'s ``{id, messages: [{role, parts}], trigger}``; the
answer is ``start``, ``text-start``, ``text-delta``s, ``text-end``, ``finish`` (usage as
message metadata) and ``data: [DONE]``, errors as ``error`` chunks, heartbeats as comments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from .request import RequestError
from .sse import SSEParser

__all__ = [
    "HEADERS",
    "chat_id_of",
    "conversation_of",
    "to_chat_body",
    "to_conversation_body",
    "to_ui_message_stream",
]

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
    "model_context_window_exceeded": "length",
    "tool_use": "tool-calls",
    "refusal": "content-filter",
    "blocked": "content-filter",  # the output guard's
}
_DONE = b"data: [DONE]\n\n"
_REASONING_ID = "reasoning-0"


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
        text = _text_of(message["parts"])
        if text.strip():
            messages.append({"role": role, "content": text})
    return {"messages": messages}


def conversation_of(owner: str | None, chat_id: str) -> str:
    """The stored conversation of ``useChat``'s chat id: the identity's own (another
    identity's chat of the same id is another conversation)."""
    return hashlib.sha256(f"{owner or ''}\x00{chat_id}".encode()).hexdigest()[:24]


def to_conversation_body(body: Any, conversation_id: str) -> dict[str, Any]:
    """``useChat``'s request for a stored conversation: only its new user message counts
    (``{id, message}`` as ``prepareSendMessagesRequest`` sends it, or the last of
    ``messages``); ``trigger: "regenerate-message"`` answers the last one again."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    if body.get("trigger") == "regenerate-message":
        return {"conversation_id": conversation_id, "regenerate": True}
    message = body.get("message")
    if message is None and isinstance(body.get("messages"), list) and body["messages"]:
        message = body["messages"][-1]
    if not isinstance(message, dict) or message.get("role") != "user":
        raise _invalid("'message' (useChat's new user message) is required")
    text = _text_of(message.get("parts"))
    if not text.strip():
        raise _invalid("the new message has no text")
    return {"conversation_id": conversation_id, "message": text}


def _text_of(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(
        part["text"]
        for part in parts
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )


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
    message = _UIMessage()
    async for chunk in frames:
        pings = parser.comments
        out: list[bytes] = []
        for raw in parser.feed(chunk):
            if message.add(json.loads(raw.data), out):
                yield b"".join(out)
                return
        if parser.comments > pings and not out:
            out.append(b": keep-alive\n\n")
        if out:
            yield b"".join(out)


class _UIMessage:
    """The parts open in the UI message being written: reasoning, and the current text part
    (the text after a tool call is a new part, so it shows after the call)."""

    __slots__ = ("reasoning", "sources", "text", "texts")

    def __init__(self) -> None:
        self.reasoning = False
        self.sources: set[str] = set()  # each source once per message
        self.text: str | None = None  # the open text part's id
        self.texts = 0

    def add(self, event: dict[str, Any], out: list[bytes]) -> bool:
        """Append ``event``'s chunks to ``out``; True when it ended the message."""
        kind = event.get("type")
        if kind == "thinking":  # protocol v1.1: the AI SDK's reasoning parts
            self._thinking(event, out)
            return False
        if self.reasoning:
            out.append(_data({"type": "reasoning-end", "id": _REASONING_ID}))
            self.reasoning = False
        if kind in ("done", "error"):
            self._end_text(out)
            out += (_ending(event), _DONE)
            return True
        handler = _HANDLERS.get(kind or "")
        if handler is not None:
            handler(self, event, out)
        return False

    def _thinking(self, event: dict[str, Any], out: list[bytes]) -> None:
        if not self.reasoning:
            out.append(_data({"type": "reasoning-start", "id": _REASONING_ID}))
            self.reasoning = True
        if event.get("text"):
            delta = {"type": "reasoning-delta", "id": _REASONING_ID, "delta": event["text"]}
            out.append(_data(delta))

    def _delta(self, event: dict[str, Any], out: list[bytes]) -> None:
        if self.text is None:
            self.text = f"t{self.texts}"
            self.texts += 1
            out.append(_data({"type": "text-start", "id": self.text}))
        out.append(_data({"type": "text-delta", "id": self.text, "delta": event["text"]}))

    def _citation(self, event: dict[str, Any], out: list[bytes]) -> None:  # v1.2: sources
        chunk = _source_chunk(event["citation"], len(self.sources))
        key = str(chunk.get("url") or chunk.get("title"))
        if key not in self.sources:
            self.sources.add(key)
            out.append(_data(chunk))

    def _fallback(self, event: dict[str, Any], out: list[bytes]) -> None:
        """v1.3: a data part the page may show (not kept in history)."""
        data = {key: event.get(key) for key in ("from", "to", "reason", "phase")}
        out.append(_data({"type": "data-fallback", "data": data, "transient": True}))

    def _tool(self, event: dict[str, Any], out: list[bytes]) -> None:  # v1.1: dynamic tools
        self._end_text(out)
        out.append(_data(_tool_chunk(event)))

    def _start(self, event: dict[str, Any], out: list[bytes]) -> None:
        start = {
            "type": "start",
            "messageId": event.get("message_id"),
            "messageMetadata": {"usage": event.get("usage", {})},
        }
        out.append(_data(start))

    def _end_text(self, out: list[bytes]) -> None:
        if self.text is not None:
            out.append(_data({"type": "text-end", "id": self.text}))
            self.text = None


_HANDLERS: dict[str, Callable[[_UIMessage, dict[str, Any], list[bytes]], None]] = {
    "delta": _UIMessage._delta,
    "citation": _UIMessage._citation,
    "fallback": _UIMessage._fallback,
    "tool_call": _UIMessage._tool,
    "tool_result": _UIMessage._tool,
    "start": _UIMessage._start,
}


def _source_chunk(citation: dict[str, Any], number: int) -> dict[str, Any]:
    """A citation as the AI SDK's ``source-url`` (a web page) or ``source-document`` part."""
    source_id = f"source-{number}"
    url = citation.get("url")
    if isinstance(url, str):
        return {
            "type": "source-url",
            "sourceId": source_id,
            "url": url,
            "title": citation.get("title"),
        }
    media = "application/pdf" if citation.get("type") == "page_location" else "text/plain"
    title = citation.get("document_title") or citation.get("title") or "document"
    return {"type": "source-document", "sourceId": source_id, "mediaType": media, "title": title}


def _tool_chunk(event: dict[str, Any]) -> dict[str, Any]:
    """A ``tool_call`` or ``tool_result`` as the AI SDK's tool chunk (a dynamic tool: the
    browser does not know the server's tools; ``providerExecuted``: the API ran it)."""
    chunk: dict[str, Any] = {"toolCallId": event["id"], "dynamic": True}
    if event.get("server"):
        chunk["providerExecuted"] = True
    if event["type"] == "tool_call":
        chunk.update(toolName=event["name"], input=event.get("input"))
        return {"type": "tool-input-available", **chunk}
    output = event.get("output")
    if event.get("is_error"):
        text = output if isinstance(output, str) else "the tool failed"
        return {"type": "tool-output-error", **chunk, "errorText": text}
    return {"type": "tool-output-available", **chunk, "output": output}
