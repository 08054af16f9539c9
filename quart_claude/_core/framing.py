"""Upstream SSE framing: bytes in any chunking, out as whole event blocks, in linear time.

The Messages API frames each event as ``event: <name>\\ndata: <json>\\n\\n``. Proxies may
rewrite line ends to CRLF or CR; a chunk may end anywhere, including between the CR and LF
of one line end. Each byte is scanned a bounded number of times however large an event
grows, and an event larger than ``max_event`` fails instead of filling memory.
"""

from __future__ import annotations

__all__ = ["EventTooLarge", "UpstreamFramer"]


class EventTooLarge(Exception):
    """One upstream event grew past the framer's limit without ending."""


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
