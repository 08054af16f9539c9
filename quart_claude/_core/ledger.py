"""Where budgets are counted and usage is recorded: one small interface, two stores.

:class:`MemoryLedger` is this worker's own (counts are per worker: documented as such);
:class:`RedisLedger` is shared by every worker and host on the stream store's Redis, each
reservation one Lua script, so concurrent requests can never reserve past a limit together.
A reservation (a *hold*) carries its expiry: a worker killed mid-request leaves one that the
next reservation sweeps away after ``CLAUDE_BUDGET_HOLD_TTL``. A reservation under the id of
a hold that exists replaces it (a top-up: the hold grows, checked against what is left as the
first one was). All of one identity's keys share a
hash tag, so each script runs in one slot of a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .budget import Amount, Limit, Refusal

if TYPE_CHECKING:
    from .budget import Spend

__all__ = [
    "DAY_SECONDS",
    "LedgerEntry",
    "LedgerStore",
    "MemoryLedger",
    "RedisLedger",
    "Window",
    "day_view",
    "windows",
]

#: ledger entries kept: per worker in memory, per identity in Redis
KEEP_ENTRIES = 10_000
DAY_SECONDS = 86400


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One upstream request's usage, raw (so it can be repriced) and priced."""

    at: float
    identity: str
    stream_id: str
    step: int
    model: str
    conversation_id: str | None
    input_tokens: int
    output_tokens: int
    thinking_tokens: int
    cache_read_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    web_search_requests: int
    web_fetch_requests: int
    cost_micro_usd: int

    @classmethod
    def of(cls, spend: Spend, usage: dict[str, Any], spent: Amount) -> LedgerEntry:
        creation = usage.get("cache_creation") or {}
        tools = usage.get("server_tool_use") or {}
        details = usage.get("output_tokens_details") or {}
        five = creation.get("ephemeral_5m_input_tokens")
        return cls(
            at=time.time(),
            identity=spend.identity,
            stream_id=spend.stream_id,
            step=spend.step,
            model=spend.model,
            conversation_id=spend.conversation_id,
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            thinking_tokens=_int(details.get("thinking_tokens")),
            cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
            cache_write_5m_tokens=_int(
                five if creation else usage.get("cache_creation_input_tokens")
            ),
            cache_write_1h_tokens=_int(creation.get("ephemeral_1h_input_tokens")),
            web_search_requests=_int(tools.get("web_search_requests")),
            web_fetch_requests=_int(tools.get("web_fetch_requests")),
            cost_micro_usd=spent.micro_usd,
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Window:
    """One period's counters of one identity: the token and money limits it enforces."""

    name: str  # "<period>:<start>"
    start: int
    end: int
    tokens: int  # -1: no token limit in this period
    micro_usd: int  # -1: no money limit
    limit: Limit  # the one a refusal names

    def fit(self, used: Amount, held: Amount, grant: Amount, floor: Amount) -> Amount | None:
        """What of ``grant`` this period leaves room for after what is ``used`` and
        ``held``; None when not even ``floor`` fits (the Lua script does the same)."""
        left_t = self.tokens - used.tokens - held.tokens
        left_m = self.micro_usd - used.micro_usd - held.micro_usd
        if (self.tokens >= 0 and left_t < floor.tokens) or (
            self.micro_usd >= 0 and left_m < floor.micro_usd
        ):
            return None
        return Amount(
            min(grant.tokens, left_t) if self.tokens >= 0 else grant.tokens,
            min(grant.micro_usd, left_m) if self.micro_usd >= 0 else grant.micro_usd,
        )


def windows(limits: Sequence[Limit], now: float) -> list[Window]:
    by_period: dict[str, Window] = {}
    for limit in limits:
        start, end = limit.period.window(now)
        name = f"{limit.period.name}:{start}"
        known = by_period.get(name)
        tokens = limit.tokens if limit.tokens is not None else (known.tokens if known else -1)
        micro = (
            limit.micro_usd if limit.micro_usd is not None else (known.micro_usd if known else -1)
        )
        by_period[name] = Window(name, start, end, tokens, micro, known.limit if known else limit)
    return list(by_period.values())


class LedgerStore(Protocol):
    """What :class:`budget.Spend` and ``GET /usage`` need from a store."""

    async def reserve(
        self,
        identity: str,
        limits: Sequence[Limit],
        hold: str,
        *,
        ask: Amount,
        floor: Amount,
        ttl: float,
        now: float,
    ) -> Amount | Refusal:
        """Hold up to ``ask`` (at least ``floor``) of what every limit leaves, atomically;
        under the id of an existing hold, replace it (that hold is not counted as taken).
        A refusal leaves an existing hold as it was."""

    async def settle(
        self, identity: str, limits: Sequence[Limit], hold: str, spent: Amount, now: float
    ) -> None: ...

    async def record(self, spend: Spend, usage: dict[str, Any], spent: Amount) -> None: ...

    async def used(self, identity: str, limits: Sequence[Limit], now: float) -> list[Amount]: ...

    async def days(self, identity: str, count: int, now: float) -> list[dict[str, Any]]: ...

    async def entries(self, identity: str) -> list[LedgerEntry]: ...


@dataclass(slots=True)
class _Counters:
    used: Amount = field(default_factory=Amount)
    holds: dict[str, tuple[Amount, float]] = field(default_factory=dict)  # hold -> (amount, expiry)


class MemoryLedger:
    """This worker's own counts and entries (a budget per worker, not per deployment)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], _Counters] = {}
        self._days: dict[tuple[str, int], list[int]] = {}  # (identity, day) -> tokens, µ$, requests
        self._entries: deque[LedgerEntry] = deque(maxlen=KEEP_ENTRIES)

    def _window(self, identity: str, window: Window, now: float) -> _Counters:
        counters = self._counters.setdefault((identity, window.name), _Counters())
        for hold, (_, expiry) in list(counters.holds.items()):
            if expiry < now:
                del counters.holds[hold]
        return counters

    async def reserve(
        self,
        identity: str,
        limits: Sequence[Limit],
        hold: str,
        *,
        ask: Amount,
        floor: Amount,
        ttl: float,
        now: float,
    ) -> Amount | Refusal:
        granted = ask
        open_windows = windows(limits, now)
        for window in open_windows:
            counters = self._window(identity, window, now)
            holds = [amount for other, (amount, _) in counters.holds.items() if other != hold]
            held = Amount(sum(a.tokens for a in holds), sum(a.micro_usd for a in holds))
            fitted = window.fit(counters.used, held, granted, floor)
            if fitted is None:
                return Refusal(window.limit, counters.used, window.end)
            granted = fitted
        for window in open_windows:
            self._window(identity, window, now).holds[hold] = (granted, now + ttl)
        return granted

    async def settle(
        self, identity: str, limits: Sequence[Limit], hold: str, spent: Amount, now: float
    ) -> None:
        for window in windows(limits, now):
            counters = self._window(identity, window, now)
            counters.holds.pop(hold, None)
            counters.used = Amount(
                counters.used.tokens + spent.tokens, counters.used.micro_usd + spent.micro_usd
            )

    async def record(self, spend: Spend, usage: dict[str, Any], spent: Amount) -> None:
        entry = LedgerEntry.of(spend, usage, spent)
        self._entries.append(entry)
        day = self._days.setdefault((spend.identity, int(entry.at) // DAY_SECONDS), [0, 0, 0])
        day[0] += spent.tokens
        day[1] += spent.micro_usd
        day[2] += 1

    async def used(self, identity: str, limits: Sequence[Limit], now: float) -> list[Amount]:
        by_name = {w.name: self._window(identity, w, now).used for w in windows(limits, now)}
        return [by_name[f"{limit.period.name}:{limit.period.window(now)[0]}"] for limit in limits]

    async def days(self, identity: str, count: int, now: float) -> list[dict[str, Any]]:
        today = int(now) // DAY_SECONDS
        out = []
        for day in range(today - count + 1, today + 1):
            tokens, micro, requests = self._days.get((identity, day), (0, 0, 0))
            out.append(day_view(day, tokens, micro, requests))
        return out

    async def entries(self, identity: str) -> list[LedgerEntry]:
        return [entry for entry in self._entries if entry.identity == identity]


def day_view(day: int, tokens: int, micro: int, requests: int) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime(day * DAY_SECONDS)),
        "tokens": tokens,
        "usd": micro / 1_000_000,
        "micro_usd": micro,
        "requests": requests,
    }


_RESERVE = """
local now, hold = tonumber(ARGV[1]), ARGV[2]
local grant_t, grant_m = tonumber(ARGV[3]), tonumber(ARGV[4])
local floor_t, floor_m, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for i, key in ipairs(KEYS) do
  local lt, lm = tonumber(ARGV[5 + i * 3]), tonumber(ARGV[6 + i * 3])
  local fields = redis.call('HGETALL', key)
  local used_t, used_m, held_t, held_m = 0, 0, 0, 0
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if name == 'used_t' then used_t = tonumber(value)
    elseif name == 'used_m' then used_m = tonumber(value)
    elseif name ~= 'h:' .. hold then  -- a top-up replaces its own hold
      local t, m, expiry = string.match(value, '^(%d+):(%d+):(%d+)$')
      if tonumber(expiry) < now then
        redis.call('HDEL', key, name)
      else
        held_t, held_m = held_t + tonumber(t), held_m + tonumber(m)
      end
    end
  end
  local left_t, left_m = lt - used_t - held_t, lm - used_m - held_m
  if (lt >= 0 and left_t < floor_t) or (lm >= 0 and left_m < floor_m) then
    return {0, i, used_t, used_m}
  end
  if lt >= 0 and left_t < grant_t then grant_t = left_t end
  if lm >= 0 and left_m < grant_m then grant_m = left_m end
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'h:' .. hold, grant_t .. ':' .. grant_m .. ':' .. (now + ttl))
  redis.call('PEXPIREAT', key, tonumber(ARGV[7 + i * 3]))
end
return {1, grant_t, grant_m}
"""

# KEYS: the windows; ARGV: hold, tokens, µ$, then each window's expiry (ms)
_SETTLE = """
for i = 1, #KEYS do
  redis.call('HDEL', KEYS[i], 'h:' .. ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'used_t', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'used_m', ARGV[3])
  redis.call('PEXPIREAT', KEYS[i], tonumber(ARGV[3 + i]))
end
return 1
"""

# KEYS: the ledger stream, the day; ARGV: tokens, µ$, the cap, then the entry's fields
_RECORD = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('HINCRBY', KEYS[2], 'used_t', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'used_m', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('EXPIRE', KEYS[2], 40 * 86400)
return 1
"""


class RedisLedger:
    """Counts and entries in Redis, shared by every worker and host."""

    def __init__(self, redis: Any, prefix: str = "qcb") -> None:
        self.redis = redis
        self.prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._record = redis.register_script(_RECORD)

    def _tag(self, identity: str) -> str:
        digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
        return f"{self.prefix}:{{{digest}}}"  # one hash tag: one cluster slot per identity

    def _keys(self, identity: str, open_windows: Sequence[Window]) -> list[str]:
        tag = self._tag(identity)
        return [f"{tag}:w:{window.name}" for window in open_windows]

    async def reserve(
        self,
        identity: str,
        limits: Sequence[Limit],
        hold: str,
        *,
        ask: Amount,
        floor: Amount,
        ttl: float,
        now: float,
    ) -> Amount | Refusal:
        open_windows = windows(limits, now)
        args: list[Any] = [int(now * 1000), hold, ask.tokens, ask.micro_usd]
        args += [floor.tokens, floor.micro_usd, int(ttl * 1000)]
        for window in open_windows:
            args += [window.tokens, window.micro_usd, (window.end + DAY_SECONDS) * 1000]
        result = await self._reserve(keys=self._keys(identity, open_windows), args=args)
        if int(result[0]) == 1:
            return Amount(int(result[1]), int(result[2]))
        window = open_windows[int(result[1]) - 1]
        return Refusal(window.limit, Amount(int(result[2]), int(result[3])), window.end)

    async def settle(
        self, identity: str, limits: Sequence[Limit], hold: str, spent: Amount, now: float
    ) -> None:
        open_windows = windows(limits, now)
        args: list[Any] = [hold, spent.tokens, spent.micro_usd]
        args += [(window.end + DAY_SECONDS) * 1000 for window in open_windows]
        await self._settle(keys=self._keys(identity, open_windows), args=args)

    def _day_key(self, identity: str, now: float) -> str:
        return f"{self._tag(identity)}:d:{int(now) // DAY_SECONDS}"

    async def record(self, spend: Spend, usage: dict[str, Any], spent: Amount) -> None:
        """The entry and the day's counts, in one script (one slot: the identity's tag)."""
        entry = LedgerEntry.of(spend, usage, spent)
        fields = [
            part
            for name, value in asdict(entry).items()
            for part in (name, "" if value is None else str(value))
        ]
        keys = [f"{self._tag(spend.identity)}:ledger", self._day_key(spend.identity, entry.at)]
        await self._record(keys=keys, args=[spent.tokens, spent.micro_usd, KEEP_ENTRIES, *fields])

    async def used(self, identity: str, limits: Sequence[Limit], now: float) -> list[Amount]:
        out = []
        for limit in limits:
            window = windows([limit], now)[0]
            used = await self.redis.hmget(self._keys(identity, [window])[0], "used_t", "used_m")
            out.append(Amount(int(used[0] or 0), int(used[1] or 0)))
        return out

    async def days(self, identity: str, count: int, now: float) -> list[dict[str, Any]]:
        today = int(now) // DAY_SECONDS
        out = []
        for day in range(today - count + 1, today + 1):
            key = f"{self._tag(identity)}:d:{day}"
            tokens, micro, requests = await self.redis.hmget(key, "used_t", "used_m", "requests")
            out.append(day_view(day, int(tokens or 0), int(micro or 0), int(requests or 0)))
        return out

    async def entries(self, identity: str) -> list[LedgerEntry]:
        rows = await self.redis.xrange(f"{self._tag(identity)}:ledger")
        return [_entry(fields) for _, fields in rows]


def _entry(fields: dict[Any, Any]) -> LedgerEntry:
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    numbers = {
        k: int(v)
        for k, v in text.items()
        if k not in ("at", "identity", "stream_id", "model", "conversation_id")
    }
    return LedgerEntry(
        at=float(text["at"]),
        identity=text["identity"],
        stream_id=text["stream_id"],
        model=text["model"],
        conversation_id=text["conversation_id"] or None,
        **numbers,
    )
