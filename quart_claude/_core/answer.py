"""One answer, owned by the task that produces it (as redis-py's ``Lock`` owns its token and
timings): its steps, the text readers have of the current one, the one usage record, the
continuation guard, the target its requests go to, its status, and the one way to end with
``done`` or ``error``. The relay changes it; its policies shape it; telemetry
(:class:`~.telemetry.StreamOutcome`), the stream's mirror and the metrics read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .policy import NO_POLICIES, Policies
from .protocol import UpstreamError, done_event
from .sse import DELTA_PREFIX, data_line, encode_json, payload_of
from .usage import add_usage

if TYPE_CHECKING:
    from .attempt import Attempt
    from .continuation import ContinuationGuard
    from .providers import Endpoint
    from .request import ChatRequest
    from .stream import Stream
    from .telemetry import StreamOutcome

__all__ = ["Answer", "Ended", "Gate", "Prior", "Target", "Tally"]


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


@dataclass(frozen=True, slots=True)
class Target:
    """Where an answer's requests go: the model asked, its endpoint, its thinking, and its
    place in a fallback chain (0: the request's own). A policy may move the answer."""

    model: str
    endpoint: Endpoint
    thinking: str | int
    hop: int = 0


@dataclass(slots=True)
class Tally:
    """What happened to the answer, counted once (telemetry's log line and span read it)."""

    attempts: int = 0  # upstream requests begun
    retries: int = 0  # made again before any of a step's text was sent
    recoveries: int = 0  # continuations after some was
    tool_calls: int = 0


class Gate(Protocol):
    """Holds what readers may not see yet (a guard's ``hold`` mode): text, and every event
    after it, until the gate releases them through :meth:`Answer.released`."""

    def text(self, literal: bytes) -> None: ...

    def event(self, data: bytes) -> bool:
        """Hold an encoded event behind the text held: False when nothing is held (it goes
        out now)."""
        ...

    @property
    def count(self) -> int:
        """Text literals held."""
        ...

    def literals(self) -> list[bytes]:
        """The text literals held, in order."""
        ...


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
        "attempt_usage",
        "continuation",
        "cost_micro_usd",
        "error",
        "final",
        "gate",
        "hop_usage",
        "outcome",
        "policies",
        "prepared",
        "recoveries",
        "reported",
        "request",
        "retries",
        "served_by",
        "start_fields",
        "step_base",
        "steps",
        "stop_reason",
        "stopped",
        "stream",
        "tally",
        "target",
        "texts",
        "tolerated",
        "usage",
    )

    def __init__(
        self, stream: Stream, request: ChatRequest, target: Target, outcome: StreamOutcome
    ) -> None:
        self.stream: Stream = stream
        self.outcome: StreamOutcome = outcome
        self.policies: Policies = NO_POLICIES
        #: the first request, built and admitted before the stream opened
        self.prepared: Attempt | None = None
        #: the request as the current target takes it (a fallback hop rewrites it)
        self.request: ChatRequest = request
        self.target: Target = target
        #: this step's text readers have, as the JSON string literals relayed (the hot path
        #: appends to it; a continuation continues it)
        self.texts: list[bytes] = []
        #: the finished steps of a tool loop (each message's content, its tools' results):
        #: the stream mirrors this list, so another worker never runs a tool twice
        self.steps: list[dict[str, Any]] = []
        stream.steps = self.steps
        #: every finished request's usage, summed: the one record (``attempt_usage`` is the
        #: request in flight's, as last reported)
        self.usage: dict[str, Any] = {}
        self.attempt_usage: dict[str, Any] = {}
        stream.usage_of = self.usage_so_far
        #: while a continuation decides whether its text goes on from the text sent
        self.continuation: ContinuationGuard | None = None
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.stopped: bool = False  # a policy ended it (a budget's cut, a guard's block)
        self.tally: Tally = Tally()
        #: what the API said of the answer besides text: ``stop_details``, ``container``
        self.reported: dict[str, Any] = {}
        self.step_base: int = 0  # output tokens before this step (a step has its own max_tokens)
        self.retries: int = 0  # this target's requests made again before any of a step's text
        self.recoveries: int = 0  # this target's continuations after some was sent
        self.tolerated: int = 0  # library warnings turned from errors into log lines
        #: the last message's content, once it is complete (the steps before it are recorded)
        self.final: list[dict[str, Any]] | None = None
        self.after_start: list[dict[str, Any]] = []  # events readers get right after start
        #: fields the ``start`` event carries besides the answer's (a conversation's ids)
        self.start_fields: dict[str, Any] = {}
        self.served_by: str | None = None  # the model of the last message_start
        #: each request's usage by the model it asked (``done`` shows it as ``iterations``
        #: once more than one model served)
        self.hop_usage: list[dict[str, Any]] = []
        self.gate: Gate | None = None  # what holds output back (None: it goes out at once)
        self.cost_micro_usd: int | None = None  # set by a policy that priced each request

    # -- what readers get --------------------------------------------------------------
    def say(self, literal: bytes) -> None:
        """One text delta out (the hot path), or into the gate."""
        gate = self.gate
        if gate is None:
            self.texts.append(literal)
            self.stream.append_data(DELTA_PREFIX + literal + b"}")
        else:
            gate.text(literal)

    def released(self, literal: bytes) -> None:
        """Text the gate lets through (the stream's first token, if it is)."""
        if self.outcome.first_token_at is None:
            self.outcome.first_token()
        self.texts.append(literal)
        self.stream.append_data(DELTA_PREFIX + literal + b"}")

    def tell(self, payload: dict[str, Any]) -> None:
        """Any other event, after the text before it (held with it while that is held)."""
        data = data_line(payload)
        gate = self.gate
        if gate is None or not gate.event(data):
            self.stream.append_data(data)

    def step_texts(self) -> list[bytes]:
        """This step's text literals: sent, then held."""
        if self.gate is None or not self.gate.count:
            return self.texts
        return [*self.texts, *self.gate.literals()]

    @property
    def text_count(self) -> int:
        """Text literals this step has produced: sent, and held."""
        return len(self.texts) + (self.gate.count if self.gate is not None else 0)

    # -- state ---------------------------------------------------------------------------
    def usage_so_far(self) -> dict[str, Any]:
        """Every request's usage, the one in flight's as last reported (the stream's mirror
        keeps it, so a worker that takes the stream over sums from there)."""
        if not self.attempt_usage:
            return self.usage
        usage = dict(self.usage)
        add_usage(usage, self.attempt_usage)
        return usage

    def counted(self, model: str, usage: dict[str, Any]) -> None:
        """One request is over: its usage added to the answer's, and kept by the model it
        asked (its own ``iterations``, if it has them)."""
        add_usage(self.usage, usage)
        self.attempt_usage = {}
        if not usage:
            return
        own = usage.get("iterations")
        if isinstance(own, list) and own:
            self.hop_usage.extend(
                {"model": model, **item} for item in own if isinstance(item, dict)
            )
            return
        counts = {key: usage[key] for key in _COUNTS if isinstance(usage.get(key), int)}
        self.hop_usage.append({"type": "message", "model": model, **counts})

    @property
    def partial(self) -> bool:
        """Whether readers already have some of the answer (this step's text, or a step)."""
        return bool(self.texts) or bool(self.steps)

    @property
    def container(self) -> dict[str, Any] | None:
        container = self.reported.get("container")
        return container if isinstance(container, dict) else None

    def retried(self, kind: str) -> None:
        """A request is made again: a ``retry`` or a ``recovery`` (each budget counted)."""
        if kind == "retry":
            self.retries += 1
            self.tally.retries += 1
        else:
            self.recoveries += 1
            self.tally.recoveries += 1

    def move(self, target: Target, request: ChatRequest) -> None:
        """A policy moved the answer (a fallback hop): its next requests go to ``target``,
        with budgets of its own."""
        self.target, self.request = target, request
        self.retries = self.recoveries = 0
        self.outcome.on_hop(target.hop, target.endpoint.provider)

    def remaining(self, max_tokens: int) -> int:
        """What is left of this step's ``max_tokens``."""
        return max_tokens - (int(self.usage.get("output_tokens") or 0) - self.step_base)

    def add_step(self, step: dict[str, Any]) -> None:
        """A finished step is recorded (so no worker asks for it again): the next begins."""
        self.stream.add_step(step)
        self.texts = []
        self.step_base = int(self.usage.get("output_tokens") or 0)

    # -- the end ---------------------------------------------------------------------------
    async def fail(
        self, error: UpstreamError, *, counted: bool = True, partial: bool | None = None
    ) -> str:
        """End with ``error`` (``counted``: not yet counted as a failure; ``partial``: say
        whether readers have some of the answer, when not :attr:`partial`); its class."""
        if counted:
            self.outcome.failed(error.error_class)
        self.error = error.error_class
        event = error.event(partial=self.partial if partial is None else partial)
        await self.policies.ending(self, event)
        self.stream.append(event)
        return error.error_class

    async def finish(self, stop_reason: str | None, *, reported: bool = True, **fields: Any) -> str:
        """End with ``done``, carrying what the API reported when ``reported``."""
        if len({item["model"] for item in self.hop_usage}) > 1:  # per hop, the API's shape
            self.usage["iterations"] = list(self.hop_usage)
        self.stop_reason = stop_reason
        event = done_event(stop_reason, self.usage, self.reported if reported else None)
        event.update(fields)
        await self.policies.ending(self, event)
        self.tell(event)
        return "done"

    def cancelled(self) -> None:
        """Stopped (a client's DELETE, or nobody came back): ``done`` with ``stop_reason:
        cancelled``, after what readers have; nothing a guard holds goes out."""
        self.gate = None
        self.stream.append(done_event("cancelled", self.usage))

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
        return Ended(self._status(bool(messages)), self.stop_reason, messages, dict(self.usage))

    def _status(self, kept: bool) -> str | None:
        if self.stream.left:
            return None
        if self.error is not None or self.stopped:
            return "partial" if kept else "error"
        if self.stop_reason is None or self.stream.cancel_reason is not None:
            return "cancelled"
        return "complete"


@dataclass(frozen=True, slots=True)
class Prior:
    """What a stream holds when this worker takes it over: the finished steps of a tool loop
    (with their recorded results), the current step's text sent, and the usage."""

    text: str
    usage: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    step_deltas: int = 0  # the current step's deltas (a lower bound of its output tokens)
    #: the ``fallback`` events of a chain's moves (a takeover goes on at the last one's hop)
    moves: list[dict[str, Any]] = field(default_factory=list)
    #: the text readers have, over every step (a guard's windows go on there)
    sent: str = ""

    @classmethod
    def from_events(
        cls, events: list[bytes], usage: dict[str, Any], steps: list[dict[str, Any]] | None = None
    ) -> Prior:
        """From the stream's encoded events, its steps and its last stored usage. An
        interrupted request never reported its output: the deltas are a lower bound of it."""
        steps = list(steps or ())
        at = int(steps[-1]["at"]) if steps else 0
        pieces: list[str] = []
        sent: list[str] = []
        total = 0
        moves: list[dict[str, Any]] = []
        for position, event in enumerate(events):
            payload = payload_of(event)
            kind = payload.get("type")
            if kind == "delta":
                total += 1
                sent.append(payload["text"])
                if position >= at:
                    pieces.append(payload["text"])
            elif kind == "fallback" and payload.get("phase") != "server":  # the chain's
                moves.append(payload)
        usage = dict(usage)
        usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), total)
        return cls("".join(pieces), usage, steps, len(pieces), moves, "".join(sent))

    def pending_calls(self) -> list[dict[str, Any]]:
        """The last step's tool calls without a recorded result."""
        if not self.steps or self.steps[-1]["results"] is None:
            return []
        done = self.steps[-1]["results"]
        return [
            block
            for block in self.steps[-1]["content"]
            if block.get("type") == "tool_use" and block.get("id") not in done
        ]

    def resume(self, answer: Answer) -> None:
        """The answer goes on from here: its steps, its usage, the text to continue."""
        add_usage(answer.usage, self.usage)
        answer.steps.extend(dict(step) for step in self.steps)
        if self.text:
            answer.texts.append(encode_json(self.text))
        answer.step_base = int(answer.usage.get("output_tokens") or 0) - self.step_deltas
