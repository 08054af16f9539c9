"""The event protocol (v1) as data: the error classes, the error event, and the constructors
of the other events. It imports no SDK and no web framework: the relay, the stores, the front
ends and the clients all speak it.
"""

from __future__ import annotations

import math
from typing import Any

from .redact import redact

__all__ = ["ERROR_CLASSES", "UpstreamError", "done_event", "start_event"]

#: class -> (retryable by default, safe message)
ERROR_CLASSES: dict[str, tuple[bool, str]] = {
    "rate_limit": (True, "Claude is receiving too many requests; try again shortly."),
    "overloaded": (True, "Claude is temporarily overloaded; try again shortly."),
    "server_error": (True, "Claude had a temporary server error; try again."),
    "network_error": (True, "The connection to Claude was interrupted; try again."),
    "timeout": (True, "Claude did not respond in time; try again."),
    "auth_error": (False, "The server's Claude API key was rejected."),
    "billing_error": (False, "The server's Claude account cannot be billed right now."),
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


def start_event(
    stream_id: str, model: str | None, message_id: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    """The first event of every stream: what answers, and the input usage so far."""
    return {
        "type": "start",
        "stream_id": stream_id,
        "model": model,
        "message_id": message_id,
        "usage": usage,
    }


def done_event(
    stop_reason: str | None, usage: dict[str, Any], reported: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The last event of a stream that ended without an error (a stop is ``cancelled``);
    ``reported``: what the API said of the answer besides (``stop_details`` on a refusal,
    code execution's ``container``), passed on as it came."""
    event = {"type": "done", "stop_reason": stop_reason, "usage": usage}
    if reported:
        event.update(reported)
    return event
