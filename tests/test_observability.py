"""Usage in the stream, Prometheus metrics, OpenTelemetry spans and the log line, through a
real server and the emulator."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families
from quart import Quart

from quart_claude import Claude, ConfigError
from quart_claude.testing import Emulator, ErrorReply, Reply

from .helpers import eventually, serving, stream_chat, stream_ends

pytestmark = pytest.mark.server

MODEL = "claude-sonnet-5-5"
ANSWER = " ".join(f"word{i}" for i in range(40))


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a scrape."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return scrape.get((name, frozenset(labels.items())), 0.0)


Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx2.AsyncClient, url: str) -> Scrape:
    response = await http.get(url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def stream_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name.startswith("chat ")]


async def test_cache_counts_reach_start_done_and_metrics(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(
        Reply(
            ANSWER,
            cache_read_input_tokens=1234,
            cache_creation_input_tokens=56,
            first_token_delay=0.5,
        )
    )
    async with serving(make_app()) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        metrics = await scrape(http, url)
    start, first_delta = result.events[0], result.events[1]
    assert start["type"] == "start" and first_delta["type"] == "delta"
    assert start["usage"]["cache_read_input_tokens"] == 1234
    # known before the first token: the start event left a half-second ahead of it
    assert result.received_at[0] < result.received_at[1]
    done = result.events[-1]
    assert done["type"] == "done" and done["usage"]["cache_read_input_tokens"] == 1234
    assert (
        value(metrics, "claude_tokens_total", model=MODEL, kind="cache_read", provider="anthropic")
        == 1234
    )
    assert (
        value(metrics, "claude_tokens_total", model=MODEL, kind="cache_write", provider="anthropic")
        == 56
    )
    assert (
        value(metrics, "claude_tokens_total", model=MODEL, kind="output", provider="anthropic")
        == done["usage"]["output_tokens"]
    )
    assert (
        value(metrics, "claude_tokens_total", model=MODEL, kind="input", provider="anthropic")
        == done["usage"]["input_tokens"]
    )


async def test_metrics_count_every_outcome(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = make_app(max_retries=2, resume_grace=5)
    async with serving(app) as url:
        empty = await scrape(http, url)
        assert value(empty, "claude_streams_active", model=MODEL) == 0
        assert (
            value(empty, "claude_tokens_total", model=MODEL, kind="input", provider="anthropic")
            == 0
        )

        emulator.script(ErrorReply(529), Reply(ANSWER))  # retried, then done
        retried = await stream_chat(http, url + "/chat/stream", {"message": "a"})
        emulator.script(ErrorReply(401))  # not retryable: an error
        failed = await stream_chat(http, url + "/chat/stream", {"message": "b"})
        # a drop mid-answer: recovered by a continuation, then done
        emulator.script(Reply(ANSWER, fault="drop", fault_after=5), Reply(ANSWER))
        recovered = await stream_chat(http, url + "/chat/stream", {"message": "c"})
        # stopped by the user while it streams, after a resume
        emulator.script(Reply(ANSWER, token_delay=0.1))
        first = await stream_chat(http, url + "/chat/stream", {"message": "d"}, stop_after_deltas=2)
        stream_id = first.headers["x-stream-id"]
        async with http.stream(
            "GET", f"{url}/chat/stream/{stream_id}", headers={"Last-Event-ID": first.ids[-1] or ""}
        ) as resumed:
            assert resumed.status_code == 200
            during = await scrape(http, url)
            assert value(during, "claude_streams_active", model=MODEL) == 1
            await http.delete(f"{url}/chat/stream/{stream_id}")
            await resumed.aread()

        async def settled() -> bool:
            return bool(value(await scrape(http, url), "claude_streams_active", model=MODEL) == 0)

        await eventually(settled)
        metrics = await scrape(http, url)

    assert retried.types[-1] == "done" and recovered.types[-1] == "done"
    assert failed.events[-1]["error"] == "auth_error"
    assert value(metrics, "claude_streams_active", model=MODEL) == 0
    assert value(metrics, "claude_streams_total", model=MODEL, outcome="done") == 2
    assert value(metrics, "claude_streams_total", model=MODEL, outcome="auth_error") == 1
    assert value(metrics, "claude_streams_total", model=MODEL, outcome="cancelled") == 1
    requests = {
        outcome: value(
            metrics,
            "claude_upstream_requests_total",
            model=MODEL,
            outcome=outcome,
            provider="anthropic",
        )
        for outcome in ("ok", "overloaded", "auth_error", "network_error", "cancelled")
    }
    assert requests == {
        "ok": 2,
        "overloaded": 1,
        "auth_error": 1,
        "network_error": 1,
        "cancelled": 1,
    }
    assert sum(requests.values()) == len(emulator.requests)
    assert (
        value(metrics, "claude_retries_total", model=MODEL, error="overloaded", kind="retry") == 1
    )
    assert (
        value(metrics, "claude_retries_total", model=MODEL, error="network_error", kind="recovery")
        == 1
    )
    for error in ("overloaded", "auth_error", "network_error"):
        assert value(metrics, "claude_errors_total", model=MODEL, error=error) == 1
    assert value(metrics, "claude_resumes_total") == 1
    # every stream that produced text has a first token; the auth error has none
    assert value(metrics, "claude_time_to_first_token_seconds_count", model=MODEL) == 3
    assert value(metrics, "claude_stream_duration_seconds_count", model=MODEL) == 4
    assert value(metrics, "claude_time_to_first_token_seconds_bucket", model=MODEL, le="60.0") == 3


async def test_metrics_route_off_and_protected(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(metrics=False)) as url:
        off = await http.get(url + "/metrics")
        assert off.status_code == 404  # the host app's own 404: the route does not exist
    async with serving(make_app(api_tokens="s3cret-token")) as url:
        refused = await http.get(url + "/metrics")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        allowed = await http.get(url + "/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert allowed.status_code == 200 and "claude_streams_active" in allowed.text
    async with serving(make_app(api_tokens="s3cret-token", metrics_auth=False)) as url:
        assert (await http.get(url + "/metrics")).status_code == 200


async def test_one_span_per_stream_with_the_genai_attributes(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    async with serving(make_app(tracer_provider=provider, resume_grace=5)) as url:
        emulator.script(Reply(ANSWER, cache_read_input_tokens=1234))
        ok = await stream_chat(
            http,
            url + "/chat/stream",
            {"message": "hi"},
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
        emulator.script(ErrorReply(529), Reply(ANSWER))
        retried = await stream_chat(http, url + "/chat/stream", {"message": "again"})
        emulator.script(ErrorReply(403))
        failed = await stream_chat(http, url + "/chat/stream", {"message": "no"})
        emulator.script(Reply(ANSWER, token_delay=0.05))
        cut = await stream_chat(http, url + "/chat/stream", {"message": "cut"}, stop_after_deltas=3)
        rest = await stream_chat(
            http,
            f"{url}/chat/stream/{cut.headers['x-stream-id']}",
            method="GET",
            headers={"Last-Event-ID": cut.ids[-1] or ""},
        )
        await eventually(lambda: len(stream_spans(exporter)) == 4)
    assert rest.types[-1] == "done"
    found = stream_spans(exporter)
    assert len(found) == 4
    by_stream = {(span.attributes or {})["quart_claude.stream_id"]: span for span in found}
    first = by_stream[ok.headers["x-stream-id"]]
    attributes = dict(first.attributes or {})
    assert first.name == f"chat {MODEL}"
    assert attributes["gen_ai.system"] == "anthropic"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.response.id"] == ok.events[0]["message_id"]
    done_usage = ok.events[-1]["usage"]
    assert attributes["gen_ai.usage.input_tokens"] == done_usage["input_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == done_usage["output_tokens"]
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 1234
    assert attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert [event.name for event in first.events] == ["first_token"]
    assert first.status.status_code == StatusCode.UNSET
    # the trace the request came with
    assert first.context is not None and first.parent is not None
    assert format(first.context.trace_id, "032x") == trace_id
    assert format(first.parent.span_id, "016x") == parent_id

    second = by_stream[retried.headers["x-stream-id"]]
    retry = [event for event in second.events if event.name == "retry"]
    assert len(retry) == 1 and retry[0].attributes is not None
    assert retry[0].attributes["error.type"] == "overloaded"
    assert retry[0].attributes["quart_claude.retry_kind"] == "retry"
    assert [event.name for event in second.events] == ["retry", "first_token"]
    assert (second.attributes or {})["quart_claude.attempts"] == 2

    third = by_stream[failed.headers["x-stream-id"]]
    assert third.status.status_code == StatusCode.ERROR
    assert third.status.description == "permission_error"
    assert (third.attributes or {})["error.type"] == "permission_error"

    fourth = by_stream[cut.headers["x-stream-id"]]
    assert [event.name for event in fourth.events] == ["first_token", "resume"]
    assert (fourth.attributes or {})["quart_claude.resumes"] == 1
    # the spans without a traceparent are roots of traces of their own
    assert second.parent is None and third.parent is None


async def test_the_log_line_carries_the_span_fields_and_trace_id(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="quart_claude")
    provider, exporter = spans
    emulator.script(Reply(ANSWER, cache_read_input_tokens=77))
    async with serving(make_app(tracer_provider=provider)) as url:
        await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        await eventually(lambda: stream_spans(exporter) and stream_ends(caplog.records))
    (span,) = stream_spans(exporter)
    (record,) = stream_ends(caplog.records)
    fields = record.__dict__["claude"]
    assert span.context is not None
    assert fields["trace_id"] == format(span.context.trace_id, "032x")
    assert fields["span_id"] == format(span.context.span_id, "016x")
    attributes = dict(span.attributes or {})
    assert fields["model"] == attributes["gen_ai.request.model"]
    assert fields["cache_read_input_tokens"] == attributes["gen_ai.usage.cache_read.input_tokens"]
    assert fields["output_tokens"] == attributes["gen_ai.usage.output_tokens"]
    assert fields["outcome"] == attributes["quart_claude.outcome"] == "done"
    assert f"trace_id={fields['trace_id']}" in record.getMessage()


async def test_without_an_otel_sdk_the_log_still_joins_the_callers_trace(
    server: str, emulator: Emulator, http: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """No SDK configured: nothing is recorded, but the caller's trace id is in the log line."""
    caplog.set_level(logging.INFO, logger="quart_claude")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    await stream_chat(
        http,
        server + "/chat/stream",
        {"message": "hi"},
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    await stream_chat(http, server + "/chat/stream", {"message": "no trace"})
    await eventually(lambda: len(stream_ends(caplog.records)) == 2)
    first, second = (r.__dict__["claude"] for r in stream_ends(caplog.records))
    assert first["trace_id"] == trace_id and first["span_id"] is None
    assert second["trace_id"] is None


def test_a_multiprocess_dir_that_is_not_there_fails_at_init_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(missing))
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR=.*is not a directory"):
        Claude(Quart(__name__), api_key="sk-test", base_url="http://127.0.0.1:9")
    Claude(Quart(__name__), api_key="sk-test", base_url="http://127.0.0.1:9", metrics=False)


def test_a_multiprocess_dir_set_too_late_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """prometheus_client decides on import; this process imported it without the variable,
    so its values would never reach the directory: said at init_app, not found at scrape."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="set after prometheus_client was imported"):
        Claude(Quart(__name__), api_key="sk-test", base_url="http://127.0.0.1:9")
