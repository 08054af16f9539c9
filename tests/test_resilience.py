"""Every upstream failure, classified and retried only where it helps (against the emulator
through the real SDK and a real Hypercorn)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, ErrorReply, Hangup, Reply, Scripted

from .conftest import API_KEY
from .helpers import eventually, free_port, serving, stream_chat, stream_ends
from .models import DEPRECATED_MODEL, PREFILL_MODEL

pytestmark = pytest.mark.server


@pytest.fixture
async def server(serve: Callable[..., Any]) -> AsyncIterator[str]:
    """Each front end's server (conftest's ``serve``): the acceptance tests run on both."""
    async with serve() as url:
        yield url


@pytest.fixture
async def quart_server(make_app: Callable[..., Quart]) -> AsyncIterator[str]:
    async with serving(make_app()) as url:
        yield url


ANSWER = "The quick brown fox jumps over the lazy dog, again and again, until done."

# (id, scripted response, expected class, retryable, retry_after, upstream requests seen)
# with CLAUDE_MAX_RETRIES=2: a retryable failure is tried exactly 3 times.
MATRIX: list[tuple[str, Scripted, str, bool, int | None, int]] = [
    ("429", ErrorReply(429), "rate_limit", True, None, 3),
    ("429 retry-after", ErrorReply(429, headers={"retry-after": "1"}), "rate_limit", True, 1, 3),
    (
        "429 spend limit",
        ErrorReply(429, error_code="enforced_spend_limit_reached", message="spend limit reached"),
        "rate_limit",
        False,
        None,
        1,
    ),
    (
        "429 retry-after too long",
        ErrorReply(429, headers={"retry-after": "120"}),
        "rate_limit",
        True,
        120,
        1,
    ),
    (
        "in-stream rate_limit_error",
        Reply(ANSWER, fault="error", fault_after=0, error_type="rate_limit_error"),
        "rate_limit",
        True,
        None,
        3,
    ),
    ("529", ErrorReply(529), "overloaded", True, None, 3),
    (
        "in-stream overloaded_error",
        Reply(ANSWER, fault="error", fault_after=0),
        "overloaded",
        True,
        None,
        3,
    ),
    ("500", ErrorReply(500), "server_error", True, None, 3),
    ("502", ErrorReply(502), "server_error", True, None, 3),
    ("503", ErrorReply(503), "server_error", True, None, 3),
    ("504", ErrorReply(504), "server_error", True, None, 3),
    (
        "in-stream api_error",
        Reply(ANSWER, fault="error", fault_after=0, error_type="api_error"),
        "server_error",
        True,
        None,
        3,
    ),
    (
        "500 x-should-retry false",
        ErrorReply(500, headers={"x-should-retry": "false"}),
        "server_error",
        False,
        None,
        1,
    ),
    ("hangup before response", Hangup(), "network_error", True, None, 3),
    ("drop mid-body", Reply(ANSWER, fault="drop", fault_after=0), "network_error", True, None, 3),
    (
        "eof without message_stop",
        Reply(ANSWER, fault="eof", fault_after=0),
        "network_error",
        True,
        None,
        3,
    ),
    ("401", ErrorReply(401), "auth_error", False, None, 1),
    ("402", ErrorReply(402, message="credit balance too low"), "billing_error", False, None, 1),
    ("403", ErrorReply(403), "permission_error", False, None, 1),
    ("404", ErrorReply(404), "not_found", False, None, 1),
    (
        "400 prompt too long",
        ErrorReply(400, message="prompt is too long: 210000 tokens > 200000 maximum"),
        "token_limit",
        False,
        None,
        1,
    ),
    ("400", ErrorReply(400, message="messages: bad"), "invalid_request", False, None, 1),
    (
        "400 x-should-retry true",
        ErrorReply(400, headers={"x-should-retry": "true"}),
        "invalid_request",
        True,
        None,
        3,
    ),
    ("422", ErrorReply(422), "invalid_request", False, None, 1),
    ("413", ErrorReply(413), "request_too_large", False, None, 1),
    ("418", ErrorReply(418, error_type="teapot_error"), "unknown", False, None, 1),
]


@pytest.fixture
async def retrying_server(serve: Callable[..., Any]):
    async with serve(max_retries=2, retry_base_delay=0.01, retry_max_delay=5) as url:
        yield url


@pytest.mark.parametrize(
    ("name", "scripted", "error_class", "retryable", "retry_after", "requests"),
    MATRIX,
    ids=[row[0] for row in MATRIX],
)
async def test_fault_matrix(
    retrying_server: str,
    emulator: Emulator,
    http: httpx2.AsyncClient,
    name: str,
    scripted: Scripted,
    error_class: str,
    retryable: bool,
    retry_after: int | None,
    requests: int,
) -> None:
    emulator.script(*[scripted] * 3, Reply("must never be reached"))
    result = await stream_chat(http, retrying_server + "/chat/stream", {"message": "hi"})
    error = result.events[-1]
    assert error["type"] == "error", result.events
    assert error["error"] == error_class
    assert error["retryable"] is retryable
    assert error.get("retry_after") == retry_after
    assert "partial" not in error
    assert API_KEY not in error["message"] and "Traceback" not in error["message"]
    assert len(emulator.requests) == requests
    assert "delta" not in result.types


async def test_fault_matrix_timeout_row(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """No upstream byte for CLAUDE_TIMEOUT seconds: ``timeout``, retried like the others."""
    emulator.script(*[Reply(ANSWER, first_token_delay=30)] * 3, Reply("must never be reached"))
    async with serve(timeout=0.5, max_retries=2, retry_base_delay=0.01) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        error = result.events[-1]
        assert (error["type"], error["error"], error["retryable"]) == ("error", "timeout", True)
        assert "retry_after" not in error and "partial" not in error
        assert len(emulator.requests) == 3
        for request in emulator.requests:  # each timed-out request was closed, not leaked
            await asyncio.wait_for(request.ended.wait(), 2)


async def test_connection_refused_is_a_retryable_network_error(
    serve: Callable[..., Any], http: httpx2.AsyncClient
) -> None:
    refused = f"http://127.0.0.1:{free_port()}"
    async with serve(base_url=refused, max_retries=1, retry_base_delay=0.01) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.events[-1]["error"] == "network_error"
    assert result.events[-1]["retryable"] is True


async def test_unknown_model_is_not_found_after_one_request(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serve(model="gpt-4o") as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.events[-1]["error"] == "not_found"
    assert len(emulator.requests) == 1


async def test_transient_failures_then_success_is_seamless(
    retrying_server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529), Reply(ANSWER, fault="drop", fault_after=0), Reply(ANSWER))
    result = await stream_chat(http, retrying_server + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    assert result.types.count("start") == 1
    assert result.types[-1] == "done"
    assert len(emulator.requests) == 3


async def test_retry_after_is_honoured(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(429, headers={"retry-after": "1"}), Reply(ANSWER))
    async with serve(retry_base_delay=0.01) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    first, second = emulator.requests
    assert second.received_at - first.received_at >= 1.0


async def test_heartbeats_flow_while_waiting_to_retry(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529, headers={"retry-after": "1.5"}), Reply(ANSWER))
    async with serve(heartbeat_interval=0.2, retry_base_delay=0.01) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    # pings came before the first event: the wait was not silent
    assert result.raw.startswith(b": ping\n\n")
    assert result.pings >= 3


async def test_heartbeats_flow_during_a_slow_first_token(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, first_token_delay=1.2))
    async with serve(heartbeat_interval=0.2) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    start_end = result.raw.index(b"\n\n") + 2
    first_delta = result.raw.index(b'"type":"delta"')
    assert result.raw[start_end:first_delta].count(b": ping\n\n") >= 3


@pytest.mark.parametrize("fault", ["error", "drop", "eof"])
async def test_mid_stream_failure_recovers_into_one_seamless_answer(
    server: str, emulator: Emulator, http: httpx2.AsyncClient, fault: Any
) -> None:
    emulator.script(
        Reply(ANSWER, fault=fault, fault_after=5, input_tokens=10), Reply(ANSWER, input_tokens=30)
    )
    result = await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER  # the full answer, said once
    assert result.types.count("start") == 1
    assert result.types[-1] == "done"
    done = result.events[-1]
    assert done["stop_reason"] == "end_turn"
    # summed over both requests: 5 tokens, then the 9 of the rest (one emulator token a word)
    assert done["usage"]["output_tokens"] == len(ANSWER.split())
    assert done["usage"]["input_tokens"] == 40
    continuation = emulator.requests[1].body["messages"]
    assert continuation[0] == {"role": "user", "content": "hi"}
    assert continuation[1]["role"] == "assistant"
    assert ANSWER.startswith(continuation[1]["content"]) and continuation[1]["content"]
    assert continuation[2]["role"] == "user"
    assert continuation[2]["content"].startswith("Your previous response was interrupted")


async def test_prefill_continuation_on_models_that_accept_it(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, fault="drop", fault_after=4), Reply(ANSWER))
    async with serve(model=PREFILL_MODEL) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    messages = emulator.requests[1].body["messages"]
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["content"] == messages[-1]["content"].rstrip()  # no trailing space


async def test_a_library_warning_raised_as_an_error_never_fails_the_stream(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # pytest runs with warnings as errors, as `python -W error` would: the SDK's deprecation
    # warning for this model is raised inside the relay's upstream call (the SDK's client,
    # as the clouds' requests and CLAUDE_HTTP_CLIENT=httpx's go; the first-party client
    # raises no warning)
    emulator.script(Reply(ANSWER), Reply(ANSWER))
    app = make_app(model=DEPRECATED_MODEL, max_retries=0, http_client="httpx")
    async with serving(app) as url:
        for _ in range(2):  # the second stream finds the warning already tolerated
            result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            assert result.text == ANSWER and result.types[-1] == "done"
    assert len(emulator.requests) == 2  # the warning struck before anything was sent
    logged = [r.getMessage() for r in caplog.records if "library warning" in r.getMessage()]
    assert len(logged) == 1 and DEPRECATED_MODEL in logged[0]


@pytest.mark.parametrize("fault", ["error", "drop"])
async def test_mid_stream_failure_without_recovery_is_a_clean_prefix_then_partial_error(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient, fault: Any
) -> None:
    emulator.script(Reply(ANSWER, fault=fault, fault_after=5), Reply("never"))
    async with serve(recovery=False) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert ANSWER.startswith(result.text) and len(result.text) < len(ANSWER)
    assert result.types.count("delta") == 5
    error = result.events[-1]
    assert error["type"] == "error" and error["retryable"] is True and error["partial"] is True
    assert len(emulator.requests) == 1


async def test_stalled_upstream_times_out(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, fault="stall", fault_after=3, stall=30))
    async with serve(timeout=2, max_retries=0, recovery=False) as url:
        started = time.monotonic()
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        elapsed = time.monotonic() - started
    error = result.events[-1]
    assert (error["error"], error["retryable"], error["partial"]) == ("timeout", True, True)
    assert 2 <= elapsed < 8
    await asyncio.wait_for(emulator.requests[0].ended.wait(), 2)


async def test_stall_before_the_first_token_times_out_and_retries(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, first_token_delay=30), Reply(ANSWER))
    async with serve(timeout=1, max_retries=1, retry_base_delay=0.01) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    assert len(emulator.requests) == 2


async def test_disconnect_closes_the_upstream_within_a_second(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.1))
    async with serve(resume_grace=0) as server:
        result = await stream_chat(
            http, server + "/chat/stream", {"message": "hi"}, stop_after_deltas=3
        )
        left_at = time.time()
        (request,) = emulator.requests
        await asyncio.wait_for(request.ended.wait(), 1.0)
        assert request.disconnected
        assert request.ended_at is not None and request.ended_at - left_at < 1.0
        assert result.types.count("delta") == 3


async def test_capacity_limit_refuses_before_calling_upstream(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.default = Reply(ANSWER, token_delay=0.05)
    async with serve(max_concurrent_streams=2) as url:
        first = asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "1"}))
        second = asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "2"}))
        await emulator.wait_for_requests(2)
        refused = await http.post(url + "/chat/stream", json={"message": "3"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "over_capacity"
        assert len(emulator.requests) == 2
        done = await asyncio.gather(first, second)
        assert all(r.types[-1] == "done" for r in done)
        again = await stream_chat(http, url + "/chat/stream", {"message": "4"})
        assert again.types[-1] == "done"  # capacity came back
    assert len(emulator.requests) == 3


async def test_one_structured_log_line_per_stream_and_never_the_key(
    quart_server: str,
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = quart_server  # the log records of a server in this process
    emulator.script(ErrorReply(529), Reply(ANSWER))
    await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    emulator.script(ErrorReply(401))
    await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    await eventually(lambda: len(stream_ends(caplog.records)) == 2)
    ends = stream_ends(caplog.records)
    assert len(ends) == 2
    ok, failed = (r.__dict__["claude"] for r in ends)
    assert ok["outcome"] == "done" and ok["attempts"] == 2
    assert ok["ttft_ms"] is not None and ok["output_tokens"] > 0
    assert ok["request_id"].startswith("req_")
    assert failed["outcome"] == "auth_error" and failed["attempts"] == 1
    assert all(API_KEY not in record.getMessage() for record in caplog.records)
    assert all(API_KEY not in str(record.__dict__) for record in caplog.records)


async def test_ready_is_503_while_draining(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    from quart_claude import Claude

    app = make_app()
    emulator.default = Reply(ANSWER, token_delay=0.2)
    async with serving(app) as url:
        reading = asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "x"}))
        await emulator.wait_for_requests(1)
        await Claude.state(app).drain()
        assert (await http.get(url + "/ready")).status_code == 503
        refused = await http.post(url + "/chat/stream", json={"message": "y"})
        assert refused.status_code == 503
        result = await reading
    assert result.events[-1]["error"] == "shutdown"
    await asyncio.wait_for(emulator.requests[0].ended.wait(), 1)
    assert emulator.requests[0].disconnected
