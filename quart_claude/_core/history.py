"""A stored branch as the API takes it back, and a turn as a reader sees it.

The API conversation is rebuilt from what the API sent, block for block (thinking with its
signature, tool calls and their results, server-tool blocks, citations, compaction), with
two repairs the API requires: thinking another model wrote is dropped, and a tool call left
without a result (a stopped turn) is closed with an ``is_error`` one. The reader's view is
built from the events readers were sent, so it shows exactly what they were shown (thinking
per ``CLAUDE_EXPOSE_THINKING``, a hidden tool's name only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .sse import DELTA_PREFIX, payload_of

if TYPE_CHECKING:
    from .db import MessageRow

__all__ = ["api_messages", "reader_view"]

_THINKING = frozenset({"thinking", "redacted_thinking"})
_UNANSWERED = "the turn ended before this tool call returned"


def api_messages(branch: Sequence[MessageRow], model: str) -> list[dict[str, Any]]:
    """The messages of ``branch`` for a request to ``model``."""
    history: list[dict[str, Any]] = []
    for row in branch:
        if row.role == "user":
            _add(history, {"role": "user", "content": row.content})
            continue
        for message in row.content.get("messages") or ():
            content = message["content"]
            if row.model != model and message["role"] == "assistant":
                content = [block for block in content if block.get("type") not in _THINKING]
            if content:
                _add(history, {"role": message["role"], "content": content})
    return _closed(history)


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _add(history: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Append, joining two user turns in a row (a turn stopped after its tools ran ends
    with their results; the next user message follows them in the same turn)."""
    if history and history[-1]["role"] == "user" == message["role"]:
        joined = _blocks(history[-1]["content"]) + _blocks(message["content"])
        history[-1] = {"role": "user", "content": joined}
    else:
        history.append(message)


def _closed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ``tool_use`` answered in the next user turn: missing results become errors."""
    out: list[dict[str, Any]] = []
    for index, message in enumerate(history):
        out.append(message)
        if message["role"] != "assistant" or isinstance(message["content"], str):
            continue
        calls = [b["id"] for b in message["content"] if b.get("type") == "tool_use"]
        if not calls:
            continue
        following = history[index + 1] if index + 1 < len(history) else None
        answered = set()
        if following is not None and following["role"] == "user":
            answered = {
                b.get("tool_use_id")
                for b in _blocks(following["content"])
                if b.get("type") == "tool_result"
            }
        missing = [
            {"type": "tool_result", "tool_use_id": call, "content": _UNANSWERED, "is_error": True}
            for call in calls
            if call not in answered
        ]
        if not missing:
            continue
        if following is not None and following["role"] == "user":
            history[index + 1] = {"role": "user", "content": [*_blocks(following["content"])]}
            results = [b for b in history[index + 1]["content"] if b.get("type") == "tool_result"]
            others = [b for b in history[index + 1]["content"] if b.get("type") != "tool_result"]
            history[index + 1]["content"] = [*results, *missing, *others]
        else:
            out.append({"role": "user", "content": missing})
    return out


def reader_view(events: Iterable[bytes]) -> list[dict[str, Any]]:
    """A turn's blocks as its readers saw them, from its encoded events (a run of text
    deltas decoded in one go: most of a turn's events are those)."""
    view: list[dict[str, Any]] = []
    calls: dict[str, dict[str, Any]] = {}
    texts: list[bytes] = []  # the JSON string literals of the text deltas in a row
    for event in events:
        end = event.index(b"\n")
        if event.startswith(DELTA_PREFIX) and event[end - 1] == 0x7D:  # ...,"text":"<literal>"}
            texts.append(event[len(DELTA_PREFIX) : end - 1])
            continue
        if texts:
            _extend(view, "text", "".join(json.loads(b"[" + b",".join(texts) + b"]")))
            texts.clear()
        _one(view, calls, payload_of(event))
    if texts:
        _extend(view, "text", "".join(json.loads(b"[" + b",".join(texts) + b"]")))
    return view


def _one(view: list[dict[str, Any]], calls: dict[str, dict[str, Any]], payload: Any) -> None:
    """Add one event other than a plain text delta to the view."""
    if isinstance(payload, dict):
        kind = payload.get("type")
        if kind == "delta":
            _extend(view, "text", payload["text"])
        elif kind == "thinking":
            _thinking(view, payload)
        elif kind == "tool_call":
            call = {k: v for k, v in payload.items()}
            calls[str(payload.get("id"))] = call
            view.append(call)
        elif kind == "tool_result":
            _result(view, calls, payload)
        elif kind == "citation" and view and view[-1]["type"] == "text":
            view[-1].setdefault("citations", []).append(payload["citation"])


def _extend(view: list[dict[str, Any]], kind: str, text: str) -> None:
    if view and view[-1]["type"] == kind and "citations" not in view[-1]:
        view[-1][kind] += text
    else:
        view.append({"type": kind, kind: text})


def _thinking(view: list[dict[str, Any]], payload: dict[str, Any]) -> None:
    if payload.get("restart"):  # a retry thinks again: what it thought before is gone
        while view and view[-1]["type"] == "thinking":
            view.pop()
        return
    _extend(view, "thinking", payload.get("text", ""))


def _result(
    view: list[dict[str, Any]], calls: dict[str, dict[str, Any]], payload: dict[str, Any]
) -> None:
    call = calls.get(str(payload.get("id")))
    if call is None:
        view.append({k: v for k, v in payload.items()})
        return
    call["is_error"] = payload.get("is_error", False)
    call["output"] = payload.get("output")
