"""Redis restarts and blips, and a host that drains while reading another host's stream.

Two apps served by real Hypercorn servers stand for two hosts sharing a real redis-server of
the test's own, which the test restarts (without persistence: everything is lost) or whose
connections it kills. The rule: a reader gets the exact answer or a retryable error, never a
silently partial one, and never someone else's stream. Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
import redis.asyncio as aioredis
from quart import Quart, Request

from quart_claude.testing import Emulator, Reply

from .conftest import RedisServer
from .helpers import free_port, serving, stream_chat
from .test_hypercorn_cli import HYPERCORN, start, stop, wait_ready

pytestmark = pytest.mark.server

ANSWER = " ".join(f"w{i:03d}" for i in range(128))  # 640 characters, 128 tokens


def user(req: Request) -> str:
    return req.headers.get("X-User", "guest")


@pytest.fixture
async def hosts(
    make_app: Callable[..., Quart], redis_server: RedisServer
) -> AsyncIterator[tuple[str, str]]:
    options: dict[str, Any] = {
        "stream_store": redis_server.url,
        "heartbeat_interval": 0.5,
        "authorize": user,
    }
    async with serving(make_app(**options)) as a, serving(make_app(**options)) as b:
        yield a, b


async def finish(emulator: Emulator, redis_url: str, stream_id: str) -> None:
    """Wait until the emulator has sent the whole answer and Redis holds the stream's end
    (after a restart, the lease round that notices the loss rewrites it)."""
    await asyncio.wait_for(emulator.requests[0].ended.wait(), 20)
    await mirrored(redis_url, stream_id)


async def mirrored(redis_url: str, stream_id: str, within: float = 10) -> None:
    """Until Redis holds the finished stream (its record says done)."""
    client = aioredis.from_url(redis_url)
    try:
        async with asyncio.timeout(within):
            while await client.hget(f"qc:{{{stream_id}}}:meta", "done") != b"1":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def read_all(http: httpx2.AsyncClient, url: str, **headers: str) -> Any:
    return await asyncio.wait_for(stream_chat(http, url, method="GET", headers=headers or None), 20)


async def test_after_a_redis_restart_another_user_cannot_read_or_stop_the_stream(
    hosts: tuple[str, str],
    redis_server: RedisServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    a, b = hosts
    emulator.script(Reply(ANSWER, token_delay=0.01))
    alice = {"X-User": "alice"}
    first = await stream_chat(
        http, a + "/chat/stream", {"message": "hi"}, headers=alice, stop_after_deltas=20
    )
    path = "/chat/stream/" + first.headers["x-stream-id"]
    redis_server.restart()
    await finish(emulator, redis_server.url, first.headers["x-stream-id"])
    assert (await http.get(b + path, headers={"X-User": "mallory"})).status_code == 404
    assert (await http.get(b + path)).status_code == 404  # nor a guest
    assert (await http.delete(b + path, headers={"X-User": "mallory"})).status_code == 404
    mine = await read_all(http, b + path, **alice)
    assert mine.text == ANSWER and mine.types[-1] == "done"


async def test_a_resume_from_the_start_after_a_redis_restart_is_exact(
    hosts: tuple[str, str],
    redis_server: RedisServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    a, b = hosts
    emulator.script(Reply(ANSWER, token_delay=0.01))
    first = await stream_chat(http, a + "/chat/stream", {"message": "hi"}, stop_after_deltas=100)
    path = "/chat/stream/" + first.headers["x-stream-id"]
    redis_server.restart()
    await finish(emulator, redis_server.url, first.headers["x-stream-id"])
    everything = await read_all(http, b + path)
    assert everything.types[0] == "start"
    assert everything.text == ANSWER and everything.types[-1] == "done"
    assert everything.ids == [str(i) for i in range(len(everything.ids))]


async def test_connection_blips_leave_no_holes(
    hosts: tuple[str, str],
    redis_server: RedisServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    a, b = hosts
    emulator.script(Reply(ANSWER, token_delay=0.01))
    killer = aioredis.from_url(redis_server.url)

    async def blips() -> None:  # from the first token to the last, every 30 ms
        while not emulator.requests[0].ended.is_set():
            await killer.client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(0.03)

    try:
        async with asyncio.timeout(30):
            producing = asyncio.create_task(
                stream_chat(http, a + "/chat/stream", {"message": "hi"})
            )
            await emulator.wait_for_requests(1)
            await blips()
            first = await producing
    finally:
        await killer.aclose()
    assert first.text == ANSWER  # the producing host's own reader never depends on Redis
    await mirrored(redis_server.url, first.headers["x-stream-id"])  # the flusher's retry
    again = await read_all(http, b + "/chat/stream/" + first.headers["x-stream-id"])
    assert again.text == ANSWER and again.types[-1] == "done"
    assert again.ids == [str(i) for i in range(len(again.ids))]


async def test_a_last_event_id_past_the_end_on_another_host_ends_with_the_stream(
    hosts: tuple[str, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    a, b = hosts
    emulator.script(Reply(ANSWER, token_delay=0.005))
    first = await stream_chat(http, a + "/chat/stream", {"message": "hi"}, stop_after_deltas=2)
    path = "/chat/stream/" + first.headers["x-stream-id"]
    past = await read_all(http, b + path, **{"Last-Event-ID": "100000"})
    assert past.status == 200 and past.events == []  # nothing after it, and it ended


async def test_while_redis_is_down_every_route_answers_json_and_ready_says_so(
    hosts: tuple[str, str],
    redis_server: RedisServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    a, b = hosts
    done = await stream_chat(http, a + "/chat/stream", {"message": "hi"})
    path = "/chat/stream/" + done.headers["x-stream-id"]
    redis_server.stop()
    for response in (
        await http.get(b + path),
        await http.delete(b + path),
        await http.post(b + "/chat/stream", json={"message": "hi"}),
    ):
        assert response.status_code == 503
        assert response.json()["error"] == "store_unavailable"
        assert response.headers["retry-after"] == "1"
    ready = await http.get(b + "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "store_unavailable"
    redis_server.start()  # empty now: the stream is gone, and the first lookup says so
    assert (await http.get(b + path)).status_code == 404
    assert (await http.get(b + "/ready")).status_code == 200


async def test_a_draining_host_ends_its_readers_of_other_hosts_streams_with_shutdown(
    make_app: Callable[..., Quart],
    redis_server: RedisServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    port = free_port()
    env = {
        "CLAUDE_API_KEY": "sk-test-drain-reader",
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_server.url,
        "CLAUDE_HEARTBEAT_INTERVAL": "0.5",
    }
    b = f"http://127.0.0.1:{port}"
    process = await start(
        [HYPERCORN, "--graceful-timeout", "5", "-b", f"127.0.0.1:{port}", "tests.host_app:app"],
        env,
    )
    try:
        await wait_ready(b + "/ready", process)
        async with serving(make_app(stream_store=redis_server.url)) as a:
            first = await stream_chat(
                http, a + "/chat/stream", {"message": "hi"}, stop_after_deltas=3
            )
            path = "/chat/stream/" + first.headers["x-stream-id"]
            following = asyncio.Event()
            reading = asyncio.create_task(
                asyncio.wait_for(stream_chat(http, b + path, method="GET", attached=following), 20)
            )
            await asyncio.wait_for(following.wait(), 10)  # the reader on b follows it live
            os.kill(process.pid, signal.SIGTERM)
            result = await reading  # a clean end of the body: httpx2 raises on a cut one
    finally:
        await stop(process)
    last = result.events[-1]
    assert last["type"] == "error" and last["error"] == "shutdown" and last["retryable"]
    assert ANSWER.startswith(result.text) and len(result.text) < len(ANSWER)
