"""The relay: one producer task per stream, turning upstream Claude events into our events.

Each endpoint's :class:`~.providers.Upstream` sends the request and raises on an HTTP error
(:mod:`.first_party` for the first-party API; the SDK's client, with its retries off, for the
clouds); the relay reads the raw SSE bytes itself, which costs a fraction of building SDK
models per event, and owns the retry policy, mid-stream recovery and cancellation. What else
shapes an answer is a :class:`~.policy.Policy` (``ARCHITECTURE.md`` lists them), called
at the seam's fixed points; the relay knows none of them.

Upstream event in -> our event out (the hot path) is :meth:`Relay._relay`; each answer's state
is one :class:`~.answer.Answer`, each request's one :class:`~.attempt.Attempt`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .answer import Answer, Ended, Prior, Target
from .attempt import Attempt, joined
from .continuation import ContinuationGuard, Diverged, continuation_messages
from .errors import UpstreamError, classify_exception
from .framing import EventTooLarge
from .params import history, own_thinking, request_params
from .policy import AnswerContext, Policies, PolicyMaker, Stop
from .prices import cost_of, price_of
from .providers import Endpoint, UpstreamSource, primary_endpoint
from .retry import RetryPolicy
from .sse import encode_json
from .stream import Cancel, Stream
from .tools import ToolBox, ToolScope

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from .config import ClaudeConfig
    from .request import ChatRequest
    from .telemetry import Telemetry

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

#: :meth:`Relay._try`: make the next request
_AGAIN = "again"


class Relay:
    """Runs generations for one app in one worker: the upstream clients, the retry policy,
    the tools, and the makers of each answer's policies."""

    def __init__(
        self,
        upstreams: UpstreamSource,
        config: ClaudeConfig,
        telemetry: Telemetry,
        tools: ToolBox | None = None,
        tool_scope: ToolScope | None = None,
        policies: Sequence[PolicyMaker] = (),
    ) -> None:
        self.upstreams = upstreams
        self.primary: Endpoint = primary_endpoint(config)  # where requests go unless moved
        self.config = config
        self.telemetry = telemetry
        self.tools: ToolBox = tools if tools is not None else ToolBox()
        self.tool_scope = tool_scope
        self.policy: RetryPolicy = RetryPolicy(
            config.max_retries, config.retry_base_delay, config.retry_max_delay
        )
        #: each answer's policies are made by these, in this order
        self.makers: list[PolicyMaker] = list(policies)

    # -- an answer's beginning ---------------------------------------------------------------
    async def begin(
        self,
        stream: Stream,
        request: ChatRequest,
        context: AnswerContext,
        parent: Context | None = None,
    ) -> Answer:
        """A new answer, its first request prepared (built, and admitted by the policies)
        before its stream opens: a policy's refusal is raised here, and nothing was sent or
        kept."""
        answer = await self._answer(stream, request, context, parent)
        try:
            await answer.policies.opening(answer)
            prepared = await self._prepare(answer)
        except BaseException:
            answer.outcome.discard()
            raise
        # a policy refuses a send's first request by raising (BudgetRefused, Blocked), not
        # with a Stop: no stream is open yet to end
        assert isinstance(prepared, Attempt), "a policy stopped an answer before it began"
        answer.prepared = prepared
        return answer

    async def abandon(self, answer: Answer) -> None:
        """A begun answer whose stream never opened: its policies give back what they took."""
        try:
            await answer.policies.release()
        finally:
            answer.outcome.discard()

    async def resume(self, stream: Stream, request: ChatRequest, context: AnswerContext) -> Answer:
        """An answer this worker takes over (``context.prior``: what the stream holds)."""
        answer = await self._answer(stream, request, context, None)
        prior = context.prior
        assert prior is not None
        prior.resume(answer)
        return answer

    async def _answer(
        self,
        stream: Stream,
        request: ChatRequest,
        context: AnswerContext,
        parent: Context | None,
    ) -> Answer:
        target = Target(request.model, self.primary, self.config.thinking)
        answer = Answer(stream, request, target, self.telemetry.stream(stream.id, request, parent))
        made = []
        try:
            for maker in self.makers:
                policy = await maker.for_answer(answer, context)
                if policy is not None:
                    made.append(policy)
        except BaseException:
            answer.outcome.discard()
            raise
        if made:
            answer.policies = Policies(made)
        answer.outcome.on_hop(answer.target.hop, answer.target.endpoint.provider)
        return answer

    # -- the producer --------------------------------------------------------------------------
    async def produce(self, answer: Answer, prior: Prior | None = None) -> Ended:
        """Fill the answer's stream: ``start``, ``delta``s, then ``done`` or ``error``; how it
        ended. ``prior``: what the stream held when this worker took it over."""
        stream = answer.stream
        result = "unknown"
        try:
            if prior is not None:
                await self._run_pending(answer, prior)
            result = await self._run(answer)
        except asyncio.CancelledError:
            result = await self._cancelled(answer)
        except Exception as exc:  # a bug of ours: never leave readers hanging
            log.exception("stream %s failed", stream.id)
            await answer.fail(UpstreamError("unknown", detail=repr(exc)), partial=False)
        finally:
            steps = list(answer.steps)
            stream.finish()
            if not stream.left:  # only a takeover needs them, and there is none after the end
                answer.steps.clear()
            answer.outcome.end(result, answer)
        ended = answer.ended(steps, joined(answer.texts) if answer.texts else "")
        cost = answer.cost_micro_usd
        if cost is None:
            price = price_of(answer.request.model, self.config.prices)
            cost = cost_of(ended.usage, price) if price is not None else None
        return dataclasses.replace(ended, cost_micro_usd=cost)

    async def _cancelled(self, answer: Answer) -> str:
        stream = answer.stream
        reason = stream.cancel_reason
        if reason is None:
            raise asyncio.CancelledError  # not ours (the loop is going away): nothing to send
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if reason.goes_on:  # no last event here
            stream.leave()
        elif reason is Cancel.SHUTDOWN:
            await answer.fail(UpstreamError("shutdown"))
        else:
            answer.cancelled()
        return reason

    async def _run(self, answer: Answer) -> str:
        """The steps of one answer: each an upstream message (with its retries and
        continuations); a message that stops to use tools, or that the API paused, is followed
        by the next one, up to ``CLAUDE_MAX_TOOL_STEPS``."""
        while True:
            attempt = await self._step(answer)
            if isinstance(attempt, str):
                return attempt  # ended with an error, or a policy's stop
            answer.reported.update(attempt.reported)
            calls = self._calls(answer, attempt)
            if not calls and attempt.stop_reason != "pause_turn":
                return await self._finish(answer, attempt.stop_reason, last=attempt)
            if len(answer.steps) >= self.config.max_tool_steps:
                log.info("stream %s: CLAUDE_MAX_TOOL_STEPS reached", answer.stream.id)
                # its calls are closed as unanswered
                return await self._finish(answer, "max_tool_steps", last=attempt, reported=False)
            try:
                await answer.policies.finishing(answer, final=False)
            except Stop as stop:
                answer.final = attempt.content()
                return await self._stopped(answer, stop)
            await self._take_step(answer, attempt, calls)

    async def _finish(
        self,
        answer: Answer,
        stop_reason: str | None,
        *,
        last: Attempt | None = None,
        reported: bool = True,
        **fields: Any,
    ) -> str:
        """End with ``done``, after the policies' last look (which may stop it instead);
        ``last``: the message that ended it, kept as readers got it (a hold guard's last
        window is released, or dropped, by that look)."""
        try:
            await answer.policies.finishing(answer, final=True)
        except Stop as stop:
            stop_reason, reported, fields = stop.stop_reason, False, stop.fields
            answer.stopped = True
        if last is not None:
            answer.final = last.content()
        return await answer.finish(stop_reason, reported=reported, **fields)

    async def _stopped(self, answer: Answer, stop: Stop) -> str:
        """A policy ended the answer (its :class:`~.policy.Stop`)."""
        answer.stopped = True
        return await self._finish(answer, stop.stop_reason, reported=False, **stop.fields)

    # -- tools -------------------------------------------------------------------------------
    async def _run_pending(self, answer: Answer, prior: Prior) -> None:
        """Taken over: the tools that had not finished run (the finished ones never again)."""
        pending = prior.pending_calls()
        if pending:
            await self._run_tools(answer, answer.steps[-1], pending)

    def _calls(self, answer: Answer, attempt: Attempt) -> list[dict[str, Any]]:
        """The app's tool calls the step stopped for (none when the app has no tools: the
        API refuses tool results in a request without tools)."""
        calls = attempt.calls() if attempt.stop_reason == "tool_use" else []
        if calls and not (self.tools or self.config.server_tools):
            log.warning("stream %s: the model called a tool; this app has none", answer.stream.id)
            return []
        return calls

    async def _take_step(
        self, answer: Answer, attempt: Attempt, calls: list[dict[str, Any]]
    ) -> None:
        """Record the finished step (so no worker asks for it again), then run its tools."""
        stream = answer.stream
        step: dict[str, Any] = {
            # the target asked (not the snapshot id that answered): a later hop drops its
            # thinking
            "model": answer.target.model,
            "content": attempt.content(),
            "results": {} if calls else None,  # None: paused, continued as is
            "at": len(stream.events),  # the step's text is in the events before this
        }
        answer.add_step(step)
        if calls:
            for call in calls:
                event = {"type": "tool_call", "id": call["id"], "name": call["name"]}
                answer.tell({**event, "input": self.tools.shown_input(call)})
            await self._run_tools(answer, step, calls)

    async def _run_tools(
        self, answer: Answer, step: dict[str, Any], calls: list[dict[str, Any]]
    ) -> None:
        """Run a step's tool calls at once; each result is recorded with the step (so it is
        never run again, here or on another worker) before its event goes out."""
        results: dict[str, Any] = step["results"]
        await asyncio.gather(*(self._run_tool(answer, call, results) for call in calls))

    async def _run_tool(
        self, answer: Answer, call: dict[str, Any], results: dict[str, Any]
    ) -> None:
        tools, stream, outcome = self.tools, answer.stream, answer.outcome
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
                default_timeout=self.config.tool_timeout,
                scope=self.tool_scope,
            )
            ended = result.outcome
        finally:
            elapsed = time.monotonic() - started
            answer.tally.tool_calls += 1
            outcome.tool_ended(span, tools.label(name), ended, elapsed)
        log.info("stream %s tool %s: %s in %.3fs", stream.id, name, ended, elapsed)
        results[result.id] = result.block()
        stream.steps_changed()
        answer.tell(
            {
                "type": "tool_result",
                "id": result.id,
                "name": result.name,
                "is_error": result.is_error,
                "output": tools.shown_output(result),
            }
        )

    # -- one step: its requests ----------------------------------------------------------------
    async def _step(self, answer: Answer) -> Attempt | str:
        """One step's upstream message, retried before any of its text was sent and continued
        after (where a policy moved the answer, when the current target's retries are spent):
        its last request, or how the stream ended (a str)."""
        attempt: Attempt | str | None = answer.prepared
        answer.prepared = None
        if attempt is None:
            attempt = await self._prepare(answer)
        thought = False  # a request of this step showed thinking: a retry's says it restarts
        while not isinstance(attempt, str):
            ended = await self._try(answer, attempt)
            if ended is None:
                return attempt
            if ended is not _AGAIN:
                return ended
            thought = thought or attempt.thought
            attempt = await self._prepare(answer, attempt, thought)
        return attempt

    async def _prepare(
        self, answer: Answer, same: Attempt | None = None, rethinking: bool = False
    ) -> Attempt | str:
        """The step's next request, built and admitted by the policies (which may reshape
        it), or how the stream ended."""
        params = await self._build(answer, same)
        if isinstance(params, str):
            return params
        # a continuation's thinking (about how to go on) is not shown mid-answer
        expose = self.config.expose_thinking and not answer.texts
        attempt = Attempt(answer, params, expose, rethinking)
        try:
            await answer.policies.before_request(answer, attempt)
        except Stop as stop:
            return await self._stopped(answer, stop)
        return attempt

    async def _build(self, answer: Answer, same: Attempt | None) -> dict[str, Any] | str:
        """The step's next request's parameters, to the current target: the step's own
        (``same``'s again, on a retry) while readers have none of its text, else one that
        continues the text (with its guard), or the end when its tokens are used up."""
        if same is not None and not answer.texts and same.target is answer.target:
            return same.asked
        request = answer.request
        target = answer.target
        messages = history(request.messages, answer.steps, request.model)
        if not answer.texts:
            params = self._params(answer, messages, request.max_tokens)
            return own_thinking(params, answer.steps, request.model)
        remaining = answer.remaining(request.max_tokens)
        if remaining < 1:
            return await self._finish(answer, "max_tokens", reported=False)
        sent = joined(answer.texts)
        messages, whitespace = continuation_messages(
            request.model, messages, sent, prefill=target.thinking == "off"
        )
        answer.continuation = ContinuationGuard(sent, whitespace)
        return self._params(answer, messages, remaining)

    def _params(
        self, answer: Answer, messages: list[dict[str, Any]], max_tokens: int
    ) -> dict[str, Any]:
        config = self.config
        params = request_params(
            answer.request, messages, max_tokens, config, answer.target.thinking
        )
        container = answer.container
        if container is not None and container.get("id"):
            # through extra_body: the SDK's typed parameter is newer than its lowest version
            params["extra_body"] = {**params.get("extra_body", {}), "container": container["id"]}
        tools = self.tools
        if tools or config.server_tools:
            params["tools"] = [*tools.definitions(), *config.server_tools]
        return params

    async def _try(self, answer: Answer, attempt: Attempt) -> str | None:
        """One request: None when it answered, :data:`_AGAIN` to make the next one, or how the
        stream ended."""
        outcome = answer.outcome
        answer.tally.attempts += 1
        outcome.attempt(attempt.model, answer.tally.attempts)
        try:
            await self._request(answer, attempt)
        except Stop as stop:  # no upstream outcome: the request was cut, not answered
            return await self._stopped(answer, stop)
        except _WarningRaised as raised:
            answer.tolerated += 1
            if answer.tolerated > 3:  # the filter did not take: never loop
                return await answer.fail(UpstreamError("unknown", detail=raised.detail))
            return _AGAIN
        except UpstreamError as error:
            wait = self._wait(answer, error)
            if wait is None:
                if await answer.policies.failed(answer, error):
                    return _AGAIN
                return await answer.fail(error, counted=False)
            await asyncio.sleep(wait)
            return _AGAIN
        except asyncio.CancelledError:
            outcome.upstream("cancelled")
            raise
        outcome.upstream("ok")
        return None

    def _wait(self, answer: Answer, error: UpstreamError) -> float | None:
        """How long before the request is made again, or None: a retry while readers have
        none of the step's text (``CLAUDE_MAX_RETRIES``), a continuation after
        (``CLAUDE_MAX_RECOVERIES``, when recovery is on and the model did not diverge)."""
        config, outcome, error_class = self.config, answer.outcome, error.error_class
        outcome.upstream(error_class)
        outcome.failed(error_class)
        if not answer.texts:
            kind = "retry"
            wait = self.policy.delay(error, answer.retries + 1)
        else:
            kind = "recovery"
            wait = None
            if config.recovery and error_class != "continuation_failed":
                wait = self.policy.delay(error, answer.recoveries + 1, limit=config.max_recoveries)
        if wait is None:
            log.warning(
                "stream %s upstream failure: %s %s", answer.stream.id, error_class, error.detail
            )
            return None
        log.info("stream %s retrying in %.2fs after %s", answer.stream.id, wait, error_class)
        answer.retried(kind)  # counted: only a request made again
        outcome.retrying(error_class, kind, wait, answer.tally.attempts)
        return wait

    # -- one request -----------------------------------------------------------------------------
    async def _request(self, answer: Answer, attempt: Attempt) -> None:
        """One upstream request, settled by the policies however it ends. Raises
        :class:`UpstreamError`, or :class:`~.policy.Stop`."""
        try:
            await self._exchange(answer, attempt)
        finally:
            await answer.policies.after_request(answer, attempt)

    async def _exchange(self, answer: Answer, attempt: Attempt) -> None:
        try:
            await self._relay(answer, attempt)
        except BaseException as exc:  # ours, SDK errors, transport errors, cancellation
            if not (isinstance(exc, Exception) and attempt.ended and not _ours(exc)):
                attempt.settle_interrupted()
                if not isinstance(exc, Exception):
                    raise  # cancelled: the producer decides what to tell readers
                raise _classified(exc) from (None if _ours(exc) else exc)
            # the connection failed after the message had ended (its stop reason came, every
            # block closed): the message is complete; a tool call in it runs
            log.info(
                "stream %s: the connection ended after the message (%r)", answer.stream.id, exc
            )
        if answer.continuation is not None:  # the whole continuation was shorter than the hold
            await _release_held(answer, attempt)
        attempt.count()

    async def _relay(self, answer: Answer, attempt: Attempt) -> None:
        """The hot path: upstream events in, our events out. A text delta's JSON string is
        spliced into our event as is; anything else goes to ``attempt``."""
        texts = answer.texts
        say = answer.say
        text_delta = _TEXT_DELTA.fullmatch
        meter = answer.policies.meter
        upstream = self.upstreams[answer.target.endpoint]
        framer = upstream.framer(MAX_UPSTREAM_EVENT)
        async with upstream.open(upstream.params(attempt.params)) as response:
            attempt.request_id = answer.outcome.request_id = response.request_id
            async for chunk in response.chunks:
                for name, data in framer.events(chunk):
                    if name != b"content_block_delta":
                        await attempt.control(name, data)  # message_start: the real input
                        continue
                    match = None if answer.continuation is not None else text_delta(data)
                    if match is not None:  # hot path: splice the JSON string as is
                        literal = match.group(1)
                    else:
                        literal = await attempt.slow_delta(data)  # metered there
                        if literal is None:
                            continue
                    if not texts and answer.gate is None:  # a hold gate marks its release
                        attempt.first_text()
                    attempt.deltas += 1
                    say(literal)
                    if meter is not None and meter(literal):
                        await attempt.checkpoint()  # a cut: leaving the block closes it
        if not attempt.ended:
            raise UpstreamError("network_error", detail="upstream ended without message_stop")


async def _release_held(answer: Answer, attempt: Attempt) -> None:
    """A continuation ended while its guard still held its first text: decide on it."""
    guard = answer.continuation
    assert guard is not None
    answer.continuation = None
    try:
        rest = guard.end()
    except Diverged as exc:
        attempt.settle_interrupted()
        raise UpstreamError("continuation_failed", detail=str(exc)) from None
    if rest:
        literal = encode_json(rest)
        answer.say(literal)
        meter = answer.policies.meter
        if meter is not None and meter(literal):
            await attempt.checkpoint()


def _ours(exc: Exception) -> bool:
    """Raised by this module (its cause says nothing more)."""
    return isinstance(exc, UpstreamError | Diverged | EventTooLarge | Warning | Stop)


def _classified(exc: Exception) -> Exception:
    """What an attempt's failure becomes for :meth:`Relay._try`."""
    if isinstance(exc, Stop):
        return exc
    if isinstance(exc, Warning):
        return _tolerate(exc)
    if isinstance(exc, Diverged):
        return UpstreamError("continuation_failed", detail=str(exc))
    if isinstance(exc, EventTooLarge):
        return UpstreamError("unknown", retryable=False, detail=str(exc))
    return classify_exception(exc)


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
