"""``POST /chat`` (a whole reply as JSON), the request options, and prompt caching, through
a real server and the emulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from quart import Quart, Request

from quart_claude import Claude, ConfigError
from quart_claude.testing import Emulator, ErrorReply, Reply

from .conftest import RedisServer
from .helpers import serving, stream_chat

pytestmark = pytest.mark.server

SYSTEM = "You are a careful assistant. " * 40  # long enough to be worth caching


async def test_chat_answers_one_json_object(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("Hello there, friend.", input_tokens=12))
    response = await http.post(server + "/chat", json={"message": "hi"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "model", "text", "stop_reason", "usage"}
    assert body["text"] == "Hello there, friend."
    assert body["stop_reason"] == "end_turn" and body["model"] == "claude-sonnet-5-5"
    assert body["id"].startswith("msg_emu_")
    assert body["usage"]["input_tokens"] == 12 and body["usage"]["output_tokens"] == 3


async def test_chat_retries_like_the_stream(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(ErrorReply(529), Reply("after a retry"))
    response = await http.post(server + "/chat", json={"message": "hi"})
    assert response.status_code == 200 and response.json()["text"] == "after a retry"
    assert len(emulator.requests) == 2


@pytest.mark.parametrize(
    ("scripted", "status", "code"),
    [
        (ErrorReply(429, headers={"retry-after": "30"}), 429, "rate_limit"),
        (ErrorReply(529), 503, "overloaded"),
        (ErrorReply(500), 502, "server_error"),
        (ErrorReply(401), 502, "auth_error"),
        (Reply("x", fault="stall", fault_after=0, stall=30), 504, "timeout"),
        (ErrorReply(400, message="prompt is too long: 300000 tokens"), 400, "token_limit"),
    ],
)
async def test_chat_upstream_failures_are_http_statuses(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    scripted: Any,
    status: int,
    code: str,
) -> None:
    emulator.script(scripted)
    async with serving(make_app(max_retries=0, recovery=False, timeout=1)) as url:
        response = await http.post(url + "/chat", json={"message": "hi"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code
    if status == 429:
        assert response.headers["retry-after"] == "30"


async def test_chat_refuses_bad_input_like_the_stream(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    response = await http.post(server + "/chat", json={"message": ""})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert emulator.requests == []


async def test_options_reach_the_upstream(
    server: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    body = {
        "message": "hi",
        "temperature": 0.2,
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "user-42"},
    }
    emulator.script(Reply("first part STOP never sent"))
    result = await stream_chat(http, server + "/chat/stream", body)
    sent = emulator.requests[0].body
    assert sent["temperature"] == 0.2 and sent["stop_sequences"] == ["STOP"]
    assert sent["metadata"] == {"user_id": "user-42"}
    assert result.text == "first part "
    assert result.events[-1]["stop_reason"] == "stop_sequence"


async def test_the_identity_is_the_user_id_whatever_the_body_says(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = make_app(authorize=lambda req: req.headers.get("X-User"))
    async with serving(app) as url:
        body = {"message": "hi", "metadata": {"user_id": "someone-else"}}
        await stream_chat(http, url + "/chat/stream", body, headers={"X-User": "alice"})
    assert emulator.requests[0].body["metadata"] == {"user_id": "alice"}


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("temperature", 1.5, "temperature"),
        ("temperature", "hot", "temperature"),
        ("temperature", True, "temperature"),
        ("stop_sequences", "STOP", "stop_sequences"),
        ("stop_sequences", ["a"] * 9, "stop_sequences"),
        ("stop_sequences", ["  "], "stop_sequences[0]"),
        ("stop_sequences", ["x" * 201], "stop_sequences[0]"),
        ("metadata", {"user_id": "u", "email": "a@b"}, "metadata"),
        ("metadata", {"user_id": "u" * 257}, "metadata.user_id"),
        ("metadata", "u", "metadata"),
    ],
)
async def test_bad_options_are_400s_naming_the_field(
    server: str, emulator: Emulator, http: httpx2.AsyncClient, field: str, value: Any, hint: str
) -> None:
    for route in ("/chat", "/chat/stream"):
        response = await http.post(server + route, json={"message": "hi", field: value})
        assert response.status_code == 400, response.text
        assert hint in response.json()["message"]
    assert emulator.requests == []


async def test_caching_the_system_prompt_makes_repeats_cache_reads(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(system_prompt=SYSTEM, cache_system_prompt=True)) as url:
        first = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        second = await stream_chat(http, url + "/chat/stream", {"message": "another question"})
    system = emulator.requests[0].body["system"]
    assert system == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    written = first.events[0]["usage"]["cache_creation_input_tokens"]
    assert written == len(SYSTEM) // 4 and first.events[0]["usage"]["cache_read_input_tokens"] == 0
    start = second.events[0]
    assert start["type"] == "start"  # known before the first delta
    assert start["usage"]["cache_read_input_tokens"] == written
    assert second.events[-1]["usage"]["cache_read_input_tokens"] == written


async def test_caching_the_conversation_marks_its_prefix(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    messages = [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": "Once upon a time " * 50},
        {"role": "user", "content": "And then?"},
    ]
    async with serving(make_app(cache_conversation=True)) as url:
        await stream_chat(http, url + "/chat/stream", {"messages": messages})
        again = await stream_chat(http, url + "/chat/stream", {"messages": messages})
    sent = emulator.requests[0].body["messages"]
    assert sent[1]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent[0] == messages[0] and sent[2] == messages[2]
    assert again.events[0]["usage"]["cache_read_input_tokens"] > 0


TOKENS = "tok-alpha-0123456789,tok-beta-0123456789"


async def test_api_tokens_guard_the_routes_and_health_stays_open(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    async with serving(make_app(api_tokens=TOKENS)) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "tok-alpha"}):
            for route in ("/chat", "/chat/stream"):
                refused = await http.post(url + route, json={"message": "hi"}, headers=headers)
                assert refused.status_code == 401
                assert refused.json()["error"] == "unauthorized"
                assert refused.headers["www-authenticate"] == "Bearer"
        assert emulator.requests == []
        for open_route in ("/health", "/ready", "/claude-stream.js"):
            assert (await http.get(url + open_route)).status_code == 200
        beta = {"Authorization": "Bearer tok-beta-0123456789"}
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"}, headers=beta)
        assert result.types[-1] == "done"
        path = f"{url}/chat/stream/{result.headers['x-stream-id']}"
        assert (await http.get(path)).status_code == 401
        alpha = {"Authorization": "Bearer tok-alpha-0123456789"}
        assert (await http.get(path, headers=alpha)).status_code == 404  # another identity's
        assert (await http.get(path, headers=beta)).status_code == 200


@pytest.mark.parametrize("is_async", [False, True])
async def test_the_authorize_hook_decides_sync_or_async(
    emulator: Emulator, http: httpx2.AsyncClient, is_async: bool
) -> None:
    app = Quart(__name__)
    claude = Claude(api_key="sk-test-authorize-0000", base_url=emulator.url)

    def check(req: Request) -> str | None:
        return "staff-7" if req.headers.get("X-Session") == "valid" else None

    async def check_async(req: Request) -> str | None:
        return check(req)

    claude.authorize(check_async if is_async else check)
    claude.init_app(app)
    async with serving(app) as url:
        refused = await http.post(url + "/chat", json={"message": "hi"})
        assert refused.status_code == 401 and "www-authenticate" not in refused.headers
        ok = await http.post(url + "/chat", json={"message": "hi"}, headers={"X-Session": "valid"})
        assert ok.status_code == 200
    assert emulator.requests[0].body["metadata"] == {"user_id": "staff-7"}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_rate_limits_per_client_with_headers(
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    redis_server: RedisServer,
    store: str,
) -> None:
    options: dict[str, Any] = {"rate_limit": "3/minute;100/day", "api_tokens": TOKENS}
    if store == "redis":
        options["stream_store"] = redis_server.url
    alpha = {"Authorization": "Bearer tok-alpha-0123456789"}
    beta = {"Authorization": "Bearer tok-beta-0123456789"}
    async with serving(make_app(**options)) as url:
        for remaining in (2, 1, 0):
            ok = await http.post(url + "/chat", json={"message": "hi"}, headers=alpha)
            assert ok.status_code == 200
            assert ok.headers["ratelimit-limit"] == "3"
            assert ok.headers["ratelimit-remaining"] == str(remaining)
            assert 0 < int(ok.headers["ratelimit-reset"]) <= 60
        refused = await http.post(url + "/chat/stream", json={"message": "hi"}, headers=alpha)
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 0 < int(refused.headers["retry-after"]) <= 60
        other = await http.post(url + "/chat", json={"message": "hi"}, headers=beta)
        assert other.status_code == 200  # another identity has its own budget
        streamed = await stream_chat(http, url + "/chat/stream", {"message": "hi"}, headers=beta)
        assert streamed.headers["ratelimit-remaining"] == "1"
    assert len(emulator.requests) == 5  # the refused request never reached the upstream


def test_a_bad_rate_limit_fails_at_init_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="CLAUDE_RATE_LIMIT"):
        Claude(Quart(__name__), api_key="sk-test-0000000000", rate_limit="lots")


async def test_cors_is_off_by_default_and_scoped_to_the_blueprint(
    make_app: Callable[..., Quart], http: httpx2.AsyncClient
) -> None:
    origin = {"Origin": "https://chat.example.com"}
    async with serving(make_app()) as url:
        plain = await http.post(url + "/chat", json={"message": "hi"}, headers=origin)
        assert "access-control-allow-origin" not in plain.headers
    app = make_app(cors_origins="https://chat.example.com")

    @app.get("/host-page")
    async def host_page() -> str:
        return "the host's"

    async with serving(app) as url:
        preflight = await http.options(
            url + "/chat/stream",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, last-event-id",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example.com"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "last-event-id" in allowed
        streamed = await stream_chat(http, url + "/chat/stream", {"message": "hi"}, headers=origin)
        assert streamed.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "x-stream-id" in streamed.headers["access-control-expose-headers"].lower()
        stranger = await http.post(
            url + "/chat", json={"message": "hi"}, headers={"Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers
        host = await http.get(url + "/host-page", headers=origin)
        assert "access-control-allow-origin" not in host.headers  # the host app's own routes


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "rain": {"type": "boolean"}},
    "required": ["city", "rain"],
    "additionalProperties": False,
}


async def test_structured_outputs_through_the_operators_extra_params(
    make_app: Callable[..., Quart], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """CLAUDE_EXTRA_PARAMS reaches every upstream request; CLAUDE_BETAS is the beta header;
    the browser can set neither."""
    import json

    extra = {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}
    app = make_app(extra_params=json.dumps(extra), betas="structured-outputs-2025-11-13")
    emulator.script(Reply(), Reply())
    async with serving(app) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "weather?"})
        forged = {"message": "hi", "output_config": {"format": {"type": "text"}}}
        refused = await http.post(url + "/chat/stream", json=forged)
        whole = (await http.post(url + "/chat", json={"message": "weather?"})).json()
    assert json.loads(result.text) == {"city": "example", "rain": True}
    assert json.loads(whole["text"]) == {"city": "example", "rain": True}
    for request in emulator.requests:
        assert request.body["output_config"] == extra["output_config"]
        assert request.headers["anthropic-beta"] == "structured-outputs-2025-11-13"
    assert refused.status_code == 400 and "output_config" in refused.text
    assert len(emulator.requests) == 2  # the forged request never went upstream
