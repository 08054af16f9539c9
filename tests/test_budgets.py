"""Budgets (issue 24): a 429 before any stream, a cut mid-answer and between tool steps with
the text kept, concurrent requests held to the limit, a period reset, a hook's tiers, and
``GET /usage`` per caller; in memory and on a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude._core.budget import Amount, parse_budget
from quart_claude._core.db import Conversations, create_engine
from quart_claude._core.ledger import MemoryLedger, RedisLedger
from quart_claude._core.ledger_sql import SqlLedger
from quart_claude.testing import Emulator, Reply, ToolUse

from .helpers import eventually, fresh_redis_db, serving, stream_chat

pytestmark = pytest.mark.server

ALICE = {"Authorization": "Bearer tok-alice-0123456789"}
BOB = {"Authorization": "Bearer tok-bob-0123456789"}
TOKENS = "tok-alice-0123456789,tok-bob-0123456789"


def ident(headers: dict[str, str]) -> str:
    """The identity a bearer token is known by."""
    return "token:" + hashlib.sha256(headers["Authorization"][7:].encode()).hexdigest()[:16]


def app_with(make_app: Callable[..., Quart], **options: Any) -> Quart:
    options.setdefault("api_tokens", TOKENS)
    options.setdefault("max_streams_per_client", 0)
    return make_app(**options)


def stored_in(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, db: int
) -> dict[str, Any]:
    """The options that keep the ledger in ``store``: ``memory``, ``redis`` (database
    ``db`` of the session's redis-server, emptied first: an earlier test of this worker may
    have left entries of the same identity there) or ``sqlite`` (conversations on)."""
    if store == "redis":
        return {"stream_store": fresh_redis_db(request.getfixturevalue("redis_url"), db)}
    if store == "sqlite":
        return {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}"}
    return {}


def ledger_of(app: Quart) -> Any:
    return app.extensions["claude"].ledger


async def chat(http: httpx2.AsyncClient, url: str, text: str = "hi", **kw: Any) -> Any:
    return await stream_chat(
        http, url + "/chat/stream", {"message": text}, headers=kw.pop("headers", ALICE), **kw
    )


async def test_a_spent_budget_is_a_429_before_any_stream_starts(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="60 tokens/day")
    emulator.default = Reply("one two three four five", input_tokens=20)
    async with serving(app) as url:
        first = await chat(http, url)
        assert first.status == 200 and first.events[-1]["stop_reason"] == "end_turn"
        answers = [first]
        while answers[-1].status == 200:
            answers.append(await chat(http, url))
            assert len(answers) < 10
        refused = answers[-1]
        used = (await http.get(url + "/usage", headers=ALICE)).json()
        other = (await http.get(url + "/usage", headers=BOB)).json()
    assert refused.status == 429
    body = refused.body
    assert body["error"] == "budget_exceeded" and body["limit"] == "60 tokens/day"
    assert body["used_tokens"] == 25 * (len(answers) - 1)  # input 20 + five words, each time
    assert 0 < body["retry_after"] <= 86400
    assert refused.headers["retry-after"] == str(body["retry_after"])
    assert len(emulator.requests) == len(answers) - 1  # the refused one never went upstream
    assert used["limits"][0]["used_tokens"] == body["used_tokens"]
    assert used["days"][-1]["requests"] == len(answers) - 1
    assert other["limits"][0]["used_tokens"] == 0 and other["days"][-1]["requests"] == 0


async def test_a_budget_too_small_for_max_tokens_lowers_it_so_the_api_stops_there(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="200 tokens/day", max_tokens=1000)
    words = [f"w{n} " for n in range(400)]
    emulator.script(Reply(tokens=words, input_tokens=20, token_delay=0.002))
    async with serving(app) as url:
        answer = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    done = answer.events[-1]
    assert done["type"] == "done" and done["stop_reason"] == "budget_exhausted"
    assert answer.text and "".join(words).startswith(answer.text)  # intact, in order
    (request,) = emulator.requests
    assert request.body["max_tokens"] < 200  # what the grant left after the input estimate
    assert len(answer.text.split()) == request.body["max_tokens"]  # the API stopped there
    assert sum(e.input_tokens + e.output_tokens for e in entries) <= 200


async def test_real_input_beyond_the_estimate_takes_more_and_cuts_at_the_limit_with_text(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    # the estimate of "hi" is ~25 tokens: 25 + 1000 is reserved; message_start says 1,111
    app = app_with(make_app, budget="1200 tokens/day", max_tokens=1000)
    words = [f"w{n} " for n in range(400)]
    emulator.script(Reply(tokens=words, input_tokens=1111, token_delay=0.002))
    async with serving(app) as url:
        answer = await chat(http, url)
        cut_at = time.time()
        entries = await ledger_of(app).entries(ident(ALICE))
    done = answer.events[-1]
    assert done["type"] == "done" and done["stop_reason"] == "budget_exhausted"
    assert answer.text and "".join(words).startswith(answer.text)
    assert 60 < len(answer.text.split()) <= 89  # 1200 - 1111 left for output
    (request,) = await emulator.wait_for_requests(1)
    await asyncio.wait_for(request.ended.wait(), 1.0)  # the upstream request closed at once
    assert request.disconnected and request.ended_at is not None
    assert request.ended_at - cut_at < 1.0
    (entry,) = entries
    assert entry.input_tokens == 1111 and entry.output_tokens == len(answer.text.split())
    assert entry.input_tokens + entry.output_tokens <= 1200


@pytest.mark.parametrize("store", ["memory", "redis", "sqlite"])
async def test_real_input_beyond_the_estimate_streams_whole_under_a_vast_budget(
    store: str,
    tmp_path: Path,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    request: pytest.FixtureRequest,
) -> None:
    options = stored_in(store, request, tmp_path, 13)
    app = app_with(make_app, budget="1000000 tokens/day", max_tokens=100, **options)
    words = [f"w{n} " for n in range(60)]
    emulator.script(
        Reply(tokens=words, input_tokens=1111),
        Reply(tokens=words, input_tokens=873, cache_read_input_tokens=94000),
    )
    async with serving(app) as url:
        first = await chat(http, url)
        cached = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    for answer in (first, cached):
        assert answer.events[-1]["stop_reason"] == "end_turn"
        assert answer.text == "".join(words)
    assert [(e.input_tokens, e.cache_read_tokens, e.output_tokens) for e in entries[-2:]] == [
        (1111, 0, 60),
        (873, 94000, 60),
    ]


async def test_a_budget_that_cannot_hold_even_the_real_input_ends_before_any_text(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="1000 tokens/day", max_tokens=100)
    emulator.script(Reply("never shown", input_tokens=1111))
    async with serving(app) as url:
        answer = await chat(http, url)
        usage = (await http.get(url + "/usage", headers=ALICE)).json()
    assert answer.status == 200  # admitted on the estimate
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    assert answer.text == "" and not [e for e in answer.events if e["type"] == "delta"]
    assert usage["limits"][0]["used_tokens"] >= 1111  # the API billed the input anyway


async def test_a_cjk_conversation_under_a_budget_streams_whole(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    """Chinese is about a token a character, three bytes each in UTF-8: the estimate (a
    token per four bytes) is low by more than max_tokens, on every send of a long chat."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    app = app_with(make_app, budget="200000 tokens/day", database_url=database, max_tokens=200)
    sentence = "我们今天讨论一下这个问题的各个方面并且给出详细的分析"
    pieces = ["这是", "一个", "很长的", "回答"] * 6
    reply = "".join(pieces)
    emulator.default = Reply(tokens=pieces)  # the emulator counts as the API: by character
    async with serving(app) as url:
        first = await chat(http, url, sentence * 40)
        cid = first.events[0]["conversation_id"]
        answers = [first]
        for _ in range(3):
            body = {"message": sentence * 40, "conversation_id": cid}
            answers.append(await stream_chat(http, url + "/chat/stream", body, headers=ALICE))
        entries = await ledger_of(app).entries(ident(ALICE))
    for answer in answers:
        assert answer.events[-1]["stop_reason"] == "end_turn", answer.events[-1]
        assert answer.text == reply
    estimates = [
        len(json.dumps(r.body["messages"], ensure_ascii=False).encode()) // 4 + 8
        for r in emulator.requests
    ]
    billed = [e.input_tokens for e in entries]
    assert all(b > e + 200 for b, e in zip(billed, estimates, strict=True))  # beats the grant


async def test_usage_and_the_429_give_micro_dollars_beside_dollars(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="0.001 usd/day", model="claude-sonnet-4-6", max_tokens=8)
    emulator.default = Reply("one two three", input_tokens=20)
    async with serving(app) as url:
        answers = [await chat(http, url)]
        while answers[-1].status == 200 and len(answers) < 12:
            answers.append(await chat(http, url))
        usage = (await http.get(url + "/usage", headers=ALICE)).json()
    refused = answers[-1]
    assert refused.status == 429
    spent = 20 * 3 + 3 * 15  # µ$: $3/MTok in, $15/MTok out
    assert refused.body["used_micro_usd"] == spent * (len(answers) - 1)
    assert refused.body["limit_micro_usd"] == 1000
    assert refused.body["used_usd"] == refused.body["used_micro_usd"] / 1_000_000
    (limit,) = usage["limits"]
    assert limit["used_micro_usd"] == refused.body["used_micro_usd"]
    assert limit["limit_micro_usd"] == 1000
    assert usage["days"][-1]["micro_usd"] == limit["used_micro_usd"]


@pytest.mark.parametrize("home", ["sqlite", "redis", "memory"])
async def test_the_ledger_records_without_any_budget_wherever_it_has_a_home(
    home: str,
    tmp_path: Path,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    request: pytest.FixtureRequest,
) -> None:
    options = stored_in(home, request, tmp_path, 12)
    unset = app_with(make_app, **options)
    recorded = app_with(make_app, ledger=True, **options)
    emulator.default = Reply("one two three", input_tokens=20)
    async with serving(unset) as url:
        assert (await chat(http, url)).status == 200
        unset_ledger = ledger_of(unset)
        unset_entries = await unset_ledger.entries(ident(ALICE)) if unset_ledger else None
    async with serving(recorded) as url:
        assert (await chat(http, url)).status == 200
        entries = await ledger_of(recorded).entries(ident(ALICE))
        usage = (await http.get(url + "/usage", headers=ALICE)).json()
    if home == "memory":  # no home: only CLAUDE_LEDGER=true keeps it, in the worker
        assert unset_ledger is None
    else:
        assert unset_entries and unset_entries[-1].output_tokens == 3
    assert entries[-1].input_tokens == 20 and entries[-1].output_tokens == 3
    assert usage["unlimited"] is True and usage["days"][-1]["requests"] >= 1


async def test_a_budget_that_runs_out_between_tool_steps_ends_before_the_next_request(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = Quart(__name__)
    claude = Claude(
        app, api_key="sk-test", base_url=emulator.url, api_tokens=TOKENS, budget="800 tokens/day"
    )

    @claude.tool
    def order_status(order_id: str) -> dict[str, str]:
        """Look up an order."""
        return {"order_id": order_id, "status": "shipped"}

    emulator.script(
        Reply(
            "Looking.", tool_calls=[ToolUse("order_status", {"order_id": "A-1"})], input_tokens=780
        ),
        Reply("must never be asked"),
    )
    async with serving(app) as url:
        answer = await chat(http, url)
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    assert answer.text == "Looking."
    assert [e["type"] for e in answer.events if e["type"].startswith("tool")] == [
        "tool_call",
        "tool_result",
    ]
    assert len(emulator.requests) == 1  # the second step was refused before it was sent


@pytest.mark.parametrize("store", ["memory", "redis", "sqlite"])
async def test_concurrent_requests_never_spend_past_the_limit(
    tmp_path: Path,
    store: str,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    request: pytest.FixtureRequest,
) -> None:
    # with conversations on, the database keeps the counts
    options = stored_in(store, request, tmp_path, 14)
    app = app_with(make_app, budget="2000 tokens/day", max_tokens=64, **options)
    emulator.default = Reply(
        tokens=[f"w{n} " for n in range(30)], input_tokens=20, token_delay=0.001
    )
    async with serving(app) as url:
        answers = await asyncio.gather(*(chat(http, url) for _ in range(60)))
        entries = await ledger_of(app).entries(ident(ALICE))
        kind = type(ledger_of(app)).__name__
    assert kind == {"memory": "MemoryLedger", "redis": "RedisLedger", "sqlite": "SqlLedger"}[store]
    spent = sum(e.input_tokens + e.output_tokens for e in entries)
    # worst cases are reserved (input estimate + max_tokens 64), so fewer fit than could;
    # the emulator never reports more tokens than the meter estimated
    assert 500 < spent <= 2000
    statuses = {a.status for a in answers}
    assert statuses == {200, 429}
    ended = [a.events[-1]["stop_reason"] for a in answers if a.status == 200]
    assert "end_turn" in ended
    assert len(entries) == len(emulator.requests)  # every upstream request is in the ledger


async def test_a_period_reset_readmits_the_identity(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="50 tokens/2 seconds")
    emulator.default = Reply("one two three", input_tokens=30)
    async with serving(app) as url:
        while (await chat(http, url)).status == 200:
            pass
        refused = await chat(http, url)
        assert refused.status == 429
        await asyncio.sleep(refused.body["retry_after"] + 0.1)
        again = await chat(http, url)
    assert again.status == 200, again.body


async def test_a_budget_hook_holds_two_tiers(emulator: Emulator, http: httpx2.AsyncClient) -> None:
    app = Quart(__name__)
    claude = Claude(
        app, api_key="sk-test", base_url=emulator.url, api_tokens=TOKENS, max_streams_per_client=0
    )
    plans = {ident(ALICE): "60 tokens/day", ident(BOB): "600 tokens/day"}

    @claude.budget
    async def plan(identity: str) -> str:
        return plans[identity]

    emulator.default = Reply("one two three four five", input_tokens=20)
    async with serving(app) as url:
        alice = [await chat(http, url) for _ in range(4)]
        bob = [await chat(http, url, headers=BOB) for _ in range(4)]
        usage = (await http.get(url + "/usage", headers=BOB)).json()
    assert alice[0].status == 200 and [a.status for a in alice[2:]] == [429, 429]
    assert [b.status for b in bob] == [200] * 4
    assert usage["limits"][0]["limit"] == "600 tokens/day"
    assert usage["limits"][0]["used_tokens"] == 100


async def test_a_money_budget_refuses_a_model_without_a_price(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="1 usd/day", model="claude-unpriced-1")
    async with serving(app) as url:
        answer = await chat(http, url)
    assert answer.status == 429
    assert answer.body["reason"] == "no_price"


@pytest.mark.parametrize("store", ["memory", "redis", "sqlite"])
async def test_a_reservation_left_by_a_dead_worker_expires(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    limits = parse_budget("CLAUDE_BUDGET", "100 tokens/day")
    conversations = None
    if store == "sqlite":
        conversations = Conversations(
            create_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"), owned=True
        )
        await conversations.create_tables()
        ledger: Any = SqlLedger(conversations.runner)
    elif store == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(request.getfixturevalue("redis_url") + "/14")
        ledger = RedisLedger(client, prefix=f"qcb-test-{time.time_ns()}")
    else:
        ledger = MemoryLedger()
    ask, floor = Amount(80, 0), Amount(30, 0)
    now = time.time()
    held = await ledger.reserve("ann", limits, "dead", ask=ask, floor=floor, ttl=0.3, now=now)
    assert held == Amount(80, 0)
    refused = await ledger.reserve(
        "ann", limits, "next", ask=ask, floor=floor, ttl=60, now=time.time()
    )
    assert not isinstance(refused, Amount)  # 20 left: less than the floor
    await asyncio.sleep(0.4)  # the dead worker's hold expires, and is swept
    granted = await ledger.reserve(
        "ann", limits, "next", ask=ask, floor=floor, ttl=60, now=time.time()
    )
    assert granted == Amount(80, 0)
    await ledger.settle("ann", limits, "next", Amount(25, 0), time.time())
    assert await ledger.used("ann", limits, time.time()) == [Amount(25, 0)]
    if store == "redis":
        await client.aclose()
    if conversations is not None:
        await conversations.close()


async def test_on_turn_gets_the_turns_cost(emulator: Emulator, http: httpx2.AsyncClient) -> None:
    app = Quart(__name__)
    claude = Claude(app, api_key="sk-test", base_url=emulator.url, model="claude-sonnet-4-6")
    costs: list[int | None] = []

    @claude.on_turn
    def kept(turn: Any) -> None:
        costs.append(turn.cost_micro_usd)

    emulator.script(Reply("one two three", input_tokens=1000, cache_read_input_tokens=1000))
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        assert answer.status == 200
        await eventually(lambda: len(costs) == 1)
    assert costs == [3000 + 300 + 3 * 15]  # $3/MTok in, $0.30 cache reads, $15 out


async def test_a_soft_threshold_warns_in_start_and_done(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = app_with(make_app, budget="100 tokens/day", budget_warn_at=50)
    emulator.default = Reply("one two three four five", input_tokens=20)
    async with serving(app) as url:
        first, second, third = [await chat(http, url) for _ in range(3)]
    assert "budget_warning" not in first.events[0] and "budget_warning" not in first.events[-1]
    assert "budget_warning" not in second.events[0]
    assert second.events[-1]["budget_warning"] == {"limit": "100 tokens/day", "used_percent": 50}
    assert third.events[0]["budget_warning"]["used_percent"] == 50
    assert third.events[-1]["budget_warning"]["used_percent"] == 75


async def test_a_money_budget_cuts_mid_answer_at_its_cost(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    # $3 in, $15 out per MTok: 20 input tokens cost 60 µ$, leaving 940 µ$: 62 output tokens
    app = app_with(make_app, budget="0.001 usd/day", model="claude-sonnet-4-6", max_tokens=1000)
    words = [f"w{n} " for n in range(400)]
    emulator.script(Reply(tokens=words, input_tokens=20))
    async with serving(app) as url:
        answer = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    assert "".join(words).startswith(answer.text)
    assert 40 < len(answer.text.split()) <= 62
    assert 0 < sum(e.cost_micro_usd for e in entries) <= 1000


async def test_a_refused_turn_leaves_no_trace_in_the_conversation(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    app = app_with(make_app, budget="120 tokens/day", database_url=database)
    emulator.default = Reply(tokens=[f"w{n} " for n in range(60)], input_tokens=20)
    async with serving(app) as url:
        first = await chat(http, url)
        cid = first.events[0]["conversation_id"]
        body = {"message": "and then?", "conversation_id": cid}
        refused = await stream_chat(http, url + "/chat/stream", body, headers=ALICE)
        again = await stream_chat(http, url + "/chat/stream", body, headers=ALICE)
        fresh = await chat(http, url, "a new chat")
        read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
        listed = (await http.get(f"{url}/conversations", headers=ALICE)).json()
    assert first.status == 200 and refused.status == 429 and fresh.status == 429
    assert [m["role"] for m in read["messages"]] == ["user", "assistant"]  # as before
    assert again.body["error"] == "budget_exceeded"  # not conversation_busy: it was freed
    assert [c["id"] for c in listed["conversations"]] == [cid]  # none made for the refusal


def thoughts(count: int) -> str:
    return "".join(f"t{n} " for n in range(count))


@pytest.mark.parametrize("hidden", [0, 1500], ids=["shown", "summarized"])
@pytest.mark.parametrize("thinking", [1024, "adaptive"])
async def test_thinking_is_held_to_the_limit(
    thinking: int | str,
    hidden: int,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    """Thinking is billed output; a summarized one bills far more than readers see, so the
    meter alone cannot hold it: the request's max_tokens is what the grant leaves."""
    app = app_with(make_app, budget="2000 tokens/day", max_tokens=4096, thinking=thinking)
    shown = 100 if hidden else 2600
    emulator.script(
        Reply(
            tokens=[f"w{n} " for n in range(400)],
            thinking=thoughts(shown),
            hidden_thinking_tokens=hidden,
        )
    )
    async with serving(app) as url:
        answer = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    (request,) = emulator.requests
    assert request.usage is not None  # the API itself stopped at the lowered max_tokens
    billed = request.usage["input_tokens"] + request.usage["output_tokens"]
    assert billed <= 2000
    assert [(e.input_tokens, e.output_tokens) for e in entries] == [
        (request.usage["input_tokens"], request.usage["output_tokens"])
    ]
    if hidden:  # the summary, then some text, within what was left
        assert answer.text and len(answer.text.split()) < 400
    else:
        assert answer.text == ""


async def test_thinking_the_request_cannot_be_lowered_for_is_cut_by_the_meter(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    # 1000 tokens leave less than the API's smallest thinking budget (1,024): only the meter
    app = app_with(make_app, budget="1000 tokens/day", max_tokens=4096, thinking=1024)
    emulator.script(Reply(tokens=["never "] * 10, thinking=thoughts(2600), token_delay=0.001))
    async with serving(app) as url:
        answer = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    assert answer.text == ""
    thinking = "".join(e["text"] for e in answer.events if e["type"] == "thinking")
    assert thoughts(2600).startswith(thinking) and 900 < len(thinking.split()) < 1000
    (request,) = await emulator.wait_for_requests(1)
    await asyncio.wait_for(request.ended.wait(), 1.0)
    assert request.disconnected and request.body["max_tokens"] == 4096 + 1024
    (entry,) = entries
    assert entry.input_tokens + entry.output_tokens <= 1000


async def test_a_tool_call_cut_mid_input_never_runs(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = Quart(__name__)
    claude = Claude(
        app,
        api_key="sk-test",
        base_url=emulator.url,
        api_tokens=TOKENS,
        budget="2000 tokens/day",
        max_tokens=4096,
    )
    saved: list[str] = []

    @claude.tool
    def save_document(text: str) -> str:
        """Save a document."""
        saved.append(text)
        return "saved"

    document = "lorem ipsum " * 625  # 7,500 characters: 2,500 tokens of tool input
    emulator.script(
        Reply("Saving.", tool_calls=[ToolUse("save_document", {"text": document})]),
        Reply("must never be asked"),
    )
    async with serving(app) as url:
        answer = await chat(http, url)
        entries = await ledger_of(app).entries(ident(ALICE))
    assert answer.events[-1]["stop_reason"] == "budget_exhausted"
    assert answer.text == "Saving."
    assert not [e for e in answer.events if e["type"].startswith("tool")]
    assert saved == [] and len(emulator.requests) == 1
    (request,) = emulator.requests
    if request.usage is not None:  # stopped by the API at the lowered max_tokens
        assert request.usage["input_tokens"] + request.usage["output_tokens"] <= 2000
    assert sum(e.input_tokens + e.output_tokens for e in entries) <= 2000
