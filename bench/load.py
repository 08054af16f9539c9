"""A lean load generator: raw asyncio sockets, HTTP/1.1, chunked SSE, no client library.

Each delta's text is ``"<emulator send time> "`` (the emulator's ``--stamp``), so the relay
latency of every event is ``receipt time - send time`` (same host, same clock).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from dataclasses import dataclass, field

_STAMP = re.compile(rb'"text":"(\d{10}\.\d+) ')  # a whole stamp (a hold guard may split one)
_ID = re.compile(rb"^id: (\d+)$", re.M)


@dataclass
class StreamResult:
    ok: bool = False
    started: float = 0.0
    ttft: float | None = None
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str | None = None
    stream_id: str | None = None
    last_id: int = -1
    reconnects: int = 0


async def _request(  # noqa: C901 (one raw HTTP/1.1 exchange, inline: the load generator stays cheap)
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    result: StreamResult,
    stop_after: int | None,
) -> str:
    """One HTTP exchange; feeds SSE blocks into ``result``. Returns why it ended."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + (body or b""))
        status_head = await reader.readuntil(b"\r\n\r\n")
        status = int(status_head.split(b" ", 2)[1])
        if status == 204:
            return "done"
        if status != 200:
            return f"status {status}"
        for line in status_head.split(b"\r\n"):
            if line.lower().startswith(b"x-stream-id:"):
                result.stream_id = line.split(b":", 1)[1].strip().decode()
        buffer = b""
        seen = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            if size == 0:
                return "eof"
            chunk = await reader.readexactly(size + 2)
            now = time.time()
            buffer += chunk[:-2]
            if b"\n\n" not in buffer:
                continue
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                if not block.startswith(b"data: "):
                    continue  # a ping comment
                match = _ID.search(block)
                if match is not None:
                    result.last_id = int(match.group(1))
                if b'"type":"delta"' in block:
                    stamp = _STAMP.search(block)
                    if stamp is not None:
                        result.latencies.append(now - float(stamp.group(1)))
                    if result.ttft is None:
                        result.ttft = now - result.started
                    result.events += 1
                    seen += 1
                elif b'"type":"done"' in block:
                    result.ok = True
                    return "done"
                elif b'"type":"error"' in block:
                    result.error = block.decode(errors="replace")[:200]
                    return "error"
            if stop_after is not None and seen >= stop_after:
                return "dropped"
    finally:
        writer.transport.abort()


async def chat(
    host: str, port: int, message: str = "bench", *, resume_every: int | None = None
) -> StreamResult:
    """POST one chat and read it to the end; with ``resume_every``, drop the connection after
    that many deltas and resume with Last-Event-ID, again and again."""
    result = StreamResult(started=time.time())
    body = json.dumps({"message": message, "max_tokens": 8192}).encode()
    try:
        why = await _request(host, port, "POST", "/chat/stream", body, {}, result, resume_every)
        while why == "dropped" and result.stream_id:
            result.reconnects += 1
            why = await _request(
                host,
                port,
                "GET",
                f"/chat/stream/{result.stream_id}",
                None,
                {"Last-Event-ID": str(result.last_id)},
                result,
                resume_every,
            )
        if not result.ok and result.error is None:
            result.error = why
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def direct_ttft(host: str, port: int, context: ssl.SSLContext | None = None) -> float:
    """Time to the first text delta reading the emulator directly (no relay; over TLS with
    ``context``)."""
    started = time.time()
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    body = json.dumps(
        {
            "model": "claude-sonnet-5-5",
            "max_tokens": 8192,
            "stream": True,
            "messages": [{"role": "user", "content": "bench"}],
        }
    ).encode()
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"x-api-key: sk-bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("emulator closed before the first delta")
            if b"text_delta" in line:
                return time.time() - started
    finally:
        writer.transport.abort()
