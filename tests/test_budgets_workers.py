"""Budgets across worker processes on one redis-server (issue 24): 200 concurrent requests
from one identity spread over 3 Hypercorn workers never spend past the limit, summed from the
ledger; and a worker SIGKILLed mid-request leaves no reservation after its expiry."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis.asyncio as aioredis

from quart_claude._core.ledger import RedisLedger
from quart_claude.testing import Emulator, Reply, ToolUse

from .helpers import stream_chat
from .test_takeover import Servers

pytestmark = pytest.mark.system

IDENTITY = "addr:127.0.0.1"  # no auth: the client address is the identity


@pytest.fixture
async def workers(emulator: Emulator, redis_server: Any, tmp_path: Path) -> AsyncIterator[Servers]:
    group = Servers(emulator, redis_server.url, tmp_path)
    group.env.update(
        CLAUDE_MAX_STREAMS_PER_CLIENT="0",
        CLAUDE_MAX_TOKENS="64",
        CLAUDE_MAX_TAKEOVERS="0",  # a killed worker's stream is not continued elsewhere
        CLAUDE_BUDGET_HOLD_TTL="1.5",
    )
    try:
        yield group
    finally:
        await group.stop_all()
        for server in group.all:
            print(f"--- {server.log.name}\n{server.output()[-3000:]}")


async def ledger_entries(url: str) -> list[Any]:
    client = aioredis.from_url(url)
    try:
        return await RedisLedger(client).entries(IDENTITY)
    finally:
        await client.aclose()


async def test_200_concurrent_requests_over_3_workers_never_pass_the_limit(
    workers: Servers, emulator: Emulator, redis_server: Any
) -> None:
    workers.env["CLAUDE_BUDGET"] = "4000 tokens/day"
    servers = await workers.start_many(3)
    emulator.default = Reply(tokens=[f"w{n} " for n in range(30)], input_tokens=20)
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=300)) as http:
        answers = await asyncio.gather(
            *(
                stream_chat(http, servers[n % 3].url + "/chat/stream", {"message": "hi"})
                for n in range(200)
            )
        )
    entries = await ledger_entries(redis_server.url)
    spent = sum(e.input_tokens + e.output_tokens for e in entries)
    assert {a.status for a in answers} == {200, 429}
    assert 0 < spent <= 4000  # the bound is 0 with the emulator's one-token deltas
    assert len(entries) == len(emulator.requests)  # every upstream request is in the ledger
    answered_by = {a.headers.get("x-worker-pid") for a in answers}
    assert len(answered_by) == 3  # every worker took part, each reserving in the one Redis


async def test_a_sigkilled_workers_reservation_lapses(workers: Servers, emulator: Emulator) -> None:
    workers.env["CLAUDE_BUDGET"] = "600 tokens/day"  # one request (its tools' prompt too)
    doomed, other = await workers.start_many(2)
    emulator.default = Reply(
        tokens=[f"w{n} " for n in range(300)], token_delay=0.1, input_tokens=20
    )
    async with httpx2.AsyncClient(timeout=30) as http:
        before_hold = time.monotonic()  # the reservation is made after this
        reading = asyncio.ensure_future(
            stream_chat(http, doomed.url + "/chat/stream", {"message": "hi"})
        )
        await emulator.wait_for_requests(1)
        refused = await stream_chat(http, other.url + "/chat/stream", {"message": "hi"})
        assert refused.status == 429  # the doomed worker's stream holds what remains
        doomed.process.send_signal(signal.SIGKILL)
        await doomed.process.wait()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx2.HTTPError):
            await reading  # its connection closes before the client does
        admitted = None
        while time.monotonic() - before_hold < 10:
            answer = await stream_chat(http, other.url + "/chat/stream", {"message": "hi"})
            if answer.status == 200:
                admitted = time.monotonic() - before_hold
                break
            await asyncio.sleep(0.25)
    assert admitted is not None, "the dead worker's reservation never lapsed"
    assert admitted >= 1.5  # not before its expiry: CLAUDE_BUDGET_HOLD_TTL after it was made


async def test_thinking_and_long_tool_inputs_over_3_workers_stay_within_the_limit(
    workers: Servers, emulator: Emulator, redis_server: Any
) -> None:
    """Output readers never see the whole of (summarized thinking) or see only at its end
    (a tool call's input) is held to the limit across workers: summed from what the
    emulator itself billed, every request it answered."""
    workers.env.update(
        CLAUDE_BUDGET="9000 tokens/day", CLAUDE_THINKING="adaptive", CLAUDE_MAX_TOKENS="2048"
    )
    servers = await workers.start_many(3)
    words = [f"w{n} " for n in range(300)]
    thinking = Reply(tokens=words, thinking="t " * 100, hidden_thinking_tokens=900)
    tool = Reply(tokens=words[:3], tool_calls=[ToolUse("fast_lookup", {"key": "k" * 4000})])
    emulator.script(*[thinking, tool] * 8)
    emulator.default = Reply(tokens=words)
    async with httpx2.AsyncClient(timeout=60) as http:
        answers = await asyncio.gather(
            *(
                stream_chat(http, servers[n % 3].url + "/chat/stream", {"message": "hi"})
                for n in range(12)
            )
        )
    entries = await ledger_entries(redis_server.url)
    billed = [r.usage for r in emulator.requests]
    assert None not in billed  # each stopped by the API at the max_tokens its grant left
    spent = sum(u["input_tokens"] + u["output_tokens"] for u in billed if u is not None)
    assert 0 < spent <= 9000
    assert sum(e.input_tokens + e.output_tokens for e in entries) == spent
    ends = [a.events[-1]["stop_reason"] for a in answers if a.status == 200]
    assert "budget_exhausted" in ends
    assert {a.status for a in answers} <= {200, 429}
