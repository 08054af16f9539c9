"""Every bad request gets a clear 4xx JSON error, the upstream is never called, and the
server keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator

from .conftest import API_KEY
from .helpers import serving, stream_chat

pytestmark = pytest.mark.server

JSON = {"content-type": "application/json"}

CASES: list[tuple[str, bytes, dict[str, str], int, str, str]] = [
    ("malformed JSON", b'{"message": "hi"', JSON, 400, "invalid_json", "JSON"),
    ("not UTF-8", b'{"message": "\xff"}', JSON, 400, "invalid_json", "JSON"),
    ("array body", b'["hi"]', JSON, 400, "invalid_request", "object"),
    ("string body", b'"hi"', JSON, 400, "invalid_request", "object"),
    ("empty body", b"", JSON, 400, "invalid_json", "JSON"),
    ("missing message", b'{"text": "hi"}', JSON, 400, "invalid_request", "'message'"),
    ("empty message", b'{"message": ""}', JSON, 400, "invalid_request", "'message'"),
    ("blank message", b'{"message": "  \\n "}', JSON, 400, "invalid_request", "'message'"),
    ("non-string message", b'{"message": 42}', JSON, 400, "invalid_request", "'message'"),
    ("null message", b'{"message": null}', JSON, 400, "invalid_request", "'message'"),
    ("both forms", b'{"message": "a", "messages": []}', JSON, 400, "invalid_request", "either"),
    ("messages not a list", b'{"messages": "hi"}', JSON, 400, "invalid_request", "'messages'"),
    ("empty messages", b'{"messages": []}', JSON, 400, "invalid_request", "'messages'"),
    (
        "bad role",
        b'{"messages": [{"role": "system", "content": "x"}]}',
        JSON,
        400,
        "invalid_request",
        "role",
    ),
    (
        "missing content",
        b'{"messages": [{"role": "user"}]}',
        JSON,
        400,
        "invalid_request",
        "content",
    ),
    ("message not an object", b'{"messages": ["hi"]}', JSON, 400, "invalid_request", "messages[0]"),
    (
        "ends with assistant",
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        JSON,
        400,
        "invalid_request",
        "last message",
    ),
    (
        "max_tokens zero",
        b'{"message": "hi", "max_tokens": 0}',
        JSON,
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "max_tokens too big",
        b'{"message": "hi", "max_tokens": 8193}',
        JSON,
        400,
        "invalid_request",
        "8192",
    ),
    (
        "max_tokens string",
        b'{"message": "hi", "max_tokens": "100"}',
        JSON,
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "max_tokens float",
        b'{"message": "hi", "max_tokens": 10.5}',
        JSON,
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "max_tokens bool",
        b'{"message": "hi", "max_tokens": true}',
        JSON,
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "system not a string",
        b'{"message": "hi", "system": ["x"]}',
        JSON,
        400,
        "invalid_request",
        "system",
    ),
    (
        "form-encoded",
        b"message=hi",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
        "JSON",
    ),
    ("no content type", b'{"message": "hi"}', {}, 415, "unsupported_media_type", "JSON"),
    (
        "oversized",
        b'{"message": "' + b"x" * (1024 * 1024) + b'"}',
        JSON,
        413,
        "body_too_large",
        "bytes",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "code", "hint"), CASES, ids=[case[0] for case in CASES]
)
async def test_bad_request_gets_a_json_4xx(
    server: str,
    emulator: Emulator,
    http: httpx2.AsyncClient,
    name: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
    hint: str,
) -> None:
    response = await http.post(server + "/chat/stream", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    payload: dict[str, Any] = response.json()
    assert payload["error"] == code
    assert hint in payload["message"]
    assert API_KEY not in response.text
    assert emulator.requests == []  # the upstream was never called
    # and the server keeps serving
    ok = await stream_chat(http, server + "/chat/stream", {"message": "still there?"})
    assert ok.types[-1] == "done"


async def test_oversized_chunked_body_without_content_length(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    host, port = server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"y" * 65536
    for _ in range(18):  # 1.1 MiB, past the 1 MiB cap; then stop sending and listen
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert b"application/json" in head
    assert emulator.requests == []
    assert (await http.get(server + "/health")).status_code == 200


async def test_disallowed_model_is_refused(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(allowed_models="claude-opus-5,claude-haiku-5-5")) as url:
        refused = await http.post(
            url + "/chat/stream", json={"message": "hi", "model": "claude-expensive"}
        )
        assert refused.status_code == 400 and "claude-opus-5" in refused.json()["message"]
        allowed = await stream_chat(
            http, url + "/chat/stream", {"message": "hi", "model": "claude-haiku-5-5"}
        )
        assert allowed.events[0]["model"] == "claude-haiku-5-5"
    assert len(emulator.requests) == 1


async def test_not_serving_yet_is_a_503_not_a_500(make_app: Callable[..., Quart]) -> None:
    """The plain test client runs no serving hooks: the route says so instead of crashing."""
    client = make_app().test_client()
    response = await client.post("/chat/stream", json={"message": "hi"})
    assert response.status_code == 503
    assert (await response.get_json())["error"] == "not_ready"


async def test_a_body_that_never_finishes_is_a_408(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(timeout=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"message": '
        )  # ...and the rest never comes
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 408")
        assert emulator.requests == []
        assert (await http.get(url + "/health")).status_code == 200


async def test_an_unknown_field_is_refused_not_ignored(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    response = await http.post(server + "/chat/stream", json={"message": "hi", "max_token": 5})
    assert response.status_code == 400
    assert "'max_token'" in response.json()["message"]
    assert emulator.requests == []
