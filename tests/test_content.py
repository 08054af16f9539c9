"""Images and PDFs in requests: they reach the API intact; what the API would refuse is a
400 here, naming the block, before anything is sent or paid for."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply

from .helpers import serving, stream_chat

pytestmark = pytest.mark.server


def png(width: int = 2, height: int = 2) -> bytes:
    """A real (tiny, grey) PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]"
    b"/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_block(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": b64(data)},
    }


def pdf_block(data: bytes = PDF) -> dict[str, Any]:
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)},
        "title": "terms.pdf",
    }


async def test_an_image_and_a_pdf_reach_the_api_intact(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        image_block(png()),
        pdf_block(),
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    async with serving(make_app()) as url:
        result = await stream_chat(
            http, url + "/chat/stream", {"messages": [{"role": "user", "content": content}]}
        )
    assert result.types[-1] == "done", result.events
    sent = emulator.requests[0].body["messages"][0]["content"]
    assert sent == content  # every block, byte for byte
    assert base64.b64decode(sent[1]["source"]["data"]) == png()
    assert base64.b64decode(sent[2]["source"]["data"]) == PDF


async def test_a_document_may_ask_to_be_cited_and_the_citation_comes_after_its_text(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    document = {**pdf_block(), "citations": {"enabled": True}}
    citation = {
        "type": "page_location",
        "cited_text": "Refunds within 30 days.",
        "document_index": 0,
        "document_title": "terms.pdf",
        "start_page_number": 2,
        "end_page_number": 3,
    }
    emulator.script(Reply("Refunds take 30 days.", citations=[citation]))
    content = [document, {"type": "text", "text": "How long for a refund?"}]
    async with serving(make_app()) as url:
        result = await stream_chat(
            http, url + "/chat/stream", {"messages": [{"role": "user", "content": content}]}
        )
    assert emulator.requests[0].body["messages"][0]["content"][0]["citations"] == {"enabled": True}
    assert result.types[-2:] == ["citation", "done"]  # after the text it supports
    assert result.events[-2] == {"type": "citation", "citation": citation, "text": result.text}


async def test_the_conversation_cache_breakpoint_goes_on_the_last_block(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [image_block(png()), {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "A grey square."},
        {"role": "user", "content": "Thanks."},
    ]
    async with serving(make_app(cache_conversation=True)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"messages": messages})
    assert result.types[-1] == "done"
    sent = emulator.requests[0].body["messages"]
    assert sent[0]["content"] == messages[0]["content"]  # untouched
    assert sent[1]["content"] == [
        {"type": "text", "text": "A grey square.", "cache_control": {"type": "ephemeral"}}
    ]


BAD: list[tuple[str, Any, str]] = [
    ("unknown type", [{"type": "audio", "data": "x"}],
     "content[0]': Input tag 'audio' found using 'type' does not match any of the expected tags"),
    ("empty text", [{"type": "text", "text": " "}], "content[0].text': String should match"),
    ("media type", [image_block(png(), "image/bmp")],
     "content[0].source.media_type': Input should be 'image/jpeg'"),
    ("not base64", [{**image_block(png()), "source": {"type": "base64",
        "media_type": "image/png", "data": "%%%not base64%%%"}}],
     "content[0].source.data': is not valid base64"),
    ("mislabelled", [image_block(png(), "image/jpeg")], "data': is not a image/jpeg file"),
    ("a PNG as a PDF", [pdf_block(png())], "data': is not a application/pdf file"),
    ("http url", [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}],
     "source.url': String should match pattern '^https://'"),
    ("extra field", [{**pdf_block(), "cache": True}],
     "content[0].cache': Extra inputs are not permitted"),
    ("too many", [{"type": "text", "text": "x"}] * 101, "content': List should have at most 100"),
    ("citations", [{**pdf_block(), "citations": {"enabled": "yes"}}],
     "citations.enabled': Input should be a valid boolean"),
    ("citations keys", [{**pdf_block(), "citations": {"on": True}}],
     "citations.enabled': Field required"),
    ("empty list", [], "content': List should have at least 1 item"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "content", "says"), BAD, ids=[case for case, *_ in BAD])
async def test_bad_blocks_are_a_400_naming_the_block(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    case: str,
    content: Any,
    says: str,
) -> None:
    async with serving(make_app()) as url:
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": content}]}  # fmt: skip
        refused = await http.post(url + "/chat/stream", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_request"
        assert "'messages[2].content" in refused.json()["message"]
        assert says in refused.json()["message"]
        # and the server keeps serving
        assert (await stream_chat(http, url + "/chat/stream", {"message": "hi"})).types[
            -1
        ] == "done"
    assert len(emulator.requests) == 1  # nothing was sent for the bad one


async def test_images_only_in_user_turns_and_url_sources_can_be_turned_off(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(allow_url_sources=False)) as url:
        in_assistant = await http.post(
            url + "/chat/stream",
            json={"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image_block(png())]},
                {"role": "user", "content": "so?"},
            ]},
        )  # fmt: skip
        by_url = await http.post(
            url + "/chat/stream",
            json={"messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}
            ]}]},
        )  # fmt: skip
    assert in_assistant.status_code == 400
    assert "only user messages may hold images" in in_assistant.json()["message"]
    assert by_url.status_code == 400
    assert "CLAUDE_ALLOW_URL_SOURCES" in by_url.json()["message"]
    assert emulator.requests == []


async def test_the_emulator_refuses_malformed_blocks_as_the_api_would(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The oracle: a request our validation would let through malformed reaches a 400."""
    body = {
        "model": "claude-sonnet-5-5",
        "max_tokens": 10,
        "messages": [{"role": "assistant", "content": [image_block(png())]}],
    }
    answer = await http.post(emulator.url + "/v1/messages", json=body, headers={"x-api-key": "k"})
    assert answer.status_code == 400
    assert "only allowed in user messages" in answer.text
