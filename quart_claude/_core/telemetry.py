"""What one stream did, recorded once and reported three ways: Prometheus metrics, an
OpenTelemetry span, and the ``stream_end`` log line, with the same fields in all three.

The relay fills a :class:`StreamOutcome` as it goes (a handful of calls per stream, none per
event). Tracing follows the GenAI semantic conventions and costs next to nothing when the
host app has not configured an OTel SDK: the API's no-op span reports ``is_recording()``
false and nothing is built for it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from .metrics import TOKEN_KINDS, Metrics
from .request import ChatRequest

if TYPE_CHECKING:
    from .answer import Answer

__all__ = ["StreamOutcome", "Telemetry", "parent_context"]

log = logging.getLogger("quart_claude")

_TRACER_NAME = "quart_claude"

#: log field -> span attribute, for the fields both carry (the GenAI conventions' names).
_SPAN_ATTRIBUTES = {
    "model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "message_id": "gen_ai.response.id",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cache_read_input_tokens": "gen_ai.usage.cache_read.input_tokens",
    "cache_creation_input_tokens": "gen_ai.usage.cache_creation.input_tokens",
    "stream_id": "quart_claude.stream_id",
    "outcome": "quart_claude.outcome",
    "attempts": "quart_claude.attempts",
    "retries": "quart_claude.retries",
    "recoveries": "quart_claude.recoveries",
    "resumes": "quart_claude.resumes",
    "tool_calls": "quart_claude.tool_calls",
    "ttft_ms": "quart_claude.ttft_ms",
    "duration_ms": "quart_claude.duration_ms",
    "request_id": "quart_claude.upstream_request_id",
    "error": "error.type",
}


class _Headers(Protocol):
    def get(self, key: str) -> str | None: ...


def parent_context(headers: _Headers) -> Context | None:
    """The trace a stream's span joins: the current span (an OTel middleware's) when there is
    one, else the request's W3C ``traceparent``; None means "the current context"."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    if not headers.get("traceparent"):
        return None
    return propagate.extract(headers)  # it only calls .get


#: ``gen_ai.provider.name`` of each CLAUDE_PROVIDER (OpenTelemetry's GenAI conventions)
_GEN_AI_PROVIDERS = {
    "bedrock": "aws.bedrock",
    "bedrock-mantle": "aws.bedrock",
    "vertex": "gcp.vertex_ai",
    "foundry": "azure.ai.inference",
}


class Telemetry:
    """The app's metrics (None when ``CLAUDE_METRICS`` is off) and its live streams' records."""

    def __init__(self, metrics: Metrics | None, tracer_provider: TracerProvider | None) -> None:
        self.metrics = metrics
        # the global provider's tracer is a proxy: it follows an SDK configured later
        self.tracer: trace.Tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=tracer_provider)
        self._live: dict[str, StreamOutcome] = {}

    def stream(
        self, stream_id: str, request: ChatRequest, parent: Context | None = None
    ) -> StreamOutcome:
        outcome = StreamOutcome(self, stream_id, request, parent)
        self._live[stream_id] = outcome
        return outcome

    def fell_back(self, from_model: str, to_model: str, reason: str, phase: str) -> None:
        if self.metrics is not None:
            self.metrics.fallbacks.labels(from_model, to_model, reason, phase).inc()

    def cooled(self, hop: str, seconds: float) -> None:
        """A hop that failed is skipped for ``seconds`` (its cooldown)."""
        if self.metrics is not None:
            self.metrics.fallback_cooldown_until.labels(hop).set(time.time() + seconds)

    def budget_rejected(self) -> None:
        if self.metrics is not None:
            self.metrics.budget_rejections.inc()

    def budget_cut(self) -> None:
        if self.metrics is not None:
            self.metrics.budget_cutoffs.inc()

    def spent(self, model: str, micro_usd: int) -> None:
        if self.metrics is not None and micro_usd:
            self.metrics.spend.labels(model).inc(micro_usd / 1_000_000)

    def resumed(self, stream_id: str, after: int) -> None:
        """A reader came back (``after``: its ``Last-Event-ID``)."""
        if self.metrics is not None:
            self.metrics.resumes.inc()
        outcome = self._live.get(stream_id)  # produced here: its span notes it
        if outcome is not None:
            outcome.resumes += 1
            if outcome.span.is_recording():
                outcome.span.add_event("resume", {"quart_claude.last_event_id": after})

    def _ended(self, stream_id: str) -> None:
        self._live.pop(stream_id, None)


class StreamOutcome:
    """One stream's record: counts, usage summed over every upstream request, its span."""

    __slots__ = (
        "_attempt",
        "_telemetry",
        "first_token_at",
        "hop",
        "message_id",
        "model",
        "parent_trace_id",
        "provider",
        "request_id",
        "response_model",
        "resumes",
        "span",
        "started",
        "stream_id",
    )

    def __init__(
        self, telemetry: Telemetry, stream_id: str, request: ChatRequest, parent: Context | None
    ) -> None:
        self._telemetry = telemetry
        self.stream_id: str = stream_id
        self.model: str = request.model  # bounded: CLAUDE_MODEL or one of CLAUDE_ALLOWED_MODELS
        self.started: float = time.monotonic()
        self.resumes: int = 0  # readers that came back (they are not the answer's)
        self.first_token_at: float | None = None
        self.request_id: str | None = None
        self.message_id: str | None = None
        self.response_model: str | None = None
        self.provider: str = "anthropic"  # the current hop's (set by the relay)
        self.hop: int = 0  # the fallback chain's hop the stream is on
        self._attempt: Span | None = None
        self.span: Span = telemetry.tracer.start_span(
            f"chat {request.model}", context=parent, kind=SpanKind.CLIENT
        )
        # the caller's trace, for the log line even when no SDK records this span (the API's
        # no-op span carries the parent's ids on some releases and none on others)
        self.parent_trace_id: int = trace.get_current_span(parent).get_span_context().trace_id
        if self.span.is_recording():
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "anthropic",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": request.model,
                "gen_ai.request.max_tokens": request.max_tokens,
                "quart_claude.stream_id": stream_id,
            }
            if request.temperature is not None:
                attributes["gen_ai.request.temperature"] = request.temperature
            if request.stop_sequences:
                attributes["gen_ai.request.stop_sequences"] = list(request.stop_sequences)
            self.span.set_attributes(attributes)
        metrics = telemetry.metrics
        if metrics is not None:
            metrics.streams_active.labels(self.model).inc()

    def first_token(self) -> None:
        now = self.first_token_at = time.monotonic()
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.time_to_first_token.labels(self.model).observe(now - self.started)
        if self.span.is_recording():
            self.span.add_event("first_token")

    def fell_back(self, from_model: str, to_model: str, reason: str, phase: str) -> None:
        self._telemetry.fell_back(from_model, to_model, reason, phase)

    def on_hop(self, hop: int, provider: str) -> None:
        """The answer is on hop ``hop`` of its fallback chain, on ``provider``."""
        self.hop, self.provider = hop, provider
        if self.span.is_recording():
            self.span.set_attribute(
                "gen_ai.provider.name", _GEN_AI_PROVIDERS.get(provider, provider)
            )

    def attempt(self, model: str, number: int) -> None:
        """The answer's ``number``th upstream request begins: its span (GenAI ``chat``, on its
        provider), a child of the stream's, ended by :meth:`upstream`."""
        if self._attempt is not None:  # one that never reached upstream (a budget refused it)
            self._attempt.end()
            self._attempt = None
        if not self.span.is_recording():
            return
        self._attempt = self._telemetry.tracer.start_span(
            f"upstream {model}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": _GEN_AI_PROVIDERS.get(self.provider, self.provider),
                "gen_ai.request.model": model,
                "quart_claude.attempt": number,
                "quart_claude.hop": self.hop,
            },
        )

    def upstream(self, outcome: str) -> None:
        """One upstream request ended: ``ok``, ``cancelled`` or its error class."""
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.upstream_requests.labels(self.model, outcome, self.provider).inc()
        span, self._attempt = self._attempt, None
        if span is not None:
            if outcome != "ok":
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end()

    def failed(self, error_class: str) -> None:
        """A failure was classified (retried or not)."""
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.errors.labels(self.model, error_class).inc()

    def retrying(self, error_class: str, kind: str, delay: float, attempts: int) -> None:
        """The request is made again after ``delay`` s (``attempts`` made so far): a ``retry``
        (no text sent yet) or a ``recovery`` (a continuation of the text already sent)."""
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.retries.labels(self.model, error_class, kind).inc()
        if self.span.is_recording():
            self.span.add_event(
                "retry",
                {
                    "error.type": error_class,
                    "quart_claude.retry_kind": kind,
                    "quart_claude.attempt": attempts + 1,
                    "quart_claude.delay_s": delay,
                },
            )

    def tool_started(self, name: str, call_id: str) -> Span:
        """A tool call's span (GenAI ``execute_tool``), a child of the stream's."""
        return self._telemetry.tracer.start_span(
            f"execute_tool {name}",
            context=trace.set_span_in_context(self.span),
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id,
            },
        )

    def tool_ended(self, span: Span, tool: str, outcome: str, seconds: float) -> None:
        """A tool call ended: ``ok`` or how it failed. ``tool``: a bounded label (the
        registered name, or ``_unknown``)."""
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.tool_calls.labels(tool, outcome).inc()
            metrics.tool_duration.labels(tool).observe(seconds)
        if outcome != "ok" and span.is_recording():
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def discard(self) -> None:
        """The answer never started (a policy refused it): no stream to count."""
        self._telemetry._ended(self.stream_id)
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.streams_active.labels(self.model).dec()
        self.span.end()

    def end(self, outcome: str, answer: Answer) -> dict[str, Any]:
        """The stream ended with ``outcome`` (``done``, ``cancelled``, ``disconnected`` or an
        error class): count it, end the span, write the log line, from what the answer holds;
        returns the log's fields."""
        self._telemetry._ended(self.stream_id)
        if self._attempt is not None:
            self._attempt.end()
            self._attempt = None
        duration = time.monotonic() - self.started
        usage, tally = answer.usage, answer.tally
        fields: dict[str, Any] = {
            "stream_id": self.stream_id,
            "model": self.model,
            "provider": self.provider,
            "hop": self.hop or None,
            "outcome": outcome,
            "stop_reason": answer.stop_reason,
            "error": answer.error,
            "attempts": tally.attempts,
            "retries": tally.retries,
            "recoveries": tally.recoveries,
            "resumes": self.resumes,
            "tool_calls": tally.tool_calls or None,
            "ttft_ms": (
                round((self.first_token_at - self.started) * 1000)
                if self.first_token_at is not None
                else None
            ),
            "duration_ms": round(duration * 1000),
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
            "cache_read_input_tokens": usage.get("cache_read_input_tokens"),
            "cache_creation_input_tokens": usage.get("cache_creation_input_tokens"),
            "request_id": self.request_id,
            "response_model": self.response_model,
            "message_id": self.message_id,
        }
        metrics = self._telemetry.metrics
        if metrics is not None:
            model = self.model
            metrics.streams_active.labels(model).dec()
            metrics.streams.labels(model, outcome).inc()
            metrics.stream_duration.labels(model).observe(duration)
            for kind, key in TOKEN_KINDS.items():
                value = usage.get(key)
                if isinstance(value, int) and value > 0:
                    metrics.tokens.labels(model, kind, self.provider).inc(value)
        span = self.span
        context = span.get_span_context()
        recording = span.is_recording()
        trace_id = context.trace_id if recording else self.parent_trace_id
        fields["trace_id"] = format(trace_id, "032x") if trace_id else None
        fields["span_id"] = format(context.span_id, "016x") if recording else None
        if span.is_recording():
            span.set_attributes(
                {
                    _SPAN_ATTRIBUTES[name]: value
                    for name, value in fields.items()
                    if value is not None and name in _SPAN_ATTRIBUTES
                }
            )
            if answer.stop_reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", [answer.stop_reason])
            if answer.error is not None:
                span.set_status(Status(StatusCode.ERROR, answer.error))
        span.end()
        log.info(
            "stream_end %s",
            " ".join(f"{key}={value}" for key, value in fields.items() if value is not None),
            extra={"claude": fields},
        )
        return fields
