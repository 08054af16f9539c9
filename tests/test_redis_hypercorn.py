"""``hypercorn -w 3`` with the Redis store: resumes that land on other workers are complete and
exact, repeatedly; a finished stream is readable from every worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2
import pytest

from quart_claude.testing import Emulator, Reply

from .helpers import free_port, stream_chat
from .test_hypercorn_cli import HYPERCORN, start, stop, wait_ready

pytestmark = pytest.mark.system

ANSWER = " ".join(f"part{i}" for i in range(80))
WORKERS = 3


@pytest.fixture
async def three_workers(emulator: Emulator, redis_url: str) -> AsyncIterator[str]:
    port = free_port()
    env = {
        "CLAUDE_API_KEY": "sk-test-workers",
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_url,
        "CLAUDE_HEARTBEAT_INTERVAL": "1",
    }
    process = await start(
        [HYPERCORN, "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "tests.host_app:app"], env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        yield url
    finally:
        await stop(process)


def fresh_connection() -> httpx2.AsyncClient:
    """A client that never reuses a connection, so the kernel may pick any worker."""
    return httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_keepalive_connections=0))


async def test_resumes_across_workers_are_exact(three_workers: str, emulator: Emulator) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.03))
    async with fresh_connection() as http:
        first = await stream_chat(
            http, three_workers + "/chat/stream", {"message": "hi"}, stop_after_deltas=10
        )
        producer = first.headers["x-worker-pid"]
        path = three_workers + "/chat/stream/" + first.headers["x-stream-id"]
        text, last = first.text, first.ids[-1]
        serving_pids = set()
        for _ in range(40):  # short resumes, each dropped after a few events
            part = await stream_chat(
                http, path, method="GET", stop_after_deltas=2, headers={"Last-Event-ID": last or ""}
            )
            if part.status == 204:
                break
            assert part.ids[0] == str(int(last or 0) + 1)  # no gap, no repeat
            serving_pids.add(part.headers["x-worker-pid"])
            text += part.text
            last = part.ids[-1]
            if part.types[-1] == "done":
                break
        assert text == ANSWER
        assert serving_pids - {producer}, "no resume landed on another worker"

        # finished: replayed whole by whichever worker takes the connection (the kernel
        # picks, unevenly; test_every_process_reads_it_until_the_ttl addresses each one)
        seen = set()
        for _ in range(100):  # until two workers answered (seen once: 30 went to one)
            whole = await stream_chat(http, path, method="GET")
            assert whole.text == ANSWER and whole.types[-1] == "done"
            seen.add(whole.headers["x-worker-pid"])
            if len(seen) >= 2:
                break
        assert len(seen) >= 2, seen
    assert len(emulator.requests) == 1


async def test_every_process_reads_it_until_the_ttl(emulator: Emulator, redis_url: str) -> None:
    """Three servers on their own ports, one Redis: each one can be asked directly."""
    env = {
        "CLAUDE_API_KEY": "sk-test-workers",
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_url,
        "CLAUDE_STREAM_TTL": "3",
    }
    ports = [free_port() for _ in range(3)]
    processes = [
        await start([HYPERCORN, "-b", f"127.0.0.1:{port}", "tests.host_app:app"], env)
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes, strict=True):
            await wait_ready(url + "/ready", process)
        emulator.script(Reply(ANSWER))
        async with fresh_connection() as http:
            done = await stream_chat(http, urls[0] + "/chat/stream", {"message": "hi"})
            path = "/chat/stream/" + done.headers["x-stream-id"]
            pids = set()
            for url in urls:
                whole = await stream_chat(http, url + path, method="GET")
                assert whole.text == ANSWER and whole.types[-1] == "done"
                pids.add(whole.headers["x-worker-pid"])
            assert len(pids) == 3
            await asyncio.sleep(3.5)  # past CLAUDE_STREAM_TTL
            for url in urls:
                assert (await http.get(url + path)).status_code == 404
    finally:
        for process in processes:
            await stop(process)
