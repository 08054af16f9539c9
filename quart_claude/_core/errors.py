"""Upstream failures, classified once into the classes of the event protocol
(:mod:`.protocol`, which imports no SDK: the stores and the front ends use it).

Every way a Claude request can fail (an HTTP status from the SDK, an in-stream ``error`` event,
a raw ``httpx2`` transport error the SDK lets escape mid-stream, a body that ends without
``message_stop``) becomes one :class:`UpstreamError` with a class name, ``retryable``, an
optional ``retry_after`` and a message that is safe to show a user.
"""

from __future__ import annotations

import email.utils
import logging
import math
import sys
import time
from collections.abc import Mapping

from .protocol import ERROR_CLASSES, UpstreamError

__all__ = [
    "ERROR_CLASSES",
    "UpstreamError",
    "classify_aws",
    "classify_exception",
    "classify_response",
    "classify_status",
]

log = logging.getLogger("quart_claude")

#: The longest ``retry-after`` passed on (seconds): a day. Anything longer is a day.
MAX_RETRY_AFTER = 86_400.0

_STATUS_CLASSES = {
    401: "auth_error",
    402: "billing_error",
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
    "billing_error": "billing_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found",
    "request_too_large": "request_too_large",
    "invalid_request_error": "invalid_request",
}

# Bedrock's exceptions (an ``exception`` message mid-stream, ``x-amzn-errortype`` on an HTTP
# error: ``ThrottlingException:http://internal.amazon.com/...``), lower-cased
_AWS_CLASSES = {
    "throttlingexception": "rate_limit",
    "servicequotaexceededexception": "rate_limit",
    "serviceunavailableexception": "overloaded",
    "modelnotreadyexception": "overloaded",
    "modelstreamerrorexception": "server_error",
    "modelerrorexception": "server_error",
    "internalserverexception": "server_error",
    "modeltimeoutexception": "timeout",
    "validationexception": "invalid_request",
    "accessdeniedexception": "permission_error",
    "unrecognizedclientexception": "auth_error",
    "expiredtokenexception": "auth_error",
    "invalidsignatureexception": "auth_error",
    "incompletesignatureexception": "auth_error",
    "resourcenotfoundexception": "not_found",
}

# Google's canonical error statuses (Vertex AI's quota, auth and routing errors)
_GOOGLE_CLASSES = {
    "RESOURCE_EXHAUSTED": "rate_limit",
    "UNAVAILABLE": "overloaded",
    "INTERNAL": "server_error",
    "UNKNOWN": "server_error",
    "DEADLINE_EXCEEDED": "timeout",
    "PERMISSION_DENIED": "permission_error",
    "UNAUTHENTICATED": "auth_error",
    "INVALID_ARGUMENT": "invalid_request",
    "FAILED_PRECONDITION": "invalid_request",
    "NOT_FOUND": "not_found",
}

_TOKEN_LIMIT_HINTS = (
    "prompt is too long",
    "input is too long",  # Bedrock's
    "context window",
    "context length",
    "too many tokens",
)
_SPEND_LIMIT = "enforced_spend_limit_reached"


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
    if status == 200:  # the API's error type, or a Bedrock exception message's name
        kind = error_type or ""
        error_class = _TYPE_CLASSES.get(kind) or _AWS_CLASSES.get(kind.lower(), "unknown")
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


def _classified(
    error_class: str,
    status: int | None,
    kind: str,
    message: str,
    headers: Mapping[str, str],
    request_id: str | None,
) -> UpstreamError:
    """A provider's error of ``error_class`` (token limits told by the message)."""
    if error_class == "invalid_request" and any(h in message.lower() for h in _TOKEN_LIMIT_HINTS):
        error_class = "token_limit"
    return UpstreamError(
        error_class,
        retry_after=parse_retry_after(headers),
        request_id=request_id,
        detail=f"status={status} type={kind} message={message[:300]!r}",
    )


def classify_aws(
    kind: str,
    message: str,
    *,
    status: int | None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> UpstreamError:
    """A Bedrock exception: an ``exception`` message mid-stream (``status`` None), or an
    HTTP error and its ``x-amzn-errortype``."""
    name = kind.split(":", 1)[0].strip().lower()
    error_class = _AWS_CLASSES.get(name)
    if error_class is None:
        fallback = _STATUS_CLASSES.get(status or 500) or "server_error"
        error_class = "invalid_request" if status == 400 else fallback
    return _classified(error_class, status, kind, message, headers or {}, request_id)


def _google_error(body: object) -> Mapping[str, object] | None:
    """Google's ``{"error": {"code", "message", "status"}}``, also as a one-item array."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("status"), str) and "type" not in error:
        return error
    return None


def _aws_message(body: object) -> str:
    if isinstance(body, dict):
        message = body.get("message") or body.get("Message")
        return message if isinstance(message, str) else ""
    return ""


def classify_response(
    status: int, headers: Mapping[str, str], body: object, request_id: str | None
) -> UpstreamError:
    """An error response: its status, headers and body (JSON, or text), from the SDK's
    ``APIStatusError`` or read by :mod:`.first_party`. Bedrock's and Google's shapes are
    told by their header and body; the API's by ``error.type`` and ``error.message``."""
    aws = headers.get("x-amzn-errortype")
    if aws:
        return classify_aws(
            aws,
            _aws_message(body),
            status=status,
            headers=headers,
            request_id=request_id or headers.get("x-amzn-requestid"),
        )
    google = _google_error(body)
    if google is not None:
        error_class = _GOOGLE_CLASSES.get(str(google["status"]))
        if error_class is None:
            error_class = _STATUS_CLASSES.get(status) or "server_error"
        message = str(google.get("message") or "")
        return _classified(error_class, status, str(google["status"]), message, headers, request_id)
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    return classify_status(
        status,
        _str(error.get("type")),
        _str(error.get("message")) or "",
        _str(code),
        headers,
        request_id,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def classify_exception(exc: BaseException) -> UpstreamError:
    """Map anything the SDK or the transport raises to an :class:`UpstreamError`. A library
    that was never imported raised nothing: the SDK is not loaded for the first-party API."""
    if isinstance(exc, UpstreamError):
        return exc
    anthropic = sys.modules.get("anthropic")
    if anthropic is not None:
        if isinstance(exc, anthropic.APIStatusError):
            return classify_response(
                exc.status_code, exc.response.headers, exc.body, exc.request_id
            )
        if isinstance(exc, anthropic.APITimeoutError):
            return _timeout(exc)
        if isinstance(exc, anthropic.APIConnectionError):
            return _network(exc)
    httpx2 = sys.modules.get("httpx2")  # the SDK's transport, raw mid-stream
    if httpx2 is not None and isinstance(exc, httpx2.TransportError):
        return _timeout(exc) if isinstance(exc, httpx2.TimeoutException) else _network(exc)
    aiohttp = sys.modules.get("aiohttp")  # :mod:`.first_party`'s
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return _timeout(exc) if isinstance(exc, TimeoutError) else _network(exc)
    log.error("unclassified upstream failure", exc_info=exc)
    return UpstreamError("unknown", detail=type(exc).__name__)


def _timeout(exc: BaseException) -> UpstreamError:
    return UpstreamError("timeout", detail=type(exc).__name__)


def _network(exc: BaseException) -> UpstreamError:
    return UpstreamError("network_error", detail=f"{type(exc).__name__}: {exc}")
