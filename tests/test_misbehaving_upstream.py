"""What misbehaving models and upstreams do to a stream, through a real server and the SDK.

Each test failed before its fix: continuations that restart or repeat, a recovery budget
that a retry setting disabled, proxy line ends, events without their ``event:`` line,
invalid JSON escapes, and one event that never ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from quart import Quart

from quart_claude import DEFAULT_MODEL
from quart_claude._core.framing import EventTooLarge, UpstreamFramer
from quart_claude._core.relay import MAX_UPSTREAM_EVENT
from quart_claude.testing import Emulator, ErrorReply, Reply

from .helpers import serving, stream_chat
from .models import PREFILL_MODEL

pytestmark = pytest.mark.server

ANSWER = " ".join(f"word{i}" for i in range(40)) + "."


@pytest.mark.parametrize("model", [PREFILL_MODEL, DEFAULT_MODEL])
@pytest.mark.parametrize("on_continue", ["rest", "restart", "repeat_tail", "repeat_whitespace"])
async def test_a_continuation_that_repeats_the_answer_is_relayed_once(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    model: str,
    on_continue: Any,
) -> None:
    emulator.script(
        Reply(ANSWER, fault="drop", fault_after=12), Reply(ANSWER, on_continue=on_continue)
    )
    async with serving(make_app(model=model)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert "".join(e["text"] for e in result.events[:13] if e["type"] == "delta").endswith(" ")
    assert result.text == ANSWER  # exact, said once (the partial ended in a space)
    assert result.types[-1] == "done"
    assert len(emulator.requests) == 2


@pytest.mark.parametrize("model", [PREFILL_MODEL, DEFAULT_MODEL])
async def test_a_repeated_newline_after_a_recovery_is_not_a_new_paragraph(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, model: str
) -> None:
    """The partial ends in a line break and the model starts its continuation with it."""
    text = "First line.\nSecond line,\nthird line.\n\nA paragraph."
    tokens = ["First ", "line.\n", "Second ", "line,\n", "third ", "line.\n\n", "A ", "paragraph."]
    emulator.script(
        Reply(text, tokens=tokens, fault="drop", fault_after=4),
        Reply(text, tokens=tokens, on_continue="repeat_whitespace"),
    )
    async with serving(make_app(model=model)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == text
    assert result.types[-1] == "done"
    assert len(emulator.requests) == 2


@pytest.mark.parametrize("model", [PREFILL_MODEL, DEFAULT_MODEL])
async def test_a_continuation_that_diverges_ends_in_an_error_not_a_corrupted_answer(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, model: str
) -> None:
    emulator.script(
        Reply(ANSWER, fault="drop", fault_after=12), Reply(ANSWER, on_continue="diverge")
    )
    async with serving(make_app(model=model)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert ANSWER.startswith(result.text) and len(result.text) < len(ANSWER)
    error = result.events[-1]
    assert error["type"] == "error" and error["error"] == "continuation_failed"
    assert error["partial"] is True and error["retryable"] is True
    assert len(emulator.requests) == 2  # no further attempt at a model that diverged


async def test_reply_tokens_are_continued_from_where_the_request_left_off(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    tokens = ["Hel", "lo ", "wor", "ld, ", "and ", "good", "bye."]
    emulator.script(Reply(tokens=tokens, fault="drop", fault_after=3), Reply(tokens=tokens))
    async with serving(make_app(model=PREFILL_MODEL)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == "".join(tokens)
    deltas = [e["text"] for e in result.events if e["type"] == "delta"]
    assert deltas[:3] == tokens[:3]


async def test_max_retries_zero_keeps_mid_stream_recovery(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, fault="drop", fault_after=5), Reply(ANSWER))
    async with serving(make_app(max_retries=0, max_recoveries=1)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER and result.types[-1] == "done"
    assert len(emulator.requests) == 2


@pytest.mark.parametrize("framing", ["crlf", "cr", "data_only", "padded"])
async def test_proxy_line_ends_and_missing_event_lines_are_understood(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, framing: Any
) -> None:
    emulator.script(Reply(ANSWER, framing=framing))
    async with serving(make_app(recovery=False)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER
    assert result.types[0] == "start" and result.events[-1]["stop_reason"] == "end_turn"
    assert len(emulator.requests) == 1  # complete as sent: no continuation


def _delta_event(text_literal: bytes) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":' + text_literal + b"}}\n\n"
    )


@pytest.mark.parametrize("literal", [b'"bad \\x escape"', b'"tab\tinside"', b'"\\u12"'])
async def test_invalid_json_in_a_delta_never_reaches_the_browser(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, literal: bytes
) -> None:
    emulator.script(Reply("after", raw=_delta_event(literal)))
    async with serving(make_app(recovery=False)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        assert (await http.get(url + "/health")).status_code == 200
    # stream_chat decodes every event as JSON: reaching here means each one was valid
    assert result.types[-1] == "error"
    assert result.text == ""


async def test_one_endless_upstream_event_fails_the_stream_and_the_worker_keeps_serving(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    endless = b"event: content_block_delta\ndata: " + b"x" * (MAX_UPSTREAM_EVENT + 1024)
    # the event never ends and the upstream then goes quiet: only the size cap ends it
    emulator.script(Reply("never", raw=endless, fault="stall", fault_after=0, stall=60))
    async with serving(make_app(recovery=False, max_retries=0, timeout=30)) as url:
        stream = asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "hi"}))
        health = await http.get(url + "/health")  # answered while the stream is in trouble
        result = await stream
        await asyncio.wait_for(emulator.requests[0].ended.wait(), 10)
    assert health.status_code == 200
    assert result.events[-1]["error"] == "unknown"  # not a timeout 30 s later
    assert result.text == ""
    assert emulator.requests[0].disconnected  # the upstream request was closed


def _blocks(data: bytes, cuts: list[int]) -> list[bytes]:
    framer = UpstreamFramer(1 << 20)
    blocks: list[bytes] = []
    start = 0
    for point in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        blocks.extend(b for b in framer.feed(data[start:point]) if b)
        start = point
    return blocks


@given(
    st.lists(st.text(alphabet="ab:{} ", min_size=1, max_size=8), min_size=1, max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_framer_gives_the_same_blocks_however_the_body_is_cut(
    payloads: list[str], newline: bytes, cuts: list[int]
) -> None:
    body = b"".join(
        b"event: e" + newline + b"data: " + json.dumps(p).encode() + newline + newline
        for p in payloads
    )
    expected = [b"event: e\ndata: " + json.dumps(p).encode() for p in payloads]
    assert _blocks(body, cuts) == expected


def test_framer_refuses_an_event_past_its_limit() -> None:
    framer = UpstreamFramer(1000)
    framer.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge):
        framer.feed(b"x" * 200)


@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
async def test_an_absurd_retry_after_is_capped_at_a_day(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, header: str
) -> None:
    emulator.script(ErrorReply(429, headers={header: "1e308"}))
    async with serving(make_app(max_retries=0)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.events[-1]["error"] == "rate_limit"
    assert result.events[-1]["retry_after"] == 86_400
