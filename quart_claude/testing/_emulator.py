"""A local Anthropic Messages API: the real wire format, scripted replies and faults.

It speaks HTTP/1.1 itself (asyncio streams, keep-alive, chunked bodies) rather than through a
framework, so it can do what frameworks hide: abort the TCP connection mid-body, stall, end
a body cleanly without ``message_stop``, and notice the moment a client hangs up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .._core.sse import SSEParser
from ._context import (
    ContextPlan,
    compaction_problem,
    context_problem,
    from_last_compaction,
    plan,
    sealed_block,
)
from ._dialects import Dialect, event_frame, exception_frame, oauth_token, recognise

__all__ = [
    "CONTINUE_MARKER",
    "Emulator",
    "ErrorReply",
    "Hangup",
    "RecordedRequest",
    "Reply",
    "Scripted",
    "ToolUse",
]

#: A user turn starting with this asks to continue an interrupted answer (see the docs'
#: "Error recovery" for 4.6+ models); the emulator then answers with the rest of the text.
CONTINUE_MARKER = "Your previous response was interrupted"

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}
_NO_PREFILL = re.compile(r"^claude-(?:(?:opus|sonnet|haiku)-4-(?:[6-9]|\d\d)|[a-z]+-[5-9]|mythos)")
_TOKEN = re.compile(r"\S+\s*|\s+")
_MAX_HEAD = 64 * 1024


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call in a reply: a ``tool_use`` block after the text, its input streamed as
    ``input_json_delta`` pieces cut at awkward places (inside keys, escapes, numbers), as the
    API's are. ``server=True``: a ``server_tool_use`` block before the text, followed by its
    ``<name>_tool_result`` block holding ``result``, as the API runs its own tools."""

    name: str
    input: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None  # None: a fresh toolu_… id
    server: bool = False
    result: Any = None  # a server tool's result content


@dataclass(frozen=True, slots=True)
class Reply:
    """A streamed (or, for ``stream: false``, whole) answer, optionally ending in a fault.

    ``fault`` happens after ``fault_after`` text deltas:
    ``"error"`` sends an in-stream ``event: error`` of ``error_type`` (on Bedrock an
    ``exception`` message, ``error_type`` naming the API's error or Bedrock's exception);
    ``"drop"`` aborts the TCP connection; ``"stall"`` goes silent for ``stall`` seconds, then
    carries on; ``"eof"`` ends the body cleanly without ``message_stop``; ``"crc"`` sends a
    Bedrock event whose CRC is wrong, and ``"truncated"`` half an event, then ends the body.
    """

    text: str | None = None  # None: a demo answer quoting the prompt
    tokens: Sequence[str] | None = None  # explicit delta pieces (joined they are the text)
    token_delay: float | None = None  # None: the emulator's default
    first_token_delay: float = 0.0
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None  # with stop_reason "stop_sequence": which one matched
    fault: Literal["error", "drop", "stall", "eof", "crc", "truncated"] | None = None
    fault_after: int = 0
    error_type: str = "overloaded_error"
    error_message: str = "Overloaded"
    stall: float = 3600.0
    headers: Mapping[str, str] = field(default_factory=dict)
    input_tokens: int | None = None
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    thinking: str | None = None  # a thinking block streamed before the text, word by word
    #: thinking billed as output but never shown: Claude 4 models stream a summary of their
    #: thinking and bill the whole of it
    hidden_thinking_tokens: int = 0
    redacted_thinking: bool = False  # a redacted_thinking block (encrypted: no text) first
    stamp: bool = False  # each delta carries its send time: "<unix seconds> " (benchmarks)
    #: How a continuation request is answered, as real models do: ``"rest"`` the text after
    #: what the request already has; ``"restart"`` the whole text again from its start;
    #: ``"repeat_tail"`` the last few words already written, then the rest; ``"diverge"``
    #: the start again, then different words; ``"repeat_whitespace"`` the whitespace the
    #: request's partial answer ended in, again, then the rest (4.6+ models do this).
    on_continue: Literal["rest", "restart", "repeat_tail", "diverge", "repeat_whitespace"] = "rest"
    #: Line ends as proxies rewrite them (``"crlf"``, ``"cr"``), ``"data_only"``: events
    #: without their ``event:`` line (the JSON ``type`` still names them), or ``"padded"``:
    #: as the live API sends them, random spaces before a delta's last brace and
    #: ``{"type": "ping"}`` with a space.
    framing: Literal["lf", "crlf", "cr", "data_only", "padded"] = "lf"
    raw: bytes = b""  # sent as is, before the first text delta (malformed input for tests)
    #: tool calls: the app's after the text (the stop reason becomes ``tool_use``), the
    #: server's before it
    tool_calls: Sequence[ToolUse] = ()
    #: ``fault`` happens after this many input pieces of the first app tool call instead
    fault_in_input: int | None = None
    #: ``fault`` happens after the ``message_delta`` (stop reason, usage), before
    #: ``message_stop``, instead: every block has ended, the message is complete
    fault_before_stop: bool = False
    #: code execution's container, reported in ``message_delta`` (``{"id": ..., ...}``)
    container: Mapping[str, Any] | None = None
    #: citations of the text block (``citations_delta``s before its text, as the API sends)
    citations: Sequence[Mapping[str, Any]] = ()
    #: a refusal's ``stop_details`` in ``message_delta`` (with ``stop_reason="refusal"``)
    stop_details: Mapping[str, Any] | None = None
    #: what the first of the request's server-side ``fallbacks`` writes after a refusal (the
    #: beta ``server-side-fallback-2026-07-01``): the refused text, a ``fallback`` block,
    #: then this; without ``fallbacks`` in the request the refusal stands
    fallback_text: str = "Here is what I can share."


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An HTTP error response with the API's JSON error body and any headers."""

    status: int
    error_type: str | None = None
    message: str = "Error"
    headers: Mapping[str, str] = field(default_factory=dict)
    error_code: str | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Hangup:
    """Close the connection without any response, after ``delay`` seconds."""

    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Replay:
    """A recorded response body sent back as it is (``text/event-stream``), in pieces of
    ``chunk`` bytes: a real API stream, byte for byte, whatever the request asked."""

    body: bytes
    chunk: int = 1024
    delay: float = 0.0  # between pieces

    @classmethod
    def file(cls, path: str | os.PathLike[str], **options: Any) -> Replay:
        with open(path, "rb") as recording:
            return cls(recording.read(), **options)


Scripted = Reply | ErrorReply | Hangup | Replay


@dataclass(slots=True)
class RecordedRequest:
    """One request as the emulator saw it, and how its response ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float
    ended: asyncio.Event
    outcome: str = "pending"  # completed | disconnected | dropped | hung_up | error
    ended_at: float | None = None
    #: the usage the emulator reported in ``message_delta`` (None: it never got that far)
    usage: dict[str, Any] | None = None
    #: the provider it came through (``anthropic``, ``bedrock``, ``vertex``...); ``body`` is
    #: then its first-party form and ``sent`` the body as the provider received it
    provider: str = "anthropic"
    sent: Any = None
    dialect: Dialect | None = field(default=None, repr=False)

    @property
    def disconnected(self) -> bool:
        """The client closed the connection before the response was complete."""
        return self.outcome == "disconnected"


class Emulator:
    """``async with Emulator() as emu:`` serves on ``emu.url`` until the block ends.

    ``emu.script(Reply(...), ErrorReply(429, headers={"retry-after": "1"}), ...)`` queues
    responses, one per request in order; with the queue empty each request gets ``default``.
    ``emu.requests`` records every request, including how its response ended.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        token_delay: float = 0.0,
        default: Scripted | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        #: serve HTTPS with this context (production's upstream is TLS: the benchmarks)
        self.ssl = ssl
        self.host: str = host
        self.port: int = port
        self.api_key = api_key
        self.token_delay = token_delay
        self.default: Scripted = default if default is not None else Reply()
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Scripted] = deque()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._new_request = asyncio.Event()
        self._cache: set[str] = set()  # prompt prefixes written to the "cache"

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.ssl is not None else 'http'}://{self.host}:{self.port}"

    async def start(self) -> Emulator:
        """Listen on ``host:port`` (port 0: a free one, see :attr:`url`)."""
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, ssl=self.ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start_on(self, sock: socket.socket) -> Emulator:
        """Listen on an already bound socket (so its URL can be known before the loop runs)."""
        address = sock.getsockname()
        self.host, self.port = str(address[0]), int(address[1])
        self._server = await asyncio.start_server(self._on_connection, sock=sock, ssl=self.ssl)
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)

    async def __aenter__(self) -> Emulator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    # -- scripting and observation -------------------------------------------------------
    def script(self, *responses: Scripted) -> None:
        self._queue.extend(responses)

    def clear(self) -> None:
        self._queue.clear()
        self.requests.clear()

    @property
    def pending(self) -> int:
        """Scripted responses not yet used."""
        return len(self._queue)

    async def wait_for_requests(self, count: int, within: float = 10.0) -> list[RecordedRequest]:
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self._new_request.clear()
                await self._new_request.wait()
        return self.requests

    # -- HTTP ----------------------------------------------------------------------------
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                parsed = _parse_head(head)
                if parsed is None:
                    await _write_json(
                        writer, 400, _error_body("invalid_request_error", "malformed request"), {}
                    )
                    return
                method, path, headers = parsed
                declared = headers.get("content-length") or "0"
                if not declared.isascii() or not declared.isdigit() or len(declared) > 12:
                    await _write_json(
                        writer,
                        400,
                        _error_body("invalid_request_error", "invalid content-length"),
                        {},
                    )
                    return
                length = int(declared)
                try:
                    raw = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                record = RecordedRequest(method, path, headers, body, time.time(), asyncio.Event())
                self.requests.append(record)
                self._new_request.set()
                keep_open = await self._respond(record, reader, writer)
                record.ended_at = time.time()
                record.ended.set()
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _respond(
        self, record: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Send one response while watching for the client to hang up. True: keep the
        connection for the next request."""
        send = asyncio.ensure_future(self._send(record, writer))
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({send, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            send.cancel()
            watch.cancel()
            raise
        if send.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await watch
            try:
                return send.result()
            except (ConnectionError, OSError):
                record.outcome = "disconnected"
                return False
        # the client closed (or sent bytes mid-response, which a client we serve never does);
        # a reset comes as the watch's exception: retrieved, it is the answer, not an error
        if not watch.cancelled():
            watch.exception()
        send.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await send
        record.outcome = "disconnected"
        return False

    def _recognise(self, record: RecordedRequest) -> tuple[int, str, str] | None:
        """Which provider the request came through; its credentials checked and its body
        turned first-party (or why not)."""
        dialect = record.dialect = recognise(record.method, record.path, record.headers)
        record.sent = record.body
        if dialect is None:
            return 404, "not_found_error", f"Not found: {record.method} {record.path}"
        record.provider = dialect.name
        if dialect.name in ("anthropic", "oauth"):
            return None
        problem = dialect.auth_problem(record.headers, self.api_key)
        if problem is not None:
            return 403, "permission_error", problem
        record.body = dialect.first_party(record.body, record.headers)
        if isinstance(record.body, dict) and "__problem" in record.body:
            return 400, "invalid_request_error", record.body.pop("__problem")
        return None

    async def _error(
        self,
        record: RecordedRequest,
        writer: asyncio.StreamWriter,
        status: int,
        error_type: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        error_code: str | None = None,
    ) -> None:
        """An error response, shaped as the request's provider sends it."""
        record.outcome = "error"
        dialect = record.dialect
        if dialect is not None:
            status, own_headers, body = dialect.error(status, error_type, message)
            if body is not None:
                await _write_json(writer, status, body, {**own_headers, **(headers or {})})
                return
        body = _error_body(error_type, message, error_code)
        await _write_json(writer, status, body, headers or {})

    async def _send(self, record: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        problem = self._recognise(record) or self._validate(record)
        if problem is not None:
            await self._error(record, writer, *problem)
            return True
        if record.provider == "oauth":
            record.outcome = "completed"
            await _write_json(writer, 200, oauth_token(), {})
            return True
        scripted = self._queue.popleft() if self._queue else self.default
        if not isinstance(scripted, Reply):
            return await self._send_other(record, writer, scripted)
        body = record.body
        scripted, text = self._planned(scripted, body)
        if body.get("stream") is True and _falls_back(scripted, body):
            return await self._server_fallback(record, writer, scripted, text)
        if body.get("stream") is True:
            return await self._stream(record, writer, scripted, text)
        record.outcome = "completed"
        await _write_json(writer, 200, self._message(scripted, body, text), scripted.headers)
        return True

    async def _send_other(
        self, record: RecordedRequest, writer: asyncio.StreamWriter, scripted: Scripted
    ) -> bool:
        """A scripted hang-up, replay or error response."""
        if isinstance(scripted, Hangup):
            await asyncio.sleep(scripted.delay)
            record.outcome = "hung_up"
            writer.transport.abort()
            return False
        if isinstance(scripted, Replay):
            return await _replay(record, writer, scripted)
        assert isinstance(scripted, ErrorReply)
        await asyncio.sleep(scripted.delay)
        error_type = scripted.error_type or _STATUS_TYPES.get(scripted.status, "api_error")
        await self._error(
            record,
            writer,
            scripted.status,
            error_type,
            scripted.message,
            scripted.headers,
            scripted.error_code,
        )
        return True

    def _planned(self, scripted: Reply, body: dict[str, Any]) -> tuple[Reply, str]:
        """The reply as the request shapes it (a demo's tool call, a structured output, the
        first stop sequence it meets), and its text."""
        if scripted.text is None and scripted.tokens is None and not scripted.tool_calls:
            structured = _structured_output(body)
            demo = _demo_tool_call(body)  # demo mode: a prompt that names a tool calls it
            if structured is not None:  # output_config.format: a JSON document of the schema
                scripted = replace(scripted, text=structured)
            elif demo is not None:
                scripted = replace(scripted, text="Let me look that up. ", tool_calls=(demo,))
        text = self._answer_text(scripted, body)
        stops = [s for s in body.get("stop_sequences") or () if isinstance(s, str) and s in text]
        if stops:  # the answer ends before the first stop sequence it contains, as the API's
            first = min(stops, key=text.index)
            text = text[: text.index(first)]
            scripted = replace(scripted, stop_reason="stop_sequence", stop_sequence=first)
        return scripted, text

    def _validate(self, record: RecordedRequest) -> tuple[int, str, str] | None:
        if record.provider == "oauth":
            return None
        refused = self._auth_problem(record)
        if refused is not None:
            return refused
        body = record.body
        if not isinstance(body, dict):
            return 400, "invalid_request_error", "The request body is not valid JSON."
        problem = _fields_problem(body) or _messages_problem(body, record.headers)
        if problem is not None:
            return 400, "invalid_request_error", problem
        model = body["model"]
        if not model.startswith("claude-"):
            return 404, "not_found_error", f"model: {model}"
        problem = (
            _thinking_problem(body, model)
            or _conversation_problem(body)
            or _last_turn_problem(body["messages"], model)
        )
        if problem is not None:
            return 400, "invalid_request_error", problem
        return None

    def _auth_problem(self, record: RecordedRequest) -> tuple[int, str, str] | None:
        headers = record.headers
        key = headers.get("x-api-key") or (
            headers.get("authorization", "")[7:]
            if headers.get("authorization", "").startswith("Bearer ")
            else ""
        )
        if record.provider == "anthropic" and not key:
            return 401, "authentication_error", "x-api-key header is required"
        if record.provider == "anthropic" and self.api_key is not None and key != self.api_key:
            return 401, "authentication_error", "invalid x-api-key"
        return None

    def _answer_text(self, reply: Reply, body: dict[str, Any]) -> str:
        """The text to send: the reply's, minus what a continuation request already has."""
        messages: list[dict[str, Any]] = body["messages"]
        prior = ""
        original = messages
        if messages[-1]["role"] == "assistant":  # prefill
            prior = _content_text(messages[-1])
            original = messages[:-1]
        elif (
            len(messages) >= 3
            and messages[-2]["role"] == "assistant"
            and _content_text(messages[-1]).startswith(CONTINUE_MARKER)
        ):
            prior = _content_text(messages[-2])
            original = messages[:-2]
        full = _full_text(reply, original)
        if not prior or not full.startswith(prior):
            return full
        if reply.on_continue == "restart":
            return full
        if reply.on_continue == "diverge":
            return full[: len(prior) // 2] + " — on second thought, something else entirely."
        rest = full[len(prior) :]
        if reply.on_continue == "repeat_tail":
            return "".join(_TOKEN.findall(prior)[-3:]) + rest
        if reply.on_continue == "repeat_whitespace":
            return prior[len(prior.rstrip()) :] + rest
        return rest

    def _message(self, reply: Reply, body: dict[str, Any], text: str) -> dict[str, Any]:
        tokens = _tokenize(reply, text)[: body["max_tokens"]]
        return {
            "id": "msg_emu_" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "".join(tokens)}],
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": {**self._usage(reply, body), "output_tokens": len(tokens)},
        }

    def _usage(self, reply: Reply, body: dict[str, Any]) -> dict[str, int]:
        """Counted as the API does, not as a client's estimate would hope: four ASCII
        characters a token, but a CJK character 1.25 tokens (three UTF-8 bytes) and any
        other non-ASCII one half; tools add their definitions and the API's own tool-use
        system prompt (:data:`TOOLS_PROMPT_TOKENS`). A prefix ending in a ``cache_control``
        block is written to the cache the first time and read from it on every repeat, as
        prompt caching does (a reply's own cache counts, when set, win)."""
        blocks = _blocks(body)
        total = sum(_quarters(text) for text, _ in blocks) + _tools_quarters(body)
        marked = [i for i, (_, cached) in enumerate(blocks) if cached]
        cached_size = sum(_quarters(text) for text, _ in blocks[: marked[-1] + 1]) if marked else 0
        write = read = 0
        if marked:
            key = json.dumps(blocks[: marked[-1] + 1])
            if key in self._cache:
                read = cached_size // 4
            else:
                self._cache.add(key)
                write = cached_size // 4
        input_tokens = max(1, (total - cached_size) // 4)
        if reply.input_tokens is not None:
            input_tokens = reply.input_tokens
        return {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": reply.cache_creation_input_tokens or write,
            "cache_read_input_tokens": reply.cache_read_input_tokens or read,
            "output_tokens": 1,
        }

    async def _stream(
        self, record: RecordedRequest, writer: asyncio.StreamWriter, reply: Reply, text: str
    ) -> bool:
        body: dict[str, Any] = record.body
        reply, tokens, stop_reason, room = _fitted(reply, body, text)
        delay = reply.token_delay if reply.token_delay is not None else self.token_delay
        usage = self._usage(reply, body)
        context = plan(body, usage["input_tokens"] + usage["cache_read_input_tokens"])
        if context is not None and context.compaction is None:  # cleared before it is read
            usage = {**usage, "input_tokens": context.input_tokens}
        event_stream = record.dialect is not None and record.dialect.event_stream
        writer.write(_stream_head(event_stream, reply.headers))
        framing = reply.framing

        async def event(name: str, payload: dict[str, Any]) -> None:
            framed = event_frame(payload, _dumps(payload)) if event_stream else None
            await chunk(framed or _framed(framing, name, payload))

        async def chunk(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        await event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": _MESSAGE_PREFIXES.get(record.provider, "msg_emu_") + secrets.token_hex(8),
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": body["model"],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage,
                },
            },
        )
        index = 0
        if context is not None and context.compaction is not None:
            index = await _compaction_block(event, context.compaction)
            if context.pause:
                tokens, stop_reason, reply = [], "compaction", replace(reply, tool_calls=())
        index = await _thinking_blocks(event, reply, delay or 0.0, index, body["model"])
        calls = [replace(c, id=c.id or _tool_id(c.server)) for c in reply.tool_calls]
        index = await _server_tool_blocks(event, index, calls)
        if (tokens or not calls or reply.fault is not None) and stop_reason != "compaction":
            faulted = await self._text_block(
                record, writer, event, chunk, reply, tokens, index, delay or 0.0
            )
            if faulted is not None:
                return faulted
            index += 1
        sent = await _tool_calls(event, index, calls, reply, room - billed(tokens))
        if sent is None:
            return await self._fault(record, writer, event, reply)
        tool_tokens, stopped = sent
        stop_reason = _after_calls(stop_reason, calls, stopped)
        output = billed(tokens) + tool_tokens + _thought(reply)
        delta = _message_delta(reply, stop_reason, output, context)
        record.usage = {**usage, **delta["usage"]}
        await event("message_delta", delta)
        if reply.fault is not None and reply.fault_before_stop:
            return await self._fault(record, writer, event, reply)
        await event("message_stop", {"type": "message_stop"})
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        record.outcome = "completed"
        return True

    async def _server_fallback(
        self, record: RecordedRequest, writer: asyncio.StreamWriter, reply: Reply, text: str
    ) -> bool:
        """A refusal the API's server-side fallback answers: the requested model's text, the
        ``fallback`` block where it gives way, the fallback model's text, and the usage of
        each in ``iterations`` (``message``, then ``fallback_message``)."""
        body: dict[str, Any] = record.body
        fallbacks = body["fallbacks"]
        to = fallbacks[0]["model"] if isinstance(fallbacks, list) else "claude-opus-4-8"
        writer.write(_stream_head(False, reply.headers))
        usage = self._usage(reply, body)

        async def event(name: str, payload: dict[str, Any]) -> None:
            data = _framed(reply.framing, name, payload)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        message: dict[str, Any] = {"id": "msg_emu_" + secrets.token_hex(8), "type": "message"}
        message["role"] = "assistant"
        message.update(content=[], model=body["model"], stop_reason=None, stop_sequence=None)
        await event(
            "message_start", {"type": "message_start", "message": {**message, "usage": usage}}
        )
        refused, answered = _tokenize(reply, text), _tokenize(reply, reply.fallback_text)
        await _plain_text_block(event, 0, refused)
        category = (reply.stop_details or {}).get("category")
        block = {"type": "fallback", "from": {"model": body["model"]}, "to": {"model": to}}
        block["trigger"] = {"type": "refusal", "category": category}
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": block},
        )
        await event("content_block_stop", {"type": "content_block_stop", "index": 1})
        await _plain_text_block(event, 2, answered)
        counts = {"input_tokens": usage["input_tokens"], "cache_read_input_tokens": 0}
        counts["cache_creation_input_tokens"] = 0
        iterations = [
            {"type": "message", "model": body["model"], **counts, "output_tokens": len(refused)},
            {"type": "fallback_message", "model": to, **counts, "output_tokens": len(answered)},
        ]
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        output = len(refused) + len(answered)
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": output, "iterations": iterations},
            },
        )
        await event("message_stop", {"type": "message_stop"})
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        record.outcome = "completed"
        return True

    async def _text_block(
        self,
        record: RecordedRequest,
        writer: asyncio.StreamWriter,
        event: Callable[[str, dict[str, Any]], Awaitable[None]],
        chunk: Callable[[bytes], Awaitable[None]],
        reply: Reply,
        tokens: list[str],
        index: int,
        delay: float,
    ) -> bool | None:
        """The text block, word by word, with the reply's fault in it (its result: the
        response ended there) or None."""
        await event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
        await event("ping", {"type": "ping"})
        for citation in reply.citations:
            await event(*_delta(index, "citations_delta", citation=dict(citation)))
        if reply.raw:
            await chunk(reply.raw)
        if reply.first_token_delay:
            await asyncio.sleep(reply.first_token_delay)
        in_text = (
            reply.fault is not None and reply.fault_in_input is None and not reply.fault_before_stop
        )
        fault_at = reply.fault_after if in_text else -1
        for sent in range(len(tokens) + 1):
            if sent == fault_at:
                if reply.fault != "stall":
                    return await self._fault(record, writer, event, reply)
                await asyncio.sleep(reply.stall)  # silent, then carry on as if nothing happened
            if sent == len(tokens):
                break
            if sent and delay:
                await asyncio.sleep(delay)
            piece = f"{time.time():.6f} " if reply.stamp else tokens[sent]
            await event(*_delta(index, "text_delta", text=piece))
        await event("content_block_stop", {"type": "content_block_stop", "index": index})
        return None

    async def _fault(
        self, record: RecordedRequest, writer: asyncio.StreamWriter, event: Any, reply: Reply
    ) -> bool:
        """End the body the way ``reply.fault`` says: drop, clean EOF, or an error event."""
        if reply.fault == "drop":
            record.outcome = "dropped"
            writer.transport.abort()
            return False
        event_stream = record.dialect is not None and record.dialect.event_stream
        if reply.fault == "error" and event_stream:  # Bedrock: an exception message
            data = exception_frame(reply.error_type, reply.error_message)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif reply.fault == "error":
            await event(
                "error",
                {
                    "type": "error",
                    "error": {"type": reply.error_type, "message": reply.error_message},
                },
            )
        elif reply.fault in ("crc", "truncated"):
            data = _broken(reply.fault, event_stream)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        record.outcome = "completed"
        writer.write(b"0\r\n\r\n")  # "eof" (and after "error"): no message_stop
        await writer.drain()
        return True


#: Thinking the real API signed, from replayed recordings: signature -> thinking. A
#: conversation may send those back, as it may the emulator's own.
_REPLAYED_SIGNATURES: dict[str, str] = {}


#: Paused messages of replayed recordings, by the ids of their server tool calls: their
#: blocks' (type, text). The API continues a paused turn only if it comes back as it was.
_PAUSED: dict[str, list[tuple[str, str]]] = {}


def _learn(body: bytes) -> None:
    """What a replayed recording tells the emulator to accept later: the thinking it signed,
    and the paused message a continuation must send back unchanged."""
    blocks: dict[int, list[str]] = {}  # index -> [type, text or thinking]
    stop_reason = None
    for event in _events(body):
        kind, index = event.get("type"), event.get("index", 0)
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            blocks[index] = [str(block.get("type")), "", str(block.get("id", ""))]
        elif kind == "content_block_delta" and index in blocks:
            delta = event.get("delta") or {}
            if delta.get("type") in ("thinking_delta", "text_delta"):
                blocks[index][1] += str(delta.get("thinking", delta.get("text", "")))
            elif delta.get("type") == "signature_delta":
                _REPLAYED_SIGNATURES[str(delta.get("signature"))] = blocks[index][1]
        elif kind == "message_delta":
            stop_reason = (event.get("delta") or {}).get("stop_reason")
    if stop_reason == "pause_turn":
        summary = [(kind, text if kind == "text" else "") for kind, text, _ in blocks.values()]
        for kind, _, block_id in blocks.values():
            if kind == "server_tool_use":
                _PAUSED[block_id] = summary


def _events(body: bytes) -> list[dict[str, Any]]:
    """The JSON events of a recorded body, read with the project's SSE parser."""
    events = []
    for event in SSEParser().feed(body + b"\n\n"):  # a last event without its blank line
        try:
            payload = event.json()
        except ValueError:
            continue
        if isinstance(payload, dict):
            events.append(payload)
    return events


def _fitted(reply: Reply, body: Mapping[str, Any], text: str) -> tuple[Reply, list[str], str, int]:
    """The reply within the request's ``max_tokens`` (which counts thinking): the reply, its
    text's tokens, its stop reason, and the room its text and tool input have."""
    stop_reason = reply.stop_reason
    reply = _thinking_reply(reply, body)
    room, reply = _thought_within(reply, body["max_tokens"])
    tokens = _tokenize(reply, text)
    if billed(tokens) > room:
        tokens = _within(tokens, room)
        stop_reason = "max_tokens"
    return reply, tokens, stop_reason, room


async def _server_tool_blocks(event: Any, index: int, calls: list[ToolUse]) -> int:
    """The API runs its own tools before it writes the answer: their blocks first."""
    for call in calls:
        if call.server:
            await _tool_block(event, index, call)
            index += 2
    return index


def _after_calls(stop_reason: str, calls: list[ToolUse], stopped: bool) -> str:
    if stopped:  # max_tokens stopped a call mid-input
        return "max_tokens"
    if any(not call.server for call in calls) and stop_reason == "end_turn":
        return "tool_use"
    return stop_reason


def _fields_problem(body: Mapping[str, Any]) -> str | None:
    """The request's required fields, as the API names a missing one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    return None


def _messages_problem(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """Each message's role and content, the context edits and the fallbacks."""
    beta = headers.get("anthropic-beta", "")
    for index, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{index}.role: invalid"
        problem = _content_problem(message, f"messages.{index}.content", beta)
        if problem is not None:
            return problem
    return context_problem(body, beta) or _fallbacks_problem(body, beta)


def _last_turn_problem(messages: Sequence[Mapping[str, Any]], model: str) -> str | None:
    """A conversation that ends with an assistant turn: a paused one that must come back as
    it was, or a prefill the model refuses."""
    if messages[-1]["role"] != "assistant":
        return None
    if _continues_server_tool(messages):
        return _paused_problem(messages)
    if _NO_PREFILL.match(model):
        return (
            "This model does not support assistant message prefill. The conversation "
            "must end with a user message."
        )
    return None


def _paused_problem(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """A paused message of a replayed recording that does not come back as it was."""
    content = messages[-1].get("content")
    if not isinstance(content, list):
        return None
    ids = [
        b.get("id") for b in content if isinstance(b, dict) and b.get("type") == "server_tool_use"
    ]
    known = next((_PAUSED[i] for i in ids if i in _PAUSED), None)
    sent = [
        (str(b.get("type")), str(b.get("text", "")) if b.get("type") == "text" else "")
        for b in content
        if isinstance(b, dict)
    ]
    if known is not None and sent != known:
        return (
            f"messages.{len(messages) - 1}: a paused turn must be sent back as it was "
            "(every block, in its order)"
        )
    return None


def _signed(block: Mapping[str, Any], model: str) -> bool:
    """A thinking block signed by ``model`` (a signature is bound to the model that wrote it:
    another model's is a 400, as the API answers), or replayed from a recording."""
    signature, text = block.get("signature"), block.get("thinking", "")
    return signature == _sign(text, model) or (
        isinstance(signature, str) and _REPLAYED_SIGNATURES.get(signature) == text
    )


def _structured_output(body: Mapping[str, Any]) -> str | None:
    """Structured outputs (``output_config.format``, ``json_schema``): the answer is JSON that
    the schema accepts, as the API guarantees."""
    config = body.get("output_config")
    form = config.get("format") if isinstance(config, dict) else None
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return None
    schema = form.get("schema")
    return json.dumps(_instance(schema if isinstance(schema, dict) else {}), ensure_ascii=False)


def _instance(schema: Mapping[str, Any]) -> Any:
    """A value ``schema`` accepts: its first enum value, or a plain one of its type."""
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _instance(sub) for name, sub in properties.items()}
    if kind == "array":
        items = schema.get("items")
        return [_instance(items)] if isinstance(items, dict) else []
    plain = {"string": "example", "integer": 1, "number": 1.5, "boolean": True, "null": None}
    return plain.get(kind if isinstance(kind, str) else "", "example")


def _stream_head(event_stream: bool, headers: Mapping[str, str]) -> bytes:
    """A streamed response's head: SSE, or Bedrock's event stream."""
    content_type = (
        "application/vnd.amazon.eventstream" if event_stream else "text/event-stream; charset=utf-8"
    )
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"content-type: {content_type}\r\n"
        "cache-control: no-cache\r\n"
        "transfer-encoding: chunked\r\n"
        f"request-id: req_emu_{secrets.token_hex(8)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    return head.encode()


#: the beta the request's ``fallbacks`` needs, and the fields an entry may have
SERVER_FALLBACK_BETA = "server-side-fallback-2026-07-01"
_FALLBACK_FIELDS = frozenset({"model", "max_tokens", "thinking", "output_config", "speed"})


def _falls_back(reply: Reply, body: Mapping[str, Any]) -> bool:
    """Whether the API's server-side fallback takes over this reply (a refusal)."""
    return reply.stop_reason == "refusal" and bool(body.get("fallbacks"))


def _fallbacks_problem(body: Mapping[str, Any], beta: str) -> str | None:
    fallbacks = body.get("fallbacks")
    if fallbacks is None:
        return None
    if SERVER_FALLBACK_BETA not in beta:
        return f"fallbacks: requires the anthropic-beta header {SERVER_FALLBACK_BETA!r}"
    if fallbacks == "default":
        return None
    if not isinstance(fallbacks, list) or not fallbacks:
        return "fallbacks: a non-empty list of entries, or 'default'"
    for index, entry in enumerate(fallbacks):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            return f"fallbacks.{index}.model: Field required"
        extra = set(entry) - _FALLBACK_FIELDS
        if extra:
            return f"fallbacks.{index}: Extra inputs are not permitted: {sorted(extra)}"
    return None


async def _plain_text_block(
    event: Callable[[str, dict[str, Any]], Awaitable[None]], index: int, tokens: list[str]
) -> None:
    block = {"type": "text", "text": ""}
    await event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )
    for piece in tokens:
        await event(*_delta(index, "text_delta", text=piece))
    await event("content_block_stop", {"type": "content_block_stop", "index": index})


#: message ids as each provider prefixes them
_MESSAGE_PREFIXES = {"bedrock": "msg_bdrk_", "vertex": "msg_vrtx_"}


def _broken(fault: str, event_stream: bool) -> bytes:
    """A text delta that cannot be used: its CRC wrong, or cut in half."""
    payload = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "never shown"},
    }
    if event_stream:
        whole = event_frame(payload, _dumps(payload), corrupt=fault == "crc")
    else:
        whole = _framed("lf", "content_block_delta", payload)
    return whole if fault == "crc" and event_stream else whole[: len(whole) // 2]


def _framed(framing: str, name: str, payload: dict[str, Any]) -> bytes:
    """One SSE event, framed as ``Reply.framing`` says."""
    if framing == "padded":
        return b"event: " + name.encode() + b"\ndata: " + _padded(payload) + b"\n\n"
    if framing == "data_only":
        return b"data: " + _dumps(payload) + b"\n\n"
    data = b"event: " + name.encode() + b"\ndata: " + _dumps(payload) + b"\n\n"
    if framing != "lf":  # JSON has no raw newlines: every LF here is a line end
        data = data.replace(b"\n", b"\r\n" if framing == "crlf" else b"\r")
    return data


def _padded(payload: dict[str, Any]) -> bytes:
    """JSON as the live API writes it (seen in recordings): ``ping`` with a space, and up to
    16 spaces before the last brace of a delta."""
    if payload.get("type") == "ping":
        return b'{"type": "ping"}'
    data = _dumps(payload)
    if payload.get("type") == "content_block_delta":
        data = data[:-1] + b" " * secrets.randbelow(17) + b"}"
    return data


def _message_delta(
    reply: Reply, stop_reason: str, output_tokens: int, context: ContextPlan | None = None
) -> dict[str, Any]:
    """The ``message_delta`` event: the stop reason and its details, the final usage, and
    what context management did (a compaction's revised input and its iterations)."""
    delta: dict[str, Any] = {"stop_reason": stop_reason, "stop_sequence": reply.stop_sequence}
    if reply.stop_details is not None:
        delta["stop_details"] = dict(reply.stop_details)
    if reply.container is not None:
        delta["container"] = dict(reply.container)
    event: dict[str, Any] = {
        "type": "message_delta",
        "delta": delta,
        "usage": {"output_tokens": output_tokens},
    }
    if context is not None:
        if context.iterations is not None:
            message = {"type": "message", "input_tokens": context.input_tokens}
            event["usage"] = {
                "input_tokens": context.input_tokens,
                "output_tokens": output_tokens,
                "iterations": [
                    *context.iterations,
                    {
                        **message,
                        "output_tokens": output_tokens,
                        "cache_read_input_tokens": 0,
                        "cache_creation_input_tokens": 0,
                    },
                ],
            }
        if context.applied_edits:
            event["context_management"] = {"applied_edits": context.applied_edits}
    return event


def _thinking_reply(reply: Reply, body: Mapping[str, Any]) -> Reply:
    """Asked to think, a model thinks: the reply with a demo thought when it has none."""
    thinking = body.get("thinking")
    asked = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    if reply.thinking is None and asked:
        return replace(reply, thinking=_demo_thought(body["messages"]))
    return reply


async def _compaction_block(
    event: Callable[[str, dict[str, Any]], Awaitable[None]], summary: str
) -> int:
    """The compaction block, first, as the API streams it: ``content: null``, then one delta
    with the summary and its opaque ``encrypted_content``. The next block's index."""
    start = {"type": "compaction", "content": None}
    await event(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}
    )
    await event("ping", {"type": "ping"})
    await event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": sealed_block(summary)},
    )
    await event("content_block_stop", {"type": "content_block_stop", "index": 0})
    return 1


async def _replay(record: RecordedRequest, writer: asyncio.StreamWriter, replay: Replay) -> bool:
    _learn(replay.body)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
        b"request-id: req_emu_" + secrets.token_hex(8).encode() + b"\r\n\r\n"
    )
    body = replay.body
    for start in range(0, len(body), replay.chunk):
        piece = body[start : start + replay.chunk]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        if replay.delay:
            await asyncio.sleep(replay.delay)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    record.outcome = "completed"
    return True


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    if len(head) > _MAX_HEAD:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def _error_body(error_type: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error, "request_id": "req_emu_" + secrets.token_hex(8)}


async def _write_json(
    writer: asyncio.StreamWriter, status: int, payload: Any, headers: Mapping[str, str]
) -> None:
    data = _dumps(payload)
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(data)}\r\n"
        f"request-id: {request_id or 'req_emu_' + secrets.token_hex(8)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()


_MEDIA_TYPES = {
    "image": {"image/jpeg", "image/png", "image/gif", "image/webp"},
    "document": {"application/pdf"},
}


async def _thinking_blocks(
    event: Callable[[str, dict[str, Any]], Awaitable[None]],
    reply: Reply,
    delay: float,
    index: int,
    model: str,
) -> int:
    """A reply's redacted and thinking blocks (word by word, then a signature) from block
    ``index``; the index of the next block."""
    if reply.redacted_thinking:
        block = {"type": "redacted_thinking", "data": "RW5jcnlwdGVk" + secrets.token_hex(8)}
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )
        await event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    if reply.thinking is not None:
        await event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            },
        )
        for piece in _TOKEN.findall(reply.thinking):
            if delay:
                await asyncio.sleep(delay)
            await event(*_delta(index, "thinking_delta", thinking=piece))
        signature = _sign(reply.thinking, model)
        await event(*_delta(index, "signature_delta", signature=signature))
        await event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    return index


#: Signs thinking blocks, so a follow-up that altered one is refused as the API refuses it.
_SIGNING_KEY = secrets.token_bytes(32)


def _sign(thinking: str, model: str) -> str:
    digest = hmac.new(_SIGNING_KEY, f"{model}\n{thinking}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _delta(index: int, kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    """A ``content_block_delta`` event of block ``index``: its name and its data."""
    delta = {"type": kind, **fields}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _tool_id(server: bool) -> str:
    return ("srvtoolu_emu_" if server else "toolu_emu_") + secrets.token_hex(8)


#: How tool input JSON is cut into ``input_json_delta`` pieces: sizes that land inside
#: keys, escapes (``\\u00e9``) and numbers, after an empty first piece as the API sends.
_INPUT_CUTS = (0, 1, 3, 2, 5, 1, 7, 4)


def input_pieces(value: Any) -> list[str]:
    """``value``'s JSON (ASCII, so non-ASCII text is ``\\u`` escapes) cut awkwardly."""
    text = json.dumps(value, ensure_ascii=True)
    pieces: list[str] = []
    position = 0
    for step in range(len(text) + len(_INPUT_CUTS)):
        size = _INPUT_CUTS[step % len(_INPUT_CUTS)]
        pieces.append(text[position : position + size])
        position += size
        if position >= len(text):
            break
    return pieces


async def _tool_block(
    event: Callable[[str, dict[str, Any]], Awaitable[None]],
    index: int,
    call: ToolUse,
    fault_at: int | None = None,
    limit: int | None = None,
) -> int | None:
    """A tool call's block (and a server tool's result block after it): the input pieces
    sent, or None at ``fault_at`` pieces (the caller ends the response there); ``limit``:
    the characters of input sent before the block stops unfinished (``max_tokens``)."""
    kind = "server_tool_use" if call.server else "tool_use"
    block: dict[str, Any] = {"type": kind, "id": call.id, "name": call.name, "input": {}}
    await event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )
    pieces = input_pieces(dict(call.input))
    for sent, piece in enumerate(pieces):
        if sent == fault_at:
            return None
        if limit is not None:
            if limit <= 0:
                break
            piece, limit = piece[:limit], limit - len(piece)
        await event(*_delta(index, "input_json_delta", partial_json=piece))
    await event("content_block_stop", {"type": "content_block_stop", "index": index})
    if call.server:
        result = {
            "type": f"{call.name}_tool_result",
            "tool_use_id": call.id,
            "content": call.result if call.result is not None else [],
        }
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": index + 1, "content_block": result},
        )
        await event("content_block_stop", {"type": "content_block_stop", "index": index + 1})
    return len(pieces)


async def _tool_calls(
    event: Callable[[str, dict[str, Any]], Awaitable[None]],
    index: int,
    calls: Sequence[ToolUse],
    reply: Reply,
    room: int,
) -> tuple[int, bool] | None:
    """The app's tool calls after the text, within ``room`` output tokens: the tokens their
    input billed, and whether ``max_tokens`` stopped one mid-input; None at the reply's
    fault in the first one's input."""
    spent = 0
    for number, call in enumerate(c for c in calls if not c.server):
        fault_at = reply.fault_in_input if number == 0 and reply.fault is not None else None
        cost = _json_tokens(call.input)
        limit = room * 3 if cost > room else None  # max_tokens stops it mid-input
        if await _tool_block(event, index + number, call, fault_at, limit) is None:
            return None
        spent += min(cost, room)
        room -= min(cost, room)
        if limit is not None:
            return spent, True
    return spent, False


def _thinking_problem(body: Mapping[str, Any], model: str) -> str | None:
    """What the API says of a request's ``thinking`` (None: acceptable)."""
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    problem = _thinking_type_problem(thinking, kind, body, model)
    if problem is not None:
        return problem
    if body.get("temperature") not in (None, 1):
        return "`temperature` may only be set to 1 when thinking is enabled"
    if body["messages"][-1].get("role") == "assistant" and not _continues_server_tool(
        body["messages"]
    ):
        return "Extended thinking is not compatible with assistant message prefill"
    return None


def _thinking_type_problem(
    thinking: Any, kind: Any, body: Mapping[str, Any], model: str
) -> str | None:
    if kind == "adaptive":
        if not _NO_PREFILL.match(model):
            return f"thinking.type: adaptive thinking is not supported on {model}"
        return None
    if kind != "enabled":
        return "thinking.type: Input tag does not match any of the expected tags"
    budget = thinking.get("budget_tokens")
    if type(budget) is not int or budget < 1024:
        return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
    if budget >= body["max_tokens"]:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    return None


def _content_problem(message: Mapping[str, Any], where: str, beta: str = "") -> str | None:
    """What the API would say of a message's content (None: it is well-formed); ``beta``:
    the request's ``anthropic-beta`` header."""
    content = message.get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not content:
        return f"{where}: Input should be a valid string or a non-empty list"
    for index, block in enumerate(content):
        at = f"{where}.{index}"
        kind = block.get("type") if isinstance(block, dict) else None
        problem = _block_problem(content, index, kind, at, message.get("role"), beta)
        if problem == "":  # none of those: a media block
            problem = _media_problem(block, kind, at, message.get("role"))
        if problem is not None:
            return problem
    return None


_ASSISTANT_BLOCKS = {"thinking", "redacted_thinking", "tool_use", "server_tool_use"}


def _media_problem(block: Mapping[str, Any], kind: Any, at: str, role: Any) -> str | None:
    if kind not in _MEDIA_TYPES:
        return f"{at}: Input tag '{kind}' is not a known content block type"
    if role != "user":
        return f"{at}: {kind} blocks are only allowed in user messages"
    source = block.get("source")
    if not isinstance(source, dict):
        return f"{at}.source: Field required"
    if source.get("type") == "url":
        return None
    if source.get("media_type") not in _MEDIA_TYPES[kind]:
        return f"{at}.source.media_type: Input should be one of {sorted(_MEDIA_TYPES[kind])}"
    try:
        base64.b64decode(source.get("data") or "", validate=True)
    except (binascii.Error, ValueError):
        return f"{at}.source.data: invalid base64 data"
    return None


def _block_problem(
    content: list[Any], index: int, kind: Any, at: str, role: Any, beta: str
) -> str | None:
    """What the API says of a text, compaction, fallback or tool-loop block (``""``: none
    of those, a media block's checks follow; None: well-formed)."""
    block = content[index]
    if kind == "text":
        return None if isinstance(block.get("text"), str) else f"{at}.text: Field required"
    if kind == "compaction":
        return compaction_problem(block, at, role, beta)
    if kind == "fallback":
        return _fallback_block_problem(content, index, at, role, beta)
    return _turn_block_problem(block, kind, role, at)


def _fallback_block_problem(
    content: list[Any], index: int, at: str, role: Any, beta: str
) -> str | None:
    """A server-side fallback's block sent back: in an assistant turn, with its beta, naming
    both models, in its place (between the refused model's output and the answer: never
    first, never last)."""
    block = content[index]
    if role != "assistant" or SERVER_FALLBACK_BETA not in beta:
        return f"{at}: fallback blocks need an assistant turn and the {SERVER_FALLBACK_BETA} beta"
    ends = [block.get(side) for side in ("from", "to")]
    if not all(isinstance(end, dict) and isinstance(end.get("model"), str) for end in ends):
        return f"{at}: a fallback block names its 'from' and 'to' models"
    if index in (0, len(content) - 1):
        return f"{at}: a fallback block must stay where it was, between two models' output"
    return None


def _turn_block_problem(block: Mapping[str, Any], kind: Any, role: Any, at: str) -> str | None:
    """What the API says of a block of a tool loop or of thinking; ``""``: not such a block."""
    server_result = (
        isinstance(kind, str) and kind.endswith("_tool_result") and kind != "tool_result"
    )
    if kind in _ASSISTANT_BLOCKS or server_result:
        if role != "assistant":
            return f"{at}: {kind} blocks are only allowed in assistant messages"
        if kind == "thinking" and not (
            isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str)
        ):
            return f"{at}.signature: Field required"
        if kind in ("tool_use", "server_tool_use") and not (
            isinstance(block.get("id"), str)
            and isinstance(block.get("name"), str)
            and isinstance(block.get("input"), dict)
        ):
            return f"{at}: a {kind} block needs an id, a name and an input object"
        return None
    if kind == "tool_result":
        if role != "user":
            return f"{at}: tool_result blocks are only allowed in user messages"
        if not isinstance(block.get("tool_use_id"), str):
            return f"{at}.tool_use_id: Field required"
        if not isinstance(block.get("content", ""), str | list):
            return f"{at}.content: Input should be a valid string or list"
        if not isinstance(block.get("is_error", False), bool):
            return f"{at}.is_error: Input should be a valid boolean"
        return None
    return ""


def _blocks_of(message: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [block for block in content if isinstance(block, dict) and block.get("type") == kind]


def _conversation_problem(body: Mapping[str, Any]) -> str | None:
    """What the API says of a tool loop's follow-up: every ``tool_use`` answered by a
    ``tool_result`` first in the next user turn (and no stray results), tools defined
    properly, and, with thinking on, the tool loop's assistant turn starting with its
    thinking, signature intact."""
    messages: list[Mapping[str, Any]] = body["messages"]
    thinking = body.get("thinking")
    thinking_on = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    return (
        _tools_problem(body.get("tools"))
        or _undeclared_tools_problem(body)
        or _pairing_problem(messages, str(body.get("model")))
        or (_loop_thinking_problem(messages) if thinking_on else None)
    )


def _undeclared_tools_problem(body: Mapping[str, Any]) -> str | None:
    """The API refuses ``tool_use`` and ``tool_result`` blocks in a request without tools."""
    if body.get("tools"):
        return None
    for message in body["messages"]:
        if _blocks_of(message, "tool_use") or _blocks_of(message, "tool_result"):
            return "Requests which include `tool_use` or `tool_result` blocks must define tools."
    return None


def _tools_problem(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    names = set()
    for index, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
            return f"tools.{index}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        if name in names:
            return "tools: Tool names must be unique."
        names.add(name)
        schema = tool.get("input_schema")
        described = isinstance(schema, dict) and schema.get("type") == "object"
        if "type" not in tool and not described:  # a server tool has a type instead
            return f"tools.{index}.input_schema.type: Input should be 'object'"
    return None


def _pairing_problem(messages: list[Mapping[str, Any]], model: str) -> str | None:
    for index, message in enumerate(messages):
        for block in _blocks_of(message, "thinking"):
            if not _signed(block, model):
                return f"messages.{index}.content: Invalid `signature` in `thinking` block"
        calls = [block["id"] for block in _blocks_of(message, "tool_use")]
        following = messages[index + 1] if index + 1 < len(messages) else {}
        results = _blocks_of(following, "tool_result")
        if calls:
            answered = {block.get("tool_use_id") for block in results}
            missing = [call for call in calls if call not in answered]
            if missing:
                return (
                    f"messages.{index + 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block must "
                    "have a corresponding `tool_result` block in the next message."
                )
            content = following["content"]
            if any(block.get("type") != "tool_result" for block in content[: len(results)]):
                return f"messages.{index + 1}: tool_result blocks must come first in the content"
        if message.get("role") == "user":
            previous = messages[index - 1] if index else {}
            known = {block.get("id") for block in _blocks_of(previous, "tool_use")}
            for block in _blocks_of(message, "tool_result"):
                if block.get("tool_use_id") not in known:
                    return (
                        f"messages.{index}.content: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {block.get('tool_use_id')}. Each `tool_result` "
                        "block must have a corresponding `tool_use` block in the previous message."
                    )
    return None


def _loop_thinking_problem(messages: list[Mapping[str, Any]]) -> str | None:
    """With thinking on, the tool loop in progress: its assistant turn starts with thinking."""
    if len(messages) < 2 or not _blocks_of(messages[-1], "tool_result"):
        return None
    turn = messages[-2].get("content")
    first = turn[0].get("type") if isinstance(turn, list) and turn else "text"
    if first in ("thinking", "redacted_thinking"):
        return None
    return (
        f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or "
        f"`redacted_thinking`, but found `{first}`. When `thinking` is enabled, a "
        "final `assistant` message must start with a thinking block."
    )


def _continues_server_tool(messages: Sequence[Mapping[str, Any]]) -> bool:
    """The conversation ends with an assistant turn the API paused (``pause_turn``) after a
    server tool: sending it back as is continues it, whatever the model."""
    content = messages[-1].get("content") if messages[-1].get("role") == "assistant" else None
    if not isinstance(content, list) or not content:
        return False
    kind = content[-1].get("type") if isinstance(content[-1], dict) else None
    return isinstance(kind, str) and (kind == "server_tool_use" or kind.endswith("_tool_result"))


def _content_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            block.get("text", "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _full_text(reply: Reply, messages: Iterable[Mapping[str, Any]]) -> str:
    if reply.text is not None:
        return reply.text
    if reply.tokens is not None:
        return "".join(reply.tokens)
    return _demo_text(messages)


def _blocks(body: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The prompt in order (system, then each message from the last compaction on) as
    (text, ends a cached prefix)."""
    blocks: list[tuple[str, bool]] = []
    for part in (body.get("system"), *from_last_compaction(body.get("messages", ()))):
        if isinstance(part, str):
            blocks.append((part, False))
        elif isinstance(part, list):
            for block in part:
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    blocks.append((block["text"], "cache_control" in block))
    return blocks


def _tokenize(reply: Reply, text: str) -> list[str]:
    """The delta pieces of ``text``: the reply's own ``tokens`` where ``text`` ends with them
    (a continuation sends the pieces after what the request already has), else words."""
    if reply.tokens is None:
        return _TOKEN.findall(text)
    pieces = list(reply.tokens)
    skip = len("".join(pieces)) - len(text)
    if skip < 0 or not "".join(pieces).endswith(text):
        return _TOKEN.findall(text)
    while pieces and skip >= len(pieces[0]):
        skip -= len(pieces.pop(0))
    if pieces and skip:
        pieces[0] = pieces[0][skip:]  # the continuation starts inside this piece
    return pieces


#: what the API adds to the input of a request with tools: its tool-use system prompt
TOOLS_PROMPT_TOKENS = 346


def _quarters(text: str) -> int:
    """Quarter tokens: an ASCII character one, a CJK one five, any other non-ASCII two."""
    if text.isascii():
        return len(text)
    wide = sum(1 for char in text if char >= "\u2e80")
    other = sum(1 for char in text if "\x7f" < char < "\u2e80")
    return len(text) + 4 * wide + other


def _tools_quarters(body: Mapping[str, Any]) -> int:
    tools = body.get("tools")
    if not tools:
        return 0
    return 4 * TOOLS_PROMPT_TOKENS + len(json.dumps(tools, ensure_ascii=False))


def billed(pieces: Iterable[str]) -> int:
    """The output tokens of delta pieces as the API bills them: a word (an ASCII piece) one,
    any other piece by character (:func:`_quarters`), rounded up."""
    return sum(1 if piece.isascii() else max(1, -(-_quarters(piece) // 4)) for piece in pieces)


def _within(pieces: Sequence[str], room: int) -> list[str]:
    """The pieces that fit in ``room`` output tokens."""
    kept: list[str] = []
    for piece in pieces:
        room -= billed((piece,))
        if room < 0:
            break
        kept.append(piece)
    return kept


def _json_tokens(value: Any) -> int:
    """A tool call's input as billed: JSON is dense, a token every three characters."""
    return -(-len(json.dumps(dict(value), ensure_ascii=False)) // 3)


def _thought(reply: Reply) -> int:
    """The thinking billed: what is shown, and what only a summary of was."""
    shown = billed(_TOKEN.findall(reply.thinking)) if reply.thinking is not None else 0
    return shown + reply.hidden_thinking_tokens


def _thought_within(reply: Reply, max_tokens: int) -> tuple[int, Reply]:
    """``max_tokens`` counts thinking: what it leaves for the text, and the reply with its
    thinking cut where it runs out (the answer then has no text)."""
    thought = _thought(reply)
    if thought <= max_tokens:
        return max_tokens - thought, reply
    shown = max(0, max_tokens - reply.hidden_thinking_tokens)
    kept = "".join(_within(_TOKEN.findall(reply.thinking or ""), shown))
    hidden = min(reply.hidden_thinking_tokens, max_tokens)
    return 0, replace(reply, thinking=kept, hidden_thinking_tokens=hidden)


def _demo_thought(messages: Iterable[Mapping[str, Any]]) -> str:
    prompt = ""
    for message in messages:
        if message.get("role") == "user":
            prompt = _content_text(message)
    words = len(prompt.split())
    return (
        f"The user wrote {words} word{'s' if words != 1 else ''}. "
        "I should answer directly and briefly, in the same language."
    )


def _demo_tool_call(body: Mapping[str, Any]) -> ToolUse | None:
    """The app's tool the newest user turn names ("order status" names ``order_status``),
    called with its string parameters set to the turn's last word; None when none is named
    or the turn answers a tool."""
    last = body["messages"][-1]
    if last.get("role") != "user" or _blocks_of(last, "tool_result"):
        return None
    prompt = _content_text(last)
    words = re.findall(r"[\w-]+", prompt)
    spoken = prompt.lower()
    for tool in body.get("tools") or ():
        name = tool.get("name", "") if isinstance(tool, dict) else ""
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        if not name or not isinstance(schema, dict):
            continue  # a server tool: not the demo's
        if name.lower() in spoken or name.replace("_", " ").lower() in spoken:
            properties = schema.get("properties") or {}
            arguments = {
                key: (words[-1] if words else "demo")
                for key, spec in properties.items()
                if key in (schema.get("required") or ()) and spec.get("type") == "string"
            }
            return ToolUse(name, arguments)
    return None


def _demo_text(messages: Iterable[Mapping[str, Any]]) -> str:
    messages = list(messages)
    results = _blocks_of(messages[-1], "tool_result") if messages else []
    if results:
        said = "; ".join(str(block.get("content", "")) for block in results)
        return f"The tool answered: {said[:300]}. (Demo mode: the emulator quotes it.)"
    prompt = ""
    for message in messages:
        if message.get("role") == "user":
            prompt = _content_text(message)
    quoted = " ".join(prompt.split())
    if len(quoted) > 200:
        quoted = quoted[:200] + "…"
    return (
        f"Hello! This is the quart-claude emulator (demo mode: no API key, no network). "
        f"You said: “{quoted}”. Every word of this reply is streamed as its own Server-Sent "
        f"Event, exactly as Claude's Messages API streams tokens, so the page, the relay and "
        f"your tests behave as they will in production. Set ANTHROPIC_API_KEY to talk to "
        f"Claude for real."
    )
