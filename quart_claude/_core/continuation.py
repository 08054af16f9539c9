"""Continuing an answer that was interrupted mid-stream, without repeating or corrupting it.

The continuation request is an assistant prefill on models that accept one (before 4.6), or
the documented "continue" user turn on the rest. Either way the model may not do as asked: it
may repeat the whitespace the prefill lost, repeat the last words it wrote, or start the
whole answer again. :class:`ContinuationGuard` holds the first text of a continuation back
until it can tell which, drops what the client already has, and refuses (with an error the
client can act on) a continuation that restarted and then diverged.
"""

from __future__ import annotations

import re
from typing import Any

from .model_ids import canonical_model

__all__ = [
    "CONTINUE_PROMPT",
    "ContinuationGuard",
    "Diverged",
    "continuation_messages",
    "supports_prefill",
]

#: The documented way to resume an interrupted answer on models that refuse prefill.
CONTINUE_PROMPT = (
    "Your previous response was interrupted and ended with: {tail}\n"
    "Continue exactly from where you left off. Do not repeat anything already written "
    "and do not add any preamble."
)

# Models before 4.6 accept an assistant prefill; 4.6+ and 5.x answer it with a 400.
_PREFILL_MODELS = re.compile(
    r"^claude-(?:3|instant|2|(?:opus|sonnet|haiku)-4(?:-[0-5])?(?:-\d{8})?$)"
)

#: Text held back at the start of a continuation before deciding (characters).
HOLD = 64
#: A continuation that starts with this much of the answer (or all of a shorter one) and
#: then differs is a restart that diverged.
RESTART_MIN = 24
#: The shortest repeat of the answer's last words that is dropped (at a word boundary).
TAIL_MIN = 3


def supports_prefill(model: str) -> bool:
    """Whether ``model`` (any provider's id) accepts an assistant prefill."""
    return _PREFILL_MODELS.match(canonical_model(model)) is not None


def continuation_messages(
    model: str, messages: list[dict[str, Any]], partial: str, *, prefill: bool = True
) -> tuple[list[dict[str, Any]], str]:
    """The messages that continue ``partial``, and the whitespace the answer may repeat.
    ``prefill=False``: the "continue" turn whatever the model (thinking forbids a prefill)."""
    if prefill and supports_prefill(model) and partial.strip():
        kept = partial.rstrip()  # the API refuses a prefill ending in whitespace
        return [*messages, {"role": "assistant", "content": kept}], partial[len(kept) :]
    tail = partial[-200:]
    # the model often starts again with the whitespace the partial ended in: the guard drops
    # that repeat (a space said twice, or a paragraph break that was never written)
    return [
        *messages,
        {"role": "assistant", "content": partial},
        {"role": "user", "content": CONTINUE_PROMPT.format(tail=tail)},
    ], partial[len(partial.rstrip()) :]


class Diverged(Exception):
    """The model restarted the answer and then wrote something else."""


class ContinuationGuard:
    """Filters the text of one continuation request against ``sent``, what the client has."""

    __slots__ = ("_held", "_sent", "_whitespace", "deciding")

    def __init__(self, sent: str, whitespace: str = "") -> None:
        self._sent = sent
        self._whitespace = whitespace  # a prefill lost it; the model may send it again
        self._held = ""
        self.deciding: bool = True

    def feed(self, text: str) -> str:
        """The part of ``text`` to relay (possibly empty while deciding)."""
        if not self.deciding:
            return text
        if self._whitespace:
            common = _common_prefix(text, self._whitespace)
            text, self._whitespace = (
                text[common:],
                self._whitespace[common:] if common == len(text) else "",
            )
        held = self._held + text
        sent = self._sent
        if (len(held) < len(sent) and sent.startswith(held)) or len(held) < min(HOLD, len(sent)):
            self._held = held  # a restart so far, or too short to tell
            return ""
        return self._decide(held)

    def end(self) -> str:
        """The attempt finished: decide on what is still held."""
        if not self.deciding:
            return ""
        held, self._held = self._held, ""
        self.deciding = False
        if held and self._sent.startswith(held) and len(held) >= RESTART_MIN:
            raise Diverged("the continuation restarted the answer and stopped early")
        return _drop_tail_repeat(self._sent, held)

    def _decide(self, held: str) -> str:
        sent = self._sent
        self._held = ""
        self.deciding = False
        if held.startswith(sent):
            return held[len(sent) :]  # the model started over: drop the repeat
        if _common_prefix(held, sent) >= min(RESTART_MIN, len(sent)):
            raise Diverged("the continuation restarted the answer with different text")
        return _drop_tail_repeat(sent, held)


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _drop_tail_repeat(sent: str, held: str) -> str:
    """``held`` without a leading repeat of ``sent``'s last words."""
    longest = min(len(sent), len(held), 200)
    for size in range(longest, TAIL_MIN - 1, -1):
        piece = held[:size]
        if not sent.endswith(piece):
            continue
        start = len(sent) - size
        if start == 0 or sent[start - 1].isspace() or piece[0].isspace():
            return held[size:]
    return held
