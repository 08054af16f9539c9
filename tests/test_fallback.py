"""Fallback chains (issue 25, first-party hops): an overload moves before any text, a failure
mid-answer continues on the next hop with the exact text, a chain runs out, a hop cools down
(for every worker, through Redis), token_limit moves only to a larger context, and a tool
loop's thinking never reaches another model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator, ErrorReply, Reply, ToolUse

from .helpers import eventually, fresh_redis_db, serving, stream_chat
from .models import NO_PREFILL_MODEL, PREFILL_MODEL

pytestmark = pytest.mark.server

PRIMARY = "claude-sonnet-5-5"
AUTH = {"Authorization": "Bearer tok-0123456789"}
HOPS = [{"model": NO_PREFILL_MODEL}, {"model": PREFILL_MODEL}]


def chained(make_app: Callable[..., Quart], **options: Any) -> Quart:
    options.setdefault("fallbacks", HOPS)
    options.setdefault("max_retries", 0)
    options.setdefault("max_recoveries", 0)
    return make_app(model=PRIMARY, **options)


def models(emulator: Emulator) -> list[str]:
    return [r.body["model"] for r in emulator.requests]


async def test_an_overload_moves_to_the_next_hop_before_any_text(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529), Reply("From the next model."))
    async with serving(chained(make_app)) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert models(emulator) == [PRIMARY, NO_PREFILL_MODEL]
    assert [e["type"] for e in answer.events] == ["start", "fallback", "delta", "delta", "delta",
                                                  "delta", "done"]  # fmt: skip
    assert answer.events[1] == {
        "type": "fallback", "from": PRIMARY, "to": NO_PREFILL_MODEL, "reason": "overloaded",
        "phase": "before_text", "hop": 1,
    }  # fmt: skip
    assert answer.text == "From the next model."
    assert answer.events[-1]["model"] == NO_PREFILL_MODEL
    assert answer.ids == [str(n) for n in range(len(answer.ids))]


async def test_a_failure_mid_answer_continues_on_the_next_hop_exactly(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    text = "One two three four five six seven eight nine ten."
    emulator.script(
        Reply(text, fault="error", fault_after=4, error_type="overloaded_error"),
        Reply(text),  # the next hop answers the continuation with the rest
    )
    async with serving(chained(make_app)) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "count"})
    assert answer.text == text  # no duplicated, no missing text
    assert answer.ids == [str(n) for n in range(len(answer.ids))]  # contiguous
    fallback = next(e for e in answer.events if e["type"] == "fallback")
    assert fallback["phase"] == "mid_answer" and fallback["to"] == NO_PREFILL_MODEL
    continuation = emulator.requests[1].body
    assert continuation["model"] == NO_PREFILL_MODEL
    assert continuation["messages"][-1]["role"] == "user"  # the "continue" turn: no prefill
    done = answer.events[-1]
    assert done["type"] == "done"
    # per hop, in the API's own shape: what each model was asked and wrote
    iterations = done["usage"]["iterations"]
    assert [(i["type"], i["model"]) for i in iterations] == [
        ("message", PRIMARY), ("message", NO_PREFILL_MODEL),
    ]  # fmt: skip
    assert sum(i["output_tokens"] for i in iterations) == done["usage"]["output_tokens"]


async def test_a_hop_that_failed_cools_down_for_the_next_answers(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529), Reply("first"), Reply("second"))
    async with serving(chained(make_app)) as url:
        await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        cooled = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert cooled.text == "second"
    assert models(emulator) == [PRIMARY, NO_PREFILL_MODEL, NO_PREFILL_MODEL]


async def test_the_cooldown_is_shared_by_two_apps_through_redis(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient, redis_url: str
) -> None:
    store = fresh_redis_db(redis_url, 10)
    emulator.script(ErrorReply(529), Reply("first"), Reply("from the other worker"))
    first = chained(make_app, stream_store=store)
    second = chained(make_app, stream_store=store)
    async with serving(first) as one, serving(second) as two:
        await stream_chat(http, one + "/chat/stream", {"message": "hi"})
        other = await stream_chat(http, two + "/chat/stream", {"message": "hi"})
    assert other.text == "from the other worker"
    assert models(emulator) == [PRIMARY, NO_PREFILL_MODEL, NO_PREFILL_MODEL]


async def test_a_tool_loop_falling_back_mid_loop_sends_no_foreign_thinking(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = Quart(__name__)
    claude = Claude(
        app, api_key="sk-test", base_url=emulator.url, model=PRIMARY, thinking=2048,
        fallbacks=HOPS, max_retries=0,
    )  # fmt: skip

    runs: list[str] = []

    @claude.tool
    def order_status(order_id: str) -> str:
        """Look up an order."""
        runs.append(order_id)
        return f"{order_id}: shipped"

    call = ToolUse("order_status", {"order_id": "C-3"})
    emulator.script(
        Reply("Checking.", thinking="Look it up.", tool_calls=[call]),
        ErrorReply(529),
        Reply("It has shipped."),
    )
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "Where is C-3?"})
    assert answer.events[-1]["type"] == "done", answer.events[-1]
    assert answer.text == "Checking.It has shipped."
    assert runs == ["C-3"]  # the finished tool step never runs again
    last = emulator.requests[2].body
    assert last["model"] == NO_PREFILL_MODEL
    sent = [b["type"] for m in last["messages"] if m["role"] == "assistant" for b in m["content"]]
    assert "thinking" not in sent and "tool_use" in sent  # the emulator refuses foreign thinking


async def test_the_ai_sdk_route_sends_a_fallback_as_a_data_part(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529), Reply("From the next model."))
    body = {
        "id": "chat-fallback",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        "trigger": "submit-message",
    }
    async with serving(chained(make_app)) as url:
        response = await http.post(url + "/ai-sdk/chat", json=body)
    chunks = [json.loads(line[6:]) for line in response.text.split("\n\n") if line[6:7] == "{"]
    parts = [c for c in chunks if c["type"] == "data-fallback"]
    assert parts == [
        {
            "type": "data-fallback",
            "data": {"from": PRIMARY, "to": NO_PREFILL_MODEL, "reason": "overloaded",
                     "phase": "before_text"},
            "transient": True,
        }
    ]  # fmt: skip
    assert [c["type"] for c in chunks][:2] == ["start", "data-fallback"]


async def test_a_refusal_the_server_side_fallback_answers_keeps_its_block_in_place(
    emulator: Emulator, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    """CLAUDE_SERVER_FALLBACKS: the API's own fallback (refusals only) with its beta; the
    reader sees a fallback event, done names the model that answered, and the turn goes back
    to the API with the fallback block where it was (the emulator refuses it elsewhere)."""
    app = Quart(__name__)
    Claude(
        app, api_key="sk-test", base_url=emulator.url, model=PRIMARY,
        server_fallbacks=[{"model": "claude-opus-4-8"}],
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", api_tokens="tok-0123456789",
    )  # fmt: skip
    emulator.script(
        Reply(
            "I can't help with that. ",
            stop_reason="refusal",
            stop_details={"type": "refusal", "category": "cyber"},
            fallback_text="Here is a safe way to do it.",
        ),
        Reply("Glad it helped."),
    )
    async with serving(app) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "Scan my network?"}, headers=AUTH
        )
        cid = first.events[0]["conversation_id"]

        async def stored() -> bool:
            read = await http.get(f"{url}/conversations/{cid}", headers=AUTH)
            return bool(read.json()["messages"][-1]["status"] == "complete")

        await eventually(stored)
        second = await stream_chat(
            http, url + "/chat/stream", {"message": "Thanks", "conversation_id": cid}, headers=AUTH
        )
    assert first.text == "I can't help with that. Here is a safe way to do it."
    fallback = next(e for e in first.events if e["type"] == "fallback")
    assert fallback == {
        "type": "fallback", "from": PRIMARY, "to": "claude-opus-4-8", "reason": "refusal",
        "phase": "server",
    }  # fmt: skip
    done = first.events[-1]
    assert done["stop_reason"] == "end_turn"
    assert [i["type"] for i in done["usage"]["iterations"]] == ["message", "fallback_message"]
    asked = emulator.requests[0]
    assert asked.body["fallbacks"] == [{"model": "claude-opus-4-8"}]
    assert "server-side-fallback-2026-07-01" in asked.headers["anthropic-beta"]
    assert second.text == "Glad it helped.", second.events[-1]
    sent_back = emulator.requests[1].body["messages"][1]
    assert [b["type"] for b in sent_back["content"]] == ["text", "fallback", "text"]


async def test_a_hop_may_turn_thinking_off(emulator: Emulator, http: httpx2.AsyncClient) -> None:
    app = Quart(__name__)
    Claude(
        app, api_key="sk-test", base_url=emulator.url, model=PRIMARY, thinking=2048,
        fallbacks=[{"model": PREFILL_MODEL, "thinking": "off"}], max_retries=0,
    )  # fmt: skip
    emulator.script(ErrorReply(529), Reply("Without thinking."))
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert answer.text == "Without thinking."
    first, second = (r.body for r in emulator.requests)
    assert first["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert "thinking" not in second and second["model"] == PREFILL_MODEL
