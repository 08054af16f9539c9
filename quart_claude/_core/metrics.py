"""Prometheus metrics: what the relay counts, and ``{prefix}/metrics`` in the text format.

One process, one worker: the metrics live in a registry of the app's own. Several worker
processes (``hypercorn -w N``, or N servers on one host): set ``PROMETHEUS_MULTIPROC_DIR`` to
an empty directory before the processes start (prometheus-client's multiprocess mode); every
process writes its values there and whichever one answers a scrape sums them all. Nothing is
counted per event: each stream touches the metrics a handful of times.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import choose_encoder

from .config_error import ConfigError

__all__ = ["MULTIPROC_ENV", "TOKEN_KINDS", "Metrics", "metrics_for"]

#: prometheus-client's own switch for multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Outcomes of a stream this worker stopped producing while it went on on another one.
_LEFT = ("handoff", "superseded")

#: ``claude_tokens_total{kind}`` -> the usage field it sums.
TOKEN_KINDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_write": "cache_creation_input_tokens",
}

# LLM latencies: a first token in 0.3-3 s is normal, 10 s+ is a queue or a retry; whole
# answers run from a second to many minutes.
TTFT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)
TOOL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db")


class Metrics:
    """The metric objects of one registry (one app; or one process in multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: str | None) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        self.streams_active: Gauge = Gauge(
            "claude_streams_active",
            "Streams being produced right now (summed over live worker processes).",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.streams: Counter = Counter(
            "claude_streams",
            "Streams ended, by outcome: done, cancelled, disconnected, handoff and superseded "
            "(it went on on another worker), or the error class.",
            ["model", "outcome"],
            registry=registry,
        )
        self.time_to_first_token: Histogram = Histogram(
            "claude_time_to_first_token_seconds",
            "From the stream's start to its first text delta, retries included.",
            ["model"],
            registry=registry,
            buckets=TTFT_BUCKETS,
        )
        self.stream_duration: Histogram = Histogram(
            "claude_stream_duration_seconds",
            "From the stream's start to its last event, whatever the outcome.",
            ["model"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.tokens: Counter = Counter(
            "claude_tokens",
            "Tokens billed upstream, by kind: input, output, cache_read, cache_write, and by "
            "the provider that finished the stream.",
            ["model", "kind", "provider"],
            registry=registry,
        )
        self.upstream_requests: Counter = Counter(
            "claude_upstream_requests",
            "Requests made upstream, by outcome (ok, cancelled, or the error class) and by "
            "provider (CLAUDE_PROVIDER, or a fallback hop's).",
            ["model", "outcome", "provider"],
            registry=registry,
        )
        self.retries: Counter = Counter(
            "claude_retries",
            "Requests made again after a failure, by the failure's class and kind "
            "(retry: before any text; recovery: a continuation after text was sent).",
            ["model", "error", "kind"],
            registry=registry,
        )
        self.errors: Counter = Counter(
            "claude_errors",
            "Failures classified by the relay, by class, whether a retry hid them or not.",
            ["model", "error"],
            registry=registry,
        )
        self.tool_calls: Counter = Counter(
            "claude_tool_calls",
            "Calls of the app's tools, by tool and outcome: ok, error, timeout, invalid_input, "
            "cancelled (the stream was stopped), unknown_tool (a name the model made up; its "
            "tool label is _unknown).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_duration: Histogram = Histogram(
            "claude_tool_duration_seconds",
            "How long the app's tools ran, by tool.",
            ["tool"],
            registry=registry,
            buckets=TOOL_BUCKETS,
        )
        self.resumes: Counter = Counter(
            "claude_resumes",
            "Readers that came back to a stream with GET /chat/stream/<id> (or the AI SDK's).",
            registry=registry,
        )
        self.fallbacks: Counter = Counter(
            "claude_fallbacks",
            "Answers moved to the next hop of CLAUDE_FALLBACKS, by hop, reason and phase "
            "(before_text or mid_answer).",
            ["from_model", "to_model", "reason", "phase"],
            registry=registry,
        )
        self.fallback_cooldown_until: Gauge = Gauge(
            "claude_fallback_cooldown_until_seconds",
            "When the cooldown of a fallback hop that failed ends (Unix time; the hop is "
            "skipped while this is later than now), by hop (provider/region:model).",
            ["hop"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.budget_rejections: Counter = Counter(
            "claude_budget_rejections",
            "Requests refused with a 429 budget_exceeded before any stream started.",
            registry=registry,
        )
        self.guard_blocks: Counter = Counter(
            "claude_guard_blocks",
            "Sends refused by the input guard, and answers ended by the output guard "
            "(reason guard_error: the guard raised or timed out).",
            ["guard", "reason"],
            registry=registry,
        )
        self.budget_cutoffs: Counter = Counter(
            "claude_budget_cutoffs",
            "Answers ended with stop_reason budget_exhausted (cut mid-answer, or refused a "
            "tool step or continuation).",
            registry=registry,
        )
        self.spend: Counter = Counter(
            "claude_spend_usd",
            "What upstream requests cost at the price table (CLAUDE_PRICES), by model.",
            ["model"],
            registry=registry,
        )

    def prepare(
        self, models: Iterable[str], error_classes: Iterable[str], provider: str = "anthropic"
    ) -> None:
        """Create every series at 0 (the label values are all known and few), so that the
        first stream, the first error of a class, is an increase ``rate()`` can see."""
        errors = tuple(error_classes)
        for model in models:
            self.streams_active.labels(model)
            self.time_to_first_token.labels(model)
            self.stream_duration.labels(model)
            for kind in TOKEN_KINDS:
                self.tokens.labels(model, kind, provider)
            for outcome in ("done", "cancelled", "disconnected", *_LEFT, *errors):
                self.streams.labels(model, outcome)
            for outcome in ("ok", "cancelled", *errors):
                self.upstream_requests.labels(model, outcome, provider)
            for error in errors:
                self.errors.labels(model, error)
                for kind in ("retry", "recovery"):
                    self.retries.labels(model, error, kind)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type, in the format the ``Accept`` header asks for
        (Prometheus text, or OpenMetrics): every worker's values in multiprocess mode."""
        encoder, content_type = choose_encoder(accept or "")
        if self.multiprocess_dir is None:
            return encoder(self.registry), content_type
        _forget_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=self.multiprocess_dir
        )
        return encoder(registry), content_type


def _forget_dead_processes(directory: str) -> None:
    """A worker that was killed (OOM, SIGKILL) never lowered its live gauges: drop them, so
    ``claude_streams_active`` counts live processes only. Counters and histograms stay."""
    pids = set()
    for entry in os.scandir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(entry.name)
        if match is not None:
            pids.add(int(match.group(1)))
    for pid in pids:
        if not _alive(pid):
            prometheus_multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_process_metrics: Metrics | None = None


def metrics_for(key: str) -> Metrics:
    """The metrics an app records into: its own registry in one process; in multiprocess
    mode, one set per process (values are keyed by name in the shared files, so two sets in
    one process would overwrite each other). ``key`` names the config key in errors."""
    global _process_metrics
    directory = os.environ.get(MULTIPROC_ENV) or None
    if directory is None:
        return Metrics(CollectorRegistry(auto_describe=True), None)
    if not Path(directory).is_dir():
        raise ConfigError(
            f"{MULTIPROC_ENV}={directory!r} is not a directory: create it (empty) before the "
            f"server starts, or unset it (or set {key}=false)"
        )
    if _process_metrics is None or _process_metrics.multiprocess_dir != directory:
        _process_metrics = Metrics(CollectorRegistry(auto_describe=True), directory)
    return _process_metrics
