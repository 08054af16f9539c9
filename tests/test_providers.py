"""Cloud providers (issue 25): each through the SDK's own client (``AsyncAnthropicBedrock``
and the rest) against the emulator's dialect of it, over real HTTP, with fake credentials read
from each platform's standard chain (boto3's environment keys, a google-auth authorized-user
file whose token endpoint is the emulator, Foundry's API key variable). Bedrock's event-stream
frames, exceptions and broken frames; Vertex's Google-shaped errors; fallbacks across
providers, before text and mid-answer; auth errors moving only to another provider."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator, ErrorReply, Reply, ToolUse
from quart_claude.testing._dialects import GOOGLE_TOKEN

from .helpers import fresh_redis_db, serving, stream_chat

pytestmark = pytest.mark.server

AWS_SECRET = "emulator-aws-secret-key-0123456789abcdef"
FOUNDRY_KEY = "foundry-emulator-key-0123456789"
BEDROCK_MODEL = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
TEXT = "One two three four five six seven eight nine ten."


@pytest.fixture(autouse=True)
def cloud_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, emulator: Emulator) -> None:
    """Each platform's standard chain, pointed at nothing real: static AWS keys in the
    environment (no files, no instance metadata), a service-account key file as google-auth's
    Application Default Credentials (its token endpoint the emulator's), and Foundry's API
    key variable."""
    for name in ("AWS_PROFILE", "AWS_BEARER_TOKEN_BEDROCK", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEMULATOR00000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps(service_account(emulator.url + "/token")))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("ANTHROPIC_FOUNDRY_API_KEY", FOUNDRY_KEY)


def service_account(token_uri: str) -> dict[str, str]:
    """A service-account key file with a fresh RSA key: google-auth signs a JWT with it and
    trades it for an access token at ``token_uri``, as it would at Google's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "emulator-project",
        "private_key_id": "emulator-key-1",
        "private_key": pem,
        "client_email": "relay@emulator-project.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    }


def provider_options(emulator: Emulator, provider: str) -> dict[str, Any]:
    """``Claude`` options for ``provider`` on the emulator: its settings, its model id."""
    url = emulator.url
    return {
        "bedrock": {"region": "us-east-1", "base_url": url, "model": BEDROCK_MODEL},
        "bedrock-mantle": {
            "region": "us-east-1",
            "base_url": url + "/anthropic",
            "model": "claude-sonnet-4-5",
        },
        "vertex": {
            "region": "us-east5",
            "project": "emulator-project",
            "base_url": url + "/v1",
            "model": VERTEX_MODEL,
        },
        "foundry": {"base_url": url + "/anthropic/", "model": "claude-sonnet-4-5"},
        "aws": {
            "region": "us-west-2",
            "workspace_id": "wrkspc_emulator",
            "base_url": url,
            "model": "claude-sonnet-4-5",
        },
        "google-cloud": {
            "region": "global",
            "project": "emulator-project",
            "workspace_id": "wrkspc_emulator",
            "base_url": url + "/v1/projects/emulator-project/locations/global/workspaces/"
            "wrkspc_emulator/invoke",
            "model": "claude-sonnet-4-5",
        },
    }[provider]


def hop(emulator: Emulator, provider: str, **extra: Any) -> dict[str, Any]:
    """A ``CLAUDE_FALLBACKS`` hop to ``provider`` on the emulator."""
    options = provider_options(emulator, provider)
    return {"provider": provider, **options, **extra}


def cloud_app(emulator: Emulator, provider: str, **options: Any) -> Quart:
    app = Quart(__name__)
    settings = {**provider_options(emulator, provider), **options}
    settings.setdefault("retry_base_delay", 0.05)
    Claude(app, provider=provider, **settings)
    return app


PROVIDERS = ["bedrock", "bedrock-mantle", "vertex", "foundry", "aws", "google-cloud"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_each_provider_streams_through_its_own_sdk_client(
    provider: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply(TEXT))
    async with serving(cloud_app(emulator, provider)) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "count"})
    assert answer.status == 200 and answer.text == TEXT, answer.events[-1]
    assert answer.events[-1]["type"] == "done"
    assert answer.ids == [str(n) for n in range(len(answer.ids))]
    (request,) = [r for r in emulator.requests if r.provider != "oauth"]
    assert request.provider == provider  # the dialect it came through, auth checked
    sent = request.sent
    if provider == "bedrock":  # the model is in the path, the version in the body
        assert request.path == "/model/" + BEDROCK_MODEL + "/invoke-with-response-stream"
        assert "model" not in sent and "stream" not in sent
        assert sent["anthropic_version"] == "bedrock-2023-05-31"
        assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIA")
    elif provider == "vertex":
        assert request.path.endswith(f"/models/{VERTEX_MODEL}:streamRawPredict")
        assert sent["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent
    elif provider == "aws":
        assert request.headers["anthropic-workspace-id"] == "wrkspc_emulator"


async def test_bedrock_exceptions_mid_stream_are_classified(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Each ``exception`` message, after text, ends the answer with its class (no retries,
    no recovery: the class is what the reader sees)."""
    kinds = {
        "throttlingException": "rate_limit",
        "serviceUnavailableException": "overloaded",
        "modelStreamErrorException": "server_error",
        "modelTimeoutException": "timeout",
        "internalServerException": "server_error",
        "validationException": "invalid_request",
    }
    for name in kinds:
        emulator.script(Reply(TEXT, fault="error", fault_after=2, error_type=name))
    app = cloud_app(emulator, "bedrock", max_retries=0, recovery=False)
    async with serving(app) as url:
        for name, error_class in kinds.items():
            answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            last = answer.events[-1]
            assert last["type"] == "error" and last["error"] == error_class, (name, last)
            assert last["partial"] is True and answer.text == "One two "


async def test_bedrock_http_errors_are_classified_by_their_error_type(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    cases = [
        (ErrorReply(429, "ThrottlingException", "Too many requests"), "rate_limit"),
        (ErrorReply(503, "ServiceUnavailableException", "Try again"), "overloaded"),
        (ErrorReply(424, "ModelErrorException", "The model failed"), "server_error"),
        (ErrorReply(403, "AccessDeniedException", "No access to the model"), "permission_error"),
        (ErrorReply(400, "ValidationException", "Input is too long for the model"), "token_limit"),
    ]
    emulator.script(*(reply for reply, _ in cases))
    app = cloud_app(emulator, "bedrock", max_retries=0)
    async with serving(app) as url:
        for reply, error_class in cases:
            answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            assert answer.events[-1]["error"] == error_class, (reply, answer.events[-1])
    assert all(r.outcome == "error" for r in emulator.requests)


@pytest.mark.parametrize("fault", ["crc", "truncated", "drop"])
async def test_a_broken_bedrock_frame_is_recovered_without_a_wrong_word(
    fault: str, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """A CRC that does not match, half a frame, a dropped connection: what the frame held is
    never shown, and the answer is continued from what readers have."""
    emulator.script(Reply(TEXT, fault=fault, fault_after=3), Reply(TEXT))  # type: ignore[arg-type]
    async with serving(cloud_app(emulator, "bedrock", model="anthropic.claude-sonnet-4-6")) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "count"})
    assert answer.text == TEXT and "never shown" not in answer.text
    assert answer.events[-1]["type"] == "done"
    assert answer.ids == [str(n) for n in range(len(answer.ids))]
    continuation = emulator.requests[1].body
    assert continuation["messages"][-1]["role"] == "user"  # 4.6: the "continue" turn, no prefill


async def test_vertex_google_shaped_errors_are_classified(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """A quota error as Google's one-item array, a permission error as its object; Vertex's
    model errors are the API's own shape."""
    emulator.script(
        ErrorReply(429, message="Quota exceeded for aiplatform.googleapis.com"),
        ErrorReply(403, message="Permission 'aiplatform.endpoints.predict' denied"),
        ErrorReply(529),
    )
    app = cloud_app(emulator, "vertex", max_retries=0)
    async with serving(app) as url:
        seen = [
            (await stream_chat(http, url + "/chat/stream", {"message": "hi"})).events[-1]["error"]
            for _ in range(3)
        ]
    assert seen == ["rate_limit", "permission_error", "overloaded"]
    bodies = [r for r in emulator.requests if r.provider == "vertex"]
    assert len(bodies) == 3


async def test_bedrock_throttled_falls_back_to_the_first_party_api_before_text(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(
        ErrorReply(503, "ServiceUnavailableException", "Bedrock is unavailable"),
        Reply("From the first-party API."),
    )
    first_party = {"provider": "anthropic", "base_url": emulator.url, "model": "claude-sonnet-4-5"}
    app = cloud_app(emulator, "bedrock", fallbacks=[first_party], max_retries=0, api_key="sk-emu")
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert [r.provider for r in emulator.requests] == ["bedrock", "anthropic"]
    fallback = answer.events[1]
    assert fallback == {
        "type": "fallback", "from": BEDROCK_MODEL, "to": "claude-sonnet-4-5",
        "reason": "overloaded", "phase": "before_text", "hop": 1,
    }  # fmt: skip
    assert answer.text == "From the first-party API."
    assert answer.events[-1]["model"] == "claude-sonnet-4-5"


async def test_a_bedrock_stream_failing_mid_answer_continues_on_vertex_exactly(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(
        Reply(TEXT, fault="error", fault_after=4, error_type="serviceUnavailableException"),
        Reply(TEXT),
    )
    app = cloud_app(
        emulator, "bedrock", fallbacks=[hop(emulator, "vertex")], max_retries=0, max_recoveries=0
    )
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "count"})
    assert answer.text == TEXT  # nothing duplicated, nothing missing
    assert answer.ids == [str(n) for n in range(len(answer.ids))]
    fallback = next(e for e in answer.events if e["type"] == "fallback")
    assert fallback["phase"] == "mid_answer" and fallback["to"] == VERTEX_MODEL
    calls = [r for r in emulator.requests if r.provider != "oauth"]
    assert [r.provider for r in calls] == ["bedrock", "vertex"]
    # Sonnet 4.5 (its Vertex id read as the first-party one) takes a prefill
    assert calls[1].body["messages"][-1] == {"role": "assistant", "content": "One two three four"}
    assert answer.events[-1]["model"] == VERTEX_MODEL


async def test_an_auth_error_moves_only_to_another_provider_and_is_logged(
    emulator: Emulator, http: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.script(
        ErrorReply(403, "UnrecognizedClientException", "The security token is invalid"),
        Reply("Vertex answered."),
    )
    hops = [
        {"model": "anthropic.claude-haiku-4-5-20251001-v1:0"},  # Bedrock too: skipped
        hop(emulator, "vertex"),
    ]
    app = cloud_app(emulator, "bedrock", fallbacks=hops, max_retries=0)
    with caplog.at_level(logging.ERROR, logger="quart_claude"):
        async with serving(app) as url:
            answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    assert answer.text == "Vertex answered.", answer.events
    assert [r.provider for r in emulator.requests if r.provider != "oauth"] == ["bedrock", "vertex"]
    assert any("refused our credentials" in r.getMessage() for r in caplog.records)


async def test_no_credential_reaches_a_response_or_a_log_line(
    emulator: Emulator, http: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.script(
        ErrorReply(403, "AccessDeniedException", f"denied for {AWS_SECRET}"),
        ErrorReply(401, message=f"bad key {FOUNDRY_KEY}"),
        Reply("ok"),
    )
    hops = [hop(emulator, "foundry"), hop(emulator, "vertex")]
    app = cloud_app(emulator, "bedrock", fallbacks=hops, max_retries=0)
    with caplog.at_level(logging.DEBUG):
        async with serving(app) as url:
            answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            health = await http.get(url + "/ready")
    assert answer.text == "ok"
    everything = (
        answer.raw.decode() + health.text + "\n".join(r.getMessage() for r in caplog.records)
    )
    for secret in (AWS_SECRET, FOUNDRY_KEY, GOOGLE_TOKEN):
        assert secret not in everything


async def test_a_tool_loop_moving_from_bedrock_sends_vertex_no_bedrock_thinking(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = Quart(__name__)
    claude = Claude(
        app, provider="bedrock", thinking=2048, fallbacks=[hop(emulator, "vertex")],
        max_retries=0, **provider_options(emulator, "bedrock"),
    )  # fmt: skip
    runs: list[str] = []

    @claude.tool
    def order_status(order_id: str) -> str:
        """Look up an order."""
        runs.append(order_id)
        return f"{order_id}: shipped"

    call = ToolUse("order_status", {"order_id": "C-3"})
    emulator.script(
        Reply("Checking.", thinking="Look it up.", tool_calls=[call]),
        ErrorReply(429, "ThrottlingException", "Slow down", headers={"retry-after": "120"}),
        Reply("It has shipped."),
    )  # fmt: skip
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "Where is C-3?"})
    assert answer.events[-1]["type"] == "done", answer.events[-1]
    assert answer.text == "Checking.It has shipped." and runs == ["C-3"]
    last = [r for r in emulator.requests if r.provider == "vertex"][-1].body
    sent = [b["type"] for m in last["messages"] if m["role"] == "assistant" for b in m["content"]]
    assert "thinking" not in sent and "tool_use" in sent  # signatures are bound to their model


def test_provider_settings_are_checked_when_the_app_starts() -> None:
    from quart_claude import ConfigError

    with pytest.raises(ConfigError, match="CLAUDE_PROVIDER"):
        Claude(Quart(__name__), provider="azure-openai")
    with pytest.raises(ConfigError, match="CLAUDE_RESOURCE is not read by CLAUDE_PROVIDER=bedrock"):
        Claude(Quart(__name__), provider="bedrock", resource="mine")
    with pytest.raises(ConfigError, match="takes no"):
        Claude(
            Quart(__name__),
            provider="bedrock",
            fallbacks=[{"model": "m", "provider": "vertex", "resource": "x"}],
        )
    # a cloud provider needs no Anthropic key; a first-party hop does
    Claude(Quart(__name__), provider="bedrock", region="us-east-1")
    with pytest.raises(ConfigError, match="CLAUDE_API_KEY"):
        Claude(
            Quart(__name__), provider="bedrock", fallbacks=[{"model": "m", "provider": "anthropic"}]
        )


async def test_telemetry_names_the_provider_of_each_attempt_and_the_cooldown(
    emulator: Emulator, http: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from .test_observability import samples

    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    emulator.script(ErrorReply(503, "ServiceUnavailableException", "down"), Reply("ok"))
    app = Quart(__name__)
    Claude(
        app, provider="bedrock", fallbacks=[hop(emulator, "vertex")], max_retries=0,
        tracer_provider=tracing, **provider_options(emulator, "bedrock"),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="quart_claude"):
        async with serving(app) as url:
            answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
            scrape = samples((await http.get(url + "/metrics")).text)
    tracing.shutdown()
    assert answer.text == "ok"
    attempts = [s for s in exporter.get_finished_spans() if s.name.startswith("upstream ")]
    assert [(s.attributes or {}).get("gen_ai.provider.name") for s in attempts] == [
        "aws.bedrock",
        "gcp.vertex_ai",
    ]
    assert attempts[0].status.status_code.name == "ERROR"

    def upstream(provider: str, outcome: str) -> float:
        labels = {"model": BEDROCK_MODEL, "outcome": outcome, "provider": provider}
        return scrape.get(("claude_upstream_requests_total", frozenset(labels.items())), 0.0)

    assert upstream("bedrock", "overloaded") == 1 and upstream("vertex", "ok") == 1
    cooling = [
        value
        for (name, labels), value in scrape.items()
        if name == "claude_fallback_cooldown_until_seconds"
        and dict(labels)["hop"] == f"bedrock/us-east-1:{BEDROCK_MODEL}"
    ]
    assert len(cooling) == 1 and cooling[0] > time.time() + 20  # the 30 s default
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream_end")]
    assert " provider=vertex " in line and " hop=1 " in line


async def test_a_bedrock_hop_cooling_down_is_skipped_by_another_worker_through_redis(
    emulator: Emulator, http: httpx2.AsyncClient, redis_url: str
) -> None:
    store = fresh_redis_db(redis_url, 11)
    emulator.script(
        ErrorReply(503, "ServiceUnavailableException", "down"), Reply("first"), Reply("second")
    )
    apps = [
        cloud_app(emulator, "bedrock", fallbacks=[hop(emulator, "vertex")], max_retries=0,
                  stream_store=store)
        for _ in range(2)
    ]  # fmt: skip
    async with serving(apps[0]) as one, serving(apps[1]) as two:
        await stream_chat(http, one + "/chat/stream", {"message": "hi"})
        other = await stream_chat(http, two + "/chat/stream", {"message": "hi"})
    assert other.text == "second"
    calls = [r.provider for r in emulator.requests if r.provider != "oauth"]
    assert calls == ["bedrock", "vertex", "vertex"]  # the other worker skipped Bedrock


async def test_a_chain_across_providers_that_runs_out_lists_its_hops(
    emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    emulator.script(
        ErrorReply(503, "ServiceUnavailableException", "down"),
        ErrorReply(529),  # Vertex passes the API's overload through in its own shape
    )
    app = cloud_app(emulator, "bedrock", fallbacks=[hop(emulator, "vertex")], max_retries=0)
    async with serving(app) as url:
        answer = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
    last = answer.events[-1]
    assert last["type"] == "error" and last["error"] == "overloaded"
    assert last["hops"] == [BEDROCK_MODEL, VERTEX_MODEL]
