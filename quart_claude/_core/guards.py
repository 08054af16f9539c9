"""Input and output guards: the host's moderation, as policies.

``@claude.input_guard`` sees each send once, after auth and validation and before anything is
reserved or sent upstream; a refusal is the send's 400. ``@claude.output_guard`` sees the
answer's text window by window (``CLAUDE_OUTPUT_GUARD_EVERY`` characters) and once more before
``done``; a block ends the answer with ``stop_reason: "blocked"``. In ``cut`` mode text flows
as it arrives and a block closes the request at once; in ``hold`` mode no reader sees text the
guard has not passed (the answer's gate holds it, and every event after it). A guard that
raises, or takes longer than ``CLAUDE_GUARD_TIMEOUT``, fails closed (``guard_error``).

The windows are counted over the whole answer's text (every step), so they go on where they
were after a retry, a continuation, a fallback hop or a takeover: the guard sees each
character once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config_error import ConfigError
from .policy import Policy, Stop
from .sse import encode_json
from .tools import call_host

if TYPE_CHECKING:
    from .answer import Answer
    from .attempt import Attempt
    from .config import ClaudeConfig
    from .policy import AnswerContext
    from .telemetry import Telemetry
    from .tools import ToolScope

__all__ = [
    "Blocked",
    "Guards",
    "InputCheck",
    "InputGuard",
    "InputGuarding",
    "OutputCheck",
    "OutputGuard",
    "OutputGuarding",
    "parse_guard_mode",
]

log = logging.getLogger("quart_claude")


def parse_guard_mode(key: str, value: str) -> str:
    """``CLAUDE_OUTPUT_GUARD_MODE``: ``cut`` or ``hold``."""
    mode = value.strip().lower()
    if mode not in ("cut", "hold"):
        raise ConfigError(f"{key} must be 'cut' or 'hold', got {value!r}")
    return mode


class Blocked(Exception):
    """A guard's refusal: raise it, or return it. ``reason`` is for programs (a short code,
    a metric label); ``message`` for people (the input guard's 400 carries it)."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class InputCheck:
    """What ``@claude.input_guard`` is given: one send."""

    identity: str | None  # who asked (None: no auth)
    conversation_id: str | None  # with conversations on
    #: the request's messages as Claude would get them (stored history included), the new
    #: user turn last
    messages: list[dict[str, Any]]

    @property
    def turn(self) -> dict[str, Any]:
        """The new user turn."""
        return self.messages[-1]

    @property
    def text(self) -> str:
        """The new user turn's text (its text blocks, joined)."""
        content = self.turn.get("content")
        if isinstance(content, str):
            return content
        return "\n".join(
            str(block.get("text", ""))
            for block in content or ()
            if isinstance(block, dict) and block.get("type") == "text"
        )


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """What ``@claude.output_guard`` is given: one window of the answer."""

    identity: str | None
    stream_id: str
    text: str  # the answer's text so far, this window included
    new: str  # the text new since the guard's last call
    final: bool  # the last call, before ``done``


Verdict = Blocked | None
InputGuard = Callable[[InputCheck], Verdict | Awaitable[Verdict]]
OutputGuard = Callable[[OutputCheck], Verdict | Awaitable[Verdict]]


class Guards:
    """The app's guards (each None when the host has none) and how they are asked."""

    def __init__(
        self,
        config: ClaudeConfig,
        telemetry: Telemetry,
        scope: ToolScope | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.scope = scope
        self.input: InputGuard | None = None
        self.output: OutputGuard | None = None

    async def ask(self, guard: str, hook: Callable[[Any], Any], check: Any) -> Blocked | None:
        """One guard's verdict (its refusal, or None), failing closed; counted when it
        blocks."""
        verdict = await self._verdict(guard, hook, check)
        if verdict is not None:
            metrics = self.telemetry.metrics
            if metrics is not None:
                metrics.guard_blocks.labels(guard, verdict.reason).inc()
            log.info("the %s guard blocked: %s", guard, verdict.reason)
        return verdict

    async def _verdict(self, guard: str, hook: Callable[[Any], Any], check: Any) -> Blocked | None:
        try:
            async with asyncio.timeout(self.config.guard_timeout):
                verdict = await self._called(hook, check)
        except Blocked as blocked:
            return blocked
        except TimeoutError:
            log.error("the %s guard took longer than CLAUDE_GUARD_TIMEOUT: blocked", guard)
            return Blocked("guard_error")
        except Exception:
            log.exception("the %s guard raised: blocked", guard)
            return Blocked("guard_error")
        if verdict is None or isinstance(verdict, Blocked):
            return verdict
        log.error("the %s guard returned %r, not None or Blocked: blocked", guard, verdict)
        return Blocked("guard_error")

    async def _called(self, hook: Callable[[Any], Any], check: Any) -> Any:
        verdict = await call_host(hook, self.scope, check)
        return await verdict if inspect.isawaitable(verdict) else verdict


class InputGuarding:
    """``@claude.input_guard`` as each new answer's policy."""

    def __init__(self, guards: Guards) -> None:
        self.guards = guards

    async def for_answer(self, answer: Answer, context: AnswerContext) -> Policy | None:
        if self.guards.input is None or context.prior is not None:
            return None  # a takeover's send was looked at where it began
        return _InputPolicy(self.guards, context)


class _InputPolicy(Policy):
    def __init__(self, guards: Guards, context: AnswerContext) -> None:
        self.guards = guards
        self.context = context

    async def opening(self, answer: Answer) -> None:
        hook = self.guards.input
        assert hook is not None
        check = InputCheck(
            answer.stream.owner, self.context.conversation_id, list(answer.request.messages)
        )
        blocked = await self.guards.ask("input", hook, check)
        if blocked is not None:
            raise blocked


class OutputGuarding:
    """``@claude.output_guard`` as each answer's policy."""

    def __init__(self, guards: Guards) -> None:
        self.guards = guards

    async def for_answer(self, answer: Answer, context: AnswerContext) -> Policy | None:
        if self.guards.output is None:
            return None
        return _OutputPolicy(self.guards, answer, context)


class _OutputPolicy(Policy):
    """One answer's output guard. In ``hold`` mode it is the answer's gate: text, and every
    event after it, wait in ``held`` until the window that holds the text has passed."""

    def __init__(self, guards: Guards, answer: Answer, context: AnswerContext) -> None:
        self.guards = guards
        self.every = guards.config.output_guard_every
        self.hold = guards.config.output_guard_mode == "hold"
        self.passed: list[str] = []  # the windows the guard passed, in order
        self.pending: list[str] = []  # text since the last window, not yet looked at
        self.pending_chars = 0
        #: hold mode: what readers may not see yet, in order: encoded text literals (True)
        #: and events (False)
        self.held: list[tuple[bytes, bool]] = []
        self.texts_held = 0
        self.blocked = False
        prior = context.prior
        if prior is not None and prior.sent:  # a takeover: the windows go on where they were
            sent = prior.sent
            at = len(sent) if self.hold else len(sent) // self.every * self.every
            self.passed = [sent[:at]]
            self._pend(sent[at:])
        if self.hold:
            answer.gate = self

    def _pend(self, text: str) -> None:
        self.pending, self.pending_chars = ([text], len(text)) if text else ([], 0)

    # -- the meter -------------------------------------------------------------------------
    def wrote(self, literal: bytes) -> bool:
        text = json.loads(literal)
        self.pending.append(text)
        self.pending_chars += len(text)
        return self.pending_chars >= self.every

    async def checkpoint(self, answer: Answer, attempt: Attempt) -> None:
        await self._windows(answer)

    async def _windows(self, answer: Answer) -> None:
        """Every whole window waiting, in order."""
        while self.pending_chars >= self.every:
            joined = "".join(self.pending)
            self._pend(joined[self.every :])
            await self._look(answer, joined[: self.every], final=False)

    async def finishing(self, answer: Answer, *, final: bool) -> None:
        """Before ``done`` (``final``), the rest; at a tool step's end in ``hold`` mode, the
        text so far, so the step's calls and results follow text the guard passed."""
        if self.blocked or not (final or self.hold):
            return
        await self._windows(answer)
        window = "".join(self.pending)
        self._pend("")
        if window or final:
            await self._look(answer, window, final=final)

    async def _look(self, answer: Answer, window: str, *, final: bool) -> None:
        hook = self.guards.output
        assert hook is not None
        self.passed.append(window)
        check = OutputCheck(
            answer.stream.owner, answer.stream.id, "".join(self.passed), window, final
        )
        blocked = await self.guards.ask("output", hook, check)
        if blocked is None:
            if self.hold:
                self._release(answer, len(window))
            return
        self.blocked = True
        if self.hold:  # what it held is never sent, stored, replayed or continued
            self.held.clear()
            self.texts_held = 0
            answer.gate = None
        reason: dict[str, Any] = {"reason": blocked.reason}
        if blocked.message is not None:
            reason["message"] = blocked.message
        raise Stop("blocked", blocked=reason)

    # -- the gate (hold mode) ---------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.texts_held

    def literals(self) -> list[bytes]:
        return [data for data, is_text in self.held if is_text]

    def text(self, literal: bytes) -> None:
        self.held.append((literal, True))
        self.texts_held += 1

    def event(self, data: bytes) -> bool:
        if not self.held:
            return False
        self.held.append((data, False))
        return True

    def _release(self, answer: Answer, chars: int) -> None:
        """Send the first ``chars`` characters of held text, and the events among them and
        right after them; a text literal across the boundary is split there."""
        held, at = self.held, 0
        while at < len(held):
            data, is_text = held[at]
            if not is_text:  # an event behind the text
                answer.stream.append_data(data)
            elif chars <= 0:
                break
            else:
                text = json.loads(data)
                if len(text) > chars:  # split: the rest stays held
                    answer.released(encode_json(text[:chars]))
                    held[at] = (encode_json(text[chars:]), True)
                    break
                answer.released(data)
                self.texts_held -= 1
                chars -= len(text)
            at += 1
        del held[:at]

    async def before_request(self, answer: Answer, attempt: Attempt) -> None:
        """A new request: what an interrupted one left held never reaches readers (its text
        is written again, and looked at again)."""
        if self.held:
            self.held.clear()
            self.texts_held = 0
            self._pend("")  # in hold mode, the text held is the text not looked at
