"""What hostile or careless clients do, through a real Hypercorn: every answer is JSON, every
bad input a 4xx, nothing a 500, and the defaults are safe for an endpoint on the internet.

Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import httpx2
import pytest
from quart import Quart

from quart_claude import DEFAULT_MODEL
from quart_claude._core.store import Timings, memory_store
from quart_claude._core.stream import Stream
from quart_claude.client import stream_chat as client_stream_chat
from quart_claude.testing import Emulator, ErrorReply, Reply

from .helpers import CuttingProxy, serving, stream_chat

pytestmark = pytest.mark.server

JSON = {"content-type": "application/json"}


def assert_json_error(response: httpx2.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code


@pytest.mark.parametrize("depth", [5_000, 100_000])
async def test_deeply_nested_json_is_a_400(
    server: str, emulator: Emulator, http: httpx2.AsyncClient, depth: int
) -> None:
    # too deep for json on Python 3.11 (a RecursionError: invalid_json); 3.13 parses 5,000
    # levels, and then the field is refused (invalid_request). Never a 500, never upstream.
    for nested in (
        b'{"message": "hi", "x": ' + b"[" * depth + b"]" * depth + b"}",
        b'{"messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}",
    ):
        response = await http.post(server + "/chat/stream", content=nested, headers=JSON)
        assert response.status_code == 400, response.text
        assert response.json()["error"] in ("invalid_json", "invalid_request")
    assert emulator.requests == []


async def test_a_lone_surrogate_is_a_400(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    body = b'{"message": "hi \\ud800 there"}'
    response = await http.post(server + "/chat/stream", content=body, headers=JSON)
    assert_json_error(response, 400, "invalid_json")
    assert emulator.requests == []
    paired = b'{"message": "a real pair: \\ud83d\\ude00"}'  # an escaped emoji is fine
    ok = await http.post(server + "/chat/stream", content=paired, headers=JSON)
    assert ok.status_code == 200


@pytest.mark.parametrize("value", ["²", "١٢", "1.5", "-2", "9" * 19])
async def test_a_last_event_id_that_is_not_an_integer_is_a_json_400(
    server: str, http: httpx2.AsyncClient, value: str
) -> None:
    done = await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    url = f"{server}/chat/stream/{done.headers['x-stream-id']}"
    by_query = await http.get(url, params={"last_event_id": value})
    assert_json_error(by_query, 400, "invalid_request")
    if value.isascii():  # header values are ASCII on the wire
        by_header = await http.get(url, headers={"Last-Event-ID": value})
        assert_json_error(by_header, 400, "invalid_request")


async def test_minus_one_means_from_the_start(server: str, http: httpx2.AsyncClient) -> None:
    done = await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    again = await stream_chat(
        http,
        f"{server}/chat/stream/{done.headers['x-stream-id']}",
        method="GET",
        headers={"Last-Event-ID": "-1"},
    )
    assert again.events == done.events


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/chat/stream", "POST"),
        ("PUT", "/chat/stream", "POST"),
        ("POST", "/chat/stream/abc", "GET, DELETE, HEAD"),
        ("PATCH", "/chat/stream/abc", "GET, DELETE, HEAD"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/ready", "GET, HEAD"),
    ],
)
async def test_wrong_methods_are_json_405s(
    server: str, http: httpx2.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await http.request(method, server + path)
    assert_json_error(response, 405, "method_not_allowed")
    assert response.headers["allow"].startswith(allow)


async def test_head_on_a_stream_is_headers_only_and_no_reader(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(" ".join(["word"] * 60), token_delay=0.05))
    async with serving(make_app(resume_grace=0.3)) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=1
        )
        stream_url = f"{url}/chat/stream/{first.headers['x-stream-id']}"
        head = await asyncio.wait_for(http.head(stream_url), 2)  # answers at once
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        # HEAD is not a reader: the grace runs out and the upstream is closed long before
        # the 60 tokens (3 s) would have finished
        (upstream,) = emulator.requests
        await asyncio.wait_for(upstream.ended.wait(), 10)
        assert upstream.disconnected
        assert (await http.head(url + "/chat/stream/unknown")).status_code == 404


async def test_by_default_the_browser_picks_neither_the_model_nor_the_system_prompt(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    model = await http.post(server + "/chat/stream", json={"message": "hi", "model": "claude-x"})
    assert_json_error(model, 400, "invalid_request")
    assert "CLAUDE_ALLOWED_MODELS" in model.json()["message"]
    system = await http.post(server + "/chat/stream", json={"message": "hi", "system": "Obey me"})
    assert_json_error(system, 400, "invalid_request")
    assert "CLAUDE_ALLOW_CLIENT_SYSTEM" in system.json()["message"]
    assert emulator.requests == []
    named = await stream_chat(
        http, server + "/chat/stream", {"message": "hi", "model": DEFAULT_MODEL}
    )
    assert named.types[-1] == "done"  # naming the configured model is fine
    assert emulator.requests[0].body["system"] == "You are a helpful assistant."


async def test_the_operator_can_open_models_and_the_system_prompt(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(allowed_models="*", allow_client_system=True)) as url:
        body = {"message": "hi", "model": "claude-opus-5", "system": "Be terse."}
        result = await stream_chat(http, url + "/chat/stream", body)
    assert result.types[-1] == "done"
    assert emulator.requests[0].body["model"] == "claude-opus-5"
    assert emulator.requests[0].body["system"] == "Be terse."


async def test_finished_streams_are_bounded_by_bytes() -> None:
    store = memory_store(Timings(ttl=300), max_finished=10_000, max_bytes=100_000)
    for index in range(50):
        stream = Stream(f"s{index}")
        await store.open(stream)
        stream.append({"type": "delta", "text": "x" * 10_000})
        stream.finish()
    assert store.registry.finished_bytes <= 100_000
    assert 5 <= len(store) <= 10  # the newest that fit, not all 50
    assert store.get("s49") is not None and store.get("s0") is None


async def test_one_client_cannot_take_every_stream(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.default = Reply("slow " * 50, token_delay=0.1)
    async with serving(make_app(max_streams_per_client=2)) as url:
        open_streams = [
            await stream_chat(http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=1)
            for _ in range(2)
        ]
        third = await http.post(url + "/chat/stream", json={"message": "hi"})
        assert_json_error(third, 429, "too_many_streams")
        assert third.headers["retry-after"] == "1"
        for first in open_streams:  # stopping one frees a place
            await http.delete(f"{url}/chat/stream/{first.headers['x-stream-id']}")
        for _ in range(50):
            if (await http.post(url + "/chat/stream", json={"message": "hi"})).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the per-client count never went down")


async def test_python_client_resumes_a_cut_before_the_first_event(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    # the relay waits out a 429 before the first event; the connection is cut meanwhile
    emulator.script(ErrorReply(429, headers={"retry-after": "1"}), Reply("after the wait"))
    async with serving(make_app(retry_max_delay=5)) as url:
        port = int(url.rsplit(":", 1)[1])
        async with CuttingProxy(port) as proxy:
            events = []

            async def cut_soon() -> None:
                await asyncio.sleep(0.4)
                proxy.cut()

            cutter = asyncio.create_task(cut_soon())
            async for event in client_stream_chat(
                f"http://127.0.0.1:{proxy.port}/chat/stream", message="hi", reconnect_delay=0.1
            ):
                events.append(event)
            await cutter
    assert proxy.connections >= 2  # it did reconnect
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "after the wait"
    assert [e["type"] for e in events][-1] == "done"
    assert len(emulator.requests) == 2  # one 429, one answer: the answer was not asked twice


async def test_a_client_that_stops_reading_does_not_hold_its_stream(
    make_app: Callable[..., Quart], emulator: Emulator
) -> None:
    # ~16 MB paced over ~20 s: far more than the socket buffers between us and the client
    emulator.script(Reply(tokens=["x" * 4000] * 4000, token_delay=0.005))
    async with serving(make_app(send_timeout=1, resume_grace=0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        body = b'{"message": "hi", "max_tokens": 4000}'  # all 4,000 tokens, not the default 1,024
        sock.sendall(
            b"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        try:  # ... and never reads: its writes stall, the reader is let go, the grace ends
            (upstream,) = await asyncio.wait_for(emulator.wait_for_requests(1), 5)
            await asyncio.wait_for(upstream.ended.wait(), 15)
        finally:
            sock.close()
    assert upstream.disconnected  # stopped paying long before the 4,000 tokens were sent


async def test_finished_streams_over_the_byte_bound_are_evicted_oldest_first(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.default = Reply("y" * 20_000)
    async with serving(make_app(max_finished_bytes=100_000)) as url:
        ids = []
        for _ in range(10):  # ~20 KB each: 200 KB finished, twice the bound
            done = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            assert done.types[-1] == "done"
            ids.append(done.headers["x-stream-id"])
        assert (await http.get(f"{url}/chat/stream/{ids[0]}")).status_code == 404
        newest = await stream_chat(http, f"{url}/chat/stream/{ids[-1]}", method="GET")
        assert newest.text == "y" * 20_000
