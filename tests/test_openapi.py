"""The OpenAPI document, made from the models that validate requests, and schemathesis
running against the live app: no 5xx, and every response as documented."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply

from .helpers import serving

pytestmark = pytest.mark.server

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


async def test_the_document_describes_this_apps_routes_and_rules(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    app = make_app(
        url_prefix="/ai", allowed_models="claude-haiku-5-5", max_tokens_limit=500, max_tokens=100
    )
    async with serving(app) as url:
        doc = (await http.get(url + "/ai/openapi.json")).json()
        page = await http.get(url + "/ai/docs")
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/ai/chat",
        "/ai/chat/stream",
        "/ai/chat/stream/{stream_id}",
        "/ai/ai-sdk/chat",
        "/ai/ai-sdk/chat/{chat_id}/stream",
        "/ai/health",
        "/ai/ready",
        "/ai/claude-stream.js",
        "/ai/openapi.json",
        "/ai/docs",
        "/ai/metrics",
    }
    body = doc["components"]["schemas"]["ChatRequest"]
    assert body["additionalProperties"] is False
    assert "system" not in body["properties"]  # not accepted from clients by default
    models = body["properties"]["model"]["anyOf"][0]["enum"]
    assert models == ["claude-sonnet-5-5", "claude-haiku-5-5"]
    assert body["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 500
    assert {"StartEvent", "DeltaEvent", "DoneEvent", "ErrorEvent"} <= set(
        doc["components"]["schemas"]
    )
    assert page.status_code == 200 and "openapi.json" in page.text


async def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(
    make_app: Callable[..., Quart], emulator: Emulator, tmp_path: Path
) -> None:
    emulator.default = Reply("A short answer.")
    app = make_app(
        allowed_models="claude-haiku-5-5",
        allow_client_system=True,
        max_streams_per_client=0,
        max_concurrent_streams=10_000,
    )
    async with serving(app) as url:
        process = await asyncio.create_subprocess_exec(
            SCHEMATHESIS,
            "run",
            url + "/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,"
            "status_code_conformance",
            "--max-examples",
            "40",
            "--seed",
            "20261125",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
            "--output-truncate",
            "false",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 600)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text.lower(), text[-3000:]
