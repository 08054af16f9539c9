"""A message's content: a string, or the API's list of blocks (text, images, PDFs), checked
before anything is sent upstream, each refusal naming the block.

Images and documents come as base64 (their bytes must decode and start as their media type
says: a mislabelled file is refused here, not by the API after the stream opened) or, unless
``CLAUDE_ALLOW_URL_SOURCES=false``, as an ``https`` URL the API fetches.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = ["IMAGE_TYPES", "MAX_BLOCKS", "MAX_MEDIA", "ContentError", "check_content"]

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
_TEXT_KEYS = {"type", "text"}
_MEDIA_KEYS = {"type", "source"}
_DOCUMENT_KEYS = {"type", "source", "title", "context", "citations"}


class ContentError(ValueError):
    """Content the API would refuse; the message names the block."""


def check_content(
    value: Any, where: str, *, role: str, allow_urls: bool, media_seen: int = 0
) -> tuple[str | list[dict[str, Any]], int]:
    """The content as sent upstream (a string, or the blocks as given) and the count of images
    and documents so far. Raises :class:`ContentError`."""
    if isinstance(value, str):
        if not value.strip():
            raise ContentError(f"'{where}' must not be empty")
        return value, media_seen
    if not isinstance(value, list) or not value:
        raise ContentError(f"'{where}' must be a string or a non-empty list of content blocks")
    if len(value) > MAX_BLOCKS:
        raise ContentError(f"'{where}' may hold at most {MAX_BLOCKS} blocks")
    for index, block in enumerate(value):
        at = f"{where}[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            _text(block, at)
            continue
        if kind not in ("image", "document"):
            raise ContentError(f"'{at}' must be a block of type 'text', 'image' or 'document'")
        if role != "user":
            raise ContentError(f"'{at}': only user messages may hold images and documents")
        _media(block, at, kind, allow_urls)
        media_seen += 1
        if media_seen > MAX_MEDIA:
            raise ContentError(f"'{at}': at most {MAX_MEDIA} images and documents per request")
    return value, media_seen


def _text(block: dict[str, Any], at: str) -> None:
    _keys(block, _TEXT_KEYS, at)
    text = block.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ContentError(f"'{at}.text' must be a non-empty string")


def _media(block: dict[str, Any], at: str, kind: str, allow_urls: bool) -> None:
    """An image or a document block."""
    _keys(block, _MEDIA_KEYS if kind == "image" else _DOCUMENT_KEYS, at)
    for optional in ("title", "context"):
        if optional in block and not isinstance(block[optional], str):
            raise ContentError(f"'{at}.{optional}' must be a string")
    if "citations" in block:
        _citations(block["citations"], f"{at}.citations")
    _source(block.get("source"), f"{at}.source", kind, allow_urls)


def _citations(value: Any, at: str) -> None:
    """A document's ``citations``: ``{"enabled": true}`` asks the answer to cite it."""
    if not isinstance(value, dict) or set(value) != {"enabled"}:
        raise ContentError(f'\'{at}\' must be {{"enabled": true}} or {{"enabled": false}}')
    if not isinstance(value["enabled"], bool):
        raise ContentError(f"'{at}.enabled' must be true or false")


def _keys(block: dict[str, Any], allowed: set[str], at: str) -> None:
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ContentError(f"'{at}': unknown field(s) {', '.join(map(repr, unknown))[:200]}")


def _source(source: Any, at: str, kind: str, allow_urls: bool) -> None:
    if not isinstance(source, dict):
        raise ContentError(f"'{at}' must be an object")
    if source.get("type") == "url":
        _url_source(source, at, allow_urls)
        return
    if source.get("type") != "base64":
        raise ContentError(f"'{at}.type' must be 'base64' or 'url'")
    _keys(source, {"type", "media_type", "data"}, at)
    media_type = source.get("media_type")
    starts = _magic(kind, media_type)
    if starts is None:
        choices = ", ".join(IMAGE_TYPES) if kind == "image" else "application/pdf"
        raise ContentError(f"'{at}.media_type' must be one of: {choices}")
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise ContentError(f"'{at}.data' must be a non-empty base64 string")
    try:
        head = base64.b64decode(data[:64], validate=True)
        base64.b64decode(data, validate=True)  # all of it: a bad byte fails here, not upstream
    except (binascii.Error, ValueError):
        raise ContentError(f"'{at}.data' is not valid base64") from None
    if not head.startswith(starts):
        raise ContentError(f"'{at}.data' is not a {media_type} file")


def _url_source(source: dict[str, Any], at: str, allow_urls: bool) -> None:
    if not allow_urls:
        raise ContentError(f"'{at}': URL sources are turned off (CLAUDE_ALLOW_URL_SOURCES)")
    _keys(source, {"type", "url"}, at)
    url = source.get("url")
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > 2048:
        raise ContentError(f"'{at}.url' must be an https URL of at most 2048 characters")


def _magic(kind: str, media_type: Any) -> tuple[bytes, ...] | None:
    """The bytes a file of ``media_type`` starts with (None: not a type ``kind`` takes)."""
    if kind == "document":
        return _PDF if media_type == "application/pdf" else None
    return IMAGE_TYPES.get(media_type) if isinstance(media_type, str) else None
