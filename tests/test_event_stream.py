"""Classic Bedrock's AWS event stream, decoded by our own CRC-checked framer: the emulator's
frames are real ones (botocore's own parser reads them), any chunking gives the same events,
a bad CRC or impossible lengths fail, exceptions become the API's in-stream error, and the
errors and model ids of each provider are read right."""

from __future__ import annotations

import json

import pytest
from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from quart_claude._core.errors import classify_aws, classify_status
from quart_claude._core.framing import CorruptFrame, EventStreamFramer, EventTooLarge
from quart_claude._core.model_ids import canonical_model
from quart_claude._core.providers import Endpoint
from quart_claude.testing._dialects import event_frame, exception_frame

pytestmark = pytest.mark.core


def api_event(text: str) -> dict[str, object]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


def framed(*texts: str) -> bytes:
    events = [api_event(text) for text in texts]
    return b"".join(event_frame(e, json.dumps(e, separators=(",", ":")).encode()) for e in events)


def test_the_emulators_frames_are_what_botocore_reads() -> None:
    """botocore's own event-stream parser (AWS's reference in Python) accepts every frame."""
    body = framed("Hello", " wörld") + exception_frame("throttlingException", "Slow down")
    parser = EventStreamBuffer()
    parser.add_data(body)
    messages = list(parser)
    assert [m.headers[":message-type"] for m in messages] == ["event", "event", "exception"]
    assert messages[2].headers[":exception-type"] == "throttlingException"
    chunk = json.loads(messages[1].payload)
    assert set(chunk) == {"bytes", "p"}  # the event, base64, and Bedrock's padding


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=6), st.lists(st.floats(0, 1), max_size=8))
def test_any_chunking_gives_the_same_events(texts: list[str], where: list[float]) -> None:
    body = framed(*texts)  # its padding is random: the cuts are fractions of its length
    cuts = sorted(int(fraction * len(body)) for fraction in where)
    framer = EventStreamFramer(1 << 20)
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        events.extend(framer.events(body[start:end]))
    assert [name for name, _ in events] == [b"content_block_delta"] * len(texts)
    assert [json.loads(payload)["delta"]["text"] for _, payload in events] == texts


def test_a_bad_crc_or_impossible_lengths_fail_instead_of_being_trusted() -> None:
    good = framed("fine")
    corrupt = bytearray(good)
    corrupt[-6] ^= 0x01  # a payload byte: the message CRC no longer matches
    with pytest.raises(CorruptFrame) as caught:
        EventStreamFramer(1 << 20).events(bytes(corrupt))
    assert "message CRC" in caught.value.detail
    prelude = bytearray(good)
    prelude[2] ^= 0x10  # the total length: the prelude CRC no longer matches
    with pytest.raises(CorruptFrame) as caught:
        EventStreamFramer(1 << 20).events(bytes(prelude))
    assert "prelude CRC" in caught.value.detail
    assert CorruptFrame("x").error_class == "network_error"  # retried, or continued


def test_a_frame_larger_than_the_limit_fails_before_it_is_buffered() -> None:
    big = framed("x" * 300_000)  # past 1000 bytes of event (and the 128 KiB headers' cap)
    with pytest.raises(EventTooLarge):
        EventStreamFramer(1000).events(big[:16])  # the prelude alone says it is too large


def test_an_exception_is_the_apis_in_stream_error_named_by_aws() -> None:
    body = framed("Hi") + exception_frame("modelStreamErrorException", "The model failed")
    events = EventStreamFramer(1 << 20).events(body)
    assert [name for name, _ in events] == [b"content_block_delta", b"error"]
    error = json.loads(events[1][1])["error"]
    assert error == {"type": "modelStreamErrorException", "message": "The model failed"}
    classified = classify_status(200, error["type"], error["message"], None, {})
    assert classified.error_class == "server_error"


@pytest.mark.parametrize(
    ("kind", "status", "error_class"),
    [
        ("throttlingException", None, "rate_limit"),
        ("ThrottlingException:http://internal.amazon.com/coral/", 429, "rate_limit"),
        ("serviceUnavailableException", None, "overloaded"),
        ("ModelNotReadyException", 429, "overloaded"),
        ("modelTimeoutException", None, "timeout"),
        ("InternalServerException", 500, "server_error"),
        ("AccessDeniedException", 403, "permission_error"),
        ("ExpiredTokenException", 403, "auth_error"),
        ("ResourceNotFoundException", 404, "not_found"),
        ("SomethingNewException", 503, "server_error"),
    ],
)  # fmt: skip
def test_bedrock_exceptions_have_our_classes(
    kind: str, status: int | None, error_class: str
) -> None:
    assert classify_aws(kind, "message", status=status).error_class == error_class


def test_a_validation_error_about_length_is_a_token_limit() -> None:
    error = classify_aws(
        "ValidationException", "Input is too long for requested model.", status=400
    )
    assert error.error_class == "token_limit"
    assert classify_aws("ValidationException", "max_tokens: bad", status=400).error_class == (
        "invalid_request"
    )


@pytest.mark.parametrize(
    ("model", "first_party"),
    [
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        ("global.anthropic.claude-opus-4-6-v1", "claude-opus-4-6"),
        ("apac.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5-20251001"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-6",
            "claude-sonnet-4-6",
        ),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5-20250929"),
        ("claude-opus-4-8", "claude-opus-4-8"),
        ("arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2", None),
    ],
)
def test_provider_model_ids_are_read_as_the_first_party_one(
    model: str, first_party: str | None
) -> None:
    assert canonical_model(model) == (first_party or model)  # an opaque ARN is kept


def test_an_endpoint_takes_only_its_providers_settings() -> None:
    assert (
        Endpoint.parse("K", {"provider": "vertex", "region": "us-east5"}).key == "vertex/us-east5"
    )
    with pytest.raises(ValueError, match="takes no"):
        Endpoint.parse("K", {"provider": "foundry", "region": "eastus"})
    with pytest.raises(ValueError, match="provider must be one of"):
        Endpoint.parse("K", {"provider": "openai"})
