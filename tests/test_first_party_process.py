"""The first-party path in a fresh interpreter (issue 27): an app that reaches only the
first-party API serves a chat without ever importing the anthropic SDK or httpx2 (half an
idle worker's memory and most of its import time), and ``CLAUDE_HTTP_CLIENT=httpx`` brings
the SDK back. A dependency's release that imported either would fail it (marked deps).

And the CAs ``SSL_CERT_FILE`` names are trusted: they are read once, into aiohttp's default
context when aiohttp is imported, so only a process started with the variable shows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quart_claude.testing._tls import certificates

pytestmark = [pytest.mark.system, pytest.mark.deps]

_ONE_CHAT = """
import asyncio, json, ssl, sys
from quart import Quart
from quart_claude import Claude
from quart_claude.testing import Emulator

# the SDK and its transport, and the OpenAPI document's models (made when it is asked for)
_WATCHED = ("anthropic", "httpx2", "quart_claude._core.openapi")

async def main():
    served = None
    if len(sys.argv) > 2:  # a certificate and its key: the emulator serves TLS
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        served.load_cert_chain(sys.argv[1], sys.argv[2])
    async with Emulator(ssl=served) as emu:
        app = Quart("one_chat")
        Claude(app, api_key="sk-test", base_url=emu.url, http_client=HTTP_CLIENT)
        async with app.test_app():
            response = await app.test_client().post("/chat/stream", json={"message": "hi"})
            body = await response.get_data()
    print(json.dumps({"body": body.decode(),
                      "loaded": sorted(m for m in _WATCHED if m in sys.modules)}))

asyncio.run(main())
"""


def _one_chat(
    http_client: str = "auto", *tls: str, env: dict[str, str] | None = None
) -> tuple[str, list[str]]:
    """One chat through an app in a fresh interpreter (over TLS when given a certificate and
    its key): its body, and which of the watched modules it loaded."""
    code = _ONE_CHAT.replace("HTTP_CLIENT", repr(http_client))
    result = subprocess.run(
        [sys.executable, "-c", code, *tls], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["body"], report["loaded"]


def _serve_one_chat(http_client: str) -> dict[str, object]:
    """Whether one chat ended ``done``, and which of the SDK and httpx2 it loaded."""
    body, loaded = _one_chat(http_client)
    return {"done": '"type":"done"' in body, "loaded": loaded}


def test_an_app_that_reaches_only_the_first_party_api_never_imports_the_sdk() -> None:
    """The SDK is half an idle worker's memory and most of its import time: the first-party
    path has no use for it (the emulator itself imports neither)."""
    assert _serve_one_chat("auto") == {"done": True, "loaded": []}


def test_with_httpx_chosen_the_first_party_api_goes_through_the_sdk() -> None:
    assert _serve_one_chat("httpx") == {"done": True, "loaded": ["anthropic", "httpx2"]}


@pytest.mark.parametrize("trusted", [True, False], ids=["ca-named", "ca-not-named"])
def test_the_upstream_is_trusted_through_the_cas_ssl_cert_file_names(
    tmp_path: Path, trusted: bool
) -> None:
    ca, cert, key = certificates(tmp_path)
    env = {**os.environ, "SSL_CERT_FILE": str(ca) if trusted else os.devnull}
    body, _loaded = _one_chat("auto", str(cert), str(key), env=env)
    if trusted:
        assert '"type":"done"' in body, body
    else:  # the stream's error event: the certificate was not trusted
        assert '"type":"error","error":"network_error"' in body, body
