"""Every answer survives the connection that asked for it: replay, stop, grace, TTL, owners."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from quart import Quart, Request

from quart_claude import Claude
from quart_claude._core.store import Timings, memory_store
from quart_claude._core.stream import Stream
from quart_claude.testing import Emulator, Reply

from .helpers import eventually, serving, stream_chat

pytestmark = pytest.mark.server


@pytest.fixture
async def server(serve: Callable[..., Any]) -> AsyncIterator[str]:
    """Each front end's server (conftest's ``serve``): the acceptance tests run on both."""
    async with serve() as url:
        yield url


ANSWER = " ".join(f"word{i}" for i in range(40))


async def test_resume_after_a_drop_gives_exactly_the_rest(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.02))
    first = await stream_chat(
        http, server + "/chat/stream", {"message": "hi"}, stop_after_deltas=10
    )
    stream_id = first.headers["x-stream-id"]
    last_id = first.ids[-1]
    assert last_id is not None
    assert first.types.count("delta") == 10
    rest = await stream_chat(
        http,
        f"{server}/chat/stream/{stream_id}",
        method="GET",
        headers={"Last-Event-ID": str(last_id)},
    )
    assert rest.status == 200
    assert rest.ids[0] == str(int(last_id) + 1)  # nothing repeated, nothing skipped
    assert first.text + rest.text == ANSWER
    assert rest.types[-1] == "done"
    assert len(emulator.requests) == 1  # the generation went on; it was not restarted

    everything = await stream_chat(http, f"{server}/chat/stream/{stream_id}", method="GET")
    assert everything.text == ANSWER
    assert everything.types[0] == "start" and everything.types[-1] == "done"
    assert everything.ids == [str(i) for i in range(len(everything.ids))]

    by_query = await stream_chat(
        http, f"{server}/chat/stream/{stream_id}?last_event_id=5", method="GET"
    )
    assert by_query.ids[0] == "6" and by_query.events == everything.events[6:]


async def test_resume_of_a_finished_stream_at_its_end_is_204(
    server: str, http: httpx2.AsyncClient
) -> None:
    done = await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    stream_id = done.headers["x-stream-id"]
    last = await http.get(
        f"{server}/chat/stream/{stream_id}", headers={"Last-Event-ID": done.ids[-1] or ""}
    )
    assert last.status_code == 204  # EventSource stops reconnecting on 204


async def test_unknown_stream_and_bad_last_event_id(server: str, http: httpx2.AsyncClient) -> None:
    missing = await http.get(f"{server}/chat/stream/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert (await http.delete(f"{server}/chat/stream/nope")).status_code == 404
    done = await stream_chat(http, server + "/chat/stream", {"message": "hi"})
    bad = await http.get(
        f"{server}/chat/stream/{done.headers['x-stream-id']}", headers={"Last-Event-ID": "abc"}
    )
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["message"]


async def test_two_readers_see_the_same_stream(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.02))
    async with http.stream("POST", server + "/chat/stream", json={"message": "hi"}) as r:
        stream_id = r.headers["x-stream-id"]
        follower = asyncio.create_task(
            stream_chat(http, f"{server}/chat/stream/{stream_id}", method="GET")
        )
        await r.aread()
    assert (await follower).text == ANSWER


async def test_delete_stops_the_upstream_and_readers_get_cancelled(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.1))
    async with http.stream("POST", server + "/chat/stream", json={"message": "hi"}) as r:
        stream_id = r.headers["x-stream-id"]
        await emulator.wait_for_requests(1)
        await asyncio.sleep(0.3)
        stopped_at = time.time()
        stop = await http.delete(f"{server}/chat/stream/{stream_id}")
        assert stop.json() == {"stream_id": stream_id, "status": "cancelled"}
        body = (await r.aread()).decode()
    (upstream,) = emulator.requests
    await asyncio.wait_for(upstream.ended.wait(), 1.0)
    assert upstream.disconnected and upstream.ended_at is not None
    assert upstream.ended_at - stopped_at < 1.0
    assert (
        body.rstrip().split("\n")[-2].startswith('data: {"type":"done","stop_reason":"cancelled"')
    )
    again = await http.delete(f"{server}/chat/stream/{stream_id}")
    assert again.json()["status"] == "finished"


async def test_with_grace_the_generation_outlives_the_connection(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.03))
    async with serve(resume_grace=30) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=3
        )
        (upstream,) = emulator.requests
        await asyncio.wait_for(upstream.ended.wait(), 10)
        assert upstream.outcome == "completed"  # nobody was reading, and it still finished
        resumed = await stream_chat(
            http, f"{url}/chat/stream/{first.headers['x-stream-id']}", method="GET"
        )
        assert resumed.text == ANSWER


async def test_grace_expiry_cancels_when_nobody_comes_back(
    serve: Callable[..., Any], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.2))
    async with serve(resume_grace=0.5) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=2
        )
        left_at = time.time()
        (upstream,) = emulator.requests
        await asyncio.wait_for(upstream.ended.wait(), 3)
        assert upstream.disconnected
        assert upstream.ended_at is not None and 0.4 < upstream.ended_at - left_at < 1.6
        resumed = await stream_chat(
            http,
            f"{url}/chat/stream/{first.headers['x-stream-id']}",
            method="GET",
            headers={"Last-Event-ID": first.ids[-1] or ""},
        )
        assert resumed.events[-1]["stop_reason"] == "cancelled"


async def test_identity_hook_restricts_who_may_read_or_stop(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = Quart(__name__)
    claude = Claude(api_key="sk-test", base_url=emulator.url)

    @claude.authorize
    def user(req: Request) -> str | None:
        return req.headers.get("X-User")

    claude.init_app(app)
    emulator.script(Reply(ANSWER, token_delay=0.05))
    async with serving(app) as url:
        first = await stream_chat(
            http,
            url + "/chat/stream",
            {"message": "hi"},
            headers={"X-User": "alice"},
            stop_after_deltas=2,
        )
        path = f"{url}/chat/stream/{first.headers['x-stream-id']}"
        mallory = {"X-User": "mallory"}
        assert (await http.get(path, headers=mallory)).status_code == 404  # as if unknown
        assert (await http.delete(path, headers=mallory)).status_code == 404
        assert (await http.get(path)).status_code == 401  # nobody: not authorized at all
        assert (await http.delete(path)).status_code == 401
        mine = await stream_chat(http, path, method="GET", headers={"X-User": "alice"})
        assert mine.text == ANSWER


async def test_finished_streams_expire_after_the_ttl(
    serve: Callable[..., Any], http: httpx2.AsyncClient
) -> None:
    async with serve(stream_ttl=0.5) as url:
        done = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        path = f"{url}/chat/stream/{done.headers['x-stream-id']}"
        assert (await http.get(path)).status_code == 200
        await asyncio.sleep(0.7)
        assert (await http.get(path)).status_code == 404


def _reaches(start: object, target: object, limit: int = 20_000) -> bool:
    """Whether ``target`` is reachable from ``start`` through references (breadth-first),
    not counting what the event loop holds: a connection pool's keep-alive timer holds the
    context it was armed in (one request's, bounded by the pool), and the loop reaches every
    task."""
    seen, frontier = {id(start)}, [start]
    while frontier and len(seen) < limit:
        step = []
        for obj in frontier:
            for ref in gc.get_referents(obj):
                if ref is target:
                    return True
                if isinstance(ref, asyncio.AbstractEventLoop):
                    continue
                if id(ref) not in seen and not isinstance(ref, type | str | bytes | int):
                    seen.add(id(ref))
                    step.append(ref)
        frontier = step
    return False


async def test_a_finished_stream_kept_for_resume_holds_nothing_of_its_request(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    """Kept for ``CLAUDE_STREAM_TTL``, a finished stream holds its events, not the request
    that opened it (its producer task held the request's context, and with it the Quart
    request, its headers and the connection's state)."""
    app = make_app()
    requests: list[Any] = []

    @app.before_request
    async def keep() -> None:
        from quart import request

        requests.append(request._get_current_object())  # type: ignore[attr-defined,unused-ignore]

    async with serving(app) as url:
        done = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        assert done.types[-1] == "done"
        stream = Claude.state(app).store.get(done.headers["x-stream-id"])
        assert stream is not None and stream.finished
        (opened,) = [r for r in requests if r.method == "POST"]
        # the producer task ends (and lets go) just after the last event is sent
        await eventually(lambda: not _reaches(stream, opened), within=5)


async def test_memory_registry_stays_bounded_under_load() -> None:
    """5,000 finished streams past the cap (ten times it): the count and the memory stop
    growing."""
    registry = memory_store(Timings(ttl=300), max_finished=500, max_bytes=256 << 20)

    async def finish_many(count: int) -> None:
        for index in range(count):
            stream = Stream(f"s{index}-{time.monotonic_ns()}")
            await registry.open(stream)
            for piece in range(20):
                stream.append({"type": "delta", "text": f"piece {piece} of a longer answer"})
            stream.finish()

    tracemalloc.start()
    try:
        await finish_many(1000)  # past the cap: the registry now holds its 500 newest
        gc.collect()
        at_cap = tracemalloc.get_traced_memory()[0]
        await finish_many(5000)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(registry) == 500
    assert at_cap > 500 * 20 * 40  # the retained streams really are measured
    assert after - at_cap < 0.05 * at_cap  # flat: not 5,000 more streams' worth


@pytest.mark.parametrize("ttl", [0.05])
async def test_memory_registry_evicts_expired(ttl: float) -> None:
    registry = memory_store(Timings(ttl=ttl), max_finished=100, max_bytes=256 << 20)
    old = Stream("old")
    await registry.open(old)
    old.finish()
    live = Stream("live")
    await registry.open(live)
    await asyncio.sleep(ttl * 2)
    assert registry.get("old") is None
    assert registry.get("live") is live  # live streams are never evicted


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_grace_counts_from_the_last_reader_leaving(
    serve: Callable[..., Any],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    options = {"resume_grace": 1.0}
    if store == "redis":
        options["stream_store"] = request.getfixturevalue("redis_url")
    emulator.script(Reply(ANSWER, token_delay=0.1))
    async with serve(**options) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=2
        )
        await asyncio.sleep(0.6)  # back within the grace period, then gone again
        again = await stream_chat(
            http,
            f"{url}/chat/stream/{first.headers['x-stream-id']}",
            method="GET",
            headers={"Last-Event-ID": first.ids[-1] or ""},
            stop_after_deltas=2,
        )
        second_left = time.time()
        (upstream,) = emulator.requests
        await asyncio.sleep(0.8)  # past the first departure's deadline, not the second's
        assert not upstream.ended.is_set(), "cancelled by the first reader's grace period"
        await asyncio.wait_for(upstream.ended.wait(), 3)
        assert upstream.disconnected
        assert upstream.ended_at is not None and upstream.ended_at - second_left >= 0.9
        assert again.types.count("delta") >= 2  # the backlog came as one chunk
