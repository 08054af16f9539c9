"""What only the Flask front end has: Gunicorn's gthread worker (a departed client noticed
while the stream is silent, SIGTERM, several workers, ``--preload``), Flask's development
server, and a Flask app and a Quart app resuming each other's streams through one Redis.
The acceptance tests that both front ends pass are parametrized in test_streaming,
test_resilience and test_resume."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from quart_claude.testing import Emulator, Reply

from .conftest import API_KEY
from .helpers import GUNICORN, ROOT, free_port, gunicorn_serving, listener, stream_chat
from .test_hypercorn_cli import HYPERCORN, start, stop, wait_ready

pytestmark = [pytest.mark.system, pytest.mark.deps]

ANSWER = " ".join(f"f{i}" for i in range(40))


def options(emulator: Emulator, **extra: object) -> dict[str, object]:
    return {"api_key": API_KEY, "base_url": emulator.url, **extra}


async def test_a_client_gone_during_silence_is_noticed_and_the_grace_then_applies(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """No event to write, so no failed write: the socket check finds the departed client,
    and the upstream request is closed within a second of the grace running out."""
    grace = 1.0
    emulator.script(Reply("first rest", tokens=["first ", "rest"], token_delay=30))
    async with gunicorn_serving(
        options(emulator, resume_grace=grace, heartbeat_interval=60)
    ) as url:
        result = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=1
        )
        left_at = time.time()
        (request,) = emulator.requests
        await asyncio.wait_for(request.ended.wait(), grace + 5)
    assert result.text == "first "
    assert request.disconnected and request.ended_at is not None
    waited = request.ended_at - left_at
    # the grace, then the next socket check (every LIVENESS_INTERVAL = 1 s), with slack
    assert grace - 0.1 < waited < grace + 1.0 + 1.0, waited


async def test_sigterm_drains_open_streams_with_a_retryable_shutdown(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.default = Reply(ANSWER, token_delay=0.5)  # 20 s each
    port = free_port()
    env = {"CLAUDE_API_KEY": API_KEY, "CLAUDE_BASE_URL": emulator.url}
    process = await start(
        [
            GUNICORN,
            "-c",
            str(ROOT / "deploy" / "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "2",
            "tests.flask_host_app:app",
        ],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        readers = [
            asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "hi"}))
            for _ in range(3)
        ]
        await emulator.wait_for_requests(3)
        await asyncio.sleep(1.0)
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        results = await asyncio.gather(*readers)  # each body ends cleanly
        await asyncio.wait_for(process.wait(), 20)
        exited_after = time.monotonic() - signalled
    finally:
        output = await stop(process)
    for result in results:
        assert result.events[-1]["error"] == "shutdown" and result.events[-1]["retryable"]
        assert result.events[-1]["partial"] is True
    assert exited_after < 10, exited_after  # gunicorn.conf.py's graceful_timeout
    assert process.returncode == 0
    assert b"without quart_claude.flask.post_worker_init" not in output
    for request in emulator.requests:  # every upstream request was closed, none left open
        assert request.ended.is_set()


async def test_without_the_gunicorn_hook_a_warning_says_so(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    sock = listener()  # inherited: no other test's server can answer on this port
    port = sock.getsockname()[1]
    env = {"CLAUDE_API_KEY": API_KEY, "CLAUDE_BASE_URL": emulator.url}
    args = [GUNICORN, "-k", "gthread", "--threads", "4", "-b", f"fd://{sock.fileno()}"]
    try:
        process = await start([*args, "tests.flask_host_app:app"], env, (sock.fileno(),))
    finally:
        sock.close()
    try:
        await wait_ready(f"http://127.0.0.1:{port}/ready", process)
    finally:
        output = await stop(process)
    assert b"without quart_claude.flask.post_worker_init" in output


@pytest.fixture
async def two_workers_preloaded(emulator: Emulator, redis_url: str) -> AsyncIterator[str]:
    port = free_port()
    env = {
        "CLAUDE_API_KEY": API_KEY,
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_url,
        "CLAUDE_HEARTBEAT_INTERVAL": "1",
    }
    config = str(ROOT / "deploy" / "gunicorn.conf.py")
    args = [GUNICORN, "-c", config, "-b", f"127.0.0.1:{port}", "-w", "2", "--preload"]
    process = await start([*args, "--access-logfile", "/dev/null", "tests.flask_host_app:app"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        yield url
    finally:
        await stop(process)


async def test_preloaded_workers_resume_each_others_streams(
    two_workers_preloaded: str, emulator: Emulator
) -> None:
    """``--preload``: the app is imported before the fork; each worker starts its own loop."""
    url = two_workers_preloaded
    # 40 tokens over 4 s, each resume leaving after one: the kernel hands the workers the
    # fresh connections as it likes, so give it many chances to pick the other one
    emulator.script(Reply(ANSWER, token_delay=0.1))
    async with httpx2.AsyncClient(
        timeout=30, limits=httpx2.Limits(max_keepalive_connections=0)
    ) as http:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=2
        )
        producer = first.headers["x-worker-pid"]
        path = url + "/chat/stream/" + first.headers["x-stream-id"]
        text, last, pids = first.text, first.ids[-1], set()
        for _ in range(60):
            part = await stream_chat(
                http, path, method="GET", stop_after_deltas=1, headers={"Last-Event-ID": last or ""}
            )
            if part.status == 204:
                break
            assert part.ids[0] == str(int(last or 0) + 1)  # no gap, no repeat
            pids.add(part.headers["x-worker-pid"])
            text += part.text
            last = part.ids[-1]
            if part.types[-1] == "done":
                break
    assert text == ANSWER
    assert pids - {producer}, "no resume landed on the other worker"
    assert len(emulator.requests) == 1


async def test_a_flask_app_and_a_quart_app_resume_each_others_streams(
    emulator: Emulator, redis_url: str, http: httpx2.AsyncClient
) -> None:
    quart_port = free_port()
    env = {
        "CLAUDE_API_KEY": API_KEY,
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_url,
    }
    quart = await start([HYPERCORN, "-b", f"127.0.0.1:{quart_port}", "tests.host_app:app"], env)
    quart_url = f"http://127.0.0.1:{quart_port}"
    try:
        await wait_ready(quart_url + "/ready", quart)
        async with gunicorn_serving(options(emulator, stream_store=redis_url)) as flask_url:
            emulator.script(Reply(ANSWER, token_delay=0.05), Reply(ANSWER, token_delay=0.05))
            for producer, reader in ((flask_url, quart_url), (quart_url, flask_url)):
                first = await stream_chat(
                    http, producer + "/chat/stream", {"message": "hi"}, stop_after_deltas=4
                )
                rest = await stream_chat(
                    http,
                    f"{reader}/chat/stream/{first.headers['x-stream-id']}",
                    method="GET",
                    headers={"Last-Event-ID": first.ids[-1] or ""},
                )
                assert first.text + rest.text == ANSWER
                assert rest.types[-1] == "done"
                assert rest.ids[0] == str(int(first.ids[-1] or 0) + 1)
                # and a stop from the other side
            emulator.script(Reply(ANSWER, token_delay=0.1))
            running = await stream_chat(
                http, flask_url + "/chat/stream", {"message": "hi"}, stop_after_deltas=2
            )
            stopped = await http.delete(f"{quart_url}/chat/stream/{running.headers['x-stream-id']}")
            assert stopped.json()["status"] == "cancelled"
            await asyncio.wait_for(emulator.requests[-1].ended.wait(), 5)
            assert emulator.requests[-1].disconnected
    finally:
        await stop(quart)


async def test_flask_run_development_server_streams(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    port = free_port()
    env = {"CLAUDE_API_KEY": API_KEY, "CLAUDE_BASE_URL": emulator.url}
    flask = str(Path(sys.executable).with_name("flask"))
    process = await start(
        [flask, "--app", "tests.flask_host_app:app", "run", "-p", str(port), "-h", "127.0.0.1"],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        emulator.script(Reply(ANSWER, token_delay=0.05))
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        assert result.text == ANSWER and result.types[-1] == "done"
        ended = emulator.requests[0].ended_at
        assert ended is not None and result.received_at[1] < ended - 1.0  # not buffered
        assert (await http.get(url + "/")).text == "the host app's own page"
    finally:
        await stop(process)


async def test_cors_on_flask_is_scoped_to_the_blueprint(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """``CLAUDE_CORS_ORIGINS`` through flask-cors, as quart-cors does it on Quart."""
    origin = {"Origin": "https://chat.example.com"}
    async with gunicorn_serving(options(emulator, cors_origins="https://chat.example.com")) as url:
        preflight = await http.options(
            url + "/chat/stream",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, last-event-id",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "last-event-id" in preflight.headers["access-control-allow-headers"].lower()
        streamed = await stream_chat(http, url + "/chat/stream", {"message": "hi"}, headers=origin)
        assert streamed.types[-1] == "done"
        assert streamed.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "x-stream-id" in streamed.headers["access-control-expose-headers"].lower()
        stranger = await http.post(
            url + "/chat", json={"message": "hi"}, headers={"Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers
        host = await http.get(url + "/", headers=origin)
        assert "access-control-allow-origin" not in host.headers  # the host app's own routes
