"""``python -m example_app`` with no key: demo mode through the emulator, end to end."""

from __future__ import annotations

import sys

import httpx2
import pytest

from .helpers import free_port, stream_chat
from .test_hypercorn_cli import start, stop, wait_ready

pytestmark = pytest.mark.system


@pytest.mark.parametrize("flag", [[], ["--flask"]], ids=["quart", "flask"])
async def test_example_app_in_demo_mode(http: httpx2.AsyncClient, flag: list[str]) -> None:
    port = free_port()
    process = await start(
        [sys.executable, "-m", "example_app", *flag],
        {"PORT": str(port), "DEMO_TOKEN_DELAY": "0.005"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/health", process)
        page = await http.get(url + "/")
        assert page.status_code == 200
        assert "Demo mode" in page.text and "const DEMO = true;" in page.text
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi there"})
        assert result.types[0] == "start" and result.types[-1] == "done"
        assert "emulator" in result.text and "hi there" in result.text
    finally:
        output = await stop(process)
    assert b"demo mode" in output
