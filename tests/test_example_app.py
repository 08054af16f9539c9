"""``python -m example_app`` with no key: demo mode through the emulator, end to end."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx2
import pytest

from .helpers import free_port, stream_chat
from .test_hypercorn_cli import start, stop, wait_ready

pytestmark = pytest.mark.system


async def _serving(flag: list[str], tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    """The example app, ready on a free port. A port taken between choosing and binding it
    (an outgoing connection's ephemeral port, with four test workers) is chosen again, up to
    three times; any other failure to start fails with the server's output."""
    for _ in range(3):
        port = free_port()
        env = {"PORT": str(port), "DEMO_TOKEN_DELAY": "0.005"}
        env["EXAMPLE_INSTANCE_PATH"] = str(tmp_path)
        process = await start([sys.executable, "-m", "example_app", *flag], env)
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url + "/health", process)
            return process, url
        except RuntimeError:
            output = await stop(process)
            if b"already in use" not in output.lower():
                raise RuntimeError(output.decode("utf-8", "replace")) from None
    raise RuntimeError("three free ports were taken before the example app could bind them")


@pytest.mark.parametrize("flag", [[], ["--flask"]], ids=["quart", "flask"])
async def test_example_app_in_demo_mode(
    http: httpx2.AsyncClient, flag: list[str], tmp_path: Path
) -> None:
    process, url = await _serving(flag, tmp_path)
    try:
        page = await http.get(url + "/")
        assert page.status_code == 200
        assert "Demo mode" in page.text and "const DEMO = true;" in page.text
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi there"})
        assert result.types[0] == "start" and result.types[-1] == "done"
        assert "emulator" in result.text and "hi there" in result.text
        # conversations on, in SQLite in the instance folder, for an anonymous browser
        assert "const CONVERSATIONS = true;" in page.text
        cid = result.events[0]["conversation_id"]
        assert "claude_anon=" in result.headers["set-cookie"]
        read = await http.get(f"{url}/conversations/{cid}")
        assert read.status_code == 200 and len(read.json()["messages"]) == 2
        assert (tmp_path / "chat.db").exists()
    finally:
        output = await stop(process)
    assert b"demo mode" in output
