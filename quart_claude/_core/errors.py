"""Upstream failures, classified once into the classes of the event protocol.

Every way a Claude request can fail (an HTTP status from the SDK, an in-stream ``error`` event,
a raw ``httpx2`` transport error the SDK lets escape mid-stream, a body that ends without
``message_stop``) becomes one :class:`UpstreamError` with a class name, ``retryable``, an
optional ``retry_after`` and a message that is safe to show a user.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import anthropic
import httpx2

from .redact import redact

__all__ = ["ERROR_CLASSES", "UpstreamError", "classify_exception", "classify_status"]

log = logging.getLogger("quart_claude")

#: class -> (retryable by default, safe message)
ERROR_CLASSES: dict[str, tuple[bool, str]] = {
    "rate_limit": (True, "Claude is receiving too many requests; try again shortly."),
    "overloaded": (True, "Claude is temporarily overloaded; try again shortly."),
    "server_error": (True, "Claude had a temporary server error; try again."),
    "network_error": (True, "The connection to Claude was interrupted; try again."),
    "timeout": (True, "Claude did not respond in time; try again."),
    "auth_error": (False, "The server's Claude API key was rejected."),
    "permission_error": (False, "The server's Claude API key may not use this resource."),
    "not_found": (False, "The requested Claude model or resource was not found."),
    "token_limit": (False, "The conversation is too long for the model's context window."),
    "invalid_request": (False, "Claude rejected the request as invalid."),
    "request_too_large": (False, "The request is too large for Claude."),
    "unknown": (False, "An unexpected error occurred while talking to Claude."),
    "shutdown": (True, "The server is restarting; try again."),
    "unavailable": (True, "The server generating this answer went away; try again."),
    "continuation_failed": (
        True,
        "The answer was interrupted and could not be continued exactly; ask again.",
    ),
}

#: The longest ``retry-after`` passed on (seconds): a day. Anything longer is a day.
MAX_RETRY_AFTER = 86_400.0

_STATUS_CLASSES = {
    401: "auth_error",
    403: "permission_error",
    404: "not_found",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
    529: "overloaded",
}

# In-stream ``error`` events arrive under HTTP 200; their ``error.type`` says what they are.
_TYPE_CLASSES = {
    "rate_limit_error": "rate_limit",
    "overloaded_error": "overloaded",
    "api_error": "server_error",
    "timeout_error": "server_error",
    "authentication_error": "auth_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found",
    "request_too_large": "request_too_large",
    "invalid_request_error": "invalid_request",
}

_TOKEN_LIMIT_HINTS = ("prompt is too long", "context window", "context length", "too many tokens")
_SPEND_LIMIT = "enforced_spend_limit_reached"


class UpstreamError(Exception):
    """A classified upstream failure. ``str()`` is the safe message."""

    def __init__(
        self,
        error_class: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        message: str | None = None,
        request_id: str | None = None,
        detail: str = "",
    ) -> None:
        default_retryable, default_message = ERROR_CLASSES[error_class]
        self.error_class = error_class
        self.retryable: bool = default_retryable if retryable is None else retryable
        self.retry_after = retry_after
        self.message: str = redact(message) if message else default_message
        self.request_id = request_id
        self.detail: str = redact(detail)  # for logs only: never sent to clients
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"UpstreamError({self.error_class!r}, retryable={self.retryable})"

    def event(self, *, partial: bool) -> dict[str, Any]:
        """The protocol's ``error`` event; ``partial`` when some text was already sent."""
        payload: dict[str, Any] = {
            "type": "error",
            "error": self.error_class,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after is not None:
            payload["retry_after"] = max(1, math.ceil(self.retry_after))
        if partial:
            payload["partial"] = True
        return payload


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` (wins) or ``retry-after`` (seconds or HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            ms = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(ms) and ms > 0:
                return min(ms / 1000, MAX_RETRY_AFTER)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - time.time()
    return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) and seconds > 0 else None


def _should_retry_header(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def classify_status(
    status: int,
    error_type: str | None,
    api_message: str,
    error_code: str | None,
    headers: Mapping[str, str],
    request_id: str | None = None,
) -> UpstreamError:
    """Classify an error response (an HTTP status, or 200 with an in-stream ``error`` event)."""
    if status == 200:
        error_class = _TYPE_CLASSES.get(error_type or "", "unknown")
    else:
        error_class = _STATUS_CLASSES.get(status) or ("server_error" if status >= 500 else "")
        if not error_class:
            error_class = "invalid_request" if status == 400 else "unknown"
    lowered = api_message.lower()
    if error_class == "invalid_request" and any(hint in lowered for hint in _TOKEN_LIMIT_HINTS):
        error_class = "token_limit"
    retryable = ERROR_CLASSES[error_class][0]
    if error_class == "rate_limit" and (
        error_code == _SPEND_LIMIT or (error_code is None and "spend limit" in lowered)
    ):
        retryable = False
    override = _should_retry_header(headers)
    if override is not None:
        retryable = override
    retry_after = parse_retry_after(headers)
    return UpstreamError(
        error_class,
        retryable=retryable,
        retry_after=retry_after,
        request_id=request_id,
        detail=f"status={status} type={error_type} message={api_message[:300]!r}",
    )


def classify_exception(exc: BaseException) -> UpstreamError:
    """Map anything the SDK or the transport raises to an :class:`UpstreamError`."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        return classify_status(
            exc.status_code,
            exc.type,
            exc.api_message or "",
            exc.error_code,
            exc.response.headers,
            exc.request_id,
        )
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return UpstreamError("timeout", detail=type(exc).__name__)
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return UpstreamError("network_error", detail=f"{type(exc).__name__}: {exc}")
    log.error("unclassified upstream failure", exc_info=exc)
    return UpstreamError("unknown", detail=type(exc).__name__)
