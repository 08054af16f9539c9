"""The relay's upstream fast path: a text delta's JSON string literal is spliced as is, and
must decode to exactly the text, however the upstream encodes it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quart_claude._core.attempt import joined as _joined
from quart_claude._core.framing import parse_block as _parse_block
from quart_claude._core.relay import _TEXT_DELTA

pytestmark = pytest.mark.core


def delta(text: str, **dumps: object) -> bytes:
    event = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }
    return json.dumps(event, **dumps).encode()  # type: ignore[arg-type]


@given(st.text())
def test_fast_path_literal_decodes_to_the_text(text: str) -> None:
    for data in (
        delta(text, separators=(",", ":")),  # the API's compact framing
        delta(text),  # the docs' spaced framing
        delta(text, separators=(",", ":"), ensure_ascii=False),
        # the live API pads with spaces before the last brace (recorded: pydantic-ai cassettes)
        delta(text, separators=(",", ":"))[:-1] + b"          }",
    ):
        match = _TEXT_DELTA.fullmatch(data)
        assert match is not None
        assert json.loads(match.group(1)) == text
        assert _joined([match.group(1), match.group(1)]) == text + text


def test_fast_path_refuses_anything_it_does_not_fully_understand() -> None:
    refused = [
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a","x":"b"}}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"},"x":1}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"a"}}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a\\"}}',
    ]
    assert all(_TEXT_DELTA.fullmatch(data) is None for data in refused)


def test_general_block_parsing() -> None:
    assert _parse_block(b"event: ping\ndata: {}") == (b"ping", b"{}")
    assert _parse_block(b": comment\nevent:x\ndata:a\ndata: b") == (b"x", b"a\nb")
    assert _parse_block(b"event: only") == (b"", b"")


def test_every_recorded_text_delta_takes_the_fast_path() -> None:
    """Real streams, padded ones included: each text delta is spliced, none decoded."""
    from . import binaries

    seen = 0
    for path in sorted(binaries.need_recordings().glob("*.sse")):
        for line in path.read_bytes().split(b"\n"):
            data = line[6:].rstrip(b"\r") if line.startswith(b"data: ") else b""
            if b'"text_delta"' in data:
                seen += 1
                assert _TEXT_DELTA.fullmatch(data) is not None, (path.name, data[:120])
    assert seen > 1000
