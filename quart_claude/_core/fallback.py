"""Fallback chains: when a model's retries are spent, the answer goes on with the next hop.

``CLAUDE_FALLBACKS`` lists the hops after the requested model; ``CLAUDE_FALLBACK_ON`` the
classes that move (``rate_limit`` only when its ``retry-after`` is longer than
``CLAUDE_RETRY_MAX_DELAY``); ``token_limit`` moves only to a hop marked ``larger_context``;
``invalid_request`` never moves; authentication and permission errors move only to another
provider. A hop that failed cools down for ``CLAUDE_FALLBACK_COOLDOWN`` seconds (or its
``retry-after``, if longer), in this worker or, with Redis, for every worker: a storm costs one
failed request per hop, not one per stream. A :class:`Chain` is one answer's walk along the
hops, owned by the answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .answer import Target
from .params import without_thinking
from .policy import Policy
from .protocol import ERROR_CLASSES, UpstreamError
from .providers import SETTING_FIELDS, Endpoint

if TYPE_CHECKING:
    from .answer import Answer
    from .config import ClaudeConfig
    from .policy import AnswerContext
    from .request import ChatRequest
    from .telemetry import Telemetry

__all__ = [
    "DEFAULT_ON",
    "Chain",
    "Cooldowns",
    "FallbackPolicy",
    "Fallbacks",
    "Hop",
    "MemoryCooldowns",
    "RedisCooldowns",
    "on_hop",
    "parse_fallback_on",
    "parse_server_fallbacks",
    "parse_fallbacks",
]

log = logging.getLogger("quart_claude")

DEFAULT_ON = frozenset({"overloaded", "server_error", "timeout", "network_error", "rate_limit"})
_AUTH = frozenset({"auth_error", "permission_error"})
_HOP_FIELDS = frozenset({"model", "provider", "max_tokens", "larger_context", "thinking"})


@dataclass(frozen=True, slots=True)
class Hop:
    """One model of the chain (the first is the request's own)."""

    model: str  # the provider's own id
    endpoint: Endpoint | None = None  # None: the app's own (CLAUDE_PROVIDER and its settings)
    max_tokens: int | None = None  # None: the request's
    larger_context: bool = False  # token_limit may move here
    thinking: str | int | None = None  # None: CLAUDE_THINKING; "off" for a model without it


def parse_fallbacks(key: str, value: Any) -> tuple[Hop, ...]:
    """``[{"model": "claude-haiku-4-5", "max_tokens": 2048, "larger_context": false},
    {"model": "anthropic.claude-sonnet-4-5-20250929-v1:0", "provider": "bedrock",
    "region": "us-east-1", "thinking": "off"}]``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{key} must be a JSON list of hops") from None
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key} must be a list of hops, got {value!r}")
    hops = []
    for item in value:
        if isinstance(item, Hop):
            hops.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("model"), str):
            raise ValueError(f"{key}: each hop needs a 'model', got {item!r}")
        hops.append(_hop(key, item))
    return tuple(hops)


def _hop(key: str, item: dict[str, Any]) -> Hop:
    unknown = set(item) - _HOP_FIELDS - set(SETTING_FIELDS)
    if unknown:
        raise ValueError(f"{key}: unknown hop field(s) {sorted(unknown)}")
    endpoint = None
    if "provider" in item or any(name in item for name in SETTING_FIELDS):
        endpoint = Endpoint.parse(key, item)
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise ValueError(f"{key}: a hop's max_tokens is a positive integer")
    thinking = item.get("thinking")
    if thinking is not None and thinking not in ("off", "adaptive") and type(thinking) is not int:
        raise ValueError(f"{key}: a hop's thinking is 'off', 'adaptive' or a budget in tokens")
    return Hop(item["model"], endpoint, max_tokens, bool(item.get("larger_context")), thinking)


SERVER_FALLBACK_FIELDS = frozenset({"model", "max_tokens", "thinking", "output_config", "speed"})


def parse_server_fallbacks(key: str, value: Any) -> str | tuple[dict[str, Any], ...] | None:
    """``CLAUDE_SERVER_FALLBACKS``: the API's own ``fallbacks`` for refusals: ``"default"``
    (the model's server-defined chain) or ``[{"model": "claude-opus-4-8"}, ...]``."""
    if value in (None, "", ()):
        return None
    if value == "default":
        return "default"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{key} must be 'default' or a JSON list of models") from None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{key} must be 'default' or a non-empty list, got {value!r}")
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise ValueError(f"{key}: each entry needs a 'model', got {entry!r}")
        unknown = set(entry) - SERVER_FALLBACK_FIELDS
        if unknown:
            raise ValueError(f"{key}: unknown field(s) {sorted(unknown)}")
    return tuple(dict(entry) for entry in value)


def parse_fallback_on(key: str, value: Any) -> frozenset[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    unknown = set(names) - set(ERROR_CLASSES)
    if unknown:
        raise ValueError(f"{key}: unknown error class(es) {sorted(unknown)}")
    return frozenset(name for name in names if name)


class Cooldowns(Protocol):
    async def cooling(self, name: str) -> bool: ...

    async def cool(self, name: str, seconds: float) -> None: ...


class MemoryCooldowns:
    """This worker's hops cooling down."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    async def cooling(self, name: str) -> bool:
        return self._until.get(name, 0.0) > time.monotonic()

    async def cool(self, name: str, seconds: float) -> None:
        self._until[name] = max(self._until.get(name, 0.0), time.monotonic() + seconds)


class RedisCooldowns:
    """Cooldowns every worker shares: one key per hop, expiring with its cooldown."""

    def __init__(self, redis: Any, prefix: str = "qc:cooldown") -> None:
        self.redis = redis
        self.prefix = prefix

    async def cooling(self, name: str) -> bool:
        return bool(await self.redis.exists(f"{self.prefix}:{name}"))

    async def cool(self, name: str, seconds: float) -> None:
        await self.redis.set(f"{self.prefix}:{name}", "1", px=max(1, int(seconds * 1000)))


@dataclass(slots=True)
class Chain:
    """One answer's walk along the hops: where it is, how often it moved, what it tried."""

    hops: tuple[Hop, ...]
    fallback_on: frozenset[str]
    max_moves: int
    cooldown: float
    retry_max_delay: float
    primary: Endpoint = field(default_factory=Endpoint)  # a hop's endpoint when it names none
    at: int = 0
    moves: int = 0
    tried: list[str] = field(default_factory=list)
    #: the last hop put on cooldown, and for how long (for the metrics)
    cooled: tuple[str, float] | None = None

    @property
    def hop(self) -> Hop:
        return self.hops[self.at]

    @property
    def endpoint(self) -> Endpoint:
        """Where the current hop's requests go."""
        return self.endpoint_of(self.hop)

    def endpoint_of(self, hop: Hop) -> Endpoint:
        return hop.endpoint or self.primary

    def cooling_key(self, hop: Hop) -> str:
        """A hop's name in the cooldowns: its endpoint and its model."""
        return f"{self.endpoint_of(hop).key}:{hop.model}"

    async def start(self, cooldowns: Cooldowns) -> None:
        """Begin on the first hop that is not cooling down (the last one if all are)."""
        for index, hop in enumerate(self.hops):
            if not await cooldowns.cooling(self.cooling_key(hop)) or index == len(self.hops) - 1:
                self.at = index
                break
        self.tried = [self.hop.model]

    def resume(self, at: int, tried: list[str]) -> None:
        """Go on where another worker's walk was (a takeover): on hop ``at``, its moves
        counted."""
        if 0 <= at < len(self.hops):
            self.at, self.moves, self.tried = at, max(0, len(tried) - 1), list(tried)

    def _may_take(self, hop: Hop, error: UpstreamError) -> bool:
        """Whether ``hop`` could answer where the current one failed with ``error``."""
        if error.error_class == "token_limit":
            return hop.larger_context
        if error.error_class in _AUTH:  # our credentials: only another provider's may work
            return self.endpoint_of(hop).provider != self.endpoint.provider
        return True

    def moves_on(self, error: UpstreamError) -> bool:
        """Whether ``error`` (the current hop's retries spent) may move to a later hop."""
        kind = error.error_class
        if kind in _AUTH:
            log.error(
                "the upstream refused our credentials (%s) on %s (%s)",
                kind,
                self.hop.model,
                self.endpoint.key,
            )
        if self.moves >= self.max_moves or self.at >= len(self.hops) - 1:
            return False
        if kind in _AUTH or kind == "token_limit":
            return any(self._may_take(hop, error) for hop in self.hops[self.at + 1 :])
        if kind == "rate_limit":  # a short wait is the retry policy's, not a reason to move
            return kind in self.fallback_on and (error.retry_after or 0) > self.retry_max_delay
        return kind in self.fallback_on

    async def next_hop(self, error: UpstreamError, cooldowns: Cooldowns) -> Hop | None:
        """Cool the failed hop and move to the next one that may take the answer."""
        if not self.moves_on(error):
            return None
        failed = self.cooling_key(self.hop)
        self.cooled = (failed, max(self.cooldown, error.retry_after or 0.0))
        await cooldowns.cool(*self.cooled)
        for index in range(self.at + 1, len(self.hops)):
            hop = self.hops[index]
            if not self._may_take(hop, error):
                continue
            if await cooldowns.cooling(self.cooling_key(hop)) and index < len(self.hops) - 1:
                continue
            self.at, self.moves = index, self.moves + 1
            self.tried.append(hop.model)
            return hop
        return None


def on_hop(request: ChatRequest, chain: Chain | None) -> ChatRequest:
    """The request as the chain's current hop takes it: its model, its ``max_tokens``, and
    no thinking the requested model wrote (the history's thinking is bound to it)."""
    if chain is None or (chain.hop.model == request.model and chain.endpoint == chain.primary):
        return request
    hop = chain.hop
    messages = [
        {**m, "content": without_thinking(m["content"])} if m.get("role") == "assistant" else m
        for m in request.messages
    ]
    return dataclasses.replace(
        request, model=hop.model, max_tokens=hop.max_tokens or request.max_tokens, messages=messages
    )


class Fallbacks:
    """``CLAUDE_FALLBACKS``: each answer's walk along the chain, as a policy. ``cooldowns``:
    this worker's, or Redis's (the state sets them at startup)."""

    def __init__(self, config: ClaudeConfig, primary: Endpoint, telemetry: Telemetry) -> None:
        self.config = config
        self.primary = primary
        self.telemetry = telemetry
        self.cooldowns: Cooldowns = MemoryCooldowns()

    async def for_answer(self, answer: Answer, context: AnswerContext) -> Policy | None:
        config, request = self.config, context.request
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
        prior = context.prior
        if prior is not None and prior.moves:  # a takeover goes on at the last move's hop
            moves = prior.moves
            chain.resume(
                int(moves[-1].get("hop", 0)),
                [str(moves[0]["from"])] + [str(move["to"]) for move in moves],
            )
        policy = FallbackPolicy(self, chain, request)
        policy.place(answer)
        return policy


class FallbackPolicy(Policy):
    """One answer's chain: a request that failed past its retries moves the answer to the
    next hop that may take it (announced by a ``fallback`` event, after ``start``)."""

    def __init__(self, fallbacks: Fallbacks, chain: Chain, request: ChatRequest) -> None:
        self.fallbacks = fallbacks
        self.chain = chain
        self.request = request  # as asked, before any hop rewrote it

    def place(self, answer: Answer) -> None:
        """Put the answer on the chain's current hop."""
        chain = self.chain
        hop = chain.hop
        thinking = hop.thinking if hop.thinking is not None else self.fallbacks.config.thinking
        target = Target(hop.model, chain.endpoint, thinking, chain.at)
        if target != answer.target:
            answer.move(target, on_hop(self.request, chain))

    async def failed(self, answer: Answer, error: UpstreamError) -> bool:
        chain, telemetry = self.chain, self.fallbacks.telemetry
        failed = chain.hop.model
        try:
            hop = await chain.next_hop(error, self.fallbacks.cooldowns)
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
        telemetry.fell_back(failed, hop.model, error.error_class, phase)
        if chain.cooled is not None:
            telemetry.cooled(*chain.cooled)
        self.place(answer)
        if answer.stream.events:
            answer.tell(event)
        else:  # readers see start first: it follows the next hop's message_start
            answer.after_start.append(event)
        return True

    async def ending(self, answer: Answer, event: dict[str, Any]) -> None:
        if event["type"] == "done":  # which hop finished it
            event["model"] = answer.served_by
        elif len(self.chain.tried) > 1:
            event["hops"] = list(self.chain.tried)  # every hop tried, in order
