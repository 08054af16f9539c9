"""A Redis Cluster as the stream store (issue 26): 3 primaries and 3 replicas, started by the
``redis_cluster`` fixture. ``tests/test_redis.py`` runs every cross-worker test on it too;
``tests/test_takeover.py`` its SIGKILL takeover and SIGTERM hand-off. Here: what only a
cluster has (slots migrating under live streams) and the features that share the store's
Redis (rate limits, budgets, fallback cooldowns)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator, ErrorReply, Reply

from .helpers import SSEResult, eventually, serving, stream_chat
from .redis_cluster import RedisClusterServers

pytestmark = pytest.mark.server

STREAMS = 20


def answer(index: int) -> str:
    return " ".join(f"s{index}w{i:03d}" for i in range(120))


async def test_slots_migrating_under_20_live_streams_lose_nothing(
    redis_cluster: RedisClusterServers,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    """Each stream's slot moves to another primary (keys MIGRATEd, the slot handed over) while
    it streams: the store's commands meet ``ASK``, ``TRYAGAIN`` and ``MOVED``, and every
    reader, on the producing worker and on the other, gets its exact answer, ids in order."""
    emulator.script(*(Reply(answer(i), token_delay=0.04) for i in range(STREAMS)))
    # redis-py's cluster client drops its node connections while it relearns the slots, so
    # commands fail for a while during each move; on a loaded machine (the whole suite) that
    # spans more than the default 3 s lease, and a live producer would be taken for dead.
    # Within a lease a migration is a retry: that is what this test checks
    options = {"stream_store": redis_cluster.url, "heartbeat_interval": 0.5, "stream_lease": 10}
    producer, other = make_app(**options), make_app(**options)
    async with serving(producer) as a, serving(other) as b:
        firsts: list[SSEResult] = []
        posts = [
            asyncio.create_task(
                stream_chat(http, a + "/chat/stream", {"message": f"q{i}"}, on_first=firsts.append)
            )
            for i in range(STREAMS)
        ]
        await eventually(lambda: len(firsts) == STREAMS, 30)
        ids = [first.events[0]["stream_id"] for first in firsts]
        remote = [
            asyncio.create_task(stream_chat(http, f"{b}/chat/stream/{sid}", method="GET"))
            for sid in ids
        ]
        await asyncio.sleep(0.5)  # mid-answer: about 12 of 120 words each
        moved = await asyncio.to_thread(redis_cluster.migrate_slots_of, ids)
        local = await asyncio.wait_for(asyncio.gather(*posts), 60)
        pairs = zip(ids, remote, strict=True)
        followed = {sid: await asyncio.wait_for(task, 60) for sid, task in pairs}
    assert moved >= STREAMS // 2  # most streams' slots really moved (ids hash anywhere)
    assert len(emulator.requests) == STREAMS  # nothing was asked twice
    for mine in local:
        theirs = followed[mine.events[0]["stream_id"]]
        for reading in (mine, theirs):
            assert reading.types[-1] == "done", reading.events[-1]
            assert reading.ids == [str(i) for i in range(len(reading.ids))]
        assert theirs.text == mine.text
    # each stream whole, each answer once (the emulator hands them out as requests arrive)
    assert sorted(mine.text for mine in local) == sorted(answer(i) for i in range(STREAMS))


async def test_rate_limits_budgets_and_cooldowns_are_shared_through_the_cluster(
    redis_cluster: RedisClusterServers,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
) -> None:
    emulator.script(ErrorReply(529), Reply("first"), Reply("from the other worker"))
    options = {
        "stream_store": redis_cluster.url,
        "rate_limit": "3/minute",
        "budget": "1000000 tokens/day",
        "fallbacks": [{"model": "claude-haiku-4-5"}],
        "max_retries": 0,
    }
    one_app, two_app = make_app(**options), make_app(**options)
    async with serving(one_app) as one, serving(two_app) as two:
        await stream_chat(http, one + "/chat/stream", {"message": "hi"})
        other = await stream_chat(http, two + "/chat/stream", {"message": "hi"})
        assert other.text == "from the other worker"  # the primary cooled for both
        assert [r.body["model"] for r in emulator.requests][1:] == ["claude-haiku-4-5"] * 2
        emulator.default = Reply("ok")
        third = await http.post(one + "/chat", json={"message": "hi"})
        refused = await http.post(two + "/chat", json={"message": "hi"})
        usage = (await http.get(two + "/usage")).json()  # counted on "one" and on "two"
    assert third.status_code == 200
    assert usage["limits"][0]["used_tokens"] > 0
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert Claude.state(one_app).store.link is not None
