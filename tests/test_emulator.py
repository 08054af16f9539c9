"""The emulator speaks the real wire format: the SDK's own parsers and error classes agree."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest

from quart_claude import DEFAULT_MODEL
from quart_claude.testing import CONTINUE_MARKER, Emulator, ErrorReply, Hangup, Reply, certificates

from .models import CURRENT_MODELS, DEPRECATED_MODEL, NO_PREFILL_MODEL, PREFILL_MODEL

pytestmark = pytest.mark.server

KEY = "sk-test-emulator"


def client(emulator: Emulator, **kwargs: object) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=KEY, base_url=emulator.url, max_retries=0, **kwargs)  # type: ignore[arg-type]


async def test_sdk_stream_helper_accumulates_the_reply(emulator: Emulator) -> None:
    emulator.script(Reply("Hello there, friend.", cache_read_input_tokens=12, thinking="hmm"))
    async with client(emulator) as sdk:
        async with sdk.messages.stream(
            model="claude-opus-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            texts = [text async for text in stream.text_stream]
            message = await stream.get_final_message()
        assert "".join(texts) == "Hello there, friend."
        assert stream.request_id is not None and stream.request_id.startswith("req_")
    assert message.stop_reason == "end_turn"
    assert message.model == "claude-opus-5"
    assert message.usage.output_tokens == len(texts) + 1  # thinking is billed output ("hmm")
    assert message.usage.cache_read_input_tokens == 12
    assert [block.type for block in message.content] == ["thinking", "text"]


async def test_non_streaming_request(emulator: Emulator) -> None:
    emulator.script(Reply("Whole answer."))
    async with client(emulator) as sdk:
        message = await sdk.messages.create(
            model="claude-opus-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.content[0].type == "text" and message.content[0].text == "Whole answer."


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (404, anthropic.NotFoundError),
        (413, anthropic.APIStatusError),
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (529, anthropic.OverloadedError),
    ],
)
async def test_error_replies_map_to_sdk_classes(
    emulator: Emulator, status: int, error_class: type[Exception]
) -> None:
    emulator.script(ErrorReply(status, message="nope", headers={"retry-after": "7"}))
    async with client(emulator) as sdk:
        with pytest.raises(error_class) as caught:
            await sdk.messages.create(
                model="claude-opus-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == status
    assert error.api_message == "nope"
    assert error.request_id is not None
    assert error.response.headers["retry-after"] == "7"


async def test_in_stream_error_arrives_as_status_200(emulator: Emulator) -> None:
    emulator.script(Reply("a b c d", fault="error", fault_after=2))
    async with client(emulator) as sdk:
        stream = await sdk.messages.create(
            model="claude-opus-5",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for _ in stream:
                pass
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"


async def test_spend_limit_error_code(emulator: Emulator) -> None:
    emulator.script(ErrorReply(429, error_code="enforced_spend_limit_reached"))
    async with client(emulator) as sdk:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await sdk.messages.create(
                model="claude-opus-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.error_code == "enforced_spend_limit_reached"


async def test_prefill_refused_on_new_models_accepted_on_old(emulator: Emulator) -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hello"}]
    emulator.script(Reply("Hello world"), Reply("Hello world"))
    async with client(emulator) as sdk:
        with pytest.raises(anthropic.BadRequestError, match="prefill"):
            await sdk.messages.create(model=NO_PREFILL_MODEL, max_tokens=50, messages=messages)  # type: ignore[arg-type]
        old = await sdk.messages.create(model=PREFILL_MODEL, max_tokens=50, messages=messages)  # type: ignore[arg-type]
    assert old.content[0].type == "text" and old.content[0].text == " world"


async def test_reply_tokens_continue_a_prefill_from_inside_a_piece(emulator: Emulator) -> None:
    tokens = ["Hel", "lo ", "wor", "ld, ", "bye."]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hello wo"}]
    emulator.script(Reply(tokens=tokens))
    async with client(emulator) as sdk:
        async with sdk.messages.stream(
            model=PREFILL_MODEL,
            max_tokens=50,
            messages=messages,  # type: ignore[arg-type]
        ) as stream:
            pieces = [text async for text in stream.text_stream]
    assert pieces == ["r", "ld, ", "bye."]


@pytest.mark.parametrize(
    ("on_continue", "partial", "expected"),
    [
        ("rest", "a b", " c d"),
        ("restart", "a b", "a b c d"),
        ("repeat_tail", "a b", "a b c d"),
        ("diverge", "a b", "a — on second thought, something else entirely."),
        ("rest", "a b ", "c d"),
        ("repeat_whitespace", "a b ", " c d"),  # the partial's trailing space, again
        ("repeat_whitespace", "a b", " c d"),  # nothing to repeat
    ],
)
async def test_continuations_answered_as_real_models_do(
    emulator: Emulator, on_continue: Any, partial: str, expected: str
) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": CONTINUE_MARKER + " and ended with: " + partial},
    ]
    emulator.script(Reply("a b c d", on_continue=on_continue))
    async with client(emulator) as sdk:
        reply = await sdk.messages.create(model=DEFAULT_MODEL, max_tokens=50, messages=messages)  # type: ignore[arg-type]
    assert reply.content[0].type == "text" and reply.content[0].text == expected


async def test_models_in_use_are_current(emulator: Emulator) -> None:
    """If this fails after an SDK upgrade, change the id in tests/models.py (one line)."""
    messages = [{"role": "user", "content": "x"}]
    emulator.script(*[Reply("ok")] * (len(CURRENT_MODELS) + 1))
    async with client(emulator) as sdk:
        for model in CURRENT_MODELS:  # warnings are errors here: a deprecated id raises
            await sdk.messages.create(model=model, max_tokens=5, messages=messages)  # type: ignore[arg-type]
        with pytest.warns(DeprecationWarning, match=DEPRECATED_MODEL):
            await sdk.messages.create(model=DEPRECATED_MODEL, max_tokens=5, messages=messages)  # type: ignore[arg-type]


async def test_auth_unknown_model_and_x_api_key(emulator: Emulator) -> None:
    strict = Emulator(api_key=KEY)
    async with strict:
        async with anthropic.AsyncAnthropic(
            api_key="wrong", base_url=strict.url, max_retries=0
        ) as sdk:
            with pytest.raises(anthropic.AuthenticationError):
                await sdk.messages.create(
                    model="claude-opus-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
    async with client(emulator) as sdk:
        with pytest.raises(anthropic.NotFoundError, match="gpt-4"):
            await sdk.messages.create(
                model="gpt-4", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    import httpx2

    async with httpx2.AsyncClient() as http:
        response = await http.post(
            emulator.url + "/v1/messages",
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
            json={
                "model": "claude-x",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert response.status_code == 200 and response.json()["type"] == "message"


async def test_hangup_and_drop_are_transport_errors(emulator: Emulator) -> None:
    emulator.script(Hangup(), Reply("a b c", fault="drop", fault_after=1))
    async with client(emulator) as sdk:
        with pytest.raises(anthropic.APIConnectionError):
            await sdk.messages.create(
                model="claude-opus-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        stream = await sdk.messages.create(
            model="claude-opus-5",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
        import httpx2

        with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as raised:
            async for _ in stream:
                pass
    # a drop is the transport's error: the SDK up to 2.16 lets it through, 2.17 and later
    # raise it as the cause of an APIConnectionError
    error = raised.value
    cause = error if isinstance(error, httpx2.RemoteProtocolError) else error.__cause__
    assert isinstance(cause, httpx2.RemoteProtocolError), repr(error)
    assert [r.outcome for r in emulator.requests] == ["hung_up", "dropped"]


async def test_eof_without_message_stop_raises_nothing_in_the_sdk(emulator: Emulator) -> None:
    emulator.script(Reply("a b c", fault="eof", fault_after=2))
    async with client(emulator) as sdk:
        stream = await sdk.messages.create(
            model="claude-opus-5",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
        types = [event.type async for event in stream]
    assert "message_stop" not in types and types.count("content_block_delta") == 2


async def test_paced_tokens_and_observed_disconnect(emulator: Emulator) -> None:
    emulator.script(Reply("one two three four five six", token_delay=0.2))
    async with client(emulator) as sdk:
        started = time.monotonic()
        async with sdk.messages.stream(
            model="claude-opus-5", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            async for _ in stream.text_stream:
                break  # leave after the first token: the connection closes
        first = time.monotonic() - started
    (request,) = emulator.requests
    await request.ended.wait()
    assert request.disconnected
    assert first < 0.5


@pytest.mark.parametrize("length", ["abc", "-5", "²", "99999999999999999999"])
async def test_a_bad_content_length_is_a_400(emulator: Emulator, length: str) -> None:
    reader, writer = await asyncio.open_connection(emulator.host, emulator.port)
    head = f"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 400")
    assert emulator.requests == []


async def test_compaction_round_trips_only_verbatim_and_with_its_beta(emulator: Emulator) -> None:
    emulator.script(
        Reply("Answered.", input_tokens=200_000), Reply("Again."), Reply("x"), Reply("x")
    )
    edits: Any = {"edits": [{"type": "compact_20260112"}]}
    first = [{"role": "user", "content": "A long talk about tides."}]
    async with client(emulator) as sdk:
        async with sdk.beta.messages.stream(
            model="claude-opus-4-6",
            max_tokens=100,
            messages=first,  # type: ignore[arg-type]
            betas=["compact-2026-01-12"],
            context_management=edits,
        ) as stream:
            message = await stream.get_final_message()
        assert [block.type for block in message.content] == ["compaction", "text"]
        assert message.usage.iterations is not None
        assert [i.type for i in message.usage.iterations] == ["compaction", "message"]
        compaction = message.content[0].model_dump(exclude_none=True)
        history: Any = [
            *first,
            {"role": "assistant", "content": [compaction]},
            {"role": "user", "content": "More?"},
        ]
        again = await sdk.beta.messages.create(
            model="claude-opus-4-6", max_tokens=50, messages=history, betas=["compact-2026-01-12"]
        )
        assert again.content[0].type == "text"
        history[1]["content"][0] = {**compaction, "content": compaction["content"] + " (edited)"}
        with pytest.raises(anthropic.BadRequestError, match="encrypted_content"):
            await sdk.beta.messages.create(
                model="claude-opus-4-6",
                max_tokens=50,
                messages=history,
                betas=["compact-2026-01-12"],
            )
        with pytest.raises(anthropic.BadRequestError, match="compact-2026-01-12"):
            await sdk.messages.create(
                model="claude-opus-4-6",
                max_tokens=50,
                messages=first,  # type: ignore[arg-type]
                extra_body={"context_management": edits},
            )


async def test_the_emulator_serves_https_for_a_tls_upstream(tmp_path: Path) -> None:
    """``Emulator(ssl=...)``: production's upstream is TLS, and so may the benchmark's be."""
    import ssl

    import httpx2

    ca, cert, key = certificates(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    async with Emulator(ssl=served) as emu:
        emu.script(Reply("Over TLS."))
        assert emu.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(ca))
        async with httpx2.AsyncClient(verify=trusted) as http:
            client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=emu.url, http_client=http)
            message = await client.messages.create(
                model=DEFAULT_MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            )
    assert message.content[0].type == "text" and message.content[0].text == "Over TLS."
