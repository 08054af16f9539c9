"""The first-party client (issue 27): the request the SDK would send, without the SDK.

Each check puts the same parameters through ``quart_claude._core.first_party`` and through
the real SDK (``AsyncAnthropic.messages.with_streaming_response.create``) against the
emulator, and compares what the emulator received: the authentication, the API version,
the betas, every header the API reads, the body. Error responses are classified the same
whichever sent them. TLS is verified against the CAs the environment names, and an
untrusted certificate is refused. And an app that only reaches the first-party API never
imports the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from quart_claude._core.errors import UpstreamError, classify_exception
from quart_claude._core.first_party import API_VERSION, FirstPartyClient
from quart_claude.testing import Emulator, ErrorReply, Reply
from quart_claude.testing._tls import certificates

from .conftest import API_KEY

pytestmark = pytest.mark.server

MODEL = "claude-opus-4-6"
#: headers that name the sender or its connection, not what the API reads
_OURS_OR_THE_SDKS = {"user-agent", "host", "content-length", "connection", "accept-encoding"}

PARAMS: list[dict[str, Any]] = [
    {
        "model": MODEL,
        "max_tokens": 32,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    },
    {
        "model": MODEL,
        "max_tokens": 2048,
        "stream": True,
        "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": 'héllo \u2028 "quoted"'}],
        "thinking": {"type": "adaptive"},
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["END"],
        "extra_body": {
            "temperature": 1,
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        },
        "extra_headers": {"anthropic-beta": "context-management-2025-06-27,other-beta"},
    },
]


def _client(url: str, **options: Any) -> FirstPartyClient:
    return FirstPartyClient(
        API_KEY,
        url,
        timeout=options.get("timeout", 10.0),
        connect_timeout=5.0,
        max_connections=8,
        user_agent="quart-claude/test",
    )


async def _ours(url: str, params: dict[str, Any]) -> bytes:
    client = _client(url)
    try:
        async with client.open(params) as response:
            return b"".join([chunk async for chunk in response.chunks])
    finally:
        await client.close()


async def _sdks(url: str, params: dict[str, Any]) -> bytes:
    async with anthropic.DefaultAioHttpClient() as http:
        sdk = anthropic.AsyncAnthropic(
            api_key=API_KEY, base_url=url, http_client=http, max_retries=0
        )
        create = sdk.messages.with_streaming_response.create
        async with create(**params) as response:
            return b"".join([chunk async for chunk in response.http_response.aiter_bytes()])


def _read_by_the_api(headers: dict[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name not in _OURS_OR_THE_SDKS and not name.startswith("x-stainless-")
    }


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "every-option"])
async def test_the_request_is_the_sdks_header_for_header_and_byte_for_byte_in_meaning(
    emulator: Emulator, params: dict[str, Any]
) -> None:
    emulator.script(Reply("Same answer."), Reply("Same answer."))
    ours = await _ours(emulator.url, params)
    sdks = await _sdks(emulator.url, params)
    mine, theirs = emulator.requests
    assert (mine.method, mine.path) == (theirs.method, theirs.path) == ("POST", "/v1/messages")
    assert _read_by_the_api(mine.headers) == _read_by_the_api(theirs.headers)
    assert mine.headers["authorization"] == f"Bearer {API_KEY}"
    assert mine.headers["anthropic-version"] == API_VERSION
    assert mine.body == theirs.body  # extra_body merged, as the SDK merges it
    assert "extra_body" not in mine.body and "extra_headers" not in mine.body
    assert mine.headers["user-agent"] == "quart-claude/test"
    assert ours.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert sdks.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


ERRORS = [
    ErrorReply(429, headers={"retry-after": "7"}),
    ErrorReply(429, error_code="enforced_spend_limit_reached", message="spend limit reached"),
    ErrorReply(529),
    ErrorReply(500, headers={"x-should-retry": "false"}),
    ErrorReply(400, message="prompt is too long: 210000 tokens > 200000 maximum"),
    ErrorReply(401),
    ErrorReply(404),
]


@pytest.mark.parametrize("reply", ERRORS, ids=lambda r: f"{r.status}-{r.message or r.error_code}")
async def test_an_error_response_is_classified_as_it_is_from_the_sdk(
    emulator: Emulator, reply: ErrorReply
) -> None:
    emulator.script(reply, reply)
    with pytest.raises(UpstreamError) as ours:
        await _ours(emulator.url, PARAMS[0])
    with pytest.raises(anthropic.APIStatusError) as sdks:
        await _sdks(emulator.url, PARAMS[0])
    theirs = classify_exception(sdks.value)
    mine = ours.value
    assert mine.error_class == theirs.error_class
    assert mine.retryable == theirs.retryable
    assert mine.retry_after == theirs.retry_after
    assert mine.request_id and theirs.request_id  # the response's (a new one each)
    assert mine.detail == theirs.detail


async def test_a_body_that_is_not_json_is_classified_by_its_status() -> None:
    """A proxy's HTML 502 page (served here by a bare socket server): a retryable server
    error, as the SDK classifies the same page."""
    page = b"<html><body>502 Bad Gateway</body></html>"

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: {len(page)}"
        writer.write(head.encode() + b"\r\nconnection: close\r\n\r\n" + page)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        with pytest.raises(UpstreamError) as ours:
            await _ours(url, PARAMS[0])
        with pytest.raises(anthropic.APIStatusError) as sdks:
            await _sdks(url, PARAMS[0])
    theirs = classify_exception(sdks.value)
    assert ours.value.error_class == theirs.error_class == "server_error"
    assert ours.value.retryable and ours.value.detail == theirs.detail


async def test_a_stalled_body_is_a_timeout_and_a_refused_connection_a_network_error(
    emulator: Emulator,
) -> None:
    emulator.script(Reply("slow " * 5, token_delay=2.0))
    client = _client(emulator.url, timeout=0.3)
    try:
        with pytest.raises(Exception) as stalled:
            async with client.open(PARAMS[0]) as response:
                async for _ in response.chunks:
                    pass
    finally:
        await client.close()
    assert classify_exception(stalled.value).error_class == "timeout"
    with pytest.raises(Exception) as refused:
        await _ours("http://127.0.0.1:9", PARAMS[0])  # the discard port: nothing listens
    assert classify_exception(refused.value).error_class == "network_error"


async def test_a_body_that_keeps_coming_is_never_cut_however_long_it_takes(
    emulator: Emulator,
) -> None:
    """The stall watchdog counts reads: a token every 0.15 s, for more than twice the 0.3 s
    timeout in all, reaches its end."""
    emulator.script(Reply("steady " * 6, token_delay=0.15))
    client = _client(emulator.url, timeout=0.3)
    try:
        async with client.open(PARAMS[0]) as response:
            body = b"".join([chunk async for chunk in response.chunks])
    finally:
        await client.close()
    assert body.count(b"steady") == 6 and body.endswith(
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


async def test_a_response_head_that_never_comes_is_a_timeout() -> None:
    """A server that reads the request and never answers: the wait for the head is bounded by
    the timeout, and classified as the SDK's read timeout was."""
    requests: list[bytes] = []
    release, released = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            with contextlib.suppress(TimeoutError):  # at most 5 s, whatever the client does
                await asyncio.wait_for(release.wait(), 5)
        finally:
            writer.close()
            released.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = _client(url, timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with server:
        try:
            with pytest.raises(Exception) as waited:
                async with client.open(PARAMS[0]):
                    pass
        finally:
            elapsed = loop.time() - started
            await client.close()
            release.set()
            await asyncio.wait_for(released.wait(), 10)  # its socket closed, not collected
    assert requests and classify_exception(waited.value).error_class == "timeout"
    assert 0.3 <= elapsed < 4  # the timeout, not the server's 5 s


@pytest.fixture
async def tls_emulator(tmp_path: Path) -> AsyncIterator[tuple[Emulator, Path]]:
    ca, cert, key = certificates(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    async with Emulator(ssl=served) as emu:
        yield emu, ca


async def test_tls_is_verified_against_the_systems_cas(
    tls_emulator: tuple[Emulator, Path],
) -> None:
    """A certificate no CA of the system's signed is refused (trusting one through
    ``SSL_CERT_FILE`` is in test_first_party_process.py: it is read when aiohttp is imported)."""
    emulator, _ca = tls_emulator
    emulator.script(Reply("Over TLS."))
    with pytest.raises(Exception) as untrusted:
        await _ours(emulator.url, PARAMS[0])
    assert classify_exception(untrusted.value).error_class == "network_error"
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)
    assert emulator.requests == []  # refused at the handshake: no request was read


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def forward_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A plain-HTTP forward proxy: it records each request line it is asked to forward."""
    seen: list[str] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode().split(" ")
        seen.append(f"{method} {target}")
        where = urllib.parse.urlsplit(target)
        up_reader, up_writer = await asyncio.open_connection(where.hostname, where.port)
        up_writer.write(f"{method} {where.path} {version}\r\n".encode() + rest)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


@pytest.mark.parametrize("exempt", [False, True], ids=["through-the-proxy", "no-proxy"])
async def test_the_environments_proxy_is_used_unless_no_proxy_exempts_the_host(
    emulator: Emulator,
    forward_proxy: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    exempt: bool,
) -> None:
    proxy, seen = forward_proxy
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    if exempt:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    emulator.script(Reply("Proxied."))
    assert b"event: message_stop" in await _ours(emulator.url, PARAMS[0])
    assert len(emulator.requests) == 1
    assert seen == ([] if exempt else [f"POST {emulator.url}/v1/messages"])
