"""Validate a chat request body before anything is sent upstream."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .config import ClaudeConfig
from .content import ContentError, check_content

__all__ = ["ChatRequest", "RequestError", "SendOptions", "parse_chat_request", "split_send"]

_ROLES = frozenset({"user", "assistant"})
_MAX_MESSAGES = 1000
_FIELDS = frozenset(
    {"message", "messages", "max_tokens", "system", "model", "temperature", "stop_sequences"}
    | {"metadata"}
)
_MAX_STOP_SEQUENCES = 8
_MAX_STOP_SEQUENCE = 200
_MAX_USER_ID = 256


class RequestError(Exception):
    """A bad request: answered as ``{"error": code, "message": message}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # content: a string, or the API's blocks
    model: str
    max_tokens: int
    system: str
    temperature: float | None = None
    stop_sequences: tuple[str, ...] = ()
    user_id: str | None = None  # metadata.user_id: the identity's when there is one


@dataclass(frozen=True, slots=True)
class SendOptions:
    """A send's conversation fields (conversations on)."""

    conversation_id: str | None = None
    client_message_id: str | None = None
    parent_id: str | None = None
    parent_given: bool = False
    regenerate: bool = False
    create: bool = False  # a missing conversation_id is created (useChat picks its chat id)


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONVERSATION_FIELDS = ("conversation_id", "client_message_id", "parent_id", "regenerate")


def split_send(body: Any) -> tuple[dict[str, Any], SendOptions]:
    """The body without its conversation fields, and those fields checked. The history is
    the server's: a body that also sends ``messages`` is refused."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    if "messages" in body:
        raise _invalid(
            "conversations are kept by the server: send 'message' (the new user turn) and "
            "'conversation_id', not 'messages'"
        )
    rest = {k: v for k, v in body.items() if k not in _CONVERSATION_FIELDS}
    ids = {}
    for name in ("conversation_id", "client_message_id", "parent_id"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or not _ID.fullmatch(value)):
            raise _invalid(f"'{name}' must be an id (letters, digits, '-' or '_', at most 64)")
        ids[name] = value
    regenerate = body.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise _invalid("'regenerate' must be true or false")
    if regenerate and "message" in body:
        raise _invalid("'regenerate' answers a stored message again: send no 'message'")
    if regenerate and ids["conversation_id"] is None:
        raise _invalid("'regenerate' needs the 'conversation_id'")
    if not regenerate and "message" not in body:
        raise _invalid("'message' (the new user turn) is required")
    if ids["parent_id"] is not None and ids["conversation_id"] is None:
        raise _invalid("'parent_id' needs the 'conversation_id'")
    return rest, SendOptions(
        ids["conversation_id"],
        ids["client_message_id"],
        ids["parent_id"],
        "parent_id" in body,
        regenerate,
    )


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"'{field}' must be a string")
    if not value.strip():
        raise _invalid(f"'{field}' must not be empty")
    return value


def parse_chat_request(
    body: Any, config: ClaudeConfig, identity: str | None = None, *, conversation: bool = False
) -> ChatRequest:
    """Turn a decoded JSON body into a :class:`ChatRequest`, or raise :class:`RequestError`.

    ``identity`` (the identity loader's answer) becomes ``metadata.user_id``, whatever the
    body says: a client cannot claim to be someone else. ``conversation``: the body's
    conversation fields are gone (:func:`split_send`); ``message`` may be content blocks,
    and is absent for a regeneration (the messages are then the server's to add).
    """
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    messages = _messages_of(body, config, conversation)
    unknown = sorted(set(body) - _FIELDS)
    if unknown:  # a typo ("max_token") must not be silently ignored
        raise _invalid(f"unknown field(s): {', '.join(map(repr, unknown))[:200]}")
    if config.thinking != "off" and body.get("temperature") is not None:
        raise _invalid(
            "'temperature' cannot be set while the server has thinking on (CLAUDE_THINKING): "
            "the API requires its default"
        )
    return ChatRequest(
        messages=messages,
        model=_model(body, config),
        max_tokens=_max_tokens(body, config),
        system=_system(body, config),
        temperature=_temperature(body.get("temperature")),
        stop_sequences=_stop_sequences(body.get("stop_sequences")),
        user_id=identity if identity is not None else _user_id(body.get("metadata")),
    )


def _messages_of(
    body: dict[str, Any], config: ClaudeConfig, conversation: bool
) -> list[dict[str, Any]]:
    if conversation:
        return _new_turn(body.get("message"), config) if "message" in body else []
    if "messages" in body:
        if "message" in body:
            raise _invalid("send either 'message' or 'messages', not both")
        return _messages(body["messages"], config.allow_url_sources)
    if "message" in body:
        return [{"role": "user", "content": _text(body["message"], "message")}]
    raise _invalid("'message' (a string) or 'messages' (a list) is required")


def _max_tokens(body: dict[str, Any], config: ClaudeConfig) -> int:
    max_tokens = body.get("max_tokens", config.max_tokens)
    if type(max_tokens) is not int:
        raise _invalid("'max_tokens' must be an integer")
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise _invalid(f"'max_tokens' must be between 1 and {config.max_tokens_limit}")
    return max_tokens


def _system(body: dict[str, Any], config: ClaudeConfig) -> str:
    """The operator's prompt, unless the operator lets clients replace it."""
    if "system" not in body:
        return config.system_prompt
    if not config.allow_client_system:
        raise _invalid(
            "'system' is set by the server (CLAUDE_SYSTEM_PROMPT); clients may not send "
            "one unless CLAUDE_ALLOW_CLIENT_SYSTEM is true"
        )
    system = body["system"]
    if not isinstance(system, str):
        raise _invalid("'system' must be a string")
    return system


def _model(body: dict[str, Any], config: ClaudeConfig) -> str:
    model = body.get("model", config.model)
    if not isinstance(model, str) or not model.strip():
        raise _invalid("'model' must be a non-empty string")
    allowed = config.allowed_models
    if model != config.model and "*" not in allowed and model not in allowed:
        choices = ", ".join((config.model, *allowed))
        raise _invalid(f"'model' must be one of: {choices} (CLAUDE_ALLOWED_MODELS)")
    return model


def _new_turn(value: Any, config: ClaudeConfig) -> list[dict[str, Any]]:
    """A conversation's new user turn: text, or the user's content blocks (text, images,
    documents: never tool blocks, as the history is the server's)."""
    try:
        content, _ = check_content(
            value, "message", role="user", allow_urls=config.allow_url_sources, media_seen=0
        )
    except ContentError as error:
        raise _invalid(str(error)) from None
    return [{"role": "user", "content": content}]


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
        raise _invalid("'temperature' must be a number from 0 to 1")
    return float(value)


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > _MAX_STOP_SEQUENCES:
        raise _invalid(f"'stop_sequences' must be a list of at most {_MAX_STOP_SEQUENCES} strings")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or len(item) > _MAX_STOP_SEQUENCE:
            raise _invalid(
                f"'stop_sequences[{index}]' must be a non-blank string of at most "
                f"{_MAX_STOP_SEQUENCE} characters"
            )
    return tuple(value)


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
        raise _invalid("'metadata' may only hold 'user_id'")
    user_id = metadata.get("user_id")
    if user_id is None:
        return None
    if not isinstance(user_id, str) or not user_id or len(user_id) > _MAX_USER_ID:
        raise _invalid(f"'metadata.user_id' must be a string of 1 to {_MAX_USER_ID} characters")
    return user_id


def _messages(value: Any, allow_urls: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _invalid("'messages' must be a non-empty list")
    if len(value) > _MAX_MESSAGES:
        raise _invalid(f"'messages' may hold at most {_MAX_MESSAGES} turns")
    messages: list[dict[str, Any]] = []
    media = 0  # images and documents so far
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _invalid(f"'messages[{index}]' must be an object")
        role = item.get("role")
        if role not in _ROLES:
            raise _invalid(f"'messages[{index}].role' must be 'user' or 'assistant'")
        try:
            content, media = check_content(
                item.get("content"),
                f"messages[{index}].content",
                role=role,
                allow_urls=allow_urls,
                media_seen=media,
            )
        except ContentError as error:
            raise _invalid(str(error)) from None
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _invalid("the last message must have the role 'user'")
    return messages
