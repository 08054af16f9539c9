"""Budgets per identity: limits, what each upstream request may spend, and the meter.

A budget is one or more limits, each tokens or money per calendar period in UTC
(``CLAUDE_BUDGET="200000 tokens/day; 5 usd/month"``). Before every upstream request (the
first, each tool step, each continuation) a :class:`Spend` reserves what the request may use,
atomically across workers (:mod:`.ledger`): its worst case (an input estimate plus
``max_tokens``) when that fits, else what remains, as long as the input and
:data:`MIN_OUTPUT` tokens fit; a request granted less than its worst case goes out with its
``max_tokens`` lowered to the grant, so the API itself stops there. While the answer streams,
the meter counts every output delta as it arrives (text, thinking, tool input: one token per
:data:`BYTES_PER_TOKEN` bytes of ASCII, at least one per delta); when the real input or the
meter passes the reservation, it is topped up against what the budget has left, and the
request is cut only at the hard limit. The request then settles at its exact usage
(``message_delta``), or, cut or cancelled, at what the meter saw.
"""

from __future__ import annotations

import calendar
import inspect
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .policy import Policy, Stop
from .prices import Price, cost_of, price_of

if TYPE_CHECKING:
    from .answer import Answer
    from .attempt import Attempt
    from .config import ClaudeConfig
    from .ledger import LedgerStore
    from .policy import AnswerContext
    from .telemetry import Telemetry

__all__ = [
    "BYTES_PER_TOKEN",
    "BudgetHook",
    "Budgets",
    "MIN_OUTPUT",
    "Amount",
    "BudgetRefused",
    "Limit",
    "Period",
    "Refusal",
    "Spend",
    "parse_budget",
]

log = logging.getLogger("quart_claude")

#: the meter's estimate of a delta's tokens (the exact count comes with ``message_delta``)
BYTES_PER_TOKEN = 4
#: what the API adds to a request with tools: its tool-use system prompt (Claude 4 and later)
TOOLS_PROMPT_TOKENS = 346
#: the smallest thinking budget the API accepts
MIN_THINKING_BUDGET = 1024
#: a request is admitted when its input and this much output fit in what remains
MIN_OUTPUT = 16
#: how long a reservation outlives a worker that died holding it (seconds)
HOLD_TTL = 600.0

_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}
_LIMIT = re.compile(
    r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>tokens?|usd|\$)\s*/\s*"
    r"(?:(?P<count>\d+)\s*)?(?P<period>second|minute|hour|day|week|month)s?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar period in UTC: ``seconds`` long (aligned to the epoch, so days start at
    midnight UTC), or a calendar month (``seconds`` None)."""

    seconds: int | None
    name: str

    def window(self, now: float) -> tuple[int, int]:
        """The current period's start and end (epoch seconds)."""
        if self.seconds is not None:
            start = int(now) // self.seconds * self.seconds
            return start, start + self.seconds
        moment = time.gmtime(now)
        start = calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0))
        days = calendar.monthrange(moment.tm_year, moment.tm_mon)[1]
        return start, start + days * 86400


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: tokens or micro-dollars per period."""

    tokens: int | None
    micro_usd: int | None
    period: Period

    def text(self) -> str:
        amount = (
            f"{self.tokens} tokens" if self.tokens is not None else f"{_usd(self.micro_usd)} usd"
        )
        return f"{amount}/{self.period.name}"


def _usd(micro: int | None) -> str:
    return f"{(micro or 0) / 1_000_000:g}"


def parse_budget(key: str, value: Any) -> tuple[Limit, ...]:
    """``"200000 tokens/day; 5 usd/month"`` (``;`` or ``,`` between limits; periods
    ``second``, ``minute``, ``hour``, ``day``, ``week``, ``month``, with a count: ``10
    seconds``). Raises ValueError naming ``key``."""
    if isinstance(value, Limit):
        return (value,)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must look like '200000 tokens/day' or '5 usd/month'")
    limits = []
    for part in re.split(r"[;,]", value):
        match = _LIMIT.match(part)
        if match is None:
            raise ValueError(f"{key}: {part.strip()!r} must look like '200000 tokens/day'")
        count = int(match["count"] or 1)
        period_name = match["period"].lower()
        period = Period(
            None if period_name == "month" else count * _UNITS[period_name],
            f"{count} {period_name}s" if count != 1 else period_name,
        )
        if period_name == "month" and count != 1:
            raise ValueError(f"{key}: a month is one calendar month")
        amount = match["amount"]
        if match["unit"].lower().startswith("token"):
            if "." in amount or int(amount) < 1:
                raise ValueError(f"{key}: a token limit is a positive whole number")
            limits.append(Limit(int(amount), None, period))
        else:
            limits.append(Limit(None, round(float(amount) * 1_000_000), period))
    return tuple(limits)


@dataclass(frozen=True, slots=True)
class Amount:
    tokens: int = 0
    micro_usd: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request that does not fit: the tightest limit, what was used, when it resets."""

    limit: Limit
    used: Amount
    reset_at: int  # epoch seconds
    reason: str = "budget_exceeded"  # or "no_price": a money limit and a model without one

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.reset_at - now))

    def body(self, now: float) -> dict[str, Any]:
        limit = self.limit
        return {
            "limit": limit.text(),
            "limit_tokens": limit.tokens,
            "limit_usd": None if limit.micro_usd is None else limit.micro_usd / 1_000_000,
            "limit_micro_usd": limit.micro_usd,
            "used_tokens": self.used.tokens,
            "used_usd": self.used.micro_usd / 1_000_000,
            "used_micro_usd": self.used.micro_usd,
            "period": limit.period.name,
            "retry_after": self.retry_after(now),
        }


class BudgetRefused(Exception):
    """Raised where a stream would open when its first request does not fit."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.limit.text())
        self.refusal = refusal


@dataclass(slots=True)
class Spend:
    """The budget of one answer: reserves before each upstream request, meters it, tops the
    reservation up when the request needs more, settles it. A unit of work owning its own
    state (like redis-py's ``Lock``). With no limits it only records (the ledger)."""

    store: LedgerStore
    identity: str
    limits: tuple[Limit, ...]
    price: Price | None
    model: str
    stream_id: str
    conversation_id: str | None = None
    step: int = 0
    hold: str | None = None  # the reservation of the request in flight
    granted: Amount = field(default_factory=Amount)
    input_tokens: int = 0  # exact from message_start, else the estimate
    output_estimate: int = 0
    spent: Amount = field(default_factory=Amount)  # the answer's, settled so far
    warn_at: int = 0  # percent of a limit past which start and done carry a warning (0: off)
    hold_ttl: float = HOLD_TTL  # how long a reservation outlives a worker that died holding it
    max_output: int = 0  # the request in flight's max_tokens, as sent
    lowered: bool = False  # that max_tokens is the budget's (what the grant left)
    _cap: int = 0  # the output tokens the request in flight may still stream
    _usage: dict[str, Any] = field(default_factory=dict)  # its input usage (message_start's)
    warning: dict[str, Any] | None = None  # the last one seen

    async def reserve(self, params: dict[str, Any]) -> Refusal | None:
        """Reserve the next request's share; a refusal when even its input does not fit."""
        estimate = estimate_input(params)
        self.max_output = int(params.get("max_tokens") or 0)
        self.input_tokens, self.output_estimate, self.lowered = estimate, 0, False
        self._usage = {"input_tokens": estimate}
        hold = secrets.token_hex(8)
        if not self.limits:  # recorded, never refused
            self.hold, self._cap = hold, self._output_cap()
            return None
        if self.money and self.price is None:
            limit = next(limit for limit in self.limits if limit.micro_usd is not None)
            return Refusal(limit, Amount(), int(time.time()), reason="no_price")
        granted = await self.store.reserve(
            self.identity,
            self.limits,
            hold,
            ask=self._amount(self.max_output),
            floor=self._amount(MIN_OUTPUT),
            ttl=self.hold_ttl,
            now=time.time(),
        )
        if isinstance(granted, Refusal):
            return granted
        self.hold, self.granted = hold, granted
        self._cap = self._output_cap()
        return None

    def fitted(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request as it is sent: when the grant leaves less output than its
        ``max_tokens``, ``max_tokens`` is lowered to what it leaves, so the API itself stops
        there (output the meter cannot see, such as summarized thinking, is then bounded
        too). A thinking budget is lowered with it, down to the API's 1,024; below that the
        meter alone cuts the request."""
        room = self._cap
        if room >= int(params.get("max_tokens") or 0):
            return params
        fitted = {**params, "max_tokens": room}
        thinking = params.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = min(int(thinking.get("budget_tokens") or 0), room - MIN_OUTPUT)
            if budget < MIN_THINKING_BUDGET:
                return params
            fitted["thinking"] = {**thinking, "budget_tokens": budget}
        self.max_output, self.lowered = room, True
        return fitted

    async def check(self) -> dict[str, Any] | None:
        """The soft threshold: a warning when a limit is ``warn_at`` percent used or more
        (the tightest one), for the ``start`` and ``done`` events."""
        if not self.warn_at or not self.limits:
            return None
        used = await self.store.used(self.identity, self.limits, time.time())
        worst: dict[str, Any] | None = None
        for limit, amount in zip(self.limits, used, strict=True):
            cap, have = (
                (limit.tokens, amount.tokens)
                if limit.tokens is not None
                else (limit.micro_usd or 0, amount.micro_usd)
            )
            percent = 100 if cap <= 0 else min(100, have * 100 // cap)
            if percent >= self.warn_at and (worst is None or percent > worst["used_percent"]):
                worst = {"limit": limit.text(), "used_percent": percent}
        self.warning = worst
        return worst

    async def release(self) -> None:
        """Give the reservation back unused (the stream never started)."""
        if self.hold is not None:
            hold, self.hold = self.hold, None
            if self.limits:
                await self.store.settle(self.identity, self.limits, hold, Amount(), time.time())

    def _amount(self, output_tokens: int) -> Amount:
        """The request's input as known (the estimate, or ``message_start``'s, its cache
        reads and writes priced) and ``output_tokens`` of output."""
        usage = {**self._usage, "output_tokens": output_tokens}
        cost = cost_of(usage, self.price) if self.price is not None else 0
        return Amount(self.input_tokens + output_tokens, cost)

    @property
    def money(self) -> bool:
        return any(limit.micro_usd is not None for limit in self.limits)

    def started(self, usage: dict[str, Any]) -> bool:
        """``message_start``'s usage: the exact input. True when the grant no longer covers
        the request's worst case (real input beat the estimate): a top-up is due."""
        self.input_tokens = _input(usage)
        self._usage = {key: value for key, value in usage.items() if key != "output_tokens"}
        self._cap = self._output_cap()
        return self._cap < self.max_output

    def metered(self, literal: bytes) -> bool:
        """One text delta (its JSON string literal): True when the request reached its grant,
        and must be topped up or cut. One token per :data:`BYTES_PER_TOKEN` bytes of ASCII,
        per two bytes of anything else (a CJK character is three bytes in UTF-8 and a token
        or more), at least one a delta: one addition and one comparison per delta."""
        size = len(literal)
        self.output_estimate += ((size >> 2) if literal.isascii() else (size >> 1)) or 1
        return self.output_estimate >= self._cap

    def metered_json(self, piece: str) -> bool:
        """A piece of a tool call's input, as :meth:`metered` meters text (thinking and any
        other block the model writes go there, encoded): JSON is dense, a token per three
        bytes of ASCII."""
        size = len(piece.encode())
        self.output_estimate += (size // 3 if piece.isascii() else size >> 1) or 1
        return self.output_estimate >= self._cap

    async def top_up(self) -> bool:
        """The request needs more than it was granted: take more of what the budget has
        left, atomically as the first reservation was (its worst case again, or room to go
        on), at least one more token. False at the hard limit: nothing more to take."""
        if self.hold is None:
            return True
        if self.lowered and self._cap >= self.max_output:
            return True  # the API stops at the max_tokens the grant left: its count is exact
        output = max(self.max_output, self.output_estimate + MIN_OUTPUT)
        granted = await self.store.reserve(
            self.identity,
            self.limits,
            self.hold,
            ask=self._amount(output),
            floor=self._amount(self.output_estimate + 1),
            ttl=self.hold_ttl,
            now=time.time(),
        )
        if isinstance(granted, Refusal):
            return self.output_estimate < self._cap
        self.granted = granted
        self._cap = self._output_cap()
        return self.output_estimate < self._cap

    def _output_cap(self) -> int:
        """The output tokens the grant leaves after the input: by tokens, and by money at the
        output rate once the input's cost (cache reads and writes priced) is known."""
        if not self.limits:
            return _UNLIMITED
        cap = self.granted.tokens - self.input_tokens
        if self.price is not None and self.money and self.price.output > 0:
            input_cost = cost_of(self._usage, self.price)
            left = self.granted.micro_usd * 1_000_000 - input_cost * 1_000_000
            cap = min(cap, left // self.price.output)
        return cap

    async def settle(self, usage: dict[str, Any] | None, *, ended: bool) -> Amount:
        """The request in flight is over: settle it at its exact usage (``ended``: the API
        reported it whole), else at what the meter saw. What it cost."""
        if self.hold is None:
            return Amount()
        final = dict(usage or {})
        if not ended:
            final["output_tokens"] = max(int(final.get("output_tokens") or 0), self.output_estimate)
            final.setdefault("input_tokens", self.input_tokens)
        spent = Amount(
            _input(final) + int(final.get("output_tokens") or 0),
            cost_of(final, self.price) if self.price is not None else 0,
        )
        hold, self.hold = self.hold, None
        if self.limits:
            await self.store.settle(self.identity, self.limits, hold, spent, time.time())
        try:
            await self.store.record(self, final, spent)
        except Exception:  # counted above; a lost ledger line must not fail the answer
            log.warning("stream %s: its usage could not be recorded", self.stream_id, exc_info=True)
        self.step += 1
        self.spent = Amount(
            self.spent.tokens + spent.tokens, self.spent.micro_usd + spent.micro_usd
        )
        return spent


#: the cap of a request no limit holds (it is only recorded)
_UNLIMITED = 1 << 62


def _input(usage: dict[str, Any]) -> int:
    return sum(
        int(usage.get(name) or 0)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def estimate_input(params: dict[str, Any]) -> int:
    """A request's input tokens, estimated: one per four bytes of its JSON (messages,
    system, tools), plus the framing the API adds (its tool-use system prompt with tools).
    Text of other scripts, PDFs and server tools' results can beat it: the grant is topped
    up when ``message_start`` says so."""
    size = len(json.dumps(params.get("messages") or [], ensure_ascii=False).encode())
    for name in ("system", "tools"):
        if params.get(name):
            size += len(json.dumps(params[name], ensure_ascii=False).encode())
    return size // 4 + 8 + (TOOLS_PROMPT_TOKENS if params.get("tools") else 0)


def usage_view(limits: Sequence[Limit], used: Sequence[Amount], now: float) -> list[dict[str, Any]]:
    """``GET /usage``'s limits: each with what was used and when it resets."""
    out = []
    for limit, amount in zip(limits, used, strict=True):
        start, end = limit.period.window(now)
        out.append(
            {
                "limit": limit.text(),
                "period": limit.period.name,
                "period_start": start,
                "resets_at": end,
                "limit_tokens": limit.tokens,
                "limit_usd": None if limit.micro_usd is None else limit.micro_usd / 1_000_000,
                "limit_micro_usd": limit.micro_usd,
                "used_tokens": amount.tokens,
                "used_usd": amount.micro_usd / 1_000_000,
                "used_micro_usd": amount.micro_usd,
            }
        )
    return out


#: ``@claude.budget``: ``fn(identity) -> a CLAUDE_BUDGET string, a list of them, or None``
BudgetHook = Callable[[str], Any]


class Budgets:
    """An app's budgets: the ledger, each identity's limits (the ``@claude.budget`` hook's,
    read each time, else ``CLAUDE_BUDGET``), and each answer's :class:`Spend` as a policy,
    metered against them, or only recorded when there are none."""

    def __init__(
        self,
        ledger: LedgerStore,
        config: ClaudeConfig,
        telemetry: Telemetry,
        hook: Callable[[], BudgetHook | None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.telemetry = telemetry
        self._hook = hook

    async def limits_for(self, identity: str) -> tuple[Limit, ...]:
        """The identity's budget: the ``@claude.budget`` hook's, else ``CLAUDE_BUDGET``."""
        hook = self._hook()
        if hook is None:
            return self.config.budget
        chosen = hook(identity)
        if inspect.isawaitable(chosen):
            chosen = await chosen
        return _limits(chosen)

    async def for_answer(self, answer: Answer, context: AnswerContext) -> Policy | None:
        try:
            limits = await self.limits_for(context.identity)  # none: recorded only
        except Exception:
            if context.prior is None:
                raise  # a new answer: the send is a 503
            log.exception("stream %s: its budget could not be read; unmetered", context.stream_id)
            return None
        request, config = context.request, self.config
        spend = Spend(
            self.ledger,
            context.identity,
            limits,
            price_of(request.model, config.prices),
            request.model,
            context.stream_id,
            context.conversation_id,
            warn_at=config.budget_warn_at,
            hold_ttl=config.budget_hold_ttl,
        )
        if not limits:
            return Recorded(spend, self.telemetry)
        return Metered(spend, self.telemetry, opening=context.prior is None)


class Recorded(Policy):
    """An answer's requests reserved, settled and recorded in the ledger (no limits)."""

    def __init__(self, spend: Spend, telemetry: Telemetry) -> None:
        self.spend = spend
        self.telemetry = telemetry

    async def before_request(self, answer: Answer, attempt: Attempt) -> None:
        await self.spend.reserve(attempt.params)

    async def after_request(self, answer: Answer, attempt: Attempt) -> None:
        spend = self.spend
        spent = await spend.settle(attempt.usage, ended=attempt.ended)
        self.telemetry.spent(spend.model, spent.micro_usd)
        answer.cost_micro_usd = spend.spent.micro_usd

    async def release(self) -> None:
        await self.spend.release()


class Metered(Recorded):
    """An answer with limits: each request reserved before it is made (the first one's
    refusal is the send's 429), fitted to its grant, metered as it streams, topped up or cut,
    settled after; a warning near a limit on ``start`` and ``done``."""

    def __init__(self, spend: Spend, telemetry: Telemetry, *, opening: bool) -> None:
        super().__init__(spend, telemetry)
        self.first = opening  # the next reservation is the send's first
        self.due = False  # the request passed its grant: a top-up, or the cut, comes next

    async def before_request(self, answer: Answer, attempt: Attempt) -> None:
        spend = self.spend
        refusal = await spend.reserve(attempt.params)
        opening, self.first = self.first, False
        if refusal is not None:
            if opening:
                self.telemetry.budget_rejected()
                raise BudgetRefused(refusal)
            self.telemetry.budget_cut()
            raise Stop("budget_exhausted")
        if opening:
            warning = await spend.check()
            if warning is not None:
                answer.start_fields["budget_warning"] = warning
        attempt.params = spend.fitted(attempt.params)

    def started(self, attempt: Attempt) -> bool:
        self.due = self.spend.started(attempt.usage) or self.due
        return self.due

    def wrote(self, literal: bytes) -> bool:
        if self.spend.metered(literal):
            self.due = True
        return self.due

    def wrote_other(self, piece: str, *, json: bool) -> bool:
        spend = self.spend
        if spend.metered_json(piece) if json else spend.metered(piece.encode()):
            self.due = True
        return self.due

    async def checkpoint(self, answer: Answer, attempt: Attempt) -> None:
        if not self.due:
            return  # another policy's checkpoint
        self.due = False
        if not await self.spend.top_up():
            self.telemetry.budget_cut()
            raise Stop("budget_exhausted")  # leaving the block closes the request

    async def after_request(self, answer: Answer, attempt: Attempt) -> None:
        self.due = False
        if self.spend.lowered and attempt.stop_reason == "max_tokens":  # the budget's
            self.telemetry.budget_cut()
            attempt.stop_reason = "budget_exhausted"
            answer.stopped = True
        await super().after_request(answer, attempt)
        if attempt.ended and attempt.stop_reason != "tool_use":  # the answer's last: done's
            await self.spend.check()

    async def ending(self, answer: Answer, event: dict[str, Any]) -> None:
        if event["type"] == "done" and self.spend.warning is not None:
            event["budget_warning"] = self.spend.warning


def _limits(chosen: Any) -> tuple[Limit, ...]:
    """What a budget hook returned, as limits (None or empty: unlimited)."""
    if not chosen:
        return ()
    if isinstance(chosen, str | Limit):
        return parse_budget("the budget hook's value", chosen)
    return tuple(limit for item in chosen for limit in _limits(item))
