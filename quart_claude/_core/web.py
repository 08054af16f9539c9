"""The web types every front end shares: an :class:`HttpRequest` in, a :class:`Reply` out, the
:class:`Route` that joins them, and the replies more than one route module gives (JSON errors,
the identity, the body read as JSON). Its own module, so route modules import it and not each
other."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .budget import Refusal
from .guards import Blocked
from .request import RequestError
from .state import ClaudeState, Unauthorized

__all__ = [
    "CORS_ALLOW_HEADERS",
    "CORS_EXPOSE_HEADERS",
    "CORS_MAX_AGE",
    "CORS_METHODS",
    "SSE_HEADERS",
    "Handler",
    "HttpRequest",
    "Reply",
    "Route",
    "blocked_reply",
    "budget_exceeded",
    "identity_of",
    "json_error",
    "json_reply",
    "read_json",
    "sse_reply",
    "store_unavailable",
    "unauthorized",
]


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_JSON = "application/json"

#: CORS for the blueprint's routes (``CLAUDE_CORS_ORIGINS``), the same on both front ends.
CORS_ALLOW_HEADERS = ["Content-Type", "Last-Event-ID", "Authorization"]
CORS_METHODS = ["GET", "POST", "PATCH", "DELETE"]
CORS_EXPOSE_HEADERS = [
    "X-Stream-Id",
    "X-Conversation-Id",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
]
CORS_MAX_AGE = 600


class Headers(Protocol):
    def get(self, key: str) -> str | None: ...


@dataclass(slots=True)
class HttpRequest:
    """What the routes need of a request, whatever the framework."""

    method: str
    headers: Headers
    args: Mapping[str, str]
    remote_addr: str | None
    mimetype: str
    content_length: int | None
    #: ``read_body(limit)``: the whole body, or :class:`RequestError` (413) past ``limit``
    read_body: Callable[[int], Awaitable[bytes]]
    #: the identity (``Auth.check_token`` and the ``authorize`` hook), or Unauthorized
    authorize: Callable[[], Awaitable[str | None]]
    path_params: dict[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    secure: bool = False  # served over HTTPS (the anonymous cookie is then Secure)
    #: a ``Set-Cookie`` for the reply (the anonymous identity, minted by this request)
    set_cookie: str | None = None


@dataclass(slots=True)
class Reply:
    """A response: ``body`` bytes, or an async iterator of chunks (a stream, sent as it
    comes, never buffered and never timed out)."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes] = b""

    @property
    def streaming(self) -> bool:
        return not isinstance(self.body, bytes)


def json_reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {**(headers or {}), "Content-Type": _JSON}, json.dumps(payload).encode())


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Reply:
    return json_reply({"error": code, "message": message, **extra}, status, headers)


def sse_reply(
    body: AsyncIterator[bytes], stream_id: str, headers: dict[str, str] | None = None
) -> Reply:
    return Reply(200, {**SSE_HEADERS, **(headers or {}), "X-Stream-Id": stream_id}, body)


_ANONYMOUS_COOKIE = "claude_anon"
_YEAR = 365 * 86400


async def identity_of(state: ClaudeState, req: HttpRequest) -> str | None:
    """Who is asking: the token's or the ``authorize`` hook's identity; with conversations
    on and no auth, an anonymous one per browser, in a signed HttpOnly cookie (minted on the
    first request without one). Raises :class:`Unauthorized`."""
    owner = await req.authorize()
    if owner is not None or not state.auth.anonymous:
        return owner
    from itsdangerous import BadSignature, URLSafeSerializer

    assert state.auth.secret_key is not None  # init_app refuses anonymous conversations without
    signer = URLSafeSerializer(state.auth.secret_key, salt="quart-claude.anonymous")
    raw = req.cookies.get(_ANONYMOUS_COOKIE)
    if raw:
        try:
            return "anon:" + str(signer.loads(raw))
        except BadSignature:
            pass  # forged or from another key: a new identity
    anonymous = secrets.token_urlsafe(18)
    path = state.config.url_prefix or "/"
    req.set_cookie = (
        f"{_ANONYMOUS_COOKIE}={signer.dumps(anonymous)}; Path={path}; Max-Age={_YEAR}; "
        "HttpOnly; SameSite=Lax" + ("; Secure" if req.secure else "")
    )
    return "anon:" + anonymous


def unauthorized(state: ClaudeState, refused: Unauthorized) -> Reply:
    headers = {"WWW-Authenticate": "Bearer"} if state.config.api_tokens else None
    return json_error(401, "unauthorized", str(refused), headers)


def store_unavailable() -> Reply:
    return json_error(
        503,
        "store_unavailable",
        "the stream store is unavailable; try again shortly",
        {"Retry-After": "1"},
    )


async def read_json(state: ClaudeState, req: HttpRequest) -> Any:
    mimetype = req.mimetype
    if mimetype != _JSON and not mimetype.endswith("+json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            "send the body as JSON with 'Content-Type: application/json'",
        )
    limit = state.config.max_body_size
    if req.content_length is not None and req.content_length > limit:
        raise RequestError(413, "body_too_large", f"the body may be at most {limit} bytes")
    try:
        async with asyncio.timeout(state.config.timeout):
            raw = await req.read_body(limit)
    except TimeoutError:
        raise RequestError(408, "request_timeout", "the body took too long to arrive") from None
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


def blocked_reply(blocked: Blocked) -> Reply:
    """The 400 of a send the input guard refused (before any stream started)."""
    return json_reply(
        {"error": "blocked", "reason": blocked.reason, "message": blocked.message}, 400
    )


def budget_exceeded(refusal: Refusal) -> Reply:
    """The 429 of a request its budget cannot take (or a money budget and an unpriced model)."""
    now = time.time()
    body = refusal.body(now)
    if refusal.reason == "no_price":
        message = "this model has no price (CLAUDE_PRICES), so a money budget cannot admit it"
        return json_error(429, "budget_exceeded", message, reason="no_price", **body)
    message = f"the budget of {refusal.limit.text()} is used up until it resets"
    return json_error(
        429, "budget_exceeded", message, {"Retry-After": str(body["retry_after"])}, **body
    )


Handler = Callable[[ClaudeState, HttpRequest], Coroutine[Any, Any, Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    """One route: its path (Werkzeug's syntax, as both frameworks route), methods, handler,
    and whether it may ask who is calling (a front end calls the hook only for those)."""

    path: str
    endpoint: str
    methods: tuple[str, ...]
    handler: Handler
    asks_identity: bool = True

    async def answer(self, state: ClaudeState, req: HttpRequest) -> Reply:
        """The handler's reply, with the cookie the request minted, if it did."""
        reply = await self.handler(state, req)
        if req.set_cookie is not None:
            reply.headers["Set-Cookie"] = req.set_cookie
        return reply
