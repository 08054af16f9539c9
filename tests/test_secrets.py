"""The API key never reaches a log line, a traceback or an event, whatever the upstream
echoes back (each case leaked into the server log before the redaction)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, ErrorReply, Reply

from .conftest import API_KEY
from .helpers import serving, stream_chat

pytestmark = pytest.mark.server

SHAPED = "sk-ant-api03-" + "Ab9_" * 20  # what a real key looks like, not the configured one


def every_log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429, 500, 529])
@pytest.mark.parametrize("secret", [API_KEY, SHAPED])
async def test_an_upstream_error_that_echoes_the_key(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    status: int,
    secret: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.script(
        ErrorReply(
            status,
            message=f"invalid x-api-key: {secret}",
            headers={"x-echo": secret, "retry-after": "1"},
        )
    )
    async with serving(make_app(max_retries=0)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.types[-1] == "error"
    assert secret not in result.raw.decode()
    logged = every_log_text(caplog)
    assert "upstream failure" in logged  # the failure was logged, with its detail
    assert secret not in logged
    assert "[redacted]" in logged


@pytest.mark.parametrize("secret", [API_KEY, SHAPED])
async def test_an_in_stream_error_that_echoes_the_key(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    secret: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.script(
        Reply("some text here", fault="error", fault_after=2, error_message=f"bad key {secret}")
    )
    async with serving(make_app(recovery=False)) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert result.types[-1] == "error"
    assert secret not in result.raw.decode()
    assert secret not in every_log_text(caplog)
