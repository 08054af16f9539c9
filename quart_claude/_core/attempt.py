"""One upstream request of an answer: what it said besides text (its usage, stop reason,
whether it ended properly) and its content blocks in the API's order, kept to send back to the
API on the next step. The relay's hot path hands it every event that is not a plain text
delta; the answer's policies meter what it writes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import classify_status
from .protocol import UpstreamError, start_event
from .sse import encode_json

if TYPE_CHECKING:
    from .answer import Answer, Target

__all__ = ["Attempt", "joined"]

_THINKING = ("thinking", "redacted_thinking")
#: a delta's fields that are not output the model wrote (a signature is opaque)
_UNBILLED = frozenset({"type", "signature"})


class Attempt:
    """One request: its parameters as sent (policies may reshape them before), and what it
    said. Text blocks are kept by their span of the step's ``texts``; thinking with its
    signature; tool calls; server tools' blocks; blocks this module does not know, as they
    came. The answer's first request's ``message_start`` starts the stream."""

    __slots__ = (
        "answer",
        "asked",
        "blocks",
        "completed",
        "deltas",
        "due",
        "expose_thinking",
        "inputs",
        "model",
        "open",
        "params",
        "reported",
        "request_id",
        "rethinking",
        "spans",
        "stop_reason",
        "target",
        "texts",
        "thought",
        "usage",
    )

    def __init__(
        self, answer: Answer, params: dict[str, Any], expose_thinking: bool, rethinking: bool
    ) -> None:
        self.answer: Answer = answer
        #: as built (a retry sends these again, reshaped again), and as sent (the policies
        #: may reshape them: a budget's max_tokens)
        self.asked: dict[str, Any] = params
        self.params: dict[str, Any] = params
        self.model: str = params["model"]  # the model asked (the target's)
        self.target: Target = answer.target
        self.due: bool = False  # a policy asked for a checkpoint (a budget's top-up, say)
        #: the step's text literals (the hot path appends to it)
        self.texts: list[bytes] = answer.texts
        self.spans: dict[int, int] = {}  # a text block's index -> where its text starts
        self.expose_thinking: bool = expose_thinking
        self.rethinking: bool = rethinking  # an earlier request of this step showed thinking
        self.thought: bool = False  # this request streamed thinking
        #: the message's blocks by index (thinking keeps its signature here: for the API,
        #: never for readers; a text block's text is in ``texts``)
        self.blocks: dict[int, dict[str, Any]] = {}
        self.inputs: dict[int, list[str]] = {}  # tool inputs' JSON, as it streams
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.completed: bool = False  # saw message_stop: a body that ends without it is truncated
        self.open: set[int] = set()  # blocks started and not yet stopped
        self.reported: dict[str, Any] = {}  # message_delta's stop_details and container
        self.deltas: int = 0
        self.request_id: str | None = None

    async def control(self, name: bytes, data: bytes) -> None:
        """Any event but a content delta (pings and unknown events: nothing to do)."""
        handler = _CONTROL.get(name)
        if handler is not None:
            handler(self, data)
            if self.due:  # message_start: the real input passes a budget's grant
                await self.checkpoint()

    async def checkpoint(self) -> None:
        """A policy asked to look now (raises :class:`~.policy.Stop` to end the answer)."""
        self.due = False
        answer = self.answer
        await answer.policies.checkpoint(answer, self)

    @property
    def ended(self) -> bool:
        """The message is complete: ``message_stop`` came, or its stop reason did with every
        block closed (a connection may fail between those and ``message_stop``)."""
        return self.completed or (self.stop_reason is not None and not self.open)

    def first_text(self) -> None:
        """The step's first text is going out: the stream's first token, if it is."""
        outcome = self.answer.outcome
        if outcome.first_token_at is None:
            outcome.first_token()

    # -- events ----------------------------------------------------------------------------
    def _message_started(self, data: bytes) -> None:
        message = json.loads(data)["message"]
        answer = self.answer
        self.usage = answer.attempt_usage = dict(message.get("usage") or {})
        stream = answer.stream
        if not stream.events:
            outcome = answer.outcome
            outcome.response_model = message.get("model")
            outcome.message_id = message.get("id")
            start = start_event(stream.id, message.get("model"), message.get("id"), self.usage)
            stream.append({**start, **answer.start_fields})
        answer.served_by = message.get("model")
        while answer.after_start:  # a fallback before the first event, after start
            answer.tell(answer.after_start.pop(0))
        self.due = answer.policies.started(self) or self.due

    def _block_started(self, data: bytes) -> None:
        body = json.loads(data)
        block = body.get("content_block") or {}
        index = int(body.get("index", 0))
        self.open.add(index)
        if block.get("type") == "text":
            self.blocks[index] = dict(block)
            self.spans[index] = self.answer.text_count
        else:
            self._block_start(index, dict(block))

    def _block_stopped(self, data: bytes) -> None:
        index = json.loads(data).get("index", 0)
        self.open.discard(index)
        if index in self.inputs:
            self._input_done(index)
        elif index in self.spans and self.blocks[index].get("citations"):
            self._cited(index)

    def _message_delta(self, data: bytes) -> None:
        body = json.loads(data)
        delta = body.get("delta") or {}
        self.stop_reason = delta.get("stop_reason") or self.stop_reason
        for name in ("stop_details", "container"):
            if delta.get(name) is not None:
                self.reported[name] = delta[name]
        self.usage.update(body.get("usage") or {})

    def _message_stopped(self, data: bytes) -> None:
        self.completed = True

    def _error(self, data: bytes) -> None:
        raise stream_error(data, self.request_id)

    def _block_start(self, index: int, block: dict[str, Any]) -> None:
        kind = block.get("type")
        self.blocks[index] = block
        if "input" in block:  # tool_use, server_tool_use, mcp_tool_use, ...: input streams
            self.inputs[index] = []
        elif kind == "thinking":
            block["thinking"] = block.get("thinking") or ""
        elif kind == "fallback":  # the API's own fallback: kept in place, told to readers
            self._server_fell_back(block)
        elif isinstance(kind, str) and kind.endswith("_tool_result"):  # a server tool's result
            content = block.get("content")
            failed = isinstance(content, dict) and str(content.get("type", "")).endswith("_error")
            self.answer.tell(
                {
                    "type": "tool_result",
                    "id": block.get("tool_use_id"),
                    "name": kind[: -len("_tool_result")],
                    "is_error": failed,
                    "output": content,
                    "server": True,
                }
            )

    def _server_fell_back(self, block: dict[str, Any]) -> None:
        """A refusal the API's server-side fallback (``CLAUDE_SERVER_FALLBACKS``) answered
        with another model: readers get a ``fallback`` event, ``done`` that model."""
        ends = [block.get(side) for side in ("from", "to")]
        models = [str(end.get("model")) if isinstance(end, dict) else "" for end in ends]
        phase = "server"
        event = {"type": "fallback", "from": models[0], "to": models[1], "reason": "refusal"}
        self.answer.tell({**event, "phase": phase})
        self.answer.served_by = models[1]
        self.answer.outcome.fell_back(models[0], models[1], "refusal", phase)

    def _input_done(self, index: int) -> None:
        """A tool call's input is complete; a server tool's call is shown now (the API runs
        it), the app's tools once the message ends (they run then)."""
        block = self.blocks[index]
        raw = "".join(self.inputs.pop(index))
        try:
            block["input"] = json.loads(raw) if raw else block.get("input") or {}
        except ValueError:
            block["input"] = {}
        if block.get("type") == "server_tool_use":
            self.answer.tell(
                {
                    "type": "tool_call",
                    "id": block.get("id"),
                    "name": block.get("name"),
                    "input": block["input"],
                    "server": True,
                }
            )

    def _cited(self, index: int) -> None:
        """A text block with citations ended: one ``citation`` event for each, after the text
        it supports (protocol v1.2), with that text and the citation as the API gave it."""
        text = joined(self.answer.step_texts()[self.spans[index] :])
        for citation in self.blocks[index]["citations"]:
            self.answer.tell({"type": "citation", "citation": citation, "text": text})

    # -- deltas off the fast path ------------------------------------------------------------
    async def slow_delta(self, data: bytes) -> bytes | None:
        """A delta off the fast path: text decoded, passed through a continuation's guard
        while it decides and re-encoded; any other delta builds its block, and is metered.
        ``None`` when there is no text to send."""
        body = json.loads(data)
        delta = body["delta"]
        if delta.get("type") == "text_delta":
            return self._guarded(delta.get("text"))
        self._block_delta(body.get("index", 0), delta)
        if self.due:
            await self.checkpoint()
        return None

    def _guarded(self, text: str | None) -> bytes | None:
        """A text delta off the fast path, through a continuation's guard while it decides."""
        if not text:
            return None
        answer = self.answer
        guard = answer.continuation
        if guard is not None:
            text = guard.feed(text)
            if not guard.deciding:
                answer.continuation = None  # decided: the rest takes the fast path
            if not text:
                return None
        return encode_json(text)

    def _block_delta(self, index: int, delta: dict[str, Any]) -> None:
        """A delta of another block: a tool's input kept, thinking sent as its own event
        and kept with its signature, the rest (citations, unknown blocks) accumulated; all
        of it metered (everything the model writes is billed output)."""
        kind = delta.get("type")
        policies = self.answer.policies
        if kind == "input_json_delta":
            piece = delta.get("partial_json") or ""
            parts = self.inputs.get(index)
            if parts is not None:
                parts.append(piece)
            if piece and policies.wrote_other(piece, json=True):
                self.due = True
            return
        if kind == "thinking_delta":
            self._thinking(delta.get("thinking") or "")
        _accumulate(self.blocks.get(index), delta)
        for name, value in delta.items():
            if name not in _UNBILLED and isinstance(value, str) and value:
                self.due = policies.wrote_other(value, json=False) or self.due

    def _thinking(self, text: str) -> None:
        if not self.expose_thinking or not text:
            return
        if not self.thought:
            self.thought = True
            # a retry after thinking (no text yet) thinks again: say so, so a client clears it
            if self.rethinking:
                self.answer.tell({"type": "thinking", "text": "", "restart": True})
        self.answer.tell({"type": "thinking", "text": text})

    # -- the request's end -------------------------------------------------------------------
    def settle_interrupted(self) -> None:
        """Count an interrupted request's usage: it never reports its final output count, so
        the deltas received are a lower bound."""
        usage = self.usage
        if usage:
            usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), self.deltas)
        self.count()

    def count(self) -> None:
        """Add this request's usage to the answer's."""
        self.answer.counted(self.model, self.usage)

    def calls(self) -> list[dict[str, Any]]:
        """The app's tool calls, complete, in the order the model made them."""
        return [
            block
            for _, block in sorted(self.blocks.items())
            if block.get("type") == "tool_use" and "id" in block
        ]

    def content(self) -> list[dict[str, Any]]:
        """The message's content as the next step sends it back: every block in the order
        the API sent it, with its fields. A continuation's first text block also holds the
        text the interrupted requests of this step sent (it continues it); an empty text
        block is left out, as the API refuses one."""
        texts = self.texts
        text_at = sorted(self.spans)
        ends = {index: self.spans[later] for index, later in itertools.pairwise(text_at)}
        content: list[dict[str, Any]] = []
        for index, block in sorted(self.blocks.items()):
            if index not in self.spans:
                content.append(block)
                continue
            start = 0 if index == text_at[0] else self.spans[index]
            text = joined(texts[start : ends.get(index, len(texts))])
            if text:
                content.append({**block, "text": text})
        if texts and not text_at:  # continued straight into other blocks: the text first
            thinking = [b for b in content if b.get("type") in _THINKING]
            content = [
                *thinking,
                {"type": "text", "text": joined(texts)},
                *content[len(thinking) :],
            ]
        return content


_CONTROL: dict[bytes, Callable[[Attempt, bytes], None]] = {
    b"content_block_start": Attempt._block_started,
    b"content_block_stop": Attempt._block_stopped,
    b"message_start": Attempt._message_started,
    b"message_delta": Attempt._message_delta,
    b"message_stop": Attempt._message_stopped,
    b"error": Attempt._error,
}


def _accumulate(block: dict[str, Any] | None, delta: dict[str, Any]) -> None:
    """Build ``block`` from a delta the way the API's deltas compose: a citation is added to
    the block's list; any other delta's string fields extend the block's field of that name
    (``compaction_delta``'s ``content``, say), so an unknown block goes back as it came."""
    if block is None:
        return
    if delta.get("type") == "citations_delta":
        citation = delta.get("citation")
        if citation is not None:
            block.setdefault("citations", []).append(citation)
        return
    for name, value in delta.items():
        if name != "type" and isinstance(value, str):
            block[name] = (block.get(name) or "") + value


def joined(texts: list[bytes]) -> str:
    """The text the client has received, from the JSON string literals kept per delta."""
    return "".join(json.loads(b"[" + b",".join(texts) + b"]"))


def stream_error(data: bytes, request_id: str | None) -> UpstreamError:
    """An ``error`` event in a 200 stream, classified as its status would be."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    return classify_status(
        200,
        error.get("type"),
        str(error.get("message", "")),
        code if isinstance(code, str) else None,
        {},
        request_id,
    )
