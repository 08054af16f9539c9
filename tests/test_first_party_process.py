"""The first-party path in a fresh interpreter (issue 27): an app that reaches only the
first-party API serves a chat without ever importing the anthropic SDK or httpx2 (half an
idle worker's memory and most of its import time), and ``CLAUDE_HTTP_CLIENT=httpx`` brings
the SDK back. A dependency's release that imported either would fail it (marked deps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.system, pytest.mark.deps]

_NO_SDK_APP = """
import asyncio, json, sys
from quart import Quart
from quart_claude import Claude
from quart_claude.testing import Emulator

async def main():
    async with Emulator() as emu:
        app = Quart("no_sdk")
        Claude(app, api_key="sk-test", base_url=emu.url)
        async with app.test_app():
            client = app.test_client()
            response = await client.post("/chat/stream", json={"message": "hi"})
            body = await response.get_data()
    print(json.dumps({"done": b'"type":"done"' in body,
                      "loaded": sorted(m for m in ("anthropic", "httpx2") if m in sys.modules)}))

asyncio.run(main())
"""


def _serve_one_chat(http_client: str) -> dict[str, object]:
    """One chat through an app in a fresh interpreter: whether it ended ``done``, and which
    of the SDK and httpx2 it loaded."""
    code = _NO_SDK_APP.replace(
        "base_url=emu.url)", f"base_url=emu.url, http_client={http_client!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_an_app_that_reaches_only_the_first_party_api_never_imports_the_sdk() -> None:
    """The SDK is half an idle worker's memory and most of its import time: the first-party
    path has no use for it (the emulator itself imports neither)."""
    assert _serve_one_chat("auto") == {"done": True, "loaded": []}


def test_with_httpx_chosen_the_first_party_api_goes_through_the_sdk() -> None:
    assert _serve_one_chat("httpx") == {"done": True, "loaded": ["anthropic", "httpx2"]}
