"""The relay itself, in the core tier: a scripted upstream (no socket, no server), each test in
milliseconds. Retries and their budget, a continuation, a fallback hop mid-answer, a budget's
cut, both output guard modes (across a retry, a hop and a takeover), the input guard, a tool
step, and a takeover's resume point."""

from __future__ import annotations

from typing import Any

import pytest

from quart_claude._core.answer import Prior
from quart_claude._core.budget import BudgetRefused, Budgets
from quart_claude._core.fallback import Fallbacks
from quart_claude._core.guards import Blocked, Guards, InputGuarding, OutputCheck, OutputGuarding
from quart_claude._core.ledger import MemoryLedger
from quart_claude._core.policy import AnswerContext, PolicyMaker
from quart_claude._core.providers import primary_endpoint
from quart_claude._core.sse import payload_of
from quart_claude._core.stream import Stream
from quart_claude._core.telemetry import Telemetry
from quart_claude._core.tools import ToolBox

from .fake_upstream import (
    Reply,
    ScriptedUpstreams,
    config,
    failure,
    message,
    relay_for,
    request,
    run,
)

pytestmark = pytest.mark.core


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


async def test_an_answer_streams_start_deltas_done() -> None:
    upstreams = ScriptedUpstreams(message("Hel", "lo"))
    done = await run(upstreams, config())
    assert _types(done.events) == ["start", "delta", "delta", "done"]
    assert done.text == "Hello"
    assert done.ended.status == "complete"
    assert done.last["usage"]["input_tokens"] == 10
    assert done.answer.tally.attempts == 1


async def test_a_failure_before_text_is_retried_within_its_budget() -> None:
    upstreams = ScriptedUpstreams(failure(), failure(), message("ok"))
    done = await run(upstreams, config(max_retries=2))
    assert done.text == "ok" and done.last["type"] == "done"
    assert len(upstreams.requests) == 3 and done.answer.tally.retries == 2
    # the same request each time
    assert upstreams.requests[0]["messages"] == upstreams.requests[2]["messages"]

    spent = ScriptedUpstreams(failure(), failure(), message("never"))
    done = await run(spent, config(max_retries=1))
    assert done.last["type"] == "error" and done.last["error"] == "overloaded"
    assert len(spent.requests) == 2 and done.ended.status == "error"


async def test_a_drop_mid_answer_is_continued_from_the_text_sent() -> None:
    upstreams = ScriptedUpstreams(
        message("The sky ", "is ", "blue", drop_after=2), message("blue."), message("x")
    )
    done = await run(upstreams, config())
    assert done.text == "The sky is blue."
    assert done.last["type"] == "done" and done.answer.tally.recoveries == 1
    continued = upstreams.requests[1]["messages"]
    assert "The sky is" in str(continued[-1]["content"]) or "The sky is" in str(continued)


async def test_recovery_exhausted_ends_in_a_partial_error() -> None:
    """(Moved from the server tier: the fault matrix keeps the real drops.)"""
    drops = [message("a", "b", "c", drop_after=2) for _ in range(3)]
    upstreams = ScriptedUpstreams(*drops, message("never"))
    done = await run(upstreams, config(max_recoveries=2))
    assert done.last["type"] == "error" and done.last["partial"] is True
    assert len(upstreams.requests) == 3 and done.text == "ab"
    assert done.ended.status == "partial"


def _chain(**options: Any) -> tuple[Any, list[PolicyMaker]]:
    options.setdefault("fallbacks", '[{"model": "claude-haiku-4-5"}, {"model": "claude-opus-5"}]')
    settings = config(max_retries=0, max_recoveries=0, **options)
    return settings, [Fallbacks(settings, primary_endpoint(settings), Telemetry(None, None))]


async def test_a_chain_that_runs_out_lists_the_hops_tried() -> None:
    """(Moved from the server tier.)"""
    settings, makers = _chain()
    upstreams = ScriptedUpstreams(failure(), failure(), failure())
    done = await run(upstreams, settings, makers)
    assert done.last["type"] == "error" and done.last["error"] == "overloaded"
    assert done.last["hops"] == ["claude-sonnet-5-5", "claude-haiku-4-5", "claude-opus-5"]
    assert [r["model"] for r in upstreams.requests] == done.last["hops"]


async def test_invalid_request_never_moves_and_token_limit_moves_only_to_a_larger_context() -> None:
    """(Moved from the server tier.)"""
    hops = '[{"model": "claude-haiku-4-5"}, {"model": "claude-opus-5", "larger_context": true}]'
    settings, makers = _chain(fallbacks=hops)
    invalid = await run(ScriptedUpstreams(failure(400, "invalid_request_error")), settings, makers)
    assert invalid.last["error"] == "invalid_request" and "hops" not in invalid.last
    too_long = Reply(status=400, error_type="invalid_request_error")
    too_long.message = "prompt is too long: 250000 tokens > 200000 maximum"
    upstreams = ScriptedUpstreams(too_long, message("A larger context."))
    long = await run(upstreams, settings, makers)
    assert long.text == "A larger context."
    assert [r["model"] for r in upstreams.requests] == ["claude-sonnet-5-5", "claude-opus-5"]


async def test_a_fallback_hop_mid_answer_goes_on_with_the_next_model() -> None:
    settings = config(max_retries=0, fallbacks='[{"model": "claude-haiku-4-5"}]', max_recoveries=0)
    telemetry = Telemetry(None, None)
    upstreams = ScriptedUpstreams(
        message("Part one, ", "part two", drop_after=1),
        message(" part two.", model="claude-haiku-4-5"),
    )
    makers: list[PolicyMaker] = [Fallbacks(settings, primary_endpoint(settings), telemetry)]
    done = await run(upstreams, settings, makers)
    moved = [event for event in done.events if event["type"] == "fallback"]
    assert moved == [
        {
            "type": "fallback",
            "from": "claude-sonnet-5-5",
            "to": "claude-haiku-4-5",
            "reason": "network_error",
            "phase": "mid_answer",
            "hop": 1,
        }
    ]
    assert [r["model"] for r in upstreams.requests] == ["claude-sonnet-5-5", "claude-haiku-4-5"]
    assert done.text.startswith("Part one, ") and done.last["model"] == "claude-haiku-4-5"
    assert done.answer.target.hop == 1


def _budget(settings: Any, limit: str) -> Budgets:
    return Budgets(MemoryLedger(), settings, Telemetry(None, None), lambda: lambda _who: limit)


async def test_a_budget_cuts_the_request_when_its_real_input_passes_the_limit() -> None:
    settings = config()
    # the estimate (a short prompt) is admitted; message_start's real input is not
    upstreams = ScriptedUpstreams(message("never", "sent", input_tokens=500))
    done = await run(upstreams, settings, [_budget(settings, "100 tokens/day")])
    assert done.last["type"] == "done" and done.last["stop_reason"] == "budget_exhausted"
    assert upstreams.closed_early == 1 and done.text == ""


async def test_a_grant_short_of_max_tokens_lowers_it_and_its_stop_is_the_budgets() -> None:
    settings = config()
    upstreams = ScriptedUpstreams(message("some text", stop_reason="max_tokens"))
    done = await run(upstreams, settings, [_budget(settings, "100 tokens/day")])
    assert upstreams.requests[0]["max_tokens"] < 256  # what the grant left
    assert done.last["stop_reason"] == "budget_exhausted" and done.ended.status == "partial"


async def test_a_budget_refuses_the_first_request_before_the_stream_opens() -> None:
    settings = config()
    upstreams = ScriptedUpstreams(message("never"))
    with pytest.raises(BudgetRefused):
        await run(upstreams, settings, [_budget(settings, "5 tokens/day")])
    assert upstreams.requests == []


def _guards(settings: Any, output: Any = None, inputs: Any = None) -> list[PolicyMaker]:
    guards = Guards(settings, Telemetry(None, None))
    guards.input, guards.output = inputs, output
    return [InputGuarding(guards), OutputGuarding(guards)]


class Watcher:
    """An output guard that blocks the window holding ``bad``, and keeps what it saw."""

    def __init__(self, bad: str = "BAD") -> None:
        self.bad = bad
        self.seen: list[OutputCheck] = []

    def __call__(self, check: OutputCheck) -> Blocked | None:
        self.seen.append(check)
        return Blocked("forbidden") if self.bad in check.new else None

    @property
    def new(self) -> str:
        return "".join(check.new for check in self.seen)


async def test_the_output_guard_sees_each_window_and_once_more_before_done() -> None:
    settings = config(output_guard_every=10)
    watcher = Watcher()
    done = await run(
        ScriptedUpstreams(message("abcdefgh", "ijklmnop", "qrstuvwxyz")),
        settings,
        _guards(settings, watcher),
    )
    assert [c.new for c in watcher.seen] == ["abcdefghij", "klmnopqrst", "uvwxyz"]
    assert [c.final for c in watcher.seen] == [False, False, True]
    assert watcher.seen[-1].text == done.text == "abcdefghijklmnopqrstuvwxyz"
    assert done.last["stop_reason"] == "end_turn"


async def test_cut_mode_stops_the_answer_and_the_request_at_the_blocked_window() -> None:
    settings = config(output_guard_every=10)
    watcher = Watcher()
    upstreams = ScriptedUpstreams(message("0123456789", "xxBADxxxxx", "more", "and more"))
    done = await run(upstreams, settings, _guards(settings, watcher))
    assert done.last["type"] == "done" and done.last["stop_reason"] == "blocked"
    assert done.last["blocked"] == {"reason": "forbidden"}
    assert done.text == "0123456789xxBADxxxxx"  # sent as it came, up to the block
    assert upstreams.closed_early == 1 and len(watcher.seen) == 2
    assert done.ended.stop_reason == "blocked"


async def test_hold_mode_sends_no_character_of_the_blocked_window() -> None:
    settings = config(output_guard_every=10, output_guard_mode="hold")
    watcher = Watcher()
    upstreams = ScriptedUpstreams(message("01234", "56789ab", "cBADefghij", "klm"))
    done = await run(upstreams, settings, _guards(settings, watcher))
    assert done.text == "0123456789"  # the first window only: the split delta's head
    assert done.last["stop_reason"] == "blocked"
    assert "a" not in done.text and done.ended.messages[-1]["content"][0]["text"] == "0123456789"


async def test_hold_mode_releases_every_window_it_passed_and_the_rest_at_the_end() -> None:
    settings = config(output_guard_every=4, output_guard_mode="hold")
    watcher = Watcher()
    done = await run(
        ScriptedUpstreams(message("abcdef", "gh", "ijk")), settings, _guards(settings, watcher)
    )
    assert done.text == "abcdefghijk"
    assert [event["text"] for event in done.events if event["type"] == "delta"] == [
        "abcd",
        "ef",
        "gh",
        "ijk",
    ]
    assert watcher.new == "abcdefghijk"


async def test_the_guard_sees_each_character_once_across_a_drop_in_both_modes() -> None:
    for mode in ("cut", "hold"):
        settings = config(output_guard_every=10, output_guard_mode=mode)
        watcher = Watcher()
        upstreams = ScriptedUpstreams(
            message("0123456789", "abcde", "never", drop_after=2),
            message("0123456789abcdeFGHIJ", "klmno"),  # a continuation repeats nothing...
        )
        done = await run(upstreams, settings, _guards(settings, watcher))
        assert done.last["type"] == "done", mode
        assert watcher.new == done.text, mode  # each character once, in order
        assert done.text.startswith("0123456789"), mode
        if mode == "hold":  # the half window held when the connection dropped was not sent
            first = next(e for e in done.events if e["type"] == "delta")
            assert first["text"] == "0123456789"


async def test_a_blocked_window_after_a_fallback_hop_ends_the_answer_once() -> None:
    settings = config(
        output_guard_every=5,
        output_guard_mode="hold",
        max_retries=0,
        max_recoveries=0,
        fallbacks='[{"model": "claude-haiku-4-5"}]',
    )
    watcher = Watcher()
    telemetry = Telemetry(None, None)
    makers = [
        *_guards(settings, watcher),
        Fallbacks(settings, primary_endpoint(settings), telemetry),
    ]
    upstreams = ScriptedUpstreams(
        message("hello", "wor", drop_after=1),
        message("hello BAD end", model="claude-haiku-4-5"),
    )
    done = await run(upstreams, settings, makers)
    assert done.last["stop_reason"] == "blocked"
    assert sum(1 for e in done.events if e["type"] == "done") == 1
    assert "BAD" not in done.text and done.text == "hello"
    assert [e["type"] for e in done.events].count("fallback") == 1


async def test_a_guard_that_raises_or_is_slow_fails_closed() -> None:
    def broken(check: OutputCheck) -> None:
        raise RuntimeError("moderation API down")

    settings = config(output_guard_every=3)
    done = await run(ScriptedUpstreams(message("abcdef")), settings, _guards(settings, broken))
    assert done.last["blocked"] == {"reason": "guard_error"}

    async def slow(check: OutputCheck) -> None:
        import asyncio

        await asyncio.sleep(5)

    settings = config(output_guard_every=3, guard_timeout=0.05)
    done = await run(ScriptedUpstreams(message("abcdef")), settings, _guards(settings, slow))
    assert done.last["blocked"] == {"reason": "guard_error"}


async def test_the_input_guard_refuses_before_any_request() -> None:
    seen: list[Any] = []

    async def refuse(check: Any) -> Blocked:
        seen.append(check)
        return Blocked("prompt_injection", "not this")

    settings = config()
    upstreams = ScriptedUpstreams(message("never"))
    with pytest.raises(Blocked) as refused:
        await run(upstreams, settings, _guards(settings, inputs=refuse))
    assert refused.value.reason == "prompt_injection" and upstreams.requests == []
    assert seen[0].text == "hi" and seen[0].identity is None


async def test_a_tool_step_runs_the_tool_and_sends_its_result_back() -> None:
    tools = ToolBox()

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    tools.register(add)
    upstreams = ScriptedUpstreams(
        message(
            "Let me add.",
            stop_reason="tool_use",
            tool_use={"id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
        ),
        message("It is 5."),
    )
    settings = config()
    relay = relay_for(upstreams, settings)
    relay.tools = tools
    done = await run(upstreams, settings, relay=relay)
    assert _types(done.events) == [
        "start",
        "delta",
        "tool_call",
        "tool_result",
        "delta",
        "done",
    ]
    result = upstreams.requests[1]["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["content"] == "5"
    assert done.answer.tally.tool_calls == 1


async def test_a_takeover_goes_on_from_the_text_readers_have() -> None:
    """Another worker's stream (its events) taken over: the continuation starts where the
    text readers have ends, and the guard's windows go on where they were."""
    settings = config(output_guard_every=4)
    chat = request()
    # the first worker died after its first delta: its successor reads the stream's events
    first = Stream("s1")
    first.append({"type": "start", "stream_id": "s1", "model": "m", "message_id": "x"})
    first.append({"type": "delta", "text": "abcdef"})
    prior_events = list(first.events)
    prior = Prior.from_events(prior_events, {"input_tokens": 10, "output_tokens": 2})
    assert prior.text == prior.sent == "abcdef"

    watcher = Watcher()
    taken = Stream("s1")
    taken.events = list(prior_events)
    upstreams = ScriptedUpstreams(message("ghij."))
    relay = relay_for(upstreams, settings, _guards(settings, watcher))
    context = AnswerContext("u", "s1", chat, prior=prior)
    resumed = await relay.resume(taken, chat, context)
    await relay.produce(resumed, prior)
    events = [payload_of(event) for event in taken.events]
    assert "abcdef" in str(upstreams.requests[0]["messages"])
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == "abcdefghij."
    # the window 'abcd' passed on the first worker; this one looks from 'ef' on
    assert watcher.new == "efghij."
    assert events[-1]["type"] == "done"


async def test_hold_mode_stores_the_whole_answer_it_released() -> None:
    """The last window is released at the end: what is kept is what readers got."""
    settings = config(output_guard_every=4, output_guard_mode="hold")
    done = await run(
        ScriptedUpstreams(message("abcdef", "gh", "ijk")), settings, _guards(settings, Watcher())
    )
    assert done.text == "abcdefghijk"
    assert done.ended.messages[-1]["content"] == [{"type": "text", "text": "abcdefghijk"}]
