"""The shipped deploy/nginx.conf (ports templated) in front of a real Hypercorn started with
the shipped deploy/hypercorn.toml (2 uvloop workers, sharing a real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest

from quart_claude.testing import Emulator, Reply

from . import binaries
from .conftest import RedisServer
from .helpers import free_port, stream_chat
from .test_hypercorn_cli import start, stop, wait_ready

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ANSWER = " ".join(f"tok{i}" for i in range(40))


def nginx_config(upstream_port: int, listen_port: int, **replace: str) -> str:
    """The shipped config with its two addresses (and any directive given) replaced."""
    text = (DEPLOY / "nginx.conf").read_text()
    for old, new in {
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
        "listen 8080;": f"listen 127.0.0.1:{listen_port};",
        **replace,
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def nginx(tmp_path: Path, config: str) -> Iterator[str]:
    nginx_binary = binaries.need("nginx")
    (tmp_path / "logs").mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(config)
    args = [nginx_binary, "-p", f"{tmp_path}/", "-c", str(conf)]
    globals_ = f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"
    checked = subprocess.run([*args, "-t", "-g", globals_], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr  # the shipped config is valid nginx
    process = subprocess.Popen([*args, "-g", globals_], stderr=subprocess.DEVNULL)
    port = int(config.split("listen 127.0.0.1:")[1].split(";")[0])
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port)):
                break
        except OSError:
            assert process.poll() is None, (tmp_path / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.asynccontextmanager
async def hypercorn(
    emulator: Emulator, redis_server: RedisServer, **env: str
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """``hypercorn --config deploy/hypercorn.toml -b 127.0.0.1:<port> tests.host_app:app``."""
    port = free_port()
    environment = {
        "CLAUDE_API_KEY": "sk-test-deploy-key-0123",
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_STREAM_STORE": redis_server.url,  # two workers: resumes may land on either
        "CLAUDE_HEARTBEAT_INTERVAL": "0.5",
        **env,
    }
    command = [sys.executable, "-m", "hypercorn", "--config", str(DEPLOY / "hypercorn.toml")]
    process = await start([*command, "-b", f"127.0.0.1:{port}", "tests.host_app:app"], environment)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/ready", process)
        yield port, process
    finally:
        output = await stop(process)
        assert b"sk-test-deploy-key" not in output


async def test_events_arrive_through_nginx_as_they_are_produced(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.1))  # 4 s
    async with hypercorn(emulator, redis_server) as (port, _):
        with nginx(tmp_path, nginx_config(port, free_port())) as url:
            result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == ANSWER and result.types[-1] == "done"
    ended = emulator.requests[0].ended_at
    assert ended is not None and result.received_at[1] < ended - 2.0  # not buffered to the end


@pytest.mark.parametrize(("heartbeat", "survives"), [("0.5", True), ("10", False)])
async def test_heartbeats_keep_a_stream_alive_past_a_short_proxy_read_timeout(
    tmp_path: Path,
    emulator: Emulator,
    redis_server: RedisServer,
    http: httpx2.AsyncClient,
    heartbeat: str,
    survives: bool,
) -> None:
    emulator.script(Reply("thought about it", first_token_delay=4.0))  # 4 s of silence first
    short = {"proxy_read_timeout 1h;": "proxy_read_timeout 2s;"}
    async with hypercorn(emulator, redis_server, CLAUDE_HEARTBEAT_INTERVAL=heartbeat) as (port, _):
        with nginx(tmp_path, nginx_config(port, free_port(), **short)) as url:
            try:
                result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
                complete = result.types[-1:] == ["done"]
            except httpx2.HTTPError:  # nginx cut the body when the upstream went quiet
                complete = False
    assert complete is survives  # the control case shows the short timeout really bites
    if survives:
        assert result.text == "thought about it" and result.pings >= 2


async def test_resume_and_stop_through_nginx(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05), Reply(ANSWER, token_delay=0.1))
    async with hypercorn(emulator, redis_server) as (port, _):
        with nginx(tmp_path, nginx_config(port, free_port())) as url:
            first = await stream_chat(
                http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=5
            )
            rest = await stream_chat(
                http,
                f"{url}/chat/stream/{first.headers['x-stream-id']}",
                method="GET",
                headers={"Last-Event-ID": first.ids[-1] or ""},
            )
            assert first.text + rest.text == ANSWER and rest.types[-1] == "done"
            second = await stream_chat(
                http, url + "/chat/stream", {"message": "hi"}, stop_after_deltas=3
            )
            stopped = await http.delete(f"{url}/chat/stream/{second.headers['x-stream-id']}")
            assert stopped.status_code == 200
            upstream = emulator.requests[1]
            await asyncio.wait_for(upstream.ended.wait(), 5)
            # the metrics are Prometheus's to scrape from inside, not the world's
            assert (await http.get(url + "/metrics")).status_code == 404
            direct = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert direct.status_code == 200 and "claude_streams_total" in direct.text
    assert upstream.disconnected


async def test_sigterm_ends_open_streams_through_nginx_within_the_grace(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, http: httpx2.AsyncClient
) -> None:
    emulator.script(*[Reply(ANSWER, token_delay=0.5)] * 3)  # 20 s each
    async with hypercorn(emulator, redis_server) as (port, process):
        with nginx(tmp_path, nginx_config(port, free_port())) as url:
            readers = [
                asyncio.create_task(stream_chat(http, url + "/chat/stream", {"message": "hi"}))
                for _ in range(3)
            ]
            await emulator.wait_for_requests(3)
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            results = await asyncio.gather(*readers)  # each body ends cleanly
            await asyncio.wait_for(process.wait(), 15)
            exited_after = time.monotonic() - signalled
    for result in results:
        assert result.events[-1]["error"] == "shutdown" and result.events[-1]["retryable"]
    assert exited_after < 10  # hypercorn.toml's graceful_timeout
    assert process.returncode == 0
