"""Tools the host app defines (issue 15): the relay runs the loop on the server, against the
emulator's ``tool_use`` (input streamed in awkward pieces) and its checks of every follow-up
(a ``tool_result`` for each call, thinking sent back first and unaltered)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anthropic
import httpx2
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import Field
from quart import Quart, current_app

from quart_claude import Claude, ToolContext
from quart_claude.client import stream_chat as client_stream_chat
from quart_claude.testing import Emulator, Reply, ToolUse
from quart_claude.testing._emulator import input_pieces

from .helpers import CuttingProxy, serving, stream_chat, wsgi_serving

pytestmark = pytest.mark.server

API_KEY = "sk-ant-test-tools"
ORDER = {"order_id": "A-17", "status": "shipped"}


class Host:
    """An app with tools whose calls the test can see."""

    def __init__(self, emulator: Emulator, **options: Any) -> None:
        self.app = Quart(__name__)
        options.setdefault("api_key", API_KEY)
        options.setdefault("base_url", emulator.url)
        options.setdefault("retry_base_delay", 0.05)
        self.claude = Claude(self.app, **options)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.started: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []

    def seen(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))
        self.started.setdefault(name, asyncio.Event()).set()

    def started_event(self, name: str) -> asyncio.Event:
        return self.started.setdefault(name, asyncio.Event())


@pytest.fixture
def host(emulator: Emulator) -> Callable[..., Host]:
    def factory(**options: Any) -> Host:
        made = Host(emulator, **options)

        @made.claude.tool
        async def order_status(order_id: str) -> dict[str, str]:
            """Look up an order by id."""
            made.seen("order_status", order_id=order_id)
            # parallel: the other tool of the step has started before this one finishes
            await asyncio.wait_for(made.started_event("weather").wait(), 5)
            return {"order_id": order_id, "status": "shipped"}

        @made.claude.tool
        def weather(city: str, days: Annotated[int, Field(ge=1, le=7)] = 1) -> str:
            """The weather forecast for a city (sync: runs in a thread)."""
            made.seen("weather", city=city, days=days)
            return f"sunny in {city} for {days} day(s)"

        return made

    return factory


async def read_stream(http: httpx2.AsyncClient, url: str, **body: Any) -> Any:
    return await stream_chat(http, url + "/chat/stream", {"message": "hi", **body})


async def test_a_two_step_loop_with_two_tools_in_parallel(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host()
    emulator.script(
        Reply(
            "Let me check both. ",
            tool_calls=[
                ToolUse("order_status", {"order_id": "A-17"}, id="toolu_1"),
                ToolUse("weather", {"city": 'Zürich "Nord" ⛅', "days": 3}, id="toolu_2"),
            ],
            input_tokens=100,
        ),
        Reply("Your order shipped and it will be sunny.", input_tokens=150),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[0] == "start" and result.types[-1] == "done"
    assert result.text == "Let me check both. Your order shipped and it will be sunny."
    calls = [e for e in result.events if e["type"] == "tool_call"]
    results = [e for e in result.events if e["type"] == "tool_result"]
    assert [(c["id"], c["name"], c["input"]) for c in calls] == [
        ("toolu_1", "order_status", {"order_id": "A-17"}),
        ("toolu_2", "weather", {"city": 'Zürich "Nord" ⛅', "days": 3}),
    ]
    assert sorted(r["id"] for r in results) == ["toolu_1", "toolu_2"]
    by_id = {r["id"]: r for r in results}
    assert by_id["toolu_1"] == {
        "type": "tool_result",
        "id": "toolu_1",
        "name": "order_status",
        "is_error": False,
        "output": {"order_id": "A-17", "status": "shipped"},
    }
    assert by_id["toolu_2"]["output"] == 'sunny in Zürich "Nord" ⛅ for 3 day(s)'
    # order: the first step's text, the calls, the results, then the second step's text
    types = result.types
    last_call = max(i for i, t in enumerate(types) if t == "tool_call")
    first_result = types.index("tool_result")
    second_text = max(i for i, t in enumerate(types) if t == "delta")
    assert types.index("delta") < types.index("tool_call") <= last_call < first_result
    assert max(i for i, t in enumerate(types) if t == "tool_result") < second_text
    assert sorted(made.calls) == [
        ("order_status", {"order_id": "A-17"}),
        ("weather", {"city": 'Zürich "Nord" ⛅', "days": 3}),
    ]
    # usage sums both steps
    done = result.events[-1]
    assert done["stop_reason"] == "end_turn"
    assert done["usage"]["input_tokens"] == 250
    first, second = emulator.requests
    assert [t["name"] for t in first.body["tools"]] == ["order_status", "weather"]
    weather_schema = first.body["tools"][1]["input_schema"]
    assert weather_schema["properties"]["days"]["maximum"] == 7
    assert weather_schema["required"] == ["city"]
    assert first.body["tools"][1]["description"].startswith("The weather forecast")
    assistant, answers = second.body["messages"][-2:]
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["tool_use_id"] for b in answers["content"]] == ["toolu_1", "toolu_2"]
    assert json.loads(answers["content"][0]["content"]) == {"order_id": "A-17", "status": "shipped"}


async def test_the_emulator_cuts_tool_input_awkwardly() -> None:
    """The relay's tests are only as good as the pieces: some cut inside an escape."""
    value = {"city": "Zürich", "n": 12345}
    pieces = input_pieces(value)
    assert pieces[0] == "" and "".join(pieces) == json.dumps(value)
    assert "\\u00fc" in "".join(pieces)
    assert not any("\\u00fc" in piece for piece in pieces)  # the escape is cut in two
    assert len(pieces) > 8


async def test_a_tool_that_raises_or_times_out_becomes_an_error_result(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tool_timeout=0.3)

    @made.claude.tool
    async def lookup(key: str) -> str:
        """Look a key up."""
        raise KeyError(f"no such key: {key}")

    @made.claude.tool
    async def slow() -> str:
        """Takes its time."""
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            made.cancelled.append("slow")
            raise
        return "late"

    emulator.script(
        Reply("", tool_calls=[ToolUse("lookup", {"key": "k9"}), ToolUse("slow")]),
        Reply("Neither worked."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done" and result.text == "Neither worked."
    results = {e["name"]: e for e in result.events if e["type"] == "tool_result"}
    assert results["lookup"]["is_error"] is True
    assert results["lookup"]["output"] == "'no such key: k9'"
    assert results["slow"]["is_error"] is True
    assert results["slow"]["output"] == "the tool did not finish within 0.3 s"
    assert made.cancelled == ["slow"]  # the timeout cancelled it
    raw = result.raw.decode()
    assert "Traceback" not in raw and 'File "' not in raw
    sent = emulator.requests[1].body["messages"][-1]["content"]
    assert all(block["is_error"] is True for block in sent)


async def test_bad_input_and_unknown_tools_are_error_results_the_model_sees(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host()
    emulator.script(
        Reply("", tool_calls=[ToolUse("weather", {"city": "Oslo", "days": 30})]),
        Reply("", tool_calls=[ToolUse("launch_rockets", {"count": 3})]),
        Reply("Sorry."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done"
    errors = [e for e in result.events if e["type"] == "tool_result"]
    assert [e["is_error"] for e in errors] == [True, True]
    assert "days: Input should be less than or equal to 7" in errors[0]["output"]
    assert errors[1]["output"] == "there is no tool named 'launch_rockets'"
    assert made.calls == []  # a refused input never reaches the function


async def test_max_tool_steps_ends_the_loop_as_documented(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host(max_tool_steps=2)
    call = Reply("Again. ", tool_calls=[ToolUse("weather", {"city": "Rome"})])
    emulator.script(call, call, call, Reply("never sent"))
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.events[-1]["type"] == "done"
    assert result.events[-1]["stop_reason"] == "max_tool_steps"
    assert len(emulator.requests) == 3
    assert len(made.calls) == 2  # the third step's call is not run
    assert result.types.count("tool_call") == 2 and result.types.count("tool_result") == 2
    assert result.text == "Again. " * 3


async def test_a_stop_during_a_tool_call_cancels_it(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator)

    @made.claude.tool
    async def long_job(job: str) -> str:
        """A long job."""
        made.seen("long_job", job=job)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            made.cancelled.append(job)
            raise
        return "finished"

    emulator.script(Reply("Starting. ", tool_calls=[ToolUse("long_job", {"job": "j1"})]))
    async with serving(made.app) as url:
        async with http.stream("POST", url + "/chat/stream", json={"message": "go"}) as response:
            stream_id = response.headers["x-stream-id"]
            reading = asyncio.ensure_future(response.aread())
            await asyncio.wait_for(made.started_event("long_job").wait(), 10)
            stopped = await http.delete(f"{url}/chat/stream/{stream_id}")
            body = await asyncio.wait_for(reading, 10)
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    assert made.cancelled == ["j1"]
    events = [json.loads(line[6:]) for line in body.decode().split("\n") if line[:6] == "data: "]
    assert events[-1] == {**events[-1], "type": "done", "stop_reason": "cancelled"}
    assert "tool_result" not in [e["type"] for e in events]
    assert len(emulator.requests) == 1


@pytest.mark.parametrize("on_continue", ["rest", "restart", "repeat_tail", "repeat_whitespace"])
async def test_a_drop_mid_tool_input_recovers_without_running_the_tool_twice(
    host: Callable[..., Host],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    on_continue: Literal["rest", "restart", "repeat_tail", "repeat_whitespace"],
) -> None:
    """Asked to continue, the model writes the rest, or starts over, or repeats its last
    words, then calls the tool again: the reader sees the text once and one call."""
    made = host()
    text = "Checking the weather for you in the city you asked about. "
    call = (ToolUse("weather", {"city": "Paris"}),)
    emulator.script(
        Reply(text, tool_calls=call, fault="drop", fault_in_input=4),  # inside the input
        Reply(text, tool_calls=call, on_continue=on_continue),
        Reply("It is sunny."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done"
    assert result.text == text + "It is sunny."
    assert made.calls == [("weather", {"city": "Paris", "days": 1})]
    assert result.types.count("tool_call") == 1 and result.types.count("tool_result") == 1
    assert len(emulator.requests) == 3
    continuation = emulator.requests[1].body["messages"]
    assert continuation[-2]["role"] == "assistant"  # it continued the text the reader has


@pytest.mark.parametrize("fault", ["drop", "eof"])
async def test_a_drop_after_the_stop_reason_runs_the_finished_tool_call_once(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient, fault: Any
) -> None:
    """The connection ends after ``message_delta`` (``stop_reason: tool_use``, every block
    closed) but before ``message_stop``: the message is complete, and its tool call runs."""
    made = host()
    emulator.script(
        Reply(
            "Checking. ",
            tool_calls=[ToolUse("weather", {"city": "Oslo"})],
            fault=fault,
            fault_before_stop=True,
        ),
        Reply("It is sunny."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done", result.events[-1]
    assert result.text == "Checking. It is sunny."
    assert made.calls == [("weather", {"city": "Oslo", "days": 1})]
    assert len(emulator.requests) == 2  # the tool's follow-up; no continuation was needed
    assert emulator.requests[0].outcome == ("dropped" if fault == "drop" else "completed")


async def test_a_drop_after_the_tools_reissues_only_the_next_step(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host()
    emulator.script(
        Reply("", tool_calls=[ToolUse("weather", {"city": "Lima"})]),
        Reply("Sunny all week in Lima.", fault="drop", fault_after=2),
        Reply("Sunny all week in Lima."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done" and result.text == "Sunny all week in Lima."
    assert len(made.calls) == 1
    recovery = emulator.requests[2].body["messages"]
    assert [m["role"] for m in recovery] == ["user", "assistant", "user", "assistant", "user"]
    assert recovery[2]["content"][0]["type"] == "tool_result"


async def test_a_resume_mid_loop_replays_every_event_exactly(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host()
    emulator.script(
        Reply(
            "Looking. ",
            tool_calls=[ToolUse("weather", {"city": "Oslo"}, id="toolu_w")],
            token_delay=0.01,
        ),
        Reply("Cold and clear in Oslo tonight.", token_delay=0.05),
    )
    async with serving(made.app) as url:
        async with http.stream("POST", url + "/chat/stream", json={"message": "go"}) as response:
            stream_id = response.headers["x-stream-id"]
            raw = b""
            async for chunk in response.aiter_raw():
                raw += chunk
                if b'"tool_result"' in raw:
                    break
        last_id = [line for line in raw.decode().split("\n") if line.startswith("id: ")][-1][4:]
        resumed = await stream_chat(
            http,
            f"{url}/chat/stream/{stream_id}",
            method="GET",
            headers={"Last-Event-ID": last_id},
        )
        whole = await stream_chat(http, f"{url}/chat/stream/{stream_id}", method="GET")
    assert resumed.ids[0] == str(int(last_id) + 1)
    assert whole.ids == [str(i) for i in range(len(whole.ids))]
    assert whole.events[int(last_id) + 1 :] == resumed.events
    assert [e["type"] for e in whole.events].count("tool_result") == 1
    assert whole.text == "Looking. Cold and clear in Oslo tonight."
    assert len(made.calls) == 1


async def test_what_readers_see_is_the_tools_choice_and_tools_know_who_asked(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, api_tokens=["alice-token"])
    identities: list[Any] = []

    @made.claude.tool(show="hidden")
    def secret_lookup(account: str, context: ToolContext) -> dict[str, str]:
        """Looks up an account's balance."""
        identities.append((context.identity, context.tool_use_id))
        return {"balance": "1234.56", "account": account}

    @made.claude.tool(show=lambda output: {"rows": len(output)})
    async def search(query: str) -> list[str]:
        """Searches the docs."""
        return [f"{query} result {n}" for n in range(3)]

    emulator.script(
        Reply(
            "",
            tool_calls=[
                ToolUse("secret_lookup", {"account": "ACC-991"}, id="toolu_s"),
                ToolUse("search", {"query": "refunds"}),
            ],
        ),
        Reply("Done."),
    )
    async with serving(made.app) as url:
        result = await stream_chat(
            http,
            url + "/chat/stream",
            {"message": "hi"},
            headers={"Authorization": "Bearer alice-token"},
        )
    assert result.types[-1] == "done"
    raw = result.raw.decode()
    assert "ACC-991" not in raw and "1234.56" not in raw and "refunds result" not in raw
    hidden = next(e for e in result.events if e["type"] == "tool_call")
    assert hidden["name"] == "secret_lookup" and hidden["input"] is None
    outputs = {e["name"]: e["output"] for e in result.events if e["type"] == "tool_result"}
    assert outputs == {"secret_lookup": None, "search": {"rows": 3}}
    assert identities == [(identities[0][0], "toolu_s")]
    assert identities[0][0] is not None and identities[0][0].startswith("token:")
    schema = emulator.requests[0].body["tools"][0]["input_schema"]
    assert "context" not in schema["properties"]
    # the model got the whole result
    sent = emulator.requests[1].body["messages"][-1]["content"][0]
    assert json.loads(sent["content"]) == {"balance": "1234.56", "account": "ACC-991"}


async def test_thinking_goes_back_first_and_intact_in_a_tool_loop(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The emulator refuses a follow-up whose assistant turn does not start with its
    thinking, or whose signature does not match: this loop passes only if both are right."""
    made = host(thinking=1024)
    emulator.script(
        Reply(
            "One moment. ",
            thinking="I need the weather tool.",
            redacted_thinking=True,
            tool_calls=[ToolUse("weather", {"city": "Kyoto"})],
        ),
        Reply("Clear skies.", thinking="The tool answered."),
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done", result.events[-1]
    assert result.text == "One moment. Clear skies."
    assert all(r.outcome == "completed" for r in emulator.requests)
    turn = emulator.requests[1].body["messages"][-2]["content"]
    assert [b["type"] for b in turn] == ["redacted_thinking", "thinking", "text", "tool_use"]
    assert turn[1]["thinking"] == "I need the weather tool."
    assert "signature" not in result.raw.decode()
    thoughts = [e for e in result.events if e["type"] == "thinking"]
    assert "".join(e["text"] for e in thoughts) == "I need the weather tool.The tool answered."
    assert not any(e.get("restart") for e in thoughts)  # the second step's is not a retry


async def test_server_tools_pass_through_and_a_paused_turn_goes_on(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    web_search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    found = [{"type": "web_search_result", "url": "https://example.com", "title": "Example"}]
    emulator.script(
        Reply(
            "",
            tool_calls=[ToolUse("web_search", {"query": "quart"}, server=True, result=found)],
            stop_reason="pause_turn",
        ),
        Reply("Quart is an async Flask."),
    )
    async with serving(make_app(server_tools=json.dumps([web_search]))) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done" and result.events[-1]["stop_reason"] == "end_turn"
    call = next(e for e in result.events if e["type"] == "tool_call")
    answer = next(e for e in result.events if e["type"] == "tool_result")
    assert call["server"] is True and call["input"] == {"query": "quart"}
    assert answer == {
        "type": "tool_result",
        "id": call["id"],
        "name": "web_search",
        "is_error": False,
        "output": found,
        "server": True,
    }
    assert result.text == "Quart is an async Flask."
    first, second = emulator.requests
    assert first.body["tools"] == [web_search]
    paused = second.body["messages"][-1]
    assert paused["role"] == "assistant"  # sent back as is: the API continues it
    assert [b["type"] for b in paused["content"]] == ["server_tool_use", "web_search_tool_result"]


async def test_refusal_and_max_tokens_are_reported(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("I can't help with that.", stop_reason="refusal"))
    async with serving(make_app()) as url:
        refused = await read_stream(http, url)
        emulator.script(Reply("one two three four five six"))
        cut = await read_stream(http, url, max_tokens=3)
    assert refused.events[-1]["stop_reason"] == "refusal"
    assert cut.events[-1]["stop_reason"] == "max_tokens" and cut.text == "one two three "


def test_functions_that_cannot_be_tools_fail_at_registration() -> None:
    claude = Claude()

    def undocumented(x: int) -> int:
        return x

    def variadic(*args: int) -> int:
        """Adds."""
        return sum(args)

    with pytest.raises(ValueError, match="needs a description"):
        claude.tool(undocumented)
    with pytest.raises(ValueError, match=r"\*args"):
        claude.tool(variadic)
    with pytest.raises(ValueError, match="must match"):
        claude.tool(name="has space")(variadic)
    claude.tool(undocumented, description="Returns x.")
    with pytest.raises(ValueError, match="already registered"):
        claude.tool(undocumented, description="Again.")


async def test_the_emulator_refuses_malformed_follow_ups(emulator: Emulator) -> None:
    """Upstream's rules, so a protocol mistake of ours is a test failure, not a surprise."""
    client = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=emulator.url, max_retries=0)
    tool = {"name": "t", "description": "d", "input_schema": {"type": "object"}}
    call = {"type": "tool_use", "id": "toolu_x", "name": "t", "input": {}}
    cases: list[tuple[list[dict[str, Any]], dict[str, Any], str]] = [
        (  # a call without its result
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [call]},
                {"role": "user", "content": "and?"},
            ],
            {},
            "without `tool_result` blocks",
        ),
        (  # a result for no call
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_y", "content": "1"}],
                },
            ],
            {},
            "unexpected `tool_use_id`",
        ),
        (  # thinking on: the loop's turn must start with its thinking
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "x"}, call]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}],
                },
            ],
            {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
            "must start with a thinking block",
        ),
        (  # an altered thinking block
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "edited", "signature": "AAAA"}],
                },
                {"role": "user", "content": "go on"},
            ],
            {},
            "Invalid `signature`",
        ),
    ]
    try:
        for messages, extra, expected in cases:
            params: dict[str, Any] = {
                "model": "claude-sonnet-5-5",
                "max_tokens": 100,
                "messages": messages,
                "tools": [tool],
                **extra,
            }
            with pytest.raises(anthropic.BadRequestError) as caught:
                await client.messages.create(**params)
            assert expected in str(caught.value)
    finally:
        await client.close()


async def test_demo_mode_calls_a_tool_the_prompt_names(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """``make run`` with no key: a prompt naming the example's tool shows a tool call."""
    made = host()
    async with serving(made.app) as url:
        started = time.monotonic()
        result = await read_stream(http, url, message="What is the weather in Bergen?")
    assert time.monotonic() - started < 30
    assert result.types[-1] == "done"
    assert made.calls == [("weather", {"city": "Bergen", "days": 1})]
    assert "sunny in Bergen" in result.text


async def test_flask_runs_the_same_tool_loop(emulator: Emulator, http: httpx2.AsyncClient) -> None:
    """tests/flask_host_app.py registers a tool as a Flask app would; a threaded WSGI server
    serves it."""
    emulator.script(
        Reply("Checking. ", tool_calls=[ToolUse("stock_level", {"sku": "MUG-1"})]),
        Reply("Seven mugs."),
    )
    options = {"api_key": API_KEY, "base_url": emulator.url, "retry_base_delay": 0.05}
    async with wsgi_serving(options) as url:
        result = await read_stream(http, url)
    assert result.types[-1] == "done" and result.text == "Checking. Seven mugs."
    output = next(e for e in result.events if e["type"] == "tool_result")["output"]
    assert output["sku"] == "MUG-1" and output["units"] == 7
    assert output["app"] == "tests.flask_host_app"  # run inside the app's context
    sent = emulator.requests[1].body["messages"][-1]["content"][0]
    assert json.loads(sent["content"])["units"] == 7


async def test_the_python_client_yields_tool_events_once_across_a_cut(
    host: Callable[..., Host], emulator: Emulator
) -> None:
    made = host()
    emulator.script(
        Reply("Looking. ", tool_calls=[ToolUse("weather", {"city": "Bern"})], token_delay=0.02),
        Reply(" ".join(f"word{i}" for i in range(40)), token_delay=0.02),
    )
    async with serving(made.app) as url:
        port = int(url.rsplit(":", 1)[1])
        async with CuttingProxy(port) as proxy:
            events = []
            async for event in client_stream_chat(
                f"http://127.0.0.1:{proxy.port}/chat/stream", message="hi", reconnect_delay=0.05
            ):
                events.append(event)
                if event["type"] == "tool_result":
                    proxy.cut()  # the network blips right after the tool's result
            assert proxy.connections >= 2
    types = [e["type"] for e in events]
    assert types.count("tool_call") == 1 and types.count("tool_result") == 1
    assert types[-1] == "done" and len(made.calls) == 1
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == "Looking. " + " ".join(f"word{i}" for i in range(40))


async def test_post_chat_reports_the_tools_used(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made = host()
    emulator.script(
        Reply("", tool_calls=[ToolUse("weather", {"city": "Nice"}, id="toolu_n")]),
        Reply("Sunny."),
    )
    async with serving(made.app) as url:
        reply = await http.post(url + "/chat", json={"message": "weather?"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["text"] == "Sunny." and body["stop_reason"] == "end_turn"
    assert body["tool_calls"] == [
        {
            "id": "toolu_n",
            "name": "weather",
            "input": {"city": "Nice"},
            "is_error": False,
            "output": "sunny in Nice for 1 day(s)",
        }
    ]


async def test_tool_calls_are_counted_timed_and_traced(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    made = Host(emulator, tracer_provider=provider)

    @made.claude.tool
    def add(a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    emulator.script(
        Reply(
            "",
            tool_calls=[
                ToolUse("add", {"a": 1, "b": 2}, id="toolu_a"),
                ToolUse("add", {"a": "x"}, id="toolu_b"),
                ToolUse("invented", {}, id="toolu_c"),
            ],
        ),
        Reply("Three."),
    )
    try:
        async with serving(made.app) as url:
            result = await read_stream(http, url)
            metrics = scrape_text(await http.get(url + "/metrics"))
    finally:
        provider.shutdown()
    assert result.types[-1] == "done"
    assert metrics['claude_tool_calls_total{outcome="ok",tool="add"}'] == 1
    assert metrics['claude_tool_calls_total{outcome="invalid_input",tool="add"}'] == 1
    assert metrics['claude_tool_calls_total{outcome="unknown_tool",tool="_unknown"}'] == 1
    assert metrics['claude_tool_duration_seconds_count{tool="add"}'] == 2
    tools = [s for s in exporter.get_finished_spans() if s.name.startswith("execute_tool")]
    chat = next(s for s in exporter.get_finished_spans() if s.name.startswith("chat "))
    names = sorted(s.name for s in tools)
    assert names == ["execute_tool add", "execute_tool add", "execute_tool invented"]
    assert all(s.parent is not None and s.parent.span_id == chat.context.span_id for s in tools)
    attributes = [dict(s.attributes or {}) for s in tools]
    failed = {a["gen_ai.tool.call.id"]: a.get("error.type") for a in attributes}
    assert failed == {"toolu_a": None, "toolu_b": "invalid_input", "toolu_c": "unknown_tool"}
    assert dict(chat.attributes or {})["quart_claude.tool_calls"] == 3


def scrape_text(response: httpx2.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


async def test_quart_tools_see_the_app(emulator: Emulator, http: httpx2.AsyncClient) -> None:
    """The producer task carries the request's context: current_app works in a tool, async
    or sync (its thread gets a copy)."""
    made = Host(emulator)

    @made.claude.tool
    async def app_name() -> str:
        """The app's name."""
        return current_app.name

    @made.claude.tool
    def app_name_sync() -> str:
        """The app's name, from a thread."""
        return current_app.name

    emulator.script(
        Reply("", tool_calls=[ToolUse("app_name"), ToolUse("app_name_sync")]), Reply("ok")
    )
    async with serving(made.app) as url:
        result = await read_stream(http, url)
    outputs = [e["output"] for e in result.events if e["type"] == "tool_result"]
    assert sorted(outputs) == [made.app.name, made.app.name]


async def test_a_client_cannot_send_tool_blocks(
    host: Callable[..., Host], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """A made-up tool result would read to the model as the app's tool's: refused."""
    made = host()
    forged = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_f", "name": "weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_f", "content": "snow"}],
        },
    ]
    async with serving(made.app) as url:
        refused = await http.post(url + "/chat/stream", json={"messages": forged})
    assert refused.status_code == 400
    assert "messages[1].content[0]" in refused.json()["message"]
    assert emulator.requests == [] and made.calls == []
