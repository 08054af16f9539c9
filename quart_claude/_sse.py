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

__all__ = ["PING", "SSEEvent", "SSEParser", "data_line", "encode_json", "frame"]

#: A comment line; keeps proxies and clients from timing out an idle connection.
PING = b": ping\n\n"

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

    __slots__ = ("_buffer", "_data", "_event", "_last_id", "_pending_cr", "_retry", "comments")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._pending_cr = False
        self.comments = 0  # how many comment lines (e.g. ``: ping``) were seen

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        buffer = self._buffer + chunk
        if self._pending_cr and buffer.startswith(b"\n"):
            buffer = buffer[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = False
        start = 0
        length = len(buffer)
        while start < length:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, after = lf, lf + 1
            elif cr + 1 < length:
                end, after = cr, cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:  # a CR at the very end: it ends the line; swallow a following LF later
                end, after = cr, cr + 1
                self._pending_cr = True
            event = self._line(buffer[start:end].decode("utf-8", "replace"))
            if event is not None:
                yield event
            start = after
        self._buffer = buffer[start:]

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
