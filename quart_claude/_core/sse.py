"""Server-Sent Events: the one encoder of our events, and a spec-following incremental parser.

An encoded event is ``data: <compact JSON>\\nid: <n>\\n\\n`` (``data:`` first, so naive
clients that keep blocks starting with ``data:`` work). JSON never contains a raw CR or LF,
so one ``data:`` line always suffices and any text round-trips byte-exact.

The parser follows the WHATWG "event stream interpretation" rules: CR, LF and CRLF line ends,
one optional space after the colon, multi-line ``data`` joined with LF, comments ignored,
``id`` persisting across events, ``retry`` only when all digits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DELTA_PREFIX",
    "PING",
    "SSEEvent",
    "SSEParser",
    "data_line",
    "encode_json",
    "frame",
    "payload_of",
]

#: A comment line; keeps proxies and clients from timing out an idle connection.
PING = b": ping\n\n"

#: The start of a text delta event as the relay writes it: the JSON string literal of the
#: text follows, then ``}``.
DELTA_PREFIX = b'data: {"type":"delta","text":'

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def encode_json(payload: Any) -> bytes:
    """Compact UTF-8 JSON. Falls back to ASCII escapes for lone surrogates (never a crash)."""
    try:
        return _dumps(payload).encode()
    except UnicodeEncodeError:
        return _dumps_ascii(payload).encode()


def data_line(payload: Any) -> bytes:
    """``data: <compact JSON>``: the first line of every event block."""
    return b"data: " + encode_json(payload)


def payload_of(event: bytes) -> Any:
    """The payload of one of our own encoded events (its ``data:`` line, then ``id``...): the
    one decoder of what :func:`data_line` and :func:`frame` wrote, wherever it is read back."""
    return json.loads(event[6 : event.index(b"\n")])


def frame(data: bytes, event_id: int | None, retry_ms: int | None = None) -> bytes:
    """Close an event block after its ``data`` line: ``id`` (when given), ``retry``, blank."""
    if event_id is None:
        return data + b"\n\n"
    if retry_ms is None:
        return data + b"\nid: %d\n\n" % event_id
    return data + b"\nid: %d\nretry: %d\n\n" % (event_id, retry_ms)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """A dispatched event: ``data`` as text, the last seen ``id``, the ``event`` name."""

    data: str
    id: str | None = None
    event: str = "message"
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental parser: ``feed(bytes)`` yields complete events; chunk boundaries anywhere."""

    __slots__ = ("_data", "_event", "_last_id", "_partial", "_pending_cr", "_retry", "comments")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the start of a line that has not ended yet
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._pending_cr = False
        self.comments: int = 0  # how many comment lines (e.g. ``: ping``) were seen

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Each byte is scanned once, however the stream is cut into chunks."""
        if not chunk:
            return
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 10:
                chunk = chunk[1:]  # the LF of a CRLF split across chunks
        start = 0
        length = len(chunk)
        cr = lf = -2  # -2: not searched yet; -1: none left in this chunk
        while start < length:
            if cr != -1 and cr < start:
                cr = chunk.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = chunk.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            end, after = self._line_end(chunk, cr, lf)
            event = self._line(self._whole(chunk[start:end]).decode("utf-8", "replace"))
            if event is not None:
                yield event
            start = after
        if start < length:
            self._partial.append(chunk[start:])

    def _whole(self, line: bytes) -> bytes:
        """The line, with its start from earlier chunks."""
        if not self._partial:
            return line
        self._partial.append(line)
        line = b"".join(self._partial)
        self._partial = []
        return line

    def _line_end(self, chunk: bytes, cr: int, lf: int) -> tuple[int, int]:
        """Where the line ends (the first CR or LF) and the next one starts (after CRLF)."""
        if cr == -1 or (lf != -1 and lf < cr):
            return lf, lf + 1
        if cr + 1 < len(chunk):
            return cr, cr + 2 if chunk[cr + 1] == 10 else cr + 1
        self._pending_cr = True  # a CR at the very end: swallow a following LF later
        return cr, cr + 1

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(
            "\n".join(self._data), self._last_id, self._event or "message", self._retry
        )
        self._data = []
        self._event = ""
        return event
