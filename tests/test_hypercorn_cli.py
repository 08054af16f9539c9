"""The extension in a user's app, served by the real ``hypercorn`` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from quart_claude.testing import Emulator, Reply

from .helpers import free_port, stream_chat
from .models import DEPRECATED_MODEL

pytestmark = [pytest.mark.system, pytest.mark.deps]

ROOT = Path(__file__).resolve().parent.parent
HYPERCORN = str(Path(sys.executable).with_name("hypercorn"))


async def wait_ready(url: str, process: asyncio.subprocess.Process, within: float = 60) -> None:
    """Until ``url`` answers 200 (a server starting on a loaded machine may take a while:
    only one that exits, or is not ready after ``within`` seconds, fails)."""
    deadline = time.monotonic() + within
    async with httpx2.AsyncClient() as http:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


async def start(
    args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=pass_fds,
    )


async def stop(process: asyncio.subprocess.Process) -> bytes:
    if process.returncode is None:
        process.terminate()
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 15)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    return output


@contextlib.asynccontextmanager
async def hypercorn_cli(
    emulator: Emulator, python_args: tuple[str, ...] = (), **env: str
) -> AsyncIterator[str]:
    """``python [python_args] -m hypercorn tests.host_app:app`` on a free port."""
    port = free_port()
    env = {"CLAUDE_API_KEY": "sk-test-cli-key-0123456789", "CLAUDE_BASE_URL": emulator.url, **env}
    args = [sys.executable, *python_args, "-m", "hypercorn", "-b", f"127.0.0.1:{port}"]
    process = await start([*args, "tests.host_app:app"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        yield url
    finally:
        output = await stop(process)
        assert b"sk-test-cli-key" not in output  # the key is never logged


@pytest.fixture
async def cli_server(emulator: Emulator) -> AsyncIterator[str]:
    async with hypercorn_cli(emulator) as url:
        yield url


async def test_hypercorn_cli_streams_incrementally_and_byte_exact(
    cli_server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    text = 'Ünïcödé ✓ — "quoted"\nnew line, data: inside, 😀 and 漢字 ' * 3
    emulator.script(Reply(text, token_delay=0.1))
    result = await stream_chat(http, cli_server + "/chat/stream", {"message": "hi"})
    assert result.text == text
    assert result.types[0] == "start" and result.types[-1] == "done"
    (request,) = emulator.requests
    # the relay may pass the end on before the emulator has recorded its own
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.ended_at is not None
    assert result.received_at[1] < request.ended_at - 1.0  # incremental, not buffered
    assert (await http.get(cli_server + "/")).text == "the host app's own page"


async def test_python_w_error_deployment_streams_a_model_the_sdk_deprecates(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Under ``python -W error`` the SDK's deprecation warning is an exception in the relay."""
    emulator.script(Reply("still answered"))
    async with hypercorn_cli(emulator, ("-W", "error"), CLAUDE_MODEL=DEPRECATED_MODEL) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.text == "still answered"
    assert result.types[-1] == "done"
    assert result.events[0]["model"] == DEPRECATED_MODEL
