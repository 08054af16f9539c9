"""The seam for what shapes an answer: budgets, fallback and the guards are each a
:class:`Policy`, called by the relay at fixed points of every answer (``ARCHITECTURE.md`` shows
the order). The relay knows this interface, never a policy; a feature adds a policy without
touching the relay's loop.

A :class:`PolicyMaker` is per app (its settings, its stores); it makes one :class:`Policy` per
answer, a unit of work with its own state (a budget's reservation, a chain's hop, a guard's
window), the way redis-py's ``Lock`` owns its token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .answer import Answer, Prior
    from .attempt import Attempt
    from .protocol import UpstreamError
    from .request import ChatRequest

__all__ = ["NO_POLICIES", "AnswerContext", "Policies", "Policy", "PolicyMaker", "Stop"]


class Stop(Exception):
    """A policy ends the answer here: ``done`` with ``stop_reason`` (and ``fields``), the
    request in flight closed (a budget's cut, a guard's block)."""

    def __init__(self, stop_reason: str, **fields: Any) -> None:
        super().__init__(stop_reason)
        self.stop_reason = stop_reason
        self.fields = fields


@dataclass(frozen=True, slots=True)
class AnswerContext:
    """Who an answer is for and what it answers, as every policy maker sees it."""

    identity: str  # the owner's identity, else the client's address (``addr:...``)
    stream_id: str
    request: ChatRequest
    conversation_id: str | None = None
    #: what the stream held when this worker took it over (None: a new answer)
    prior: Prior | None = None


class Policy:
    """One answer's policy. Every hook is optional: a policy overrides the ones it needs, and
    the relay calls only those (in the order the policies were made), at these points:

    - :meth:`opening`: once per send, before its first request (never on a takeover);
    - :meth:`before_request`: before each upstream request (reserve, refuse, reshape it);
      the send's first one refuses by raising its own exception (a budget's
      ``BudgetRefused``), as no stream is open yet; a later one raises :class:`Stop`;
    - :meth:`started`: the request's ``message_start`` (its real input);
    - :meth:`wrote` (text, as the JSON string literal relayed) and :meth:`wrote_other`
      (thinking, tool input, any other block): the meter, one call per delta; True asks for
      a :meth:`checkpoint`, where a policy may take more or raise :class:`Stop`;
    - :meth:`after_request`: the request is over, however it ended (settle);
    - :meth:`failed`: the request failed past its retries: True when the policy moved the
      answer (the next request goes there);
    - :meth:`finishing`: a step is about to be recorded (``final=False``: its tools run
      next), or the answer to end with ``done`` (``final=True``; any stop reason but a
      cancellation): a look at what it wrote, which may raise :class:`Stop`;
    - :meth:`ending`: the answer's last event (``done`` or ``error``) is about to go out:
      a policy adds its fields to it."""

    async def opening(self, answer: Answer) -> None:
        return None

    async def before_request(self, answer: Answer, attempt: Attempt) -> None:
        return None

    def started(self, attempt: Attempt) -> bool:
        return False

    def wrote(self, literal: bytes) -> bool:
        return False

    def wrote_other(self, piece: str, *, json: bool) -> bool:
        return False

    async def checkpoint(self, answer: Answer, attempt: Attempt) -> None:
        return None

    async def after_request(self, answer: Answer, attempt: Attempt) -> None:
        return None

    async def failed(self, answer: Answer, error: UpstreamError) -> bool:
        return False

    async def finishing(self, answer: Answer, *, final: bool) -> None:
        return None

    async def ending(self, answer: Answer, event: dict[str, Any]) -> None:
        return None

    async def release(self) -> None:
        """The stream never started (its store refused it): give back what was taken."""
        return None


class PolicyMaker(Protocol):
    """Makes an answer's policy (None: it has none for this answer)."""

    async def for_answer(self, answer: Answer, context: AnswerContext) -> Policy | None: ...


_HOOKS = (
    "opening",
    "before_request",
    "started",
    "wrote",
    "wrote_other",
    "checkpoint",
    "after_request",
    "failed",
    "finishing",
    "ending",
)


_HOOKS_OF: dict[type[Policy], frozenset[str]] = {}


def _hooks_of(kind: type[Policy]) -> frozenset[str]:
    """The hooks a policy class overrides (once per class: an answer's setup reads it)."""
    hooks = _HOOKS_OF.get(kind)
    if hooks is None:
        hooks = frozenset(n for n in _HOOKS if getattr(kind, n) is not getattr(Policy, n))
        _HOOKS_OF[kind] = hooks
    return hooks


class Policies:
    """An answer's policies, in order, each hook bound once to the policies that have it (the
    relay's hot path calls a meter only when one exists)."""

    __slots__ = (
        "_after",
        "_before",
        "_check",
        "_ending",
        "_failed",
        "_finishing",
        "_opening",
        "_started",
        "_wrote_other",
        "all",
        "meter",
    )

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self.all: tuple[Policy, ...] = tuple(policies)
        all_ = self.all

        def having(name: str) -> tuple[Policy, ...]:
            return tuple(policy for policy in all_ if name in _hooks_of(type(policy)))

        self._opening = having("opening")
        self._started = having("started")
        self._wrote_other = having("wrote_other")
        self._before = having("before_request")
        self._after = having("after_request")
        self._check = having("checkpoint")
        self._failed = having("failed")
        self._finishing = having("finishing")
        self._ending = having("ending")
        meters = [policy.wrote for policy in having("wrote")]
        #: the text meter (None: no policy meters text, and the hot path skips it)
        self.meter: Callable[[bytes], bool] | None = (
            meters[0] if len(meters) == 1 else _any_of(meters) if meters else None
        )

    def started(self, attempt: Attempt) -> bool:
        due = False
        for policy in self._started:
            due = policy.started(attempt) or due
        return due

    def wrote_other(self, piece: str, *, json: bool) -> bool:
        due = False
        for policy in self._wrote_other:
            due = policy.wrote_other(piece, json=json) or due
        return due

    async def opening(self, answer: Answer) -> None:
        for policy in self._opening:
            await policy.opening(answer)

    async def before_request(self, answer: Answer, attempt: Attempt) -> None:
        for policy in self._before:
            await policy.before_request(answer, attempt)

    async def checkpoint(self, answer: Answer, attempt: Attempt) -> None:
        for policy in self._check:
            await policy.checkpoint(answer, attempt)

    async def after_request(self, answer: Answer, attempt: Attempt) -> None:
        """Every policy settles, even when one raises (the first error goes on)."""
        error: BaseException | None = None
        for policy in self._after:
            try:
                await policy.after_request(answer, attempt)
            except BaseException as exc:  # each settles on its own
                error = error or exc
        if error is not None:
            raise error

    async def failed(self, answer: Answer, error: UpstreamError) -> bool:
        for policy in self._failed:
            if await policy.failed(answer, error):
                return True
        return False

    async def finishing(self, answer: Answer, *, final: bool) -> None:
        for policy in self._finishing:
            await policy.finishing(answer, final=final)

    async def ending(self, answer: Answer, event: dict[str, Any]) -> None:
        for policy in self._ending:
            await policy.ending(answer, event)

    async def release(self) -> None:
        for policy in self.all:
            await policy.release()


def _any_of(meters: Sequence[Callable[[bytes], bool]]) -> Callable[[bytes], bool]:
    def meter(literal: bytes) -> bool:
        due = False
        for wrote in meters:
            due = wrote(literal) or due
        return due

    return meter


#: an answer's policies before its makers have made them (or when it has none)
NO_POLICIES = Policies()
