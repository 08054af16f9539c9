"""The relay: one producer task per stream, turning upstream Claude events into our events.

Each endpoint's :class:`~.providers.Upstream` sends the request and raises on an HTTP error
(:mod:`.first_party` for the first-party API; the SDK's client, with its retries off, for the
clouds); the relay reads the raw SSE bytes itself, which costs a fraction of building SDK
models per event, and owns the retry policy, mid-stream recovery and cancellation.

Upstream event in -> our event out (the hot path) is :meth:`Relay._relay`; each answer's state
is one :class:`~.answer.Answer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context

from .answer import Answer, Ended
from .config import ClaudeConfig
from .continuation import ContinuationGuard, Diverged, continuation_messages
from .errors import UpstreamError, classify_exception, classify_status
from .fallback import Chain, Cooldowns, Hop, MemoryCooldowns, on_hop, without_thinking
from .framing import EventTooLarge
from .prices import cost_of, price_of
from .protocol import done_event, start_event
from .providers import Endpoint, Upstreams, primary_endpoint
from .request import ChatRequest
from .retry import RetryPolicy
from .sse import DELTA_PREFIX, encode_json
from .stream import Cancel, Stream
from .telemetry import StreamOutcome, Telemetry
from .tools import ToolBox, ToolScope

if TYPE_CHECKING:
    from .budget import Spend
from .usage import add_usage

__all__ = ["MAX_UPSTREAM_EVENT", "Prior", "Relay"]

log = logging.getLogger("quart_claude")

# A text delta as the API frames it (compact, or with the docs' spaces, or with the live API's
# random padding before the last brace). Its text stays a JSON string literal and is spliced
# into our event as is: no decode, no re-encode.
_TEXT_DELTA = re.compile(
    rb'\{"type": ?"content_block_delta", ?"index": ?\d+, ?"delta": ?'
    rb'\{"type": ?"text_delta", ?"text": ?'
    rb'("(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")\} *\} *'  # JSON's escapes only
)

#: The largest single upstream event accepted (bytes); past it the stream fails, instead of
#: one never-ending event filling memory.
MAX_UPSTREAM_EVENT = 8 * 1024 * 1024

_EPHEMERAL = {"type": "ephemeral"}  # prompt caching's cache_control
_THINKING = ("thinking", "redacted_thinking")


class Relay:
    """Runs generations for one app in one worker: the SDK client plus the policies."""

    def __init__(
        self,
        upstreams: Upstreams,
        config: ClaudeConfig,
        telemetry: Telemetry,
        tools: ToolBox | None = None,
        tool_scope: ToolScope | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.primary: Endpoint = primary_endpoint(config)  # where requests go unless a chain moved
        self.config = config
        self.telemetry = telemetry
        self.tools: ToolBox = tools if tools is not None else ToolBox()
        self.tool_scope = tool_scope
        self.policy: RetryPolicy = RetryPolicy(
            config.max_retries, config.retry_base_delay, config.retry_max_delay
        )
        #: the hops cooling down (CLAUDE_FALLBACKS): this worker's, or Redis's (set by the state)
        self.cooldowns: Cooldowns = MemoryCooldowns()

    async def produce(
        self,
        stream: Stream,
        request: ChatRequest,
        parent: Context | None = None,
        prior: Prior | None = None,
        spend: Spend | None = None,
    ) -> Ended:
        """Fill ``stream`` with one answer: ``start``, ``delta``s, then ``done`` or ``error``;
        how it ended. ``parent``: the trace the stream's span joins (None: the current
        context); ``prior``: what the stream already holds when this worker took it over."""
        outcome = self.telemetry.stream(stream.id, request, parent)
        answer = Answer(stream, outcome)
        answer.spend = spend
        result = "unknown"
        if self.config.fallbacks:
            answer.chain = await self._chain(request)
        self._on_hop(answer)
        try:
            result = await self._run(answer, request, prior)
        except asyncio.CancelledError:
            reason = stream.cancel_reason
            if reason is None:
                raise  # not ours (the loop is going away): nothing sensible to send
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            result = reason
            if reason.goes_on:  # no last event here
                stream.leave()
            elif reason is Cancel.SHUTDOWN:
                answer.fail(UpstreamError("shutdown"))
            else:
                stream.append(done_event("cancelled", answer.usage))
        except Exception as exc:  # a bug of ours: never leave readers hanging
            log.exception("stream %s failed", stream.id)
            answer.fail(UpstreamError("unknown", detail=repr(exc)), partial=False)
        finally:
            steps = stream.steps
            stream.finish()
            if not stream.left:  # only a takeover needs them, and there is none after the end
                stream.steps = []
            outcome.end(result)
        ended = answer.ended(steps, _joined(answer.texts) if answer.texts else "")
        if spend is not None:  # each request priced and settled on its own
            return dataclasses.replace(ended, cost_micro_usd=spend.spent.micro_usd)
        price = price_of(request.model, self.config.prices)
        cost = cost_of(ended.usage, price) if price is not None else None
        return dataclasses.replace(ended, cost_micro_usd=cost)

    async def _chain(self, request: ChatRequest) -> Chain:
        """The answer's walk along ``CLAUDE_FALLBACKS``, from the first hop not cooling down."""
        config = self.config
        chain = Chain(
            (Hop(request.model), *config.fallbacks),
            config.fallback_on,
            config.max_fallbacks,
            config.fallback_cooldown,
            config.retry_max_delay,
            self.primary,
        )
        try:
            await chain.start(self.cooldowns)
        except Exception:  # the shared cooldowns are unreachable: start at the first hop
            log.warning("the fallback cooldowns are unavailable", exc_info=True)
            chain.tried = [request.model]
        return chain

    async def _run(self, answer: Answer, request: ChatRequest, prior: Prior | None) -> str:
        """The steps of one answer: each an upstream message (with its retries and
        continuations); a message that stops to use tools, or that the API paused, is followed
        by the next one, up to ``CLAUDE_MAX_TOOL_STEPS``."""
        stream = answer.stream
        if prior is not None:
            await self._resume(answer, prior)
        while True:
            turn = await self._step(answer, request)
            if isinstance(turn, str):
                return turn  # ended with an error, or out of tokens
            answer.reported.update(turn.reported)
            calls = self._calls(answer, turn)
            if not calls and turn.stop_reason != "pause_turn":
                answer.final = turn.content()
                return answer.finish(turn.stop_reason)
            if len(stream.steps) >= self.config.max_tool_steps:
                log.info("stream %s: CLAUDE_MAX_TOOL_STEPS reached", stream.id)
                answer.final = turn.content()  # its calls are closed as unanswered
                return answer.finish("max_tool_steps", reported=False)
            await self._take_step(answer, turn, calls)

    async def _resume(self, answer: Answer, prior: Prior) -> None:
        """Taken over: the steps and usage so far, the text to continue, and the tools that
        had not finished (the finished ones never run again)."""
        stream = answer.stream
        if answer.chain is not None and prior.hop is not None:
            answer.chain.resume(prior.hop, prior.tried)
            self._on_hop(answer)
        add_usage(answer.usage, prior.usage)
        stream.usage = dict(answer.usage)
        stream.steps = [dict(step) for step in prior.steps]
        if prior.text:
            answer.texts.append(encode_json(prior.text))
        answer.step_base = int(answer.usage.get("output_tokens") or 0) - prior.step_deltas
        pending = prior.pending_calls()
        if pending:
            await self._run_tools(stream, stream.steps[-1], pending, answer.outcome)

    def _calls(self, answer: Answer, turn: _Turn) -> list[dict[str, Any]]:
        """The app's tool calls the step stopped for (none when the app has no tools: the
        API refuses tool results in a request without tools)."""
        calls = turn.calls() if turn.stop_reason == "tool_use" else []
        if calls and not (self.tools or self.config.server_tools):
            log.warning("stream %s: the model called a tool; this app has none", answer.stream.id)
            return []
        return calls

    async def _take_step(self, answer: Answer, turn: _Turn, calls: list[dict[str, Any]]) -> None:
        """Record the finished step (so no worker asks for it again), then run its tools."""
        stream = answer.stream
        step: dict[str, Any] = {
            # the hop asked (not the snapshot id that answered): a later hop drops its thinking
            "model": answer.chain.hop.model if answer.chain is not None else None,
            "content": turn.content(),
            "results": {} if calls else None,  # None: paused, continued as is
            "at": len(stream.events),  # the step's text is in the events before this
        }
        stream.add_step(step)
        answer.next_step()  # the step's text is recorded with it
        if calls:
            for call in calls:
                event = {"type": "tool_call", "id": call["id"], "name": call["name"]}
                stream.append({**event, "input": self.tools.shown_input(call)})
            await self._run_tools(stream, step, calls, answer.outcome)

    async def _run_tools(
        self,
        stream: Stream,
        step: dict[str, Any],
        calls: list[dict[str, Any]],
        outcome: StreamOutcome,
    ) -> None:
        """Run a step's tool calls at once; each result is recorded with the step (so it is
        never run again, here or on another worker) before its event goes out."""
        tools = self.tools
        timeout = self.config.tool_timeout
        results: dict[str, Any] = step["results"]

        async def run(call: dict[str, Any]) -> None:
            name = call["name"]
            span = outcome.tool_started(name, call["id"])
            started = time.monotonic()
            ended = "cancelled"
            try:
                result = await tools.run(
                    call["id"],
                    name,
                    call["input"],
                    identity=stream.owner,
                    stream_id=stream.id,
                    default_timeout=timeout,
                    scope=self.tool_scope,
                )
                ended = result.outcome
            finally:
                elapsed = time.monotonic() - started
                outcome.tool_ended(span, tools.label(name), ended, elapsed)
            log.info("stream %s tool %s: %s in %.3fs", stream.id, name, ended, elapsed)
            results[result.id] = result.block()
            stream.steps_changed()
            stream.append(
                {
                    "type": "tool_result",
                    "id": result.id,
                    "name": result.name,
                    "is_error": result.is_error,
                    "output": tools.shown_output(result),
                }
            )

        await asyncio.gather(*(run(call) for call in calls))

    async def _step(self, answer: Answer, request: ChatRequest) -> _Turn | str:
        """One step's upstream message, retried before any of its text was sent and continued
        after (on the next hop of a fallback chain, when the current one's retries are spent):
        its last request's :class:`_Turn`, or how the stream ended (a str)."""
        following = self._next_request(answer, request)
        thought = False  # a request of this step showed thinking: a retry's says it restarts
        while not isinstance(following, str):
            params, guard = following
            # a continuation's thinking (about how to go on) is not shown mid-answer
            turn = _Turn(answer, self.config.expose_thinking and not answer.texts, thought)
            ended = await self._try(answer, params, guard, turn)
            if ended is None:
                return turn
            if ended is not _AGAIN:
                return ended
            thought = thought or turn.thought
            following = self._next_request(answer, request, following)
        return following

    def _next_request(
        self,
        answer: Answer,
        request: ChatRequest,
        same: tuple[dict[str, Any], ContinuationGuard | None] | None = None,
    ) -> tuple[dict[str, Any], ContinuationGuard | None] | str:
        """The step's next request, to the current hop: the step's own (``same`` again, on a
        retry) while readers have none of its text, else one that continues the text (with
        its guard), or the end when its tokens are used up."""
        if same is not None and not answer.texts and not answer.moved:
            return same
        answer.moved = False
        request = on_hop(request, answer.chain)
        history = _history(request.messages, answer.stream.steps, request.model)
        if not answer.texts:
            params = self._params(request, history, request.max_tokens, answer)
            return _own_thinking(params, answer.stream.steps, request.model), None
        remaining = answer.remaining(request.max_tokens)
        if remaining < 1:
            return answer.finish("max_tokens", reported=False)
        sent = _joined(answer.texts)
        messages, whitespace = continuation_messages(
            request.model, history, sent, prefill=self._thinking(answer) == "off"
        )
        params = self._params(request, messages, remaining, answer)
        return params, ContinuationGuard(sent, whitespace)

    async def _try(
        self,
        answer: Answer,
        params: dict[str, Any],
        guard: ContinuationGuard | None,
        turn: _Turn,
    ) -> str | None:
        """One request: None when it answered, :data:`_AGAIN` to make the next one, or how the
        stream ended."""
        outcome = answer.outcome
        outcome.attempts += 1
        turn.model = params["model"]
        outcome.attempt(turn.model)
        try:
            await self._attempt(answer, params, guard, turn)
        except OutOfBudget:
            self.telemetry.budget_cut()
            return answer.finish("budget_exhausted", reported=False)
        except _WarningRaised as raised:
            answer.tolerated += 1
            if answer.tolerated > 3:  # the filter did not take: never loop
                return answer.fail(UpstreamError("unknown", detail=raised.detail))
            return _AGAIN
        except UpstreamError as error:
            wait = self._wait(answer, error)
            if wait is None:
                if await self._fall_back(answer, error):
                    return _AGAIN
                return answer.fail(error, counted=False)
            await asyncio.sleep(wait)
            return _AGAIN
        except asyncio.CancelledError:
            outcome.upstream("cancelled")
            raise
        outcome.upstream("ok")
        return None

    async def _fall_back(self, answer: Answer, error: UpstreamError) -> bool:
        """The current hop's retries are spent: move the answer to the next hop, if the chain
        has one that may take it (announced by a ``fallback`` event, after ``start``)."""
        chain = answer.chain
        if chain is None:
            return False
        failed = chain.hop.model
        try:
            hop = await chain.next_hop(error, self.cooldowns)
        except Exception:
            log.warning("the fallback cooldowns are unavailable", exc_info=True)
            return False
        if hop is None:
            return False
        phase = "mid_answer" if answer.texts else "before_text"
        event: dict[str, Any] = {"type": "fallback", "from": failed, "to": hop.model}
        event.update(reason=error.error_class, phase=phase, hop=chain.at)
        log.warning(
            "stream %s: %s -> %s after %s (%s)",
            answer.stream.id,
            failed,
            hop.model,
            error.error_class,
            phase,
        )
        self.telemetry.fell_back(failed, hop.model, error.error_class, phase)
        if chain.cooled is not None:
            self.telemetry.cooled(*chain.cooled)
        self._on_hop(answer)
        if answer.stream.events:
            answer.stream.append(event)
        else:  # readers see start first: it follows the next hop's message_start
            answer.after_start.append(event)
        answer.retries = answer.recoveries = 0  # each hop has its own budgets
        answer.moved = True
        return True

    def _wait(self, answer: Answer, error: UpstreamError) -> float | None:
        """How long before the request is made again, or None: a retry while readers have
        none of the step's text (the retry budget), a continuation after (the recovery
        budget, when recovery is on and the model did not diverge)."""
        config, outcome, error_class = self.config, answer.outcome, error.error_class
        outcome.upstream(error_class)
        outcome.failed(error_class)
        wait: float | None = None
        if not answer.texts:
            kind = "retry"
            wait = self.policy.delay(error, answer.retries + 1)
        else:
            kind = "recovery"
            if config.recovery and error_class != "continuation_failed":
                wait = self.policy.delay(error, answer.recoveries + 1, limit=config.max_recoveries)
        if wait is None:
            log.warning(
                "stream %s upstream failure: %s %s", answer.stream.id, error_class, error.detail
            )
            return None
        log.info("stream %s retrying in %.2fs after %s", answer.stream.id, wait, error_class)
        if kind == "retry":  # the budget used: only a request made again counts
            answer.retries += 1
        else:
            answer.recoveries += 1
        outcome.retrying(error_class, kind, wait)
        return wait

    def _endpoint(self, answer: Answer) -> Endpoint:
        """Where the answer's requests go now: its chain's hop, else the app's own."""
        return answer.chain.endpoint if answer.chain is not None else self.primary

    def _on_hop(self, answer: Answer) -> None:
        """Telemetry follows the hop the answer is on."""
        at = answer.chain.at if answer.chain is not None else 0
        answer.outcome.on_hop(at, self._endpoint(answer).provider)

    def _thinking(self, answer: Answer | None) -> str | int:
        """The thinking of the hop the answer is on (a hop may turn it off, say for a model
        without it), else ``CLAUDE_THINKING``."""
        chain = answer.chain if answer is not None else None
        if chain is not None and chain.hop.thinking is not None:
            return chain.hop.thinking
        return self.config.thinking

    def first_params(self, request: ChatRequest) -> dict[str, Any]:
        """The answer's first request, as :meth:`_run` will make it (a budget reserves it
        before the stream opens)."""
        return self._params(request, _history(request.messages, []), request.max_tokens)

    def _params(
        self,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        max_tokens: int,
        answer: Answer | None = None,
    ) -> dict[str, Any]:
        params = _params(request, messages, max_tokens, self.config, self._thinking(answer))
        container = answer.container if answer is not None else None
        if container is not None and container.get("id"):
            # through extra_body: the SDK's typed parameter is newer than its lowest version
            params["extra_body"] = {**params.get("extra_body", {}), "container": container["id"]}
        tools = self.tools
        if tools or self.config.server_tools:
            params["tools"] = [*tools.definitions(), *self.config.server_tools]
        return params

    async def _attempt(
        self,
        answer: Answer,
        params: dict[str, Any],
        guard: ContinuationGuard | None,
        turn: _Turn,
    ) -> None:
        """One upstream request; ``turn`` keeps what it said besides text (its stop reason,
        its blocks). Raises :class:`UpstreamError`, or :class:`OutOfBudget` when a budget
        refuses it or cuts it (it is reserved before it is made, settled after)."""
        spend = answer.spend
        if spend is None:
            return await self._request(answer, params, guard, turn)
        if spend.hold is None and await spend.reserve(params) is not None:
            raise OutOfBudget
        try:
            await self._request(answer, spend.fitted(params), guard, turn)
            if spend.lowered and turn.stop_reason == "max_tokens":  # the budget's max_tokens
                self.telemetry.budget_cut()
                turn.stop_reason = "budget_exhausted"
        finally:
            spent = await spend.settle(turn.usage, ended=turn.ended)
            self.telemetry.spent(spend.model, spent.micro_usd)
            if turn.ended and turn.stop_reason != "tool_use":  # the answer's last: done's warning
                await spend.check()

    async def _request(
        self,
        answer: Answer,
        params: dict[str, Any],
        guard: ContinuationGuard | None,
        turn: _Turn,
    ) -> None:
        try:
            await self._relay(answer, params, guard, turn)
        except BaseException as exc:  # ours, SDK errors, transport errors, cancellation
            if not (isinstance(exc, Exception) and turn.ended and not _ours(exc)):
                turn.settle_interrupted()
                if not isinstance(exc, Exception):
                    raise  # cancelled: the producer decides what to tell readers
                raise _classified(exc) from (None if _ours(exc) else exc)
            # the connection failed after the message had ended (its stop reason came, every
            # block closed): the message is complete; a tool call in it runs
            log.info(
                "stream %s: the connection ended after the message (%r)", answer.stream.id, exc
            )
        if guard is not None:  # the whole continuation was shorter than the hold
            _release_held(answer, guard, turn)
        turn.count()

    async def _relay(
        self,
        answer: Answer,
        params: dict[str, Any],
        guard: ContinuationGuard | None,
        turn: _Turn,
    ) -> None:
        """The hot path: upstream events in, our events out. A text delta's JSON string is
        spliced into our event as is; anything else goes to ``turn``."""
        texts = answer.texts
        append_data = answer.stream.append_data
        text_delta = _TEXT_DELTA.fullmatch
        meter = turn.spend.metered if turn.spend is not None else None
        upstream = self.upstreams[self._endpoint(answer)]
        framer = upstream.framer(MAX_UPSTREAM_EVENT)
        async with upstream.open(upstream.params(params)) as response:
            turn.request_id = answer.outcome.request_id = response.request_id
            async for chunk in response.chunks:
                for name, data in framer.events(chunk):
                    if name != b"content_block_delta":
                        await turn.control(name, data)  # message_start: the real input
                        continue
                    match = None if guard is not None else text_delta(data)
                    if match is not None:  # hot path: splice the JSON string as is
                        literal = match.group(1)
                    else:
                        literal, guard = await turn.slow_delta(data, guard)  # metered there
                        if literal is None:
                            continue
                    if not texts:
                        turn.first_text()
                    turn.deltas += 1
                    texts.append(literal)
                    append_data(DELTA_PREFIX + literal + b"}")
                    if meter is not None and meter(literal):
                        await turn.top_up()  # cut (leaving the block closes the request)
        if not turn.ended:
            raise UpstreamError("network_error", detail="upstream ended without message_stop")


def _release_held(answer: Answer, guard: ContinuationGuard, turn: _Turn) -> None:
    """A continuation ended while its guard still held its first text: decide on it."""
    try:
        rest = guard.end()
    except Diverged as exc:
        turn.settle_interrupted()
        raise UpstreamError("continuation_failed", detail=str(exc)) from None
    if rest:
        literal = encode_json(rest)
        answer.texts.append(literal)
        answer.stream.append_data(DELTA_PREFIX + literal + b"}")


#: :meth:`Relay._try`: make the next request
_AGAIN = "again"


class _Turn:
    """What one upstream request said besides text: its usage, stop reason, whether it
    ended properly (``message_stop``), and its content blocks in the API's order (text, by
    its span of the step's ``texts``; thinking with its signature; tool calls; server tools'
    blocks; blocks this module does not know, as they came), kept to send back to the API on
    the next step. The first request's ``message_start`` starts the stream."""

    __slots__ = (
        "answer",
        "blocks",
        "completed",
        "deltas",
        "due",
        "expose_thinking",
        "inputs",
        "model",
        "open",
        "outcome",
        "reported",
        "request_id",
        "rethinking",
        "spans",
        "spend",
        "stop_reason",
        "stream",
        "texts",
        "thought",
        "usage",
    )

    def __init__(self, answer: Answer, expose_thinking: bool, rethinking: bool) -> None:
        self.stream = answer.stream
        self.answer = answer
        #: the answer's budget, when it has limits to meter against (else it only records)
        self.spend = answer.spend if answer.spend is not None and answer.spend.limits else None
        self.due = False  # the request passed its grant: a top-up, or the cut, comes next
        self.outcome = answer.outcome
        self.texts = answer.texts  # the step's text literals; the hot path appends to it
        self.spans: dict[int, int] = {}  # a text block's index -> where its text starts
        self.expose_thinking = expose_thinking
        self.rethinking = rethinking  # an earlier request of this step showed thinking
        self.thought = False  # this request streamed thinking
        #: the message's blocks by index (thinking keeps its signature here: for the API,
        #: never for readers; a text block's text is in ``texts``)
        self.blocks: dict[int, dict[str, Any]] = {}
        self.inputs: dict[int, list[str]] = {}  # tool inputs' JSON, as it streams
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.completed = False  # saw message_stop: a body that ends without it is truncated
        self.open: set[int] = set()  # blocks started and not yet stopped
        self.reported: dict[str, Any] = {}  # message_delta's stop_details and container
        self.deltas = 0
        self.request_id: str | None = None
        self.model = ""  # the model asked (the hop's)

    async def control(self, name: bytes, data: bytes) -> None:
        """Any event but a content delta (pings and unknown events: nothing to do)."""
        handler = _CONTROL.get(name)
        if handler is not None:
            handler(self, data)
            if self.due:  # message_start: the real input passes the grant
                await self.top_up()

    def _block_started(self, data: bytes) -> None:
        body = json.loads(data)
        block = body.get("content_block") or {}
        index = int(body.get("index", 0))
        self.open.add(index)
        if block.get("type") == "text":
            self.blocks[index] = dict(block)
            self.spans[index] = len(self.texts)
        else:
            self._block_start(index, dict(block))

    def _block_stopped(self, data: bytes) -> None:
        index = json.loads(data).get("index", 0)
        self.open.discard(index)
        if index in self.inputs:
            self._input_done(index)
        elif index in self.spans and self.blocks[index].get("citations"):
            self._cited(index)

    def _message_started(self, data: bytes) -> None:
        message = json.loads(data)["message"]
        self.usage = dict(message.get("usage") or {})
        self._note_usage()
        if not self.stream.events:
            outcome = self.outcome
            outcome.response_model = message.get("model")
            outcome.message_id = message.get("id")
            start = start_event(self.stream.id, message.get("model"), message.get("id"), self.usage)
            self.stream.append({**start, **self.stream.start_fields})
        self.answer.served_by = message.get("model")
        while self.answer.after_start:  # a fallback before the first event, after start
            self.stream.append(self.answer.after_start.pop(0))
        if self.spend is not None:  # the real input may beat the estimate: more is taken
            self.due = self.spend.started(self.usage)

    async def top_up(self) -> None:
        """The request passed its grant: take more of the budget, or cut it here (raises
        :class:`OutOfBudget`: the hard limit)."""
        self.due = False
        assert self.spend is not None
        if not await self.spend.top_up():
            raise OutOfBudget

    def _message_delta(self, data: bytes) -> None:
        body = json.loads(data)
        delta = body.get("delta") or {}
        self.stop_reason = delta.get("stop_reason") or self.stop_reason
        for name in ("stop_details", "container"):
            if delta.get(name) is not None:
                self.reported[name] = delta[name]
        self.usage.update(body.get("usage") or {})
        self._note_usage()

    def _message_stopped(self, data: bytes) -> None:
        self.completed = True

    def _error(self, data: bytes) -> None:
        raise _stream_error(data, self.request_id)

    def first_text(self) -> None:
        """The step's first text is going out: the stream's first token, if it is."""
        if self.outcome.first_token_at is None:
            self.outcome.first_token()

    @property
    def ended(self) -> bool:
        """The message is complete: ``message_stop`` came, or its stop reason did with every
        block closed (a connection may fail between those and ``message_stop``)."""
        return self.completed or (self.stop_reason is not None and not self.open)

    def _block_start(self, index: int, block: dict[str, Any]) -> None:
        kind = block.get("type")
        self.blocks[index] = block
        if "input" in block:  # tool_use, server_tool_use, mcp_tool_use, ...: input streams
            self.inputs[index] = []
        elif kind == "thinking":
            block["thinking"] = block.get("thinking") or ""
        elif kind == "fallback":  # the API's own fallback: kept in place, told to readers
            self._server_fell_back(block)
        elif isinstance(kind, str) and kind.endswith("_tool_result"):  # a server tool's result
            content = block.get("content")
            failed = isinstance(content, dict) and str(content.get("type", "")).endswith("_error")
            self.stream.append(
                {
                    "type": "tool_result",
                    "id": block.get("tool_use_id"),
                    "name": kind[: -len("_tool_result")],
                    "is_error": failed,
                    "output": content,
                    "server": True,
                }
            )

    def _server_fell_back(self, block: dict[str, Any]) -> None:
        """A refusal the API's server-side fallback (``CLAUDE_SERVER_FALLBACKS``) answered
        with another model: readers get a ``fallback`` event, ``done`` that model."""
        ends = [block.get(side) for side in ("from", "to")]
        models = [str(end.get("model")) if isinstance(end, dict) else "" for end in ends]
        phase = "server"
        event = {"type": "fallback", "from": models[0], "to": models[1], "reason": "refusal"}
        self.stream.append({**event, "phase": phase})
        self.answer.served_by = models[1]
        self.outcome.fell_back(models[0], models[1], "refusal", phase)

    def _input_done(self, index: int) -> None:
        """A tool call's input is complete; a server tool's call is shown now (the API runs
        it), the app's tools once the message ends (they run then)."""
        block = self.blocks[index]
        raw = "".join(self.inputs.pop(index))
        try:
            block["input"] = json.loads(raw) if raw else block.get("input") or {}
        except ValueError:
            block["input"] = {}
        if block.get("type") == "server_tool_use":
            self.stream.append(
                {
                    "type": "tool_call",
                    "id": block.get("id"),
                    "name": block.get("name"),
                    "input": block["input"],
                    "server": True,
                }
            )

    def _cited(self, index: int) -> None:
        """A text block with citations ended: one ``citation`` event for each, after the text
        it supports (protocol v1.2), with that text and the citation as the API gave it."""
        text = _joined(self.texts[self.spans[index] :])
        for citation in self.blocks[index]["citations"]:
            self.stream.append({"type": "citation", "citation": citation, "text": text})

    def calls(self) -> list[dict[str, Any]]:
        """The app's tool calls, complete, in the order the model made them."""
        return [
            block
            for _, block in sorted(self.blocks.items())
            if block.get("type") == "tool_use" and "id" in block
        ]

    def content(self) -> list[dict[str, Any]]:
        """The message's content as the next step sends it back: every block in the order
        the API sent it, with its fields. A continuation's first text block also holds the
        text the interrupted requests of this step sent (it continues it); an empty text
        block is left out, as the API refuses one."""
        texts = self.texts
        text_at = sorted(self.spans)
        ends = {index: self.spans[later] for index, later in itertools.pairwise(text_at)}
        content: list[dict[str, Any]] = []
        for index, block in sorted(self.blocks.items()):
            if index not in self.spans:
                content.append(block)
                continue
            start = 0 if index == text_at[0] else self.spans[index]
            text = _joined(texts[start : ends.get(index, len(texts))])
            if text:
                content.append({**block, "text": text})
        if texts and not text_at:  # continued straight into other blocks: the text first
            thinking = [b for b in content if b.get("type") in _THINKING]
            content = [
                *thinking,
                {"type": "text", "text": _joined(texts)},
                *content[len(thinking) :],
            ]
        return content

    async def slow_delta(
        self, data: bytes, guard: ContinuationGuard | None
    ) -> tuple[bytes | None, ContinuationGuard | None]:
        """A delta off the fast path: text decoded, passed through a continuation's guard
        (None once it has decided) and re-encoded; any other delta builds its block, and is
        metered. ``None`` when there is no text to send."""
        body = json.loads(data)
        delta = body["delta"]
        if delta.get("type") == "text_delta":
            return _guarded(delta.get("text"), guard)
        self._block_delta(body.get("index", 0), delta)
        if self.due:
            await self.top_up()
        return None, guard

    def _block_delta(self, index: int, delta: dict[str, Any]) -> None:
        """A delta of another block: a tool's input kept, thinking sent as its own event
        and kept with its signature, the rest (citations, unknown blocks) accumulated."""
        kind = delta.get("type")
        block = self.blocks.get(index)
        if kind == "input_json_delta":
            piece = delta.get("partial_json") or ""
            parts = self.inputs.get(index)
            if parts is not None:
                parts.append(piece)
            if self.spend is not None and piece and self.spend.metered_json(piece):
                self.due = True
            return
        if kind == "thinking_delta":
            self._thinking(delta.get("thinking") or "")
        _accumulate(block, delta)
        if self.spend is not None:  # everything the model writes is billed output
            for name, value in delta.items():
                if name not in _UNBILLED and isinstance(value, str) and value:
                    self.due = self.spend.metered(value.encode()) or self.due

    def _thinking(self, text: str) -> None:
        if not self.expose_thinking or not text:
            return
        stream = self.stream
        if not self.thought:
            self.thought = True
            # a retry after thinking (no text yet) thinks again: say so, so a client clears it
            if self.rethinking:
                stream.append({"type": "thinking", "text": "", "restart": True})
        stream.append({"type": "thinking", "text": text})

    def _note_usage(self) -> None:
        """The stream's usage so far: every request before, and this one as reported."""
        usage = dict(self.outcome.usage)
        add_usage(usage, self.usage)
        self.stream.usage = usage

    def settle_interrupted(self) -> None:
        """Count an interrupted request's usage: it never reports its final output count, so
        the deltas received are a lower bound."""
        usage = self.usage
        if usage:
            usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), self.deltas)
        self.count()

    def count(self) -> None:
        """Add this request's usage to the answer's (and to its hop's, with a chain)."""
        add_usage(self.outcome.usage, self.usage)
        self.answer.hop_used(self.model, self.usage)


def _guarded(
    text: str | None, guard: ContinuationGuard | None
) -> tuple[bytes | None, ContinuationGuard | None]:
    """A text delta off the fast path, through a continuation's guard while it decides."""
    if not text:
        return None, guard
    if guard is not None:
        text = guard.feed(text)
        if not guard.deciding:
            guard = None  # decided: the rest takes the fast path
        if not text:
            return None, guard
    return encode_json(text), guard


_CONTROL: dict[bytes, Callable[[_Turn, bytes], None]] = {
    b"content_block_start": _Turn._block_started,
    b"content_block_stop": _Turn._block_stopped,
    b"message_start": _Turn._message_started,
    b"message_delta": _Turn._message_delta,
    b"message_stop": _Turn._message_stopped,
    b"error": _Turn._error,
}


#: a delta's fields that are not output the model wrote (a signature is opaque)
_UNBILLED = frozenset({"type", "signature"})


def _accumulate(block: dict[str, Any] | None, delta: dict[str, Any]) -> None:
    """Build ``block`` from a delta the way the API's deltas compose: a citation is added to
    the block's list; any other delta's string fields extend the block's field of that name
    (``compaction_delta``'s ``content``, say), so an unknown block goes back as it came."""
    if block is None:
        return
    if delta.get("type") == "citations_delta":
        citation = delta.get("citation")
        if citation is not None:
            block.setdefault("citations", []).append(citation)
        return
    for name, value in delta.items():
        if name != "type" and isinstance(value, str):
            block[name] = (block.get(name) or "") + value


class OutOfBudget(Exception):
    """The answer's budget refused the next request, or cut the one streaming."""


def _ours(exc: Exception) -> bool:
    """Raised by this module (its cause says nothing more)."""
    return isinstance(exc, UpstreamError | Diverged | EventTooLarge | Warning | OutOfBudget)


def _classified(exc: Exception) -> Exception:
    """What an attempt's failure becomes for :meth:`Relay._run`."""
    if isinstance(exc, OutOfBudget):
        return exc
    if isinstance(exc, Warning):
        return _tolerate(exc)
    if isinstance(exc, Diverged):
        return UpstreamError("continuation_failed", detail=str(exc))
    if isinstance(exc, EventTooLarge):
        return UpstreamError("unknown", retryable=False, detail=str(exc))
    return classify_exception(exc)


@dataclass(frozen=True, slots=True)
class Prior:
    """What a stream holds when this worker takes it over: the finished steps of a tool loop
    (with their recorded results), the current step's text sent, and the usage."""

    text: str
    usage: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    step_deltas: int = 0  # the current step's deltas (a lower bound of its output tokens)
    #: the fallback chain's hop the stream was on (its last ``fallback`` event's), and the
    #: models it tried: a takeover goes on there, never back to a hop that failed
    hop: int | None = None
    tried: list[str] = field(default_factory=list)

    @classmethod
    def from_events(
        cls, events: list[bytes], usage: dict[str, Any], steps: list[dict[str, Any]] | None = None
    ) -> Prior:
        """From the stream's encoded events, its steps and its last stored usage. An
        interrupted request never reported its output: the deltas are a lower bound of it."""
        steps = list(steps or ())
        at = int(steps[-1]["at"]) if steps else 0
        pieces: list[str] = []
        total = 0
        moves: list[dict[str, Any]] = []
        for position, event in enumerate(events):
            payload = json.loads(event[6 : event.index(b"\n")])
            kind = payload.get("type")
            if kind == "delta":
                total += 1
                if position >= at:
                    pieces.append(payload["text"])
            elif kind == "fallback" and payload.get("phase") != "server":  # the chain's
                moves.append(payload)
        usage = dict(usage)
        usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), total)
        if not moves:
            return cls("".join(pieces), usage, steps, len(pieces))
        tried = [str(moves[0]["from"]), *(str(move["to"]) for move in moves)]
        hop = int(moves[-1].get("hop", 0))
        return cls("".join(pieces), usage, steps, len(pieces), hop, tried)

    def pending_calls(self) -> list[dict[str, Any]]:
        """The last step's tool calls without a recorded result."""
        if not self.steps or self.steps[-1]["results"] is None:
            return []
        done = self.steps[-1]["results"]
        return [
            block
            for block in self.steps[-1]["content"]
            if block.get("type") == "tool_use" and block.get("id") not in done
        ]


class _WarningRaised(Exception):
    """A library's warning was raised as an error (the host runs with ``-W error``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _tolerate(warning: Warning) -> _WarningRaised:
    """Log ``warning`` and ignore it from now on in this process, so the request can be made
    again: a library's notice (the SDK deprecating a model, say) never fails a stream, even
    where the host's warning filters turn warnings into errors."""
    kind, message = type(warning), str(warning)
    log.warning("upstream library warning (logged, not raised): %s: %s", kind.__name__, message)
    warnings.filterwarnings("ignore", message=re.escape(message), category=kind)
    return _WarningRaised(f"{kind.__name__}: {message}")


def _history(
    messages: list[dict[str, Any]], steps: list[dict[str, Any]], model: str | None = None
) -> list[dict[str, Any]]:
    """The conversation a step continues: the request's, then each finished step's message
    and (for tool steps) a user turn with its results, in the order of the calls. A step
    another model wrote loses its thinking (a signature is bound to its model)."""
    history = list(messages)
    for step in steps:
        content = step["content"]
        if model is not None and step.get("model") not in (None, model):
            content = without_thinking(content)
        history.append({"role": "assistant", "content": content})
        results = step["results"]
        if results is not None:
            history.append(
                {
                    "role": "user",
                    "content": [
                        results[block["id"]]
                        for block in step["content"]
                        if block.get("type") == "tool_use" and block.get("id") in results
                    ],
                }
            )
    return history


def _own_thinking(
    params: dict[str, Any], steps: list[dict[str, Any]], model: str
) -> dict[str, Any]:
    """A tool loop that another hop began goes on without thinking: with thinking on, the
    API wants the loop's assistant turn to start with its thinking, and the thinking there
    is bound to the model that wrote it (this hop may not replay it)."""
    if not steps or steps[-1].get("model") in (None, model) or "thinking" not in params:
        return params
    thinking = params.pop("thinking")
    if thinking.get("type") == "enabled":
        params["max_tokens"] -= int(thinking.get("budget_tokens") or 0)
    return params


def _joined(texts: list[bytes]) -> str:
    """The text the client has received, from the JSON string literals kept per delta."""
    return "".join(json.loads(b"[" + b",".join(texts) + b"]"))


def _stream_error(data: bytes, request_id: str | None) -> UpstreamError:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    return classify_status(
        200,
        error.get("type"),
        str(error.get("message", "")),
        code if isinstance(code, str) else None,
        {},
        request_id,
    )


def _think(params: dict[str, Any], thinking: str | int, max_tokens: int) -> None:
    if thinking == "adaptive":
        params["thinking"] = {"type": "adaptive"}
    elif isinstance(thinking, int):  # the budget comes on top of the answer's max_tokens
        params["thinking"] = {"type": "enabled", "budget_tokens": thinking}
        params["max_tokens"] = max_tokens + thinking


def _cache_breakpoint(messages: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The conversation before the newest user turn, marked: the same on the next turn, so
    cached. The breakpoint goes on its last block."""
    marked = dict(messages[index])
    content = marked["content"]
    if isinstance(content, str):
        marked["content"] = [{"type": "text", "text": content, "cache_control": _EPHEMERAL}]
    else:
        marked["content"] = [*content[:-1], {**content[-1], "cache_control": _EPHEMERAL}]
    return [*messages[:index], marked, *messages[index + 1 :]]


def _params(
    request: ChatRequest,
    messages: list[dict[str, Any]],
    max_tokens: int,
    config: ClaudeConfig,
    thinking: str | int,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": request.model,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": True,
    }
    _think(params, thinking, max_tokens)
    if request.system:
        params["system"] = (
            [{"type": "text", "text": request.system, "cache_control": _EPHEMERAL}]
            if config.cache_system_prompt
            else request.system
        )
    if config.cache_conversation and len(request.messages) >= 2:
        params["messages"] = _cache_breakpoint(messages, len(request.messages) - 2)
    if request.temperature is not None:
        # not a typed parameter of SDK 2.x's create(): sent through its public extra_body
        params["extra_body"] = {"temperature": request.temperature}
    if request.stop_sequences:
        params["stop_sequences"] = list(request.stop_sequences)
    if request.user_id is not None:
        params["metadata"] = {"user_id": request.user_id}
    extra = {**config.extra_params, **params.get("extra_body", {})}
    betas = list(config.betas)
    edit = _CONTEXT_EDITS.get(config.context_strategy)
    if edit is not None:  # the API's own context editing or compaction (CLAUDE_CONTEXT_STRATEGY)
        extra.setdefault("context_management", {"edits": [{"type": edit[0]}]})
        betas.append(edit[1])
    if extra:  # the operator's, under what the request itself sets
        params["extra_body"] = extra
    if betas:
        params["extra_headers"] = {"anthropic-beta": ",".join(dict.fromkeys(betas))}
    return params


#: CLAUDE_CONTEXT_STRATEGY -> (the context_management edit, its beta)
_CONTEXT_EDITS = {
    "clear_tool_uses": ("clear_tool_uses_20250919", "context-management-2025-06-27"),
    "compact": ("compact_20260112", "compact-2026-01-12"),
}
