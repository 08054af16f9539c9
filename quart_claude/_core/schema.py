"""The request bodies as pydantic models: they validate what a client sends, and the OpenAPI
document (``openapi.py``) is generated from them (one source for both).

The chat body's model is built per app, from its configuration: the models a client may
name, the ``max_tokens`` ceiling, and whether ``system`` is accepted at all. So the document
says exactly what this app accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .config import ClaudeConfig

__all__ = ["ValidationError", "chat_body_model"]

_STRICT = ConfigDict(extra="forbid", strict=True)
_TEXT = Field(min_length=1, pattern=r"\S")  # a string with something in it


class TextBlock(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str = _TEXT


class UrlSource(BaseModel):
    """Fetched by the API (unless ``CLAUDE_ALLOW_URL_SOURCES=false``)."""

    model_config = _STRICT
    type: Literal["url"]
    url: str = Field(pattern=r"^https://", max_length=2048)


class ImageData(BaseModel):
    model_config = _STRICT
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class PdfData(BaseModel):
    model_config = _STRICT
    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: str = Field(min_length=1)


class ImageBlock(BaseModel):
    model_config = _STRICT
    type: Literal["image"]
    source: Annotated[ImageData | UrlSource, Field(discriminator="type")]


class Citations(BaseModel):
    model_config = _STRICT
    enabled: bool


class DocumentBlock(BaseModel):
    model_config = _STRICT
    type: Literal["document"]
    source: Annotated[PdfData | UrlSource, Field(discriminator="type")]
    title: str | None = None
    context: str | None = None
    citations: Citations | None = None  # the answer cites the document's passages


Block = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    #: a string, or the API's blocks (images and documents in user turns only)
    content: Annotated[str, _TEXT] | Annotated[list[Block], Field(min_length=1, max_length=100)]


class Metadata(BaseModel):
    model_config = _STRICT
    user_id: str | None = Field(default=None, min_length=1, max_length=256)


def chat_body_model(config: ClaudeConfig, conversations: bool = False) -> type[BaseModel]:
    """The request body this app accepts (``message`` or ``messages``, and the options)."""
    models: Any = (
        str if "*" in config.allowed_models else Literal[(config.model, *config.allowed_models)]
    )
    fields: dict[str, Any] = {
        "message": (str | None, Field(default=None, min_length=1, pattern=r"\S")),
        "messages": (list[Message] | None, Field(default=None, min_length=1, max_length=1000)),
        "max_tokens": (int | None, Field(default=None, ge=1, le=config.max_tokens_limit)),
        "model": (models | None, Field(default=None)),
        "temperature": (float | int | None, Field(default=None, ge=0, le=1)),
        "stop_sequences": (
            list[str] | None,
            Field(default=None, max_length=8),
        ),
        "metadata": (Metadata | None, Field(default=None)),
    }
    if config.allow_client_system:
        fields["system"] = (str | None, Field(default=None))
    if config.database_url is not None or conversations:  # the history is the server's
        del fields["messages"]
        ids = (str | None, Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$"))
        fields["message"] = (
            Annotated[str, _TEXT]
            | Annotated[list[Block], Field(min_length=1, max_length=100)]
            | None,
            Field(default=None),
        )
        fields.update(conversation_id=ids, client_message_id=ids, parent_id=ids)
        fields["regenerate"] = (bool | None, Field(default=None))
    return create_model("ChatRequest", __config__=_STRICT, **fields)
