"""The Python client survives a connection cut mid-stream and yields the answer once."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from quart_claude.client import ChatError, stream_chat, stream_chat_sync
from quart_claude.testing import Emulator, Reply

from .helpers import CuttingProxy

pytestmark = pytest.mark.server

ANSWER = " ".join(f"token{i}" for i in range(60))


async def test_client_reconnects_after_a_cut_and_sees_each_event_once(
    server: str, emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.02))
    port = int(server.rsplit(":", 1)[1])
    async with CuttingProxy(port) as proxy:
        events = []
        async for event in stream_chat(
            f"http://127.0.0.1:{proxy.port}/chat/stream", message="hi", reconnect_delay=0.05
        ):
            events.append(event)
            if len(events) == 12:
                proxy.cut()  # the network blips mid-answer
        assert proxy.connections >= 2  # it really reconnected
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == ANSWER
    assert [e["type"] for e in events].count("start") == 1
    assert events[-1]["type"] == "done"
    assert len(emulator.requests) == 1  # the answer was resumed, not regenerated


async def test_client_reports_refusals(server: str) -> None:
    with pytest.raises(ChatError) as caught:
        async for _ in stream_chat(server + "/chat/stream", message="hi", max_tokens=0):
            pass
    assert caught.value.status == 400
    assert caught.value.payload["error"] == "invalid_request"


async def test_client_gives_up_when_the_server_is_gone(server: str, emulator: Emulator) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    port = int(server.rsplit(":", 1)[1])
    proxy = CuttingProxy(port)
    async with proxy:
        stream = stream_chat(
            f"http://127.0.0.1:{proxy.port}/chat/stream",
            message="hi",
            reconnect_delay=0.01,
            max_reconnects=2,
        )
        first = await anext(stream)
        assert first["type"] == "start"
        assert proxy._server is not None
        proxy._server.close()  # no new connections possible
        proxy.cut()
        with pytest.raises(httpx2.TransportError):
            async for _ in stream:
                pass


async def test_sync_client_in_a_thread(server: str, emulator: Emulator) -> None:
    emulator.script(Reply("short and sweet"))
    events = await asyncio.to_thread(
        lambda: list(stream_chat_sync(server + "/chat/stream", message="hi"))
    )
    assert "".join(str(e["text"]) for e in events if e["type"] == "delta") == "short and sweet"
    assert events[-1]["type"] == "done"
