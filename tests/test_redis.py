"""With the Redis store, a stream produced on one worker is read, resumed and stopped from
another, on one redis-server and on a Redis Cluster (3 primaries, 3 replicas). Two apps in
one process stand for two workers here; test_redis_hypercorn.py uses a real
``hypercorn -w 3``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
import redis.asyncio as aioredis
from quart import Quart

from quart_claude import Claude
from quart_claude._core.redis_mirror import RedisMirror
from quart_claude.testing import Emulator, Reply

from .helpers import serving, stream_chat
from .redis_cluster import RedisClusterServers, client_for

pytestmark = pytest.mark.server

ANSWER = " ".join(f"w{i}" for i in range(50))


@pytest.fixture(params=["server", "cluster"])
def redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """Every test here on one redis-server, then on a Redis Cluster."""
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return cluster.url
    return redis_url


@pytest.fixture
async def workers(
    make_app: Callable[..., Quart], redis_url: str
) -> AsyncIterator[tuple[str, str, Quart, Quart]]:
    first = make_app(stream_store=redis_url, heartbeat_interval=0.5)
    second = make_app(stream_store=redis_url, heartbeat_interval=0.5)
    async with serving(first) as a, serving(second) as b:
        yield a, b, first, second


async def test_resume_on_another_worker_is_exact(
    workers: tuple[str, str, Quart, Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    a, b, _, _ = workers
    emulator.script(Reply(ANSWER, token_delay=0.02))
    first = await stream_chat(http, a + "/chat/stream", {"message": "hi"}, stop_after_deltas=10)
    path = "/chat/stream/" + first.headers["x-stream-id"]
    rest = await stream_chat(
        http, b + path, method="GET", headers={"Last-Event-ID": first.ids[-1] or ""}
    )
    assert rest.ids[0] == str(int(first.ids[-1] or 0) + 1)
    assert first.text + rest.text == ANSWER
    assert rest.types[-1] == "done"
    # finished: every worker replays it whole, and says 204 at its end
    everything = await stream_chat(http, b + path, method="GET")
    assert everything.text == ANSWER
    assert everything.ids == [str(i) for i in range(len(everything.ids))]
    end = await http.get(b + path, headers={"Last-Event-ID": everything.ids[-1] or ""})
    assert end.status_code == 204
    assert len(emulator.requests) == 1


async def test_live_follow_from_another_worker(
    workers: tuple[str, str, Quart, Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    a, b, _, _ = workers
    emulator.script(Reply(ANSWER, token_delay=0.03))
    async with http.stream("POST", a + "/chat/stream", json={"message": "hi"}) as response:
        path = "/chat/stream/" + response.headers["x-stream-id"]
        follower = asyncio.create_task(stream_chat(http, b + path, method="GET"))
        await response.aread()
    followed = await follower
    assert followed.text == ANSWER and followed.types[-1] == "done"


async def test_delete_on_another_worker_stops_the_upstream(
    workers: tuple[str, str, Quart, Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    a, b, _, _ = workers
    emulator.script(Reply(ANSWER, token_delay=0.1))
    async with http.stream("POST", a + "/chat/stream", json={"message": "hi"}) as response:
        path = "/chat/stream/" + response.headers["x-stream-id"]
        await emulator.wait_for_requests(1)
        await asyncio.sleep(0.2)
        stopped_at = time.time()
        assert (await http.delete(b + path)).json()["status"] == "cancelled"
        body = await response.aread()
    upstream = emulator.requests[0]
    await asyncio.wait_for(upstream.ended.wait(), 1.5)
    assert upstream.disconnected
    assert upstream.ended_at is not None and upstream.ended_at - stopped_at < 1.0
    assert b'"stop_reason":"cancelled"' in body


async def test_remote_reader_keeps_the_generation_alive(
    make_app: Callable[..., Quart], redis_url: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """The producer's own reader leaves; a reader on another worker still counts."""
    emulator.script(Reply(ANSWER, token_delay=0.04))
    first = make_app(stream_store=redis_url, resume_grace=0.2, heartbeat_interval=0.3)
    second = make_app(stream_store=redis_url, heartbeat_interval=0.3)
    async with serving(first) as a, serving(second) as b:
        async with http.stream("POST", a + "/chat/stream", json={"message": "hi"}) as response:
            path = "/chat/stream/" + response.headers["x-stream-id"]
            following = asyncio.Event()
            follower = asyncio.create_task(
                stream_chat(http, b + path, method="GET", attached=following)
            )
            await asyncio.wait_for(following.wait(), 10)
        followed = await follower  # the POST reader left long before the end
    assert followed.text == ANSWER
    assert emulator.requests[0].outcome == "completed"


async def test_without_takeovers_readers_learn_when_the_producer_dies(
    make_app: Callable[..., Quart],
    redis_url: str,
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    """``CLAUDE_MAX_TAKEOVERS=0``: nobody continues it (tests/test_takeover.py: with)."""
    first = make_app(stream_store=redis_url, heartbeat_interval=0.5, max_takeovers=0)
    second = make_app(stream_store=redis_url, heartbeat_interval=0.5, max_takeovers=0)
    emulator.script(Reply(ANSWER, fault="stall", fault_after=5, stall=60))
    async with (
        serving(first) as a,
        serving(second) as b,
        http.stream("POST", a + "/chat/stream", json={"message": "hi"}) as response,
    ):
        path = "/chat/stream/" + response.headers["x-stream-id"]
        stream_id = response.headers["x-stream-id"]
        await emulator.wait_for_requests(1)
        # the producing worker "dies": its lease stops being refreshed and expires
        store = Claude.state(first).store
        assert isinstance(store.mirror, RedisMirror)
        store.mirror._records[stream_id].renewing = False  # its leases are no longer renewed
        client = client_for(redis_url)
        await client.delete(f"qc:{{{stream_id}}}:lease")
        await client.aclose()
        started = time.monotonic()
        orphan = await asyncio.wait_for(stream_chat(http, b + path, method="GET"), 10)
    assert orphan.events[-1]["type"] == "error"
    assert orphan.events[-1]["error"] == "unavailable"
    assert orphan.events[-1]["retryable"] is True
    assert time.monotonic() - started < 5


async def test_finished_streams_expire_everywhere(
    make_app: Callable[..., Quart], redis_url: str, http: httpx2.AsyncClient
) -> None:
    first = make_app(stream_store=redis_url, stream_ttl=1)
    second = make_app(stream_store=redis_url, stream_ttl=1)
    async with serving(first) as a, serving(second) as b:
        done = await stream_chat(http, a + "/chat/stream", {"message": "hi"})
        path = "/chat/stream/" + done.headers["x-stream-id"]
        assert (await stream_chat(http, b + path, method="GET")).types[-1] == "done"
        await asyncio.sleep(2.2)
        assert (await http.get(b + path)).status_code == 404
        assert (await http.get(a + path)).status_code == 404


async def test_store_down_is_a_503_not_a_500(
    make_app: Callable[..., Quart], redis_url: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = make_app(stream_store=redis_url)
    async with serving(app) as url:
        store = Claude.state(app).store
        assert store.link is not None
        real = store.link.redis
        store.link.redis = aioredis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
        try:
            refused = await http.post(url + "/chat/stream", json={"message": "hi"})
        finally:
            await store.link.redis.aclose()
            store.link.redis = real
        assert refused.status_code == 503
        assert refused.json()["error"] == "store_unavailable"
        assert emulator.requests == []
        assert (await stream_chat(http, url + "/chat/stream", {"message": "hi"})).types[
            -1
        ] == "done"


async def test_redis_lost_mid_read_ends_with_a_retryable_error(
    workers: tuple[str, str, Quart, Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    a, b, _, second = workers
    emulator.script(Reply(ANSWER, token_delay=0.05))
    first = await stream_chat(http, a + "/chat/stream", {"message": "hi"}, stop_after_deltas=3)
    store = Claude.state(second).store
    assert store.link is not None
    following = asyncio.Event()
    reading = asyncio.create_task(
        stream_chat(
            http,
            b + "/chat/stream/" + first.headers["x-stream-id"],
            method="GET",
            attached=following,
        )
    )
    await asyncio.wait_for(following.wait(), 10)  # the reader on "b" is following it live
    real = store.link.blocking
    store.link.blocking = aioredis.from_url("redis://127.0.0.1:1/0")  # Redis is gone for "b"
    try:
        result = await asyncio.wait_for(reading, 10)
    finally:
        await store.link.blocking.aclose()
        store.link.blocking = real
    assert result.events[-1]["type"] == "error"
    assert result.events[-1]["error"] == "unavailable"
    assert result.events[-1]["retryable"] is True
    assert result.text and ANSWER.startswith(result.text)  # a clean prefix, from the start
