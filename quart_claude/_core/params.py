"""An answer's upstream requests, as the API takes them: the conversation a step continues
(the request's, then each finished step's message and its tools' results), and the parameters
of one request (thinking, caching, the operator's extras and betas)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ClaudeConfig
    from .request import ChatRequest

__all__ = ["history", "own_thinking", "request_params", "without_thinking"]

_EPHEMERAL = {"type": "ephemeral"}  # prompt caching's cache_control
_THINKING = frozenset({"thinking", "redacted_thinking"})


def without_thinking(content: Any) -> Any:
    """A message's content without its thinking blocks (another model wrote them)."""
    if not isinstance(content, list):
        return content
    kept = [b for b in content if not (isinstance(b, dict) and b.get("type") in _THINKING)]
    return kept or content  # a message of thinking alone (never seen) is left as it is


def history(
    messages: list[dict[str, Any]], steps: list[dict[str, Any]], model: str | None = None
) -> list[dict[str, Any]]:
    """The conversation a step continues: the request's, then each finished step's message
    and (for tool steps) a user turn with its results, in the order of the calls. A step
    another model wrote loses its thinking (a signature is bound to its model)."""
    conversation = list(messages)
    for step in steps:
        content = step["content"]
        if model is not None and step.get("model") not in (None, model):
            content = without_thinking(content)
        conversation.append({"role": "assistant", "content": content})
        results = step["results"]
        if results is not None:
            conversation.append(
                {
                    "role": "user",
                    "content": [
                        results[block["id"]]
                        for block in step["content"]
                        if block.get("type") == "tool_use" and block.get("id") in results
                    ],
                }
            )
    return conversation


def own_thinking(params: dict[str, Any], steps: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """A tool loop that another hop began goes on without thinking: with thinking on, the
    API wants the loop's assistant turn to start with its thinking, and the thinking there
    is bound to the model that wrote it (this hop may not replay it)."""
    if not steps or steps[-1].get("model") in (None, model) or "thinking" not in params:
        return params
    thinking = params.pop("thinking")
    if thinking.get("type") == "enabled":
        params["max_tokens"] -= int(thinking.get("budget_tokens") or 0)
    return params


def _think(params: dict[str, Any], thinking: str | int, max_tokens: int) -> None:
    if thinking == "adaptive":
        params["thinking"] = {"type": "adaptive"}
    elif isinstance(thinking, int):  # the budget comes on top of the answer's max_tokens
        params["thinking"] = {"type": "enabled", "budget_tokens": thinking}
        params["max_tokens"] = max_tokens + thinking


def _cache_breakpoint(messages: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The conversation before the newest user turn, marked: the same on the next turn, so
    cached. The breakpoint goes on its last block."""
    marked = dict(messages[index])
    content = marked["content"]
    if isinstance(content, str):
        marked["content"] = [{"type": "text", "text": content, "cache_control": _EPHEMERAL}]
    else:
        marked["content"] = [*content[:-1], {**content[-1], "cache_control": _EPHEMERAL}]
    return [*messages[:index], marked, *messages[index + 1 :]]


def request_params(
    request: ChatRequest,
    messages: list[dict[str, Any]],
    max_tokens: int,
    config: ClaudeConfig,
    thinking: str | int,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": request.model,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": True,
    }
    _think(params, thinking, max_tokens)
    if request.system:
        params["system"] = (
            [{"type": "text", "text": request.system, "cache_control": _EPHEMERAL}]
            if config.cache_system_prompt
            else request.system
        )
    if config.cache_conversation and len(request.messages) >= 2:
        params["messages"] = _cache_breakpoint(messages, len(request.messages) - 2)
    if request.temperature is not None:
        # not a typed parameter of SDK 2.x's create(): sent through its public extra_body
        params["extra_body"] = {"temperature": request.temperature}
    if request.stop_sequences:
        params["stop_sequences"] = list(request.stop_sequences)
    if request.user_id is not None:
        params["metadata"] = {"user_id": request.user_id}
    extra = {**config.extra_params, **params.get("extra_body", {})}
    betas = list(config.betas)
    edit = _CONTEXT_EDITS.get(config.context_strategy)
    if edit is not None:  # the API's own context editing or compaction (CLAUDE_CONTEXT_STRATEGY)
        extra.setdefault("context_management", {"edits": [{"type": edit[0]}]})
        betas.append(edit[1])
    if extra:  # the operator's, under what the request itself sets
        params["extra_body"] = extra
    if betas:
        params["extra_headers"] = {"anthropic-beta": ",".join(dict.fromkeys(betas))}
    return params


#: CLAUDE_CONTEXT_STRATEGY -> (the context_management edit, its beta)
_CONTEXT_EDITS = {
    "clear_tool_uses": ("clear_tool_uses_20250919", "context-management-2025-06-27"),
    "compact": ("compact_20260112", "compact-2026-01-12"),
}
