"""What a request cost: a dated price table, and usage priced to the micro-dollar.

Rates are integers, micro-dollars per million tokens, so a cost is exact integer arithmetic
(one rounding, half up, per request). Source: the Claude API pricing page
(platform.claude.com/docs/en/about-claude/pricing), read on :data:`PRICES_DATE`; override or
extend with ``CLAUDE_PRICES``. Raw token counts are what the ledger keeps, so usage can be
repriced when the table changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .model_ids import canonical_model

__all__ = ["PRICES", "PRICES_DATE", "Price", "cost_of", "parse_prices", "price_of"]

PRICES_DATE = "2026-12-01"
_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """One model's rates, in micro-dollars per million tokens (per request for server tools)."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    web_search: int = 10_000  # $10 per 1,000 searches
    web_fetch: int = 0  # tokens only

    @classmethod
    def usd(cls, inp: float, w5: float, w1: float, read: float, out: float) -> Price:
        """From the pricing page's columns: USD per MTok."""
        return cls(_micro(inp), _micro(out), _micro(w5), _micro(w1), _micro(read))


def _micro(usd: float) -> int:
    return round(usd * _MILLION)


#: The current models (base input, 5-minute cache write, 1-hour cache write, cache read,
#: output; USD per million tokens). Haiku 5.5 is its band for prompts up to 100k tokens.
PRICES: dict[str, Price] = {
    "claude-fable-5-1": Price.usd(10, 12.5, 20, 0.25, 50),
    "claude-mythos-5-1": Price.usd(10, 12.5, 20, 0.25, 50),
    "claude-fable-5": Price.usd(10, 12.5, 20, 1, 50),
    "claude-mythos-5": Price.usd(10, 12.5, 20, 1, 50),
    "claude-opus-5-5": Price.usd(4, 5, 8, 0.2, 20),
    "claude-opus-5": Price.usd(5, 6.25, 10, 0.5, 25),
    "claude-opus-4-8": Price.usd(5, 6.25, 10, 0.5, 25),
    "claude-opus-4-7": Price.usd(5, 6.25, 10, 0.5, 25),
    "claude-opus-4-6": Price.usd(5, 6.25, 10, 0.5, 25),
    "claude-opus-4-5": Price.usd(5, 6.25, 10, 0.5, 25),
    "claude-opus-4-1": Price.usd(15, 18.75, 30, 1.5, 75),
    "claude-opus-4": Price.usd(15, 18.75, 30, 1.5, 75),
    "claude-sonnet-5-5": Price.usd(2, 2.5, 4, 0.1, 10),  # cache reads $0.10 from 2026-10-07
    "claude-sonnet-5": Price.usd(2, 2.5, 4, 0.2, 10),
    "claude-sonnet-4-6": Price.usd(3, 3.75, 6, 0.3, 15),
    "claude-sonnet-4-5": Price.usd(3, 3.75, 6, 0.3, 15),
    "claude-sonnet-4": Price.usd(3, 3.75, 6, 0.3, 15),
    "claude-haiku-5-5": Price.usd(0.1, 0.125, 0.2, 0.01, 0.5),
    "claude-haiku-4-5": Price.usd(1, 1.25, 2, 0.1, 5),
    "claude-haiku-3-5": Price.usd(0.8, 1, 1.6, 0.08, 4),
}

_SNAPSHOT = re.compile(r"-\d{8}$")  # claude-sonnet-4-5-20250929 is claude-sonnet-4-5
_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


def price_of(model: str, table: Mapping[str, Price]) -> Price | None:
    """``model``'s price: its own row, or its first-party id's (a Bedrock or Vertex id), or
    its snapshot's family (``-YYYYMMDD`` dropped)."""
    first_party = canonical_model(model)
    return table.get(model) or table.get(first_party) or table.get(_SNAPSHOT.sub("", first_party))


def parse_prices(key: str, value: Any) -> dict[str, Price]:
    """``CLAUDE_PRICES``: ``{"model": {"input": 3, "output": 15, ...}}`` in USD per million
    tokens (``web_search``: USD per request), over the shipped table. Raises ValueError."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{key} must be a JSON object of model prices") from None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object of model prices, got {value!r}")
    table = dict(PRICES)
    for model, rates in value.items():
        if not isinstance(rates, dict) or not {"input", "output"} <= set(rates):
            raise ValueError(f"{key}: {model!r} needs at least 'input' and 'output' (USD/MTok)")
        unknown = set(rates) - {*_FIELDS, "web_search", "web_fetch"}
        if unknown or not all(_rate(r) for r in rates.values()):
            raise ValueError(f"{key}: {model!r} has an unknown or negative rate: {rates!r}")
        inp = float(rates["input"])
        table[str(model)] = Price(
            input=_micro(inp),
            output=_micro(float(rates["output"])),
            cache_write_5m=_micro(float(rates.get("cache_write_5m", inp * 1.25))),
            cache_write_1h=_micro(float(rates.get("cache_write_1h", inp * 2))),
            cache_read=_micro(float(rates.get("cache_read", inp * 0.1))),
            web_search=_micro(float(rates.get("web_search", 0.01))),
            web_fetch=_micro(float(rates.get("web_fetch", 0))),
        )
    return table


def _rate(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def cost_of(usage: Mapping[str, Any], price: Price) -> int:
    """One request's cost in micro-dollars, from its final usage: input, output (thinking
    included), cache writes by their lifetime, cache reads, server-tool requests, and the
    compaction iterations (billed, but only in ``usage.iterations``)."""
    scaled = _tokens_cost(usage, price)
    for iteration in usage.get("iterations") or ():
        if isinstance(iteration, Mapping) and iteration.get("type") == "compaction":
            scaled += _tokens_cost(iteration, price)
    tools = usage.get("server_tool_use") or {}
    requests = _int(tools.get("web_search_requests")) * price.web_search
    requests += _int(tools.get("web_fetch_requests")) * price.web_fetch
    return (scaled + _MILLION // 2) // _MILLION + requests


def _tokens_cost(usage: Mapping[str, Any], price: Price) -> int:
    """Tokens times rates, in micro-dollars times a million (rounded once, by the caller)."""
    creation = usage.get("cache_creation") or {}
    five = _int(creation.get("ephemeral_5m_input_tokens"))
    hour = _int(creation.get("ephemeral_1h_input_tokens"))
    if not creation:  # no split reported: every write is a 5-minute one
        five = _int(usage.get("cache_creation_input_tokens"))
    return (
        _int(usage.get("input_tokens")) * price.input
        + _int(usage.get("output_tokens")) * price.output
        + five * price.cache_write_5m
        + hour * price.cache_write_1h
        + _int(usage.get("cache_read_input_tokens")) * price.cache_read
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
