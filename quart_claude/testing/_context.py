"""The emulator's context editing and compaction: enough of the betas to test a relay on them.

Shapes follow the SDK's beta types and the recording
``vercel-ai__long_multibyte_text_compaction_block.sse``: a ``compaction`` block streamed first
(``content: null`` at its start, then one ``compaction_delta``), the compaction's own tokens only
in ``usage.iterations``, and ``message_delta.usage.input_tokens`` revised down to the context
the model actually read. A request carrying a ``compaction`` block is counted from that block
on, as the API ignores everything before it. Context editing reports what it cleared in
``message_delta.context_management.applied_edits``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ContextPlan", "compaction_problem", "context_problem", "from_last_compaction", "plan"]

#: each edit type and the beta it needs in ``anthropic-beta``
BETAS = {
    "clear_tool_uses_20250919": "context-management-2025-06-27",
    "clear_thinking_20251015": "context-management-2025-06-27",
    "compact_20260112": "compact-2026-01-12",
}
#: the API's default input-token triggers
_TRIGGERS = {"compact_20260112": 150_000, "clear_tool_uses_20250919": 100_000}
_KEEP_TOOL_USES = 3
_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class ContextPlan:
    """What the API does to one request's context before the model reads it."""

    input_tokens: int  # what the model reads after the edits
    compaction: str | None = None  # a summary to stream first, as a compaction block
    pause: bool = False  # pause_after_compaction: stop with stop_reason "compaction"
    applied_edits: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] | None = None


def _seal(content: str) -> str:
    """The opaque ``encrypted_content`` of a summary: sent back unchanged or refused."""
    return base64.b64encode(hmac.new(_KEY, content.encode(), hashlib.sha256).digest()).decode()


def sealed_block(content: str) -> dict[str, Any]:
    """The compaction block as a ``compaction_delta`` completes it."""
    return {"type": "compaction_delta", "content": content, "encrypted_content": _seal(content)}


def _edits(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    management = body.get("context_management")
    if not isinstance(management, Mapping):
        return []
    edits = management.get("edits")
    return [e for e in edits if isinstance(e, Mapping)] if isinstance(edits, list) else []


def context_problem(body: Mapping[str, Any], beta: str) -> str | None:
    """What the API says of ``context_management`` (``beta``: the request's beta header)."""
    if "context_management" not in body:
        return None
    edits = _edits(body)
    if not edits:
        return "context_management.edits: Field required"
    betas = {name.strip() for name in beta.split(",")}
    for index, edit in enumerate(edits):
        kind = edit.get("type")
        if kind not in BETAS:
            return f"context_management.edits.{index}.type: Input tag {kind!r} is not known"
        if BETAS[kind] not in betas:
            return (
                f"context_management.edits.{index}: requires the anthropic-beta "
                f"header {BETAS[kind]!r}"
            )
    return None


def compaction_problem(block: Mapping[str, Any], at: str, role: Any, beta: str) -> str | None:
    """What the API says of a ``compaction`` block sent back."""
    if "compact-2026-01-12" not in beta:
        return f"{at}: compaction blocks require the anthropic-beta header 'compact-2026-01-12'"
    if role != "assistant":
        return f"{at}: compaction blocks are only allowed in assistant messages"
    content = block.get("content")
    if content is None:
        return None  # a failed compaction goes back as a no-op
    if not isinstance(content, str) or not content:
        return f"{at}.content: empty string content is not allowed"
    if block.get("encrypted_content") != _seal(content):
        return f"{at}.encrypted_content: does not match the compaction it was returned with"
    return None


def from_last_compaction(messages: Sequence[Any]) -> list[Any]:
    """The contents the model reads: everything from the last compaction block on (as a
    user turn's text: its summary)."""
    for m_index in range(len(messages) - 1, -1, -1):
        content = (
            messages[m_index].get("content") if isinstance(messages[m_index], Mapping) else None
        )
        if not isinstance(content, list):
            continue
        for b_index in range(len(content) - 1, -1, -1):
            block = content[b_index]
            if isinstance(block, Mapping) and block.get("type") == "compaction":
                summary = {"type": "text", "text": block.get("content") or ""}
                rest = [summary, *content[b_index + 1 :]]
                return [rest, *(m.get("content") for m in messages[m_index + 1 :])]
    return [m.get("content") if isinstance(m, Mapping) else None for m in messages]


def plan(body: Mapping[str, Any], input_tokens: int) -> ContextPlan | None:
    """The edits a request's ``context_management`` triggers at ``input_tokens``."""
    edits = _edits(body)
    if not edits:
        return None
    applied: list[dict[str, Any]] = []
    for edit in edits:
        kind = edit.get("type")
        trigger = edit.get("trigger")
        at = trigger.get("value") if isinstance(trigger, Mapping) else None
        if input_tokens < (at if isinstance(at, int) else _TRIGGERS.get(str(kind), 100_000)):
            continue
        if kind == "compact_20260112":
            summary = _summary(body.get("messages") or ())
            after = max(1, len(summary) // 4)
            usage = {"input_tokens": input_tokens, "output_tokens": after}
            return ContextPlan(
                input_tokens=after,
                compaction=summary,
                pause=bool(edit.get("pause_after_compaction")),
                applied_edits=applied,
                iterations=[{"type": "compaction", **_cache_free(usage)}],
            )
        if kind == "clear_tool_uses_20250919":
            cleared = _clear_tool_uses(body.get("messages") or (), edit)
            if cleared is not None:
                applied.append(cleared)
                input_tokens -= cleared["cleared_input_tokens"]
    return (
        ContextPlan(input_tokens=max(1, input_tokens), applied_edits=applied) if applied else None
    )


def _cache_free(usage: dict[str, int]) -> dict[str, int]:
    return {**usage, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _summary(messages: Sequence[Any]) -> str:
    """A deterministic stand-in for the model's summary: the user turns' opening words."""
    said = []
    for message in messages:
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            text = (
                content
                if isinstance(content, str)
                else " ".join(b.get("text", "") for b in content or () if isinstance(b, Mapping))
            )
            if text.strip():
                said.append(text.strip()[:60])
    return "## Summary of Conversation\n\n" + "\n".join(f"- The user said: {s}" for s in said)


def _clear_tool_uses(messages: Sequence[Any], edit: Mapping[str, Any]) -> dict[str, Any] | None:
    """Clear every tool result but the last ``keep`` ones (what the API reports)."""
    keep = edit.get("keep")
    kept = keep.get("value") if isinstance(keep, Mapping) else None
    results = [
        block
        for message in messages
        if isinstance(message, Mapping) and isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, Mapping) and block.get("type") == "tool_result"
    ]
    old = results[: max(0, len(results) - (kept if isinstance(kept, int) else _KEEP_TOOL_USES))]
    if not old:
        return None
    size = sum(len(str(block.get("content", ""))) for block in old)
    return {
        "type": "clear_tool_uses_20250919",
        "cleared_tool_uses": len(old),
        "cleared_input_tokens": max(1, size // 4),
    }
