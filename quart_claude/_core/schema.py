"""The request bodies as pydantic models: the one validator of what a client sends. The
OpenAPI document (``openapi.py``) is generated from the same models, and the 400's message
names the field from the error's location.

The chat body's model is built per app, from its configuration: the models a client may
name, the ``max_tokens`` ceiling, and whether ``system`` is accepted at all. So the document
says exactly what this app accepts. What a model cannot express (a file's magic bytes, the
count of images in a whole request, the rules between fields) runs inside it, as validators.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .config import ClaudeConfig

__all__ = [
    "IMAGE_TYPES",
    "MAX_BLOCKS",
    "MAX_MEDIA",
    "ValidationError",
    "chat_body_model",
    "problem",
]

_STRICT = ConfigDict(extra="forbid", strict=True)
_TEXT = Field(min_length=1, pattern=r"\S")  # a string with something in it

#: Media types the API accepts for images, and how each file starts.
IMAGE_TYPES: dict[str, tuple[bytes, ...]] = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
_PDF = (b"%PDF-",)
#: Blocks in one message, and images plus documents in one request (the API's limit: 100).
MAX_BLOCKS = 100
MAX_MEDIA = 100
_MAX_MESSAGES = 1000


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", message)


class TextBlock(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str = _TEXT


class UrlSource(BaseModel):
    """Fetched by the API (unless ``CLAUDE_ALLOW_URL_SOURCES=false``)."""

    model_config = _STRICT
    type: Literal["url"]
    url: str = Field(pattern=r"^https://", max_length=2048)

    @model_validator(mode="before")
    @classmethod
    def _allowed(cls, value: Any, info: ValidationInfo) -> Any:
        config = (info.context or {}).get("config")
        if config is not None and not config.allow_url_sources:
            raise _invalid("URL sources are turned off (CLAUDE_ALLOW_URL_SOURCES)")
        return value


def _decoded_head(data: str) -> bytes:
    """The file's first bytes; all of it decoded, so a bad byte fails here, not upstream."""
    try:
        base64.b64decode(data, validate=True)
        return base64.b64decode(data[:64], validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("is not valid base64") from None


class ImageData(BaseModel):
    model_config = _STRICT
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)

    @field_validator("data")
    @classmethod
    def _is_the_file(cls, data: str, info: ValidationInfo) -> str:
        media_type = info.data.get("media_type")
        if media_type is not None and not _decoded_head(data).startswith(IMAGE_TYPES[media_type]):
            raise _invalid(f"is not a {media_type} file")
        return data


class PdfData(BaseModel):
    model_config = _STRICT
    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: str = Field(min_length=1)

    @field_validator("data")
    @classmethod
    def _is_the_file(cls, data: str) -> str:
        if not _decoded_head(data).startswith(_PDF):
            raise _invalid("is not a application/pdf file")
        return data


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


def _content_kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "blocks"


#: a message's content: a string, or the API's blocks (images and documents in user turns)
Content = Annotated[
    Annotated[str, Tag("text"), _TEXT]
    | Annotated[list[Block], Tag("blocks"), Field(min_length=1, max_length=MAX_BLOCKS)],
    Discriminator(_content_kind),
]


def _media(content: Any) -> int:
    if isinstance(content, str):
        return 0
    return sum(1 for block in content if isinstance(block, ImageBlock | DocumentBlock))


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: Content

    @model_validator(mode="after")
    def _media_from_users(self) -> Message:
        if self.role != "user" and _media(self.content):
            raise _invalid("only user messages may hold images and documents")
        return self


class Metadata(BaseModel):
    model_config = _STRICT
    user_id: str | None = Field(default=None, min_length=1, max_length=256)


_StopSequence = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
_Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Body(BaseModel):
    """The rules between a chat body's fields (each app's model adds the fields)."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            raise _invalid("the body must be a JSON object")
        config: ClaudeConfig | None = (info.context or {}).get("config")
        if config is not None:
            _server_fields(value, config)
        if "conversation_id" in cls.model_fields:
            _conversation_fields(value)
        elif "message" in value and "messages" in value:
            raise _invalid("send either 'message' or 'messages', not both")
        elif "message" not in value and "messages" not in value:
            raise _invalid("'message' (a string) or 'messages' (a list) is required")
        return value

    @model_validator(mode="after")
    def _whole_request(self) -> _Body:
        messages = getattr(self, "messages", None)
        if "conversation_id" not in type(self).model_fields and messages is None:
            if getattr(self, "message", None) is None:
                raise _invalid("'message' (a string) or 'messages' (a list) is required")
        if messages:
            if messages[-1].role != "user":
                raise _invalid("the last message must have the role 'user'")
            if sum(_media(message.content) for message in messages) > MAX_MEDIA:
                raise _invalid(f"at most {MAX_MEDIA} images and documents per request")
        return self


def _server_fields(body: dict[str, Any], config: ClaudeConfig) -> None:
    """What the operator decides, refused with the setting that would allow it."""
    if "system" in body and not config.allow_client_system:
        raise _invalid(
            "'system' is set by the server (CLAUDE_SYSTEM_PROMPT); clients may not send "
            "one unless CLAUDE_ALLOW_CLIENT_SYSTEM is true"
        )
    if config.thinking != "off" and body.get("temperature") is not None:
        raise _invalid(
            "'temperature' cannot be set while the server has thinking on (CLAUDE_THINKING): "
            "the API requires its default"
        )


def _conversation_fields(body: dict[str, Any]) -> None:
    """The history is the server's: a new user turn, or a regeneration of a stored one."""
    if "messages" in body:
        raise _invalid(
            "conversations are kept by the server: send 'message' (the new user turn) and "
            "'conversation_id', not 'messages'"
        )
    regenerate = body.get("regenerate") is True
    cid = body.get("conversation_id")
    if regenerate and "message" in body:
        raise _invalid("'regenerate' answers a stored message again: send no 'message'")
    if regenerate and cid is None:
        raise _invalid("'regenerate' needs the 'conversation_id'")
    if not regenerate and body.get("message") is None:
        raise _invalid("'message' (the new user turn) is required")
    if body.get("parent_id") is not None and cid is None:
        raise _invalid("'parent_id' needs the 'conversation_id'")


def _model_field(config: ClaudeConfig) -> Any:
    """The models a client may name (``CLAUDE_MODEL`` and ``CLAUDE_ALLOWED_MODELS``)."""
    if "*" in config.allowed_models:
        return Annotated[str, _TEXT] | None
    return Literal[(config.model, *config.allowed_models)] | None


def chat_body_model(config: ClaudeConfig, conversations: bool = False) -> type[BaseModel]:
    """The request body this app accepts (``message`` or ``messages``, and the options)."""
    fields: dict[str, Any] = {
        "message": (Annotated[str, _TEXT] | None, Field(default=None)),
        "messages": (
            list[Message] | None,
            Field(default=None, min_length=1, max_length=_MAX_MESSAGES),
        ),
        "max_tokens": (int | None, Field(default=None, ge=1, le=config.max_tokens_limit)),
        "model": (_model_field(config), Field(default=None)),
        "temperature": (float | int | None, Field(default=None, ge=0, le=1)),
        "stop_sequences": (list[_StopSequence] | None, Field(default=None, max_length=8)),
        "metadata": (Metadata | None, Field(default=None)),
    }
    if config.allow_client_system:
        fields["system"] = (str | None, Field(default=None))
    if config.database_url is not None or conversations:  # the history is the server's
        del fields["messages"]
        fields["message"] = (Content | None, Field(default=None))
        fields.update(conversation_id=(_Id | None, None), client_message_id=(_Id | None, None))
        fields.update(parent_id=(_Id | None, None), regenerate=(bool | None, None))
    return create_model("ChatRequest", __base__=_Body, **fields)


#: the tags a discriminated union puts in an error's location (dropped from the field's name)
_TAGS = frozenset({"text", "blocks", "image", "document", "base64", "url"})
_TAGGED = frozenset({"content", "message", "source"})


def problem(error: ValidationError) -> str:
    """The 400's message for the first error: the field, as the client wrote it, then what
    is wrong (``'messages[2].content[0].source.data': is not a image/png file``)."""
    first = error.errors()[0]
    where = ""
    previous: Any = None
    for part in first["loc"]:
        tag = isinstance(part, str) and part in _TAGS
        if tag and (isinstance(previous, int) or previous in _TAGGED):
            previous = part
            continue
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        previous = part
    message = str(first["msg"]) + _HINTS.get((where, first["type"]), "")
    return f"'{where}': {message}" if where else message


#: what the operator would change to allow a refused value
_HINTS = {("model", "literal_error"): " (the server's CLAUDE_MODEL or CLAUDE_ALLOWED_MODELS)"}
