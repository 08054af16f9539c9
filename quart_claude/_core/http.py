"""The routes, written once for every front end: an :class:`HttpRequest` in, a :class:`Reply`
out, on the event loop that serves the streams.

A front end (Quart's blueprint, Flask's) only translates: its request into an
:class:`HttpRequest` (and the ``authorize`` hook's answer, called in its own request context),
and the :class:`Reply` into its response; a body that is an async iterator is the stream. So
validation, status codes, headers and the event protocol cannot differ between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .aisdk import HEADERS as AI_SDK_HEADERS
from .aisdk import (
    chat_id_of,
    conversation_of,
    to_chat_body,
    to_conversation_body,
    to_ui_message_stream,
)
from .budget import BudgetRefused, usage_view
from .guards import Blocked
from .request import ChatRequest, RequestError, SendOptions, read_chat
from .schema import ValidationError, problem
from .sse import payload_of
from .state import ClaudeState, Unauthorized
from .store import Found
from .stream import Cancel, StoreUnavailable, Stream, new_stream_id
from .web import (
    CORS_ALLOW_HEADERS,
    CORS_EXPOSE_HEADERS,
    CORS_MAX_AGE,
    CORS_METHODS,
    SSE_HEADERS,
    HttpRequest,
    Reply,
    Route,
    blocked_reply,
    budget_exceeded,
    identity_of,
    json_error,
    json_reply,
    read_json,
    sse_reply,
    store_unavailable,
    unauthorized,
)

__all__ = [
    "CORS_ALLOW_HEADERS",
    "CORS_EXPOSE_HEADERS",
    "CORS_MAX_AGE",
    "CORS_METHODS",
    "ROUTES",
    "HttpRequest",
    "Reply",
    "Route",
    "json_error",
    "method_not_allowed",
    "routes_for",
]

log = logging.getLogger("quart_claude")


def _not_found() -> Reply:
    return json_error(404, "not_found", "no such stream: unknown, expired, or not yours")


async def _open_stream(
    state: ClaudeState,
    req: HttpRequest,
    convert: Callable[[Any, str | None], Any] | None = None,
    *,
    whole: bool = False,
) -> tuple[Stream, dict[str, str]] | Reply:
    """Validate the request and start its producer: the stream and the headers its answer
    carries, or the error to answer. Both chat routes begin here, so they refuse alike."""
    if state.relay is None or state.draining:
        return json_error(
            503,
            "not_ready",
            "the Claude backend is not serving yet (or is shutting down)",
            {"Retry-After": "1"},
        )
    try:
        owner = await identity_of(state, req)
    except Unauthorized as refused:
        return unauthorized(state, refused)
    client = owner if owner is not None else f"addr:{req.remote_addr}"
    headers = await _rate_limited(state, client)
    if isinstance(headers, Reply):
        return headers
    parsed = await _parse(state, req, owner, convert)
    if isinstance(parsed, Reply):
        return parsed
    chat, options = parsed
    over = _over_capacity(state, client)
    if over is not None:
        return over
    if options is not None:  # a stored conversation's turn
        # conversations' routes load SQLAlchemy: only an app with conversations pays for it
        from .conversation_routes import open_turn

        opened = await open_turn(
            state,
            chat,
            options,
            stream_id=new_stream_id(),
            owner=owner,
            client=client,
            headers=req.headers,
            whole=whole,
        )
        if isinstance(opened, Reply):
            return opened
        return opened[0], {**headers, **opened[1]}
    opened_stream = await _opened(state, chat, owner, client, req)
    return opened_stream if isinstance(opened_stream, Reply) else (opened_stream, headers)


async def _opened(
    state: ClaudeState, chat: ChatRequest, owner: str | None, client: str, req: HttpRequest
) -> Stream | Reply:
    """The stream of a request with no conversation, or why it did not open."""
    try:
        return await state.open_stream(
            new_stream_id(), chat, owner=owner, client=client, headers=req.headers
        )
    except StoreUnavailable:
        return store_unavailable()
    except BudgetRefused as refused:
        return budget_exceeded(refused.refusal)
    except Blocked as blocked:
        return blocked_reply(blocked)


async def _rate_limited(state: ClaudeState, client: str) -> dict[str, str] | Reply:
    """The rate limit's headers, or its 429 (a 503 when its store is down)."""
    if state.rate_limiter is None:
        return {}
    try:
        allowed, headers = await state.rate_limiter.hit(client)
    except Exception:
        log.exception("the rate limit store is unavailable")
        return store_unavailable()
    if not allowed:
        return json_error(
            429, "rate_limited", "too many requests from this client (CLAUDE_RATE_LIMIT)", headers
        )
    return headers


def _over_capacity(state: ClaudeState, client: str) -> Reply | None:
    """This worker's 503, or the client's 429, when one more stream would be too many."""
    if len(state.producers) >= state.config.max_concurrent_streams:
        return json_error(
            503,
            "over_capacity",
            "too many open streams on this server; try again shortly",
            {"Retry-After": "1"},
        )
    per_client = state.config.max_streams_per_client
    if per_client and state.producers.of(client) >= per_client:
        return json_error(
            429,
            "too_many_streams",
            f"at most {per_client} open streams per client (CLAUDE_MAX_STREAMS_PER_CLIENT)",
            {"Retry-After": "1"},
        )
    return None


async def usage(state: ClaudeState, req: HttpRequest) -> Reply:
    """The caller's own usage: each limit in its current period, and the last 7 days."""
    try:
        owner = await identity_of(state, req)
    except Unauthorized as refused:
        return unauthorized(state, refused)
    identity = owner if owner is not None else f"addr:{req.remote_addr}"
    budgets = state.budgets
    if budgets is None:
        return json_reply({"limits": [], "days": [], "unlimited": True})
    now = time.time()
    try:
        limits = await budgets.limits_for(identity)
        used = await budgets.ledger.used(identity, limits, now)
        days = await budgets.ledger.days(identity, 7, now)
    except Exception:
        log.exception("the usage ledger is unavailable")
        return store_unavailable()
    return json_reply(
        {"limits": usage_view(limits, used, now), "days": days, "unlimited": not limits}
    )


async def _parse(
    state: ClaudeState,
    req: HttpRequest,
    owner: str | None,
    convert: Callable[[Any, str | None], Any] | None,
) -> tuple[ChatRequest, SendOptions | None] | Reply:
    """The request, validated once by the app's model (with conversations on, its
    conversation fields apart)."""
    try:
        body = await read_json(state, req)
        if convert is not None:  # another protocol's request shape (the AI SDK's)
            body = convert(body, owner)
        chat, options = read_chat(
            body, state.body_model, state.config, owner, conversation=state.conversations_on
        )
    except RequestError as error:
        return json_error(error.status, error.code, error.message)
    except ValidationError as invalid:
        return json_error(400, "invalid_request", problem(invalid))
    if options is not None and convert is not None:  # useChat names its chats: a new id is new
        options = dataclasses.replace(options, create=True)
    return chat, options


async def chat_stream(state: ClaudeState, req: HttpRequest) -> Reply:
    opened = await _open_stream(state, req)
    if isinstance(opened, Reply):
        return opened
    stream, headers = opened
    return sse_reply(stream.read(-1, state.config.heartbeat_interval), stream.id, headers)


#: The HTTP status of a failed answer on ``POST /chat``, by error class: 429 and 4xx for
#: what the client can change, 502/503/504 for the upstream (or this server's key/model).
_CHAT_STATUS = {
    "rate_limit": 429,
    "overloaded": 503,
    "server_error": 502,
    "network_error": 502,
    "timeout": 504,
    "auth_error": 502,
    "billing_error": 502,
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


async def chat(state: ClaudeState, req: HttpRequest) -> Reply:
    """The same request as ``/chat/stream``, answered as one JSON object when it is done."""
    opened = await _open_stream(state, req, whole=True)
    if isinstance(opened, Reply):
        return opened
    stream, headers = opened
    producer = stream.producer  # None: it is done already
    try:
        if producer is not None:
            await asyncio.shield(producer)
    except asyncio.CancelledError:  # the client left: nobody will read this answer
        stream.cancel(Cancel.DISCONNECTED)
        raise
    events = [payload_of(event) for event in stream.events]
    final = events[-1]
    if final["type"] == "error":
        if "retry_after" in final:
            headers["Retry-After"] = str(final["retry_after"])
        status = _CHAT_STATUS.get(final["error"], 502)
        return json_error(status, final["error"], final["message"], headers)
    return json_reply(_whole_answer(events), headers=headers)


def _whole_answer(events: list[dict[str, Any]]) -> dict[str, Any]:
    """``POST /chat``'s body: a finished stream's events as one answer."""
    start = events[0] if events[0]["type"] == "start" else {}
    final = events[-1]
    reply: dict[str, Any] = {
        "id": start.get("message_id"),
        "model": start.get("model"),
        "text": "".join(event["text"] for event in events if event["type"] == "delta"),
        "stop_reason": final.get("stop_reason"),
        "usage": final.get("usage", {}),
    }
    for key in ("conversation_id", "user_message_id", "assistant_message_id"):
        if key in start:
            reply[key] = start[key]
    for reported in ("stop_details", "container", "blocked"):
        if reported in final:
            reply[reported] = final[reported]
    calls = _tool_calls(events)
    if calls:
        reply["tool_calls"] = calls
    citations = [event for event in events if event["type"] == "citation"]
    if citations:
        reply["citations"] = citations
    return reply


def _tool_calls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls with their results, as readers saw them."""
    calls: dict[str, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "tool_call":
            calls[event["id"]] = {key: value for key, value in event.items() if key != "type"}
        elif event["type"] == "tool_result" and event["id"] in calls:
            calls[event["id"]].update(is_error=event["is_error"], output=event.get("output"))
    return list(calls.values())


_EVENT_ID = re.compile(r"-1|[0-9]{1,18}")  # -1: before the first event (nothing seen yet)


def _last_event_id(req: HttpRequest) -> int:
    raw = req.headers.get("Last-Event-ID")
    if raw is None:
        raw = req.args.get("last_event_id")
    if raw is None or raw == "":
        return -1
    if _EVENT_ID.fullmatch(raw) is None:
        raise RequestError(400, "invalid_request", "Last-Event-ID must be an event id (an integer)")
    return int(raw)


async def _find(state: ClaudeState, req: HttpRequest, stream_id: str) -> Found | Reply:
    """The stream, or the reply that says why not (401, 404, 503)."""
    try:
        found = await state.find(stream_id, await identity_of(state, req))
    except Unauthorized as refused:
        return unauthorized(state, refused)
    except StoreUnavailable:
        return store_unavailable()
    return _not_found() if found is None else found


async def resume_stream(state: ClaudeState, req: HttpRequest) -> Reply:
    """Replay every event after ``Last-Event-ID`` (or all), then follow the stream live."""
    try:
        after = _last_event_id(req)
    except RequestError as error:
        return json_error(error.status, error.code, error.message)
    stream = await _find(state, req, req.path_params["stream_id"])
    if isinstance(stream, Reply):
        return stream
    if req.method == "HEAD":  # headers only: never a reader that keeps the stream alive
        return Reply(200, {**SSE_HEADERS, "X-Stream-Id": stream.id})
    events = state.read(stream, after)
    if events is None:
        return Reply(204, {})  # nothing more, ever: EventSource stops reconnecting
    state.telemetry.resumed(stream.id, after)
    return sse_reply(events, stream.id)


async def stop_stream(state: ClaudeState, req: HttpRequest) -> Reply:
    """The stop button: close the upstream request; readers get ``done`` / ``cancelled``."""
    stream = await _find(state, req, req.path_params["stream_id"])
    if isinstance(stream, Reply):
        return stream
    try:
        stopped = await state.stop(stream)
    except StoreUnavailable:
        return store_unavailable()
    return json_reply({"stream_id": stream.id, "status": "cancelled" if stopped else "finished"})


async def ai_sdk_chat(state: ClaudeState, req: HttpRequest) -> Reply:
    """``useChat``'s POST: the same producer, answered in the UI message stream protocol."""
    chat_ids: list[str] = []

    def convert(body: Any, owner: str | None) -> Any:
        chat_ids.append(chat_id_of(body))
        if state.conversations_on:  # the chat is a stored conversation: send only its new turn
            return to_conversation_body(body, conversation_of(owner, chat_ids[0]))
        return to_chat_body(body)

    opened = await _open_stream(state, req, convert)
    if isinstance(opened, Reply):
        return opened
    stream, headers = opened
    await state.remember_chat(stream.owner, chat_ids[0], stream.id)
    frames = stream.read(-1, state.config.heartbeat_interval)
    return sse_reply(to_ui_message_stream(frames), stream.id, {**AI_SDK_HEADERS, **headers})


async def ai_sdk_resume(state: ClaudeState, req: HttpRequest) -> Reply:
    """``useChat({resume: true})``: the chat's stream in progress, replayed from its start
    (the client rebuilds the message from it), or 204 when there is none."""
    try:
        identity = await identity_of(state, req)
        stream_id = await state.active_chat(identity, req.path_params["chat_id"])
        stream = await state.find(stream_id, identity) if stream_id else None
    except Unauthorized as refused:
        return unauthorized(state, refused)
    except StoreUnavailable:
        return store_unavailable()
    frames = state.read(stream, -1, live_only=True) if stream is not None else None
    if stream is None or frames is None:
        return Reply(204, {})
    state.telemetry.resumed(stream.id, -1)
    return sse_reply(to_ui_message_stream(frames), stream.id, AI_SDK_HEADERS)


async def metrics(state: ClaudeState, req: HttpRequest) -> Reply:
    """Prometheus's scrape: this app's metrics (every worker's, in multiprocess mode)."""
    if state.config.metrics_auth:
        try:
            await req.authorize()
        except Unauthorized as refused:
            return unauthorized(state, refused)
    assert state.telemetry.metrics is not None  # the route exists only with CLAUDE_METRICS
    exposition = state.telemetry.metrics.exposition
    body, content_type = await asyncio.to_thread(exposition, req.headers.get("Accept"))
    return Reply(200, {"Content-Type": content_type, "Cache-Control": "no-store"}, body)


async def openapi(state: ClaudeState, req: HttpRequest) -> Reply:
    return json_reply(state.openapi)


_DOCS = b"""<!doctype html><html lang="en"><head><meta charset="utf-8">
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


async def docs(state: ClaudeState, req: HttpRequest) -> Reply:
    """A page listing the routes, from the document (no CDN, no dependency)."""
    return Reply(200, {"Content-Type": "text/html; charset=utf-8"}, _DOCS)


async def health(state: ClaudeState, req: HttpRequest) -> Reply:
    return json_reply({"status": "ok", "timestamp": int(time.time())})


async def ready(state: ClaudeState, req: HttpRequest) -> Reply:
    if state.ready:
        if not await state.store.ping():
            return json_reply({"status": "store_unavailable"}, 503)
        conversations = state.conversations
        if conversations is not None and not await conversations.ping():
            return json_reply({"status": "database_unavailable"}, 503)
        return json_reply({"status": "ready", "streams": len(state.producers)})
    return json_reply({"status": "draining" if state.draining else "starting"}, 503)


_CLIENT_SCRIPT = Path(__file__).parent.parent / "static" / "claude-stream.js"


async def client_script(state: ClaudeState, req: HttpRequest) -> Reply:
    """The browser client, served next to the routes it speaks to (no build step)."""
    return Reply(
        200,
        {"Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "public, max-age=3600"},
        _script(),
    )


_script_bytes: bytes | None = None


def _script() -> bytes:
    global _script_bytes
    if _script_bytes is None:
        _script_bytes = _CLIENT_SCRIPT.read_bytes()
    return _script_bytes


ROUTES = (
    Route("/chat", "chat", ("POST",), chat),
    Route("/chat/stream", "chat_stream", ("POST",), chat_stream),
    Route("/chat/stream/<stream_id>", "resume_stream", ("GET",), resume_stream),
    Route("/chat/stream/<stream_id>", "stop_stream", ("DELETE",), stop_stream),
    Route("/health", "health", ("GET",), health, asks_identity=False),
    Route("/ready", "ready", ("GET",), ready, asks_identity=False),
    Route("/claude-stream.js", "client_script", ("GET",), client_script, asks_identity=False),
    Route("/openapi.json", "openapi", ("GET",), openapi, asks_identity=False),
    Route("/ai-sdk/chat", "ai_sdk_chat", ("POST",), ai_sdk_chat),
    Route("/ai-sdk/chat/<chat_id>/stream", "ai_sdk_resume", ("GET",), ai_sdk_resume),
    Route("/docs", "docs", ("GET",), docs, asks_identity=False),
    Route("/metrics", "metrics", ("GET",), metrics),
    Route("/usage", "usage", ("GET",), usage),
)

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def routes_for(state: ClaudeState) -> list[Route]:
    """This app's routes (``/metrics`` only with ``CLAUDE_METRICS``, the conversations'
    only with them on)."""
    routes = [r for r in ROUTES if r.path != "/metrics" or state.config.metrics]
    if state.conversations_on:
        from .conversation_routes import CONVERSATION_ROUTES

        routes += CONVERSATION_ROUTES
    return routes


def method_not_allowed(routes: list[Route]) -> list[tuple[str, tuple[str, ...], Reply]]:
    """For each path, the methods it does not answer and the 405 they get (JSON, ``Allow``)."""
    allowed: dict[str, tuple[str, ...]] = {}
    for route in routes:
        allowed[route.path] = allowed.get(route.path, ()) + route.methods
    answers = []
    for path, methods in allowed.items():
        allow = ", ".join((*methods, "HEAD") if "GET" in methods else methods)
        reply = json_error(
            405, "method_not_allowed", f"use {allow} here", {"Allow": allow + ", OPTIONS"}
        )
        others = tuple(method for method in _METHODS if method not in methods)
        answers.append((path, others, reply))
    return answers
