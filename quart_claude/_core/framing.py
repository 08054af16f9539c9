"""Upstream framing: bytes in any chunking, out as ``(event name, data)`` pairs, in linear
time, for the relay's one hot path whatever the provider.

SSE (the Messages API, and every provider but classic Bedrock) frames each event as
``event: <name>\\ndata: <json>\\n\\n``. Proxies may rewrite line ends to CRLF or CR; a chunk
may end anywhere, including between the CR and LF of one line end. Classic Bedrock frames
each event in AWS event-stream binary messages, CRC-checked here (the SDK's decoder is
private), whose ``chunk`` payload holds the same event JSON in base64. Each byte is scanned
a bounded number of times however large an event grows, and an event larger than
``max_event`` fails instead of filling memory.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from typing import Protocol

from .protocol import UpstreamError

__all__ = ["EventStreamFramer", "EventTooLarge", "Framer", "UpstreamFramer"]


class EventTooLarge(Exception):
    """One upstream event grew past the framer's limit without ending."""


class Framer(Protocol):
    def events(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The ``(event name, data)`` of each event ``chunk`` completes."""
        ...


class UpstreamFramer:
    __slots__ = ("_held_cr", "_max_event", "_pending", "_size")

    def __init__(self, max_event: int) -> None:
        self._max_event = max_event
        self._pending: list[bytes] = []  # the start of an event that has not ended yet
        self._size = 0
        self._held_cr = False  # the last chunk ended in CR: a leading LF here is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """The event blocks (LF line ends, no trailing blank line) that ``chunk`` completes.

        An event left unfinished at the end of the body is never returned (the SSE rule).
        """
        if self._held_cr:
            self._held_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # a CR ends a line on its own: convert now; a following LF is swallowed later
            self._held_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            return []
        pending = self._pending
        blocks: list[bytes] = []
        if pending and chunk[0] == 10 and pending[-1][-1] == 10:  # b"\n\n" across chunks
            blocks.append(b"".join(pending)[:-1])
            pending.clear()
            self._size = 0
            chunk = chunk[1:]
        parts = chunk.split(b"\n\n")
        if len(parts) > 1:
            if pending:
                parts[0] = b"".join(pending) + parts[0]
                pending.clear()
                self._size = 0
            blocks.extend(parts[:-1])
        rest = parts[-1]
        if rest:
            pending.append(rest)
            self._size += len(rest)
            if self._size > self._max_event:
                raise EventTooLarge(f"an upstream event exceeded {self._max_event} bytes")
        return blocks

    def events(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        return [named(block) for block in self.feed(chunk)]


def named(block: bytes) -> tuple[bytes, bytes]:
    """``(event name, data)``: the API's framing, ``event: <name>\\ndata: <json>``, at once;
    anything else by the general rules."""
    cut = block.find(b"\ndata: ")
    if cut > 7 and block.startswith(b"event: ") and b"\n" not in block[cut + 7 :]:
        return block[7:cut], block[cut + 7 :]
    return parse_block(block)


def parse_block(block: bytes) -> tuple[bytes, bytes]:
    """``(event name, data)`` of one SSE block by the general rules; ``b""`` if no data."""
    name = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    if not data:
        return b"", b""
    joined = data[0] if len(data) == 1 else b"\n".join(data)
    if not name:  # no event: line; the JSON's "type" names the event, as the API defines it
        return _typed(joined), joined
    return name, joined


def _typed(data: bytes) -> bytes:
    """An event's name from its JSON's ``type`` (first, as the API writes it, or anywhere)."""
    match = _TYPE_FIRST.match(data)
    if match is not None:
        return match.group(1)
    body = json.loads(data)
    kind = body.get("type") if isinstance(body, dict) else None
    return kind.encode() if isinstance(kind, str) else b""


_CHUNK_BYTES = re.compile(rb'"bytes" ?: ?"([A-Za-z0-9+/=]*)"')
_TYPE_FIRST = re.compile(rb'\{ *"type": ?"([a-z_]+)"')

# AWS event-stream: total length, headers length, prelude CRC; headers; payload; message CRC
_PRELUDE = struct.Struct(">III")
_U32 = struct.Struct(">I")
_MAX_HEADERS = 128 * 1024  # botocore's caps
#: a header value's size by type (6 bytes and 7 string carry a u16 length instead)
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


class CorruptFrame(UpstreamError):
    """An event-stream message whose CRC or lengths are wrong: the bytes cannot be trusted."""

    def __init__(self, detail: str) -> None:
        super().__init__("network_error", detail=f"Bedrock event stream: {detail}")


class EventStreamFramer:
    """Classic Bedrock's ``application/vnd.amazon.eventstream`` response, message by message:
    each ``chunk`` event's payload decoded into its Messages API event; an ``exception``
    message (throttling, a model stream error...) into the API's in-stream ``error`` event,
    its type the exception's name (classified by :mod:`.errors`)."""

    __slots__ = ("_max_message", "_need", "_pending", "_seen", "_size")

    def __init__(self, max_event: int) -> None:
        # the payload's base64 is a third larger than the event
        self._max_message = max_event * 4 // 3 + _MAX_HEADERS + 1024
        self._pending: list[bytes] = []  # the start of a message that has not ended yet
        self._size = 0  # its bytes so far
        self._need = 0  # the bytes before it can be read (its length, once the prelude came)
        #: headers parsed before, by their bytes (a stream repeats the same few)
        self._seen: dict[bytes, dict[str, object]] = {}

    def events(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        if self._pending:  # joined once the message is whole: linear however it is cut
            self._pending.append(chunk)
            self._size += len(chunk)
            if self._size < self._need:
                return []
            chunk = b"".join(self._pending)
            self._pending.clear()
        data, view = chunk, memoryview(chunk)
        out: list[tuple[bytes, bytes]] = []
        start, size = 0, len(data)
        need = 12
        while size - start >= 12:
            total, headers_length, crc = self._prelude(data, view, start)
            end = start + total
            if size < end:
                need = total
                break
            if zlib.crc32(view[start + 8 : end - 4], crc) != _U32.unpack_from(data, end - 4)[0]:
                raise CorruptFrame("message CRC mismatch")
            at = start + 12 + headers_length
            event = _message(self._headers(data[start + 12 : at]), data[at : end - 4])
            if event is not None:
                out.append(event)
            start = end
        if start < size:
            self._pending.append(data[start:])
            self._size, self._need = size - start, need
        return out

    def _prelude(self, data: bytes, view: memoryview, start: int) -> tuple[int, int, int]:
        """The message at ``start``: its total length, its headers' length and the CRC so
        far, its prelude checked."""
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(data, start)
        crc = zlib.crc32(view[start : start + 8])
        if crc != prelude_crc:
            raise CorruptFrame("prelude CRC mismatch")
        if total < 16 or headers_length > min(_MAX_HEADERS, total - 16):
            raise CorruptFrame(f"impossible lengths {total}/{headers_length}")
        if total > self._max_message:
            raise EventTooLarge(f"an upstream event exceeded {self._max_message} bytes")
        return int(total), int(headers_length), crc

    def _headers(self, raw: bytes) -> dict[str, object]:
        headers = self._seen.get(raw)
        if headers is None:
            headers = _headers(raw)
            if len(self._seen) < 16:
                self._seen[raw] = headers
        return headers


def _headers(raw: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    at, size = 0, len(raw)
    while at < size:
        length = raw[at]
        name = raw[at + 1 : at + 1 + length].decode("utf-8", "replace")
        at += 1 + length
        kind = raw[at]
        at += 1
        value: object
        if kind in (6, 7):
            (count,) = struct.unpack_from(">H", raw, at)
            piece = raw[at + 2 : at + 2 + count]
            value = piece.decode("utf-8", "replace") if kind == 7 else piece
            at += 2 + count
        elif kind in _FIXED:
            value = kind == 0 if kind < 2 else raw[at : at + _FIXED[kind]]
            at += _FIXED[kind]
        else:
            raise CorruptFrame(f"unknown header type {kind}")
        headers[name] = value
    return headers


def _message(headers: dict[str, object], payload: bytes) -> tuple[bytes, bytes] | None:
    """One message's event, or None (a message type with nothing for the relay)."""
    kind = headers.get(":message-type")
    if kind == "event":
        if headers.get(":event-type") != "chunk":
            return None
        found = _CHUNK_BYTES.search(payload)  # beside it, "p": padding against sizing
        encoded = found.group(1) if found is not None else json.loads(payload)["bytes"]
        data = base64.b64decode(encoded)
        return _typed(data), data
    if kind in ("exception", "error"):  # as the API's in-stream error event, named by AWS
        name = headers.get(":exception-type") or headers.get(":error-code") or ""
        message = headers.get(":error-message")
        if message is None:
            try:
                message = json.loads(payload).get("message", "")
            except (ValueError, AttributeError):
                message = ""
        error = {"type": str(name), "message": str(message)}
        return b"error", json.dumps({"type": "error", "error": error}).encode()
    return None
