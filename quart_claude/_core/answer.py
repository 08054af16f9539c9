"""One answer's state, owned by the task that produces it (as redis-py's ``Lock`` owns its
token and timings): what readers have of the current step, what the API reported, the retry
and recovery budgets, the one usage record, and the one way to end with ``done`` or
``error``. The relay reads and changes it; telemetry (:class:`~.telemetry.StreamOutcome`)
observes what happened to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .protocol import UpstreamError, done_event
from .stream import Stream
from .telemetry import StreamOutcome

if TYPE_CHECKING:
    from .budget import Spend
    from .fallback import Chain

__all__ = ["Answer", "Ended"]


@dataclass(frozen=True, slots=True)
class Ended:
    """How an answer ended, for whoever keeps it (the conversation, the ``on_turn`` hook).
    ``status`` is ``complete``, ``partial``, ``cancelled`` or ``error``; None when the
    answer goes on in another worker (which will report it)."""

    status: str | None
    stop_reason: str | None
    #: the API messages the answer produced, as the API sent them (a tool loop's assistant
    #: messages with the user turns of their results); a partial one ends with its text
    messages: list[dict[str, Any]]
    usage: dict[str, Any]
    #: what it cost at the price table, in micro-dollars (None: the model has no price)
    cost_micro_usd: int | None = None


#: the counts of a request's usage an ``iterations`` entry carries
_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


class Answer:
    """The state of one answer across its steps, requests and continuations."""

    __slots__ = (
        "after_start",
        "chain",
        "final",
        "hop_usage",
        "moved",
        "outcome",
        "recoveries",
        "reported",
        "retries",
        "served_by",
        "spend",
        "step_base",
        "stream",
        "texts",
        "tolerated",
    )

    def __init__(self, stream: Stream, outcome: StreamOutcome) -> None:
        self.stream = stream
        self.outcome = outcome
        #: this step's text readers have, as the JSON string literals relayed (the hot path
        #: appends to it; a continuation continues it)
        self.texts: list[bytes] = []
        #: what the API said of the answer besides text: ``stop_details``, ``container``
        self.reported: dict[str, Any] = {}
        self.step_base = 0  # output tokens before this step (a step has its own max_tokens)
        self.retries = 0  # requests made again before any of the step's text was sent
        self.recoveries = 0  # continuations after some of it was
        self.tolerated = 0  # library warnings turned from errors into log lines
        #: the last message's content, once it is complete (the steps before it are recorded)
        self.final: list[dict[str, Any]] | None = None
        #: the answer's budget (None: unlimited): reserves, meters and settles each request
        self.spend: Spend | None = None
        #: the answer's walk along CLAUDE_FALLBACKS (None: no fallbacks configured)
        self.chain: Chain | None = None
        self.moved = False  # the chain moved since the last request was built
        self.after_start: list[dict[str, Any]] = []  # events readers get right after start
        self.served_by: str | None = None  # the model of the last message_start
        #: each request's usage by the model it asked, when a chain may move (``done`` shows
        #: it as ``iterations`` once more than one model served)
        self.hop_usage: list[dict[str, Any]] = []

    @property
    def usage(self) -> dict[str, Any]:
        """Every request's usage so far, summed (telemetry reads the same record)."""
        return self.outcome.usage

    @property
    def partial(self) -> bool:
        """Whether readers already have some of the answer (this step's text, or a step)."""
        return bool(self.texts) or bool(self.stream.steps)

    @property
    def container(self) -> dict[str, Any] | None:
        container = self.reported.get("container")
        return container if isinstance(container, dict) else None

    def remaining(self, max_tokens: int) -> int:
        """What is left of this step's ``max_tokens``."""
        return max_tokens - (int(self.usage.get("output_tokens") or 0) - self.step_base)

    def next_step(self) -> None:
        self.texts = []
        self.step_base = int(self.usage.get("output_tokens") or 0)

    def fail(
        self, error: UpstreamError, *, counted: bool = True, partial: bool | None = None
    ) -> str:
        """End with ``error`` (``counted``: not yet counted as a failure; ``partial``: say
        whether readers have some of the answer, when not :attr:`partial`); its class."""
        if counted:
            self.outcome.failed(error.error_class)
        self.outcome.error = error.error_class
        event = error.event(partial=self.partial if partial is None else partial)
        if self.chain is not None and len(self.chain.tried) > 1:
            event["hops"] = list(self.chain.tried)  # every hop tried, in order
        self.stream.append(event)
        return error.error_class

    def ended(self, steps: list[dict[str, Any]], partial_text: str) -> Ended:
        """What is kept of this answer: ``steps`` (the recorded ones) and the last message,
        complete, or what readers have of it (``partial_text``)."""
        messages: list[dict[str, Any]] = []
        for step in steps:
            messages.append({"role": "assistant", "content": step["content"]})
            results = step["results"]
            if results:
                calls = [b["id"] for b in step["content"] if b.get("type") == "tool_use"]
                done = [results[call] for call in calls if call in results]
                messages.append({"role": "user", "content": done})
        last = self.final
        if last is None and partial_text:
            last = [{"type": "text", "text": partial_text}]
        if last:
            messages.append({"role": "assistant", "content": last})
        outcome = self.outcome
        if self.stream.left:
            status = None
        elif outcome.error is not None:
            status = "partial" if messages else "error"
        elif outcome.stop_reason is None or self.stream.cancel_reason is not None:
            status = "cancelled"
        elif outcome.stop_reason == "budget_exhausted":
            status = "partial" if messages else "error"
        else:
            status = "complete"
        return Ended(status, outcome.stop_reason, messages, dict(self.usage))

    def hop_used(self, model: str, usage: dict[str, Any]) -> None:
        """One request's usage, kept by model (its own ``iterations``, if it has them)."""
        if self.chain is None or not usage:
            return
        own = usage.get("iterations")
        if isinstance(own, list) and own:
            self.hop_usage.extend(
                {"model": model, **item} for item in own if isinstance(item, dict)
            )
            return
        counts = {key: usage[key] for key in _COUNTS if isinstance(usage.get(key), int)}
        self.hop_usage.append({"type": "message", "model": model, **counts})

    def finish(self, stop_reason: str | None, *, reported: bool = True) -> str:
        """End with ``done``, carrying what the API reported when ``reported``."""
        if len({item["model"] for item in self.hop_usage}) > 1:  # per hop, the API's shape
            self.usage["iterations"] = list(self.hop_usage)
        self.outcome.stop_reason = stop_reason
        event = done_event(stop_reason, self.usage, self.reported if reported else None)
        if self.spend is not None and self.spend.warning is not None:
            event["budget_warning"] = self.spend.warning
        if self.chain is not None:  # which hop finished it
            event["model"] = self.served_by
        self.stream.append(event)
        return "done"
