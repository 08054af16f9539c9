"""A chat request as the relay takes it, read from a body the app's model validated
(:mod:`.schema`: the one validator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .config import ClaudeConfig

__all__ = ["ChatRequest", "RequestError", "SendOptions", "read_chat"]


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


def read_chat(
    body: Any,
    model: type[BaseModel],
    config: ClaudeConfig,
    identity: str | None = None,
    *,
    conversation: bool = False,
) -> tuple[ChatRequest, SendOptions | None]:
    """The request in ``body``, validated once by ``model`` (raises its ``ValidationError``),
    and, with conversations on, the send's fields. The content goes upstream as it came.

    ``identity`` (the identity loader's answer) becomes ``metadata.user_id``, whatever the
    body says: a client cannot claim to be someone else. With conversations on ``message``
    may be content blocks, and is absent for a regeneration (the messages are then the
    server's to add)."""
    model.model_validate(body, context={"config": config})
    metadata = body.get("metadata") or {}
    chat = ChatRequest(
        messages=_messages(body, conversation),
        model=body.get("model") or config.model,
        max_tokens=body.get("max_tokens") or config.max_tokens,
        system=_system(body, config),
        temperature=None if body.get("temperature") is None else float(body["temperature"]),
        stop_sequences=tuple(body.get("stop_sequences") or ()),
        user_id=identity if identity is not None else metadata.get("user_id"),
    )
    if not conversation:
        return chat, None
    options = SendOptions(
        body.get("conversation_id"),
        body.get("client_message_id"),
        body.get("parent_id"),
        "parent_id" in body,
        body.get("regenerate") is True,
    )
    return chat, options


def _messages(body: dict[str, Any], conversation: bool) -> list[dict[str, Any]]:
    if body.get("messages") is not None:
        return [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
    if body.get("message") is None:  # a regeneration: the stored turn is answered again
        return []
    return [{"role": "user", "content": body["message"]}]


def _system(body: dict[str, Any], config: ClaudeConfig) -> str:
    """The operator's prompt, unless the operator lets clients replace it (the model
    refused a ``system`` it may not send)."""
    system = body.get("system")
    return system if isinstance(system, str) else config.system_prompt
