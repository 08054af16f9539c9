"""The price table prices the recorded real streams' usage to the micro-dollar (issue 24):
cache writes by lifetime, cache reads, thinking (in output), server-tool requests,
compaction iterations."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from quart_claude import SSEParser
from quart_claude._core.prices import PRICES, cost_of, parse_prices, price_of

from . import binaries

pytestmark = pytest.mark.core

RECORDINGS = binaries.recordings() or Path("/nonexistent/recorded-streams")
NAMES = sorted(p.name for p in RECORDINGS.glob("*.sse")) or ["(the recordings are missing)"]

#: the pricing page's rows, USD per MTok: input, 5m write, 1h write, cache read, output
PAGE = {
    "claude-sonnet-4": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4-5": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4-6": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-5": ("2", "2.50", "4", "0.20", "10"),
    "claude-haiku-4-5": ("1", "1.25", "2", "0.10", "5"),
    "claude-opus-4-6": ("5", "6.25", "10", "0.50", "25"),
    "claude-fable-5": ("10", "12.50", "20", "1", "50"),
}


def final_usage(name: str) -> tuple[str, dict[str, Any]]:
    model, usage = "", {}
    for sse in SSEParser().feed((RECORDINGS / name).read_bytes()):
        event = sse.json()
        if event.get("type") == "message_start":
            model = event["message"]["model"]
            usage = dict(event["message"].get("usage") or {})
        elif event.get("type") == "message_delta":
            usage.update(event.get("usage") or {})
    return model, usage


def by_hand(usage: dict[str, Any], rates: tuple[str, ...]) -> int:
    """The cost as the pricing page reads, in exact decimals, rounded once."""
    inp, w5, w1, read, out = (Decimal(r) for r in rates)
    creation = usage.get("cache_creation") or {}
    five = (
        creation.get("ephemeral_5m_input_tokens", 0)
        if creation
        else usage.get("cache_creation_input_tokens", 0)
    )
    usd = (
        usage.get("input_tokens", 0) * inp
        + usage.get("output_tokens", 0) * out
        + (five or 0) * w5
        + creation.get("ephemeral_1h_input_tokens", 0) * w1
        + (usage.get("cache_read_input_tokens") or 0) * read
    )
    for it in usage.get("iterations") or ():
        if it.get("type") == "compaction":
            usd += it["input_tokens"] * inp + it["output_tokens"] * out
    # tokens times USD per million tokens is micro-dollars
    micro = usd.quantize(Decimal(1), ROUND_HALF_UP)
    searches = int((usage.get("server_tool_use") or {}).get("web_search_requests", 0))
    return int(micro) + searches * 10_000  # $10 per 1,000 searches


@pytest.mark.parametrize("name", NAMES)
def test_each_recorded_stream_is_priced_to_the_micro_dollar(name: str) -> None:
    binaries.need_recordings()
    model, usage = final_usage(name)
    family = model.rsplit("-", 1)[0] if model[-8:].isdigit() else model
    price = price_of(model, PRICES)
    assert price is not None, model
    assert cost_of(usage, price) == by_hand(usage, PAGE[family])


def test_cache_writes_reads_and_thinking_each_count() -> None:
    price = PRICES["claude-sonnet-4-5"]
    base = {"input_tokens": 1000, "output_tokens": 1000}
    assert cost_of(base, price) == 18_000  # $3 + $15 per MTok, for a thousand each
    assert cost_of({**base, "cache_read_input_tokens": 1000}, price) == 18_300
    five = {"cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0}}
    hour = {"cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000}}
    assert cost_of({**base, **five}, price) == 21_750
    assert cost_of({**base, **hour}, price) == 24_000
    thinking = {**base, "output_tokens_details": {"thinking_tokens": 600}}
    assert cost_of(thinking, price) == 18_000  # already in output_tokens


def test_claude_prices_overrides_and_extends_the_table() -> None:
    table = parse_prices("CLAUDE_PRICES", '{"my-model": {"input": 1, "output": 2}}')
    assert table["my-model"].input == 1_000_000 and table["my-model"].cache_read == 100_000
    assert "claude-sonnet-5-5" in table
    with pytest.raises(ValueError, match="CLAUDE_PRICES"):
        parse_prices("CLAUDE_PRICES", '{"m": {"input": -1, "output": 2}}')
