from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quart_claude import SSEEvent, SSEParser
from quart_claude._core.sse import PING, data_line, frame

pytestmark = pytest.mark.core


def encode_event(payload: object, event_id: int, retry_ms: int | None = None) -> bytes:
    return frame(data_line(payload), event_id, retry_ms)


def parse_all(data: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    points = sorted({c % (len(data) + 1) for c in (cuts or [])})
    start = 0
    for point in [*points, len(data)]:
        events.extend(parser.feed(data[start:point]))
        start = point
    return events


def test_event_layout_data_first_then_id() -> None:
    assert encode_event({"type": "delta", "text": "hi"}, 3) == (
        b'data: {"type":"delta","text":"hi"}\nid: 3\n\n'
    )
    assert encode_event({"type": "start"}, 0, retry_ms=1500) == (
        b'data: {"type":"start"}\nid: 0\nretry: 1500\n\n'
    )


def test_lone_surrogate_does_not_crash() -> None:
    block = encode_event({"text": "a\ud800b"}, 0)
    (event,) = parse_all(block)
    assert event.json()["text"] == "a\ud800b"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(),
    index=st.integers(min_value=0, max_value=10**9),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=8),
)
def test_any_text_round_trips_through_a_spec_parser(text: str, index: int, cuts: list[int]) -> None:
    block = encode_event({"type": "delta", "text": text}, index)
    stream = block + PING + encode_event({"type": "done"}, index + 1)
    events = parse_all(stream, cuts)
    assert [e.id for e in events] == [str(index), str(index + 1)]
    assert json.loads(events[0].data) == {"type": "delta", "text": text}
    assert block.startswith(b"data: ")
    assert block.count(b"\n") == 3  # one data line, one id line, the blank line


def test_parser_follows_the_spec() -> None:
    stream = (
        b": comment\r\n"
        b"event: custom\r\ndata:first\r\ndata: second\r\nid: 7\r\nretry: 2500\r\n\r\n"
        b"data: no id given\r\rdata: x\nid\n\n"
        b"data: y\nid: a\x00b\nretry: soon\n\n"
        b"event: empty\n\n"
    )
    for cuts in ([], list(range(len(stream)))):
        events = parse_all(stream, cuts)
        assert [(e.event, e.data, e.id) for e in events] == [
            ("custom", "first\nsecond", "7"),
            ("message", "no id given", "7"),  # the last id persists
            ("message", "x", ""),  # a bare "id" resets it
            ("message", "y", ""),  # an id with NUL is ignored
        ]
        assert events[0].retry == 2500
        assert events[-1].retry == 2500  # "retry: soon" is not all digits: ignored


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert list(parser.feed(b"data: a\r")) == []
    assert list(parser.feed(b"\n")) == []
    (event,) = list(parser.feed(b"\r\n"))
    assert event.data == "a"


def test_an_empty_chunk_between_cr_and_lf_dispatches_nothing() -> None:
    parser = SSEParser()
    chunks = (b"data: a\r", b"", b"\ndata: b\n\n")
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    assert [event.data for event in events] == ["a\nb"]  # one event: the CRLF was one line end


def test_a_long_line_in_many_chunks_is_one_line() -> None:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for piece in (b"data: ", *[b"x" * 1000] * 50, b"\n\n"):
        events.extend(parser.feed(piece))
    assert [len(event.data) for event in events] == [50_000]
