"""The blueprint: ``POST /chat/stream``, ``GET /health``, ``GET /ready``.

Views are thin: validate, create a :class:`Stream`, start its producer task, and answer with
a reader of that stream. The producer is not tied to the HTTP request, so the generation can
outlive the connection that asked for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request, send_file
from werkzeug.exceptions import HTTPException

from ._aisdk import HEADERS as AI_SDK_HEADERS
from ._aisdk import chat_id_of, to_chat_body, to_ui_message_stream
from ._extension import Claude, ClaudeState, Unauthorized
from ._request import RequestError, parse_chat_request
from ._schema import ValidationError
from ._stream import StoreUnavailable, Stream, new_stream_id
from ._telemetry import parent_context

if TYPE_CHECKING:  # redis is an optional dependency
    from ._redis_store import RemoteStream

__all__ = ["create_blueprint"]

log = logging.getLogger("quart_claude")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _json_response(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


def _json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return _json_response({"error": code, "message": message}, status, headers)


async def _read_json(state: ClaudeState) -> Any:
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            "send the body as JSON with 'Content-Type: application/json'",
        )
    limit = state.config.max_body_size
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, "body_too_large", f"the body may be at most {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(state.config.timeout):
            async for part in request.body:  # Quart's limit is fixed per app; this one is ours
                size += len(part)
                if size > limit:
                    raise RequestError(
                        413, "body_too_large", f"the body may be at most {limit} bytes"
                    )
                parts.append(part)
    except TimeoutError:
        raise RequestError(408, "request_timeout", "the body took too long to arrive") from None
    raw = b"".join(parts)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", "the body is nested too deeply") from None
    if b"\\u" in raw:  # only an escape can smuggle in a lone surrogate, which no API accepts
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise RequestError(
                400, "invalid_json", "the body holds a lone surrogate (\\ud800-\\udfff)"
            ) from None
    return body


async def _open_stream(
    state: ClaudeState, convert: Callable[[Any], Any] | None = None
) -> tuple[Stream, dict[str, str]] | Response:
    """Validate the request and start its producer: the stream and the headers its answer
    carries, or the error to answer. Both chat routes begin here, so they refuse alike."""
    relay = state.relay
    if relay is None or state.draining:
        return _json_error(
            503,
            "not_ready",
            "the Claude backend is not serving yet (or is shutting down)",
            {"Retry-After": "1"},
        )
    try:
        owner = await state.authorize()
    except Unauthorized as refused:
        return _unauthorized(state, refused)
    client = owner if owner is not None else f"addr:{request.remote_addr}"
    headers: dict[str, str] = {}
    if state.rate_limiter is not None:
        try:
            allowed, headers = await state.rate_limiter.hit(client)
        except Exception:
            log.exception("the rate limit store is unavailable")
            return _store_unavailable()
        if not allowed:
            return _json_error(
                429,
                "rate_limited",
                "too many requests from this client (CLAUDE_RATE_LIMIT)",
                headers,
            )
    try:
        body = await _read_json(state)
        if convert is not None:  # another protocol's request shape (the AI SDK's)
            body = convert(body)
        chat = parse_chat_request(body, state.config, owner)
        state.body_model.model_validate(body)  # the model the OpenAPI document is made from
    except RequestError as error:
        return _json_error(error.status, error.code, error.message)
    except ValidationError as invalid:
        first = invalid.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return _json_error(400, "invalid_request", f"'{where}': {first['msg']}")
    if state.live_streams() >= state.config.max_concurrent_streams:
        return _json_error(
            503,
            "over_capacity",
            "too many open streams on this server; try again shortly",
            {"Retry-After": "1"},
        )
    per_client = state.config.max_streams_per_client
    if per_client and state.streams_of(client) >= per_client:
        return _json_error(
            429,
            "too_many_streams",
            f"at most {per_client} open streams per client (CLAUDE_MAX_STREAMS_PER_CLIENT)",
            {"Retry-After": "1"},
        )

    stream = Stream(
        new_stream_id(),
        retry_ms=state.config.sse_retry,
        owner=owner,
        on_idle=state.stream_idle,
    )
    if state.store is not None:
        try:
            await state.store.attach(stream)
        except Exception:
            log.exception("the stream store is unavailable")
            return _store_unavailable()
    state.streams.add(stream)
    parent = parent_context(request.headers)  # the trace the stream's span joins
    state.start_producer(stream, relay.produce(stream, chat, parent), client)
    return stream, headers


async def chat_stream() -> Response:
    state = Claude.state()
    opened = await _open_stream(state)
    if isinstance(opened, Response):
        return opened
    stream, headers = opened
    response = _sse_response(stream.read(-1, state.config.heartbeat_interval), stream.id)
    response.headers.update(headers)
    return response


#: The HTTP status of a failed answer on ``POST /chat``, by error class: 429 and 4xx for
#: what the client can change, 502/503/504 for the upstream (or this server's key/model).
_CHAT_STATUS = {
    "rate_limit": 429,
    "overloaded": 503,
    "server_error": 502,
    "network_error": 502,
    "timeout": 504,
    "auth_error": 502,
    "permission_error": 502,
    "not_found": 502,
    "token_limit": 400,
    "invalid_request": 400,
    "request_too_large": 413,
    "unknown": 502,
    "shutdown": 503,
    "unavailable": 503,
    "continuation_failed": 502,
}


async def chat() -> Response:
    """The same request as ``/chat/stream``, answered as one JSON object when it is done."""
    state = Claude.state()
    opened = await _open_stream(state)
    if isinstance(opened, Response):
        return opened
    stream, headers = opened
    producer = stream.producer
    assert producer is not None
    try:
        await asyncio.shield(producer)
    except asyncio.CancelledError:  # the client left: nobody will read this answer
        stream.cancel("disconnected")
        raise
    events = [json.loads(event[6 : event.index(b"\n")]) for event in stream.events]
    final = events[-1]
    if final["type"] == "error":
        if "retry_after" in final:
            headers["Retry-After"] = str(final["retry_after"])
        status = _CHAT_STATUS.get(final["error"], 502)
        return _json_error(status, final["error"], final["message"], headers)
    start = events[0] if events[0]["type"] == "start" else {}
    return _json_response(
        {
            "id": start.get("message_id"),
            "model": start.get("model"),
            "text": "".join(event["text"] for event in events if event["type"] == "delta"),
            "stop_reason": final.get("stop_reason"),
            "usage": final.get("usage", {}),
        },
        headers=headers,
    )


async def _find(
    state: ClaudeState, stream_id: str, identity: str | None
) -> Stream | RemoteStream | None:
    """The stream (produced here, or elsewhere when Redis is configured) if it exists and
    ``identity`` may see it; otherwise None, as if it did not exist."""
    found: Stream | RemoteStream | None = state.streams.get(stream_id)
    if found is None and state.store is not None:
        found = await state.store.lookup(stream_id)
    if found is None or (found.owner is not None and found.owner != identity):
        return None
    return found


def _unauthorized(state: ClaudeState, refused: Unauthorized) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if state.config.api_tokens else None
    return _json_error(401, "unauthorized", str(refused), headers)


def _store_unavailable() -> Response:
    return _json_error(
        503,
        "store_unavailable",
        "the stream store is unavailable; try again shortly",
        {"Retry-After": "1"},
    )


def _not_found() -> Response:
    return _json_error(404, "not_found", "no such stream: unknown, expired, or not yours")


_EVENT_ID = re.compile(r"-1|[0-9]{1,18}")  # -1: before the first event (nothing seen yet)


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    if raw is None or raw == "":
        return -1
    if _EVENT_ID.fullmatch(raw) is None:
        raise RequestError(400, "invalid_request", "Last-Event-ID must be an event id (an integer)")
    return int(raw)


async def resume_stream(stream_id: str) -> Response:
    """Replay every event after ``Last-Event-ID`` (or all), then follow the stream live."""
    state = Claude.state()
    try:
        after = _last_event_id()
    except RequestError as error:
        return _json_error(error.status, error.code, error.message)
    try:
        stream = await _find(state, stream_id, await state.authorize())
    except Unauthorized as refused:
        return _unauthorized(state, refused)
    except StoreUnavailable:
        return _store_unavailable()
    if stream is None:
        return _not_found()
    if request.method == "HEAD":  # headers only: never a reader that keeps the stream alive
        return Response(b"", status=200, headers={**SSE_HEADERS, "X-Stream-Id": stream.id})
    heartbeat = state.config.heartbeat_interval
    if isinstance(stream, Stream):
        if stream.finished and after >= len(stream.events) - 1:
            return Response(status=204)  # nothing more, ever: EventSource stops reconnecting
        state.telemetry.resumed(stream.id, after)
        return _sse_response(stream.read(after, heartbeat), stream.id)
    assert state.store is not None
    if stream.done and after >= stream.count - 1:
        return Response(status=204)
    state.telemetry.resumed(stream.id, after)
    return _sse_response(state.store.read(stream.id, after, heartbeat), stream.id)


async def stop_stream(stream_id: str) -> Response:
    """The stop button: close the upstream request; readers get ``done`` / ``cancelled``."""
    state = Claude.state()
    try:
        stream = await _find(state, stream_id, await state.authorize())
        if stream is None:
            return _not_found()
        if isinstance(stream, Stream):
            stopped = stream.cancel("cancelled")
        else:  # produced on another worker: it polls for this within half a second
            assert state.store is not None
            stopped = not stream.done
            if stopped:
                await state.store.request_cancel(stream.id)
    except Unauthorized as refused:
        return _unauthorized(state, refused)
    except StoreUnavailable:
        return _store_unavailable()
    return _json_response(
        {"stream_id": stream.id, "status": "cancelled" if stopped else "finished"}
    )


def _sse_response(
    body: AsyncIterator[bytes], stream_id: str, headers: dict[str, str] | None = None
) -> Response:
    headers = {**SSE_HEADERS, **(headers or {}), "X-Stream-Id": stream_id}
    response = Response(body, status=200, headers=headers)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would silently stall long streams
    return response


async def ai_sdk_chat() -> Response:
    """``useChat``'s POST: the same producer, answered in the UI message stream protocol."""
    state = Claude.state()
    chat_ids: list[str] = []

    def convert(body: Any) -> Any:
        chat_ids.append(chat_id_of(body))
        return to_chat_body(body)

    opened = await _open_stream(state, convert)
    if isinstance(opened, Response):
        return opened
    stream, headers = opened
    await state.chats.remember(stream.owner, chat_ids[0], stream.id)
    frames = stream.read(-1, state.config.heartbeat_interval)
    return _sse_response(to_ui_message_stream(frames), stream.id, {**AI_SDK_HEADERS, **headers})


async def ai_sdk_resume(chat_id: str) -> Response:
    """``useChat({resume: true})``: the chat's stream in progress, replayed from its start
    (the client rebuilds the message from it), or 204 when there is none."""
    state = Claude.state()
    try:
        identity = await state.authorize()
        stream_id = await state.chats.active(identity, chat_id)
        stream = await _find(state, stream_id, identity) if stream_id else None
    except Unauthorized as refused:
        return _unauthorized(state, refused)
    except StoreUnavailable:
        return _store_unavailable()
    heartbeat = state.config.heartbeat_interval
    if isinstance(stream, Stream) and not stream.finished:
        frames = stream.read(-1, heartbeat)
    elif stream is not None and not isinstance(stream, Stream) and not stream.done:
        assert state.store is not None
        frames = state.store.read(stream.id, -1, heartbeat)
    else:
        return Response(status=204)
    state.telemetry.resumed(stream.id, -1)
    return _sse_response(to_ui_message_stream(frames), stream.id, AI_SDK_HEADERS)


async def metrics() -> Response:
    """Prometheus's scrape: this app's metrics (every worker's, in multiprocess mode)."""
    state = Claude.state()
    if state.config.metrics_auth:
        try:
            await state.authorize()
        except Unauthorized as refused:
            return _unauthorized(state, refused)
    assert state.telemetry.metrics is not None  # the route exists only with CLAUDE_METRICS
    exposition = state.telemetry.metrics.exposition
    body, content_type = await asyncio.to_thread(exposition, request.headers.get("Accept"))
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


async def openapi() -> Response:
    return _json_response(Claude.state().openapi)


_DOCS = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>quart-claude API</title><style>body{font:15px/1.5 system-ui,sans-serif;max-width:52rem;
margin:2rem auto;padding:0 1rem}code{background:#f3f3f3;padding:0 .2em}li{margin:.3rem 0}</style>
</head><body><h1>quart-claude API</h1><p>The OpenAPI 3.1 document:
<a href="openapi.json"><code>openapi.json</code></a> (load it in any OpenAPI viewer).</p>
<ul id="ops"></ul><script>
fetch("openapi.json").then((r) => r.json()).then((doc) => {
  const list = document.getElementById("ops");
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = method.toUpperCase() + " " + path;
      li.append(code, " " + (op.summary || ""));
      list.append(li);
    }
  }
});
</script></body></html>"""


async def docs() -> Response:
    """A page listing the routes, from the document (no CDN, no dependency)."""
    return Response(_DOCS, content_type="text/html; charset=utf-8")


async def health() -> dict[str, Any]:
    return {"status": "ok", "timestamp": int(time.time())}


async def ready() -> Response:
    state = Claude.state()
    if state.ready:
        if state.store is not None and not await state.store.ping():
            return _json_response({"status": "store_unavailable"}, 503)
        return _json_response({"status": "ready", "streams": state.live_streams()})
    status = "draining" if state.draining else "starting"
    return _json_response({"status": status}, 503)


_ROUTES = {  # path -> methods it answers (HEAD comes with GET)
    "/chat": ("POST",),
    "/chat/stream": ("POST",),
    "/chat/stream/<stream_id>": ("GET", "DELETE"),
    "/health": ("GET",),
    "/ready": ("GET",),
    "/claude-stream.js": ("GET",),
    "/openapi.json": ("GET",),
    "/ai-sdk/chat": ("POST",),
    "/ai-sdk/chat/<chat_id>/stream": ("GET",),
    "/docs": ("GET",),
    "/metrics": ("GET",),
}
_CLIENT_SCRIPT = Path(__file__).parent / "static" / "claude-stream.js"


async def client_script() -> Response:
    """The browser client, served next to the routes it speaks to (no build step)."""
    response = await send_file(_CLIENT_SCRIPT, mimetype="text/javascript")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _method_not_allowed(allowed: tuple[str, ...]) -> Callable[..., Awaitable[Response]]:
    allow = ", ".join((*allowed, "HEAD") if "GET" in allowed else allowed)

    async def view(**_: Any) -> Response:
        return _json_error(
            405, "method_not_allowed", f"use {allow} here", {"Allow": allow + ", OPTIONS"}
        )

    return view


async def _http_error(error: HTTPException) -> Response:
    """Errors Quart raises inside our views (a body it refused, say) answer JSON too."""
    name = (error.name or "error").lower().replace(" ", "_")
    return _json_error(error.code or 500, name, error.description or name)


async def _internal_error(error: Exception) -> Response:
    log.error("unexpected error in %s %s", request.method, request.path, exc_info=error)
    return _json_error(500, "internal_error", "an unexpected error occurred")


def create_blueprint(*, with_metrics: bool = True) -> Blueprint:
    blueprint = Blueprint("claude", __name__)
    blueprint.add_url_rule("/chat", "chat", chat, methods=["POST"])
    blueprint.add_url_rule("/chat/stream", "chat_stream", chat_stream, methods=["POST"])
    blueprint.add_url_rule(
        "/chat/stream/<stream_id>", "resume_stream", resume_stream, methods=["GET"]
    )
    blueprint.add_url_rule(
        "/chat/stream/<stream_id>", "stop_stream", stop_stream, methods=["DELETE"]
    )
    blueprint.add_url_rule("/health", "health", health, methods=["GET"])
    blueprint.add_url_rule("/ready", "ready", ready, methods=["GET"])
    blueprint.add_url_rule("/claude-stream.js", "client_script", client_script, methods=["GET"])
    blueprint.add_url_rule("/openapi.json", "openapi", openapi, methods=["GET"])
    blueprint.add_url_rule("/ai-sdk/chat", "ai_sdk_chat", ai_sdk_chat, methods=["POST"])
    blueprint.add_url_rule(
        "/ai-sdk/chat/<chat_id>/stream", "ai_sdk_resume", ai_sdk_resume, methods=["GET"]
    )
    blueprint.add_url_rule("/docs", "docs", docs, methods=["GET"])
    if with_metrics:
        blueprint.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    for index, (path, allowed) in enumerate(_ROUTES.items()):
        if path == "/metrics" and not with_metrics:
            continue
        others = [method for method in _METHODS if method not in allowed]
        blueprint.add_url_rule(
            path, f"method_not_allowed_{index}", _method_not_allowed(allowed), methods=others
        )
    blueprint.register_error_handler(HTTPException, _http_error)
    blueprint.register_error_handler(Exception, _internal_error)
    return blueprint
