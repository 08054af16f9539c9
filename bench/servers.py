"""The systems under test, each served by Hypercorn (uvloop) in a single process.

    python -m bench.servers SYSTEM BIND UPSTREAM_URL [REDIS_URL]

(``SYSTEM``: ``quart_claude``, ``conversations``, ``budget``, ``guard-cut``, ``guard-hold``,
``bedrock``, ``bare``, ``bare-aiohttp`` or ``common``.)

(``BIND`` as Hypercorn takes it: ``127.0.0.1:8000``, or ``fd://N`` for an inherited socket.)

- ``quart_claude``: this project, ``Claude(app)`` with its defaults.
- ``conversations``: the same with conversations in SQLite (``CLAUDE_DATABASE_URL``): each
  stream is a turn (one write when it opens, one when it ends).
- ``budget``: ``quart_claude`` with a budget no stream reaches (``CLAUDE_BUDGET``, counted in
  the worker's memory): every request reserved, metered per delta and settled.
- ``guard-cut``, ``guard-hold``: ``quart_claude`` with an output guard that answers at once
  (``CLAUDE_OUTPUT_GUARD_MODE`` ``cut`` and ``hold``, a window every 200 characters): what
  the windows cost, and the latency ``hold`` adds.
- ``bedrock``: ``quart_claude`` on classic Amazon Bedrock (``CLAUDE_PROVIDER=bedrock``): the
  SDK's Bedrock client signing with SigV4 (fake static keys), the emulator's event-stream
  framing, decoded with its CRCs by the relay.
- ``bare``: the floor; a raw ASGI app (no framework) that forwards each upstream text delta
  as one SSE event, through httpx2 line iteration.
- ``bare-aiohttp``: the same floor on aiohttp's client (the transport quart-claude uses by
  default), with one connector for every stream, as the burst's floor.
- ``common``: the usual design; a Quart view iterating ``client.messages.stream().text_stream``.
- ``flask``: this project's Flask front end under Gunicorn's gthread worker (``flask_app``,
  started by ``bench.run`` with the ``gunicorn`` command, one worker, a thread per stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from hypercorn.asyncio import serve
from hypercorn.config import Config

# Each system imports what it needs when it is built: the floor's idle worker holds no
# framework and no SDK, as its own deployment would.

MODEL = "claude-sonnet-5-5"
BEDROCK_MODEL = "global.anthropic.claude-sonnet-4-6"
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHMARK0000000",
    "AWS_SECRET_ACCESS_KEY": "bench-fake-secret-key",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}
T = TypeVar("T")
SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def quart_claude_app(
    upstream: str,
    redis_url: str | None,
    database: str | None = None,
    budget: str | None = None,
    provider: str | None = None,
    guard: str | None = None,
) -> Any:
    from quart import Quart

    from quart_claude import Claude

    app = Quart(__name__)
    options: dict[str, Any] = {
        "api_key": "sk-bench",
        "base_url": upstream,
        "max_concurrent_streams": 10_000,
        "max_streams_per_client": 0,  # the load generator is one client with many streams
        "handle_signals": False,
    }
    if redis_url:
        options["stream_store"] = redis_url
    if budget:
        options["budget"] = budget
    if provider == "bedrock":  # boto3's chain finds these: nothing real is ever signed for
        for name, value in _FAKE_AWS.items():
            os.environ.setdefault(name, value)
        options.update(provider="bedrock", region="us-east-1", model=BEDROCK_MODEL)
    if database:  # conversations on: each stream is a turn of a new conversation
        options["database_url"] = f"sqlite+aiosqlite:///{database}"
        app.config["SECRET_KEY"] = "bench-secret-key"
    if guard:
        options["output_guard_mode"] = guard
    claude = Claude(app, **options)
    if guard:

        @claude.output_guard
        async def passes(check: Any) -> None:  # a guard that answers at once
            return None

    return app


def flask_app(upstream: str, redis_url: str | None = None) -> Any:
    """This project's Flask front end, for Gunicorn: ``bench.servers:flask_app("<url>")``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # as main() does for the others:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 descriptors per stream
    from flask import Flask

    from quart_claude.flask import Claude as FlaskClaude

    app = Flask(__name__)
    options: dict[str, Any] = {
        "api_key": "sk-bench",
        "base_url": upstream,
        "max_concurrent_streams": 10_000,
        "max_streams_per_client": 0,
    }
    if redis_url:
        options["stream_store"] = redis_url
    FlaskClaude(app, **options)
    return app


def common_app(upstream: str) -> Any:
    import anthropic
    from quart import Quart, Response, request

    app = Quart(__name__)
    clients: list[anthropic.AsyncAnthropic] = []

    @app.before_serving
    async def start() -> None:
        clients.append(anthropic.AsyncAnthropic(api_key="sk-bench", base_url=upstream))

    @app.post("/chat/stream")
    async def chat() -> Response:
        body = await request.get_json()

        async def events() -> Any:
            async with clients[0].messages.stream(
                model=MODEL,
                max_tokens=body.get("max_tokens", 8192),
                messages=[{"role": "user", "content": body["message"]}],
            ) as stream:
                async for text in stream.text_stream:
                    yield f"data: {_dumps({'type': 'delta', 'text': text})}\n\n"
            yield 'data: {"type":"done"}\n\n'

        response = Response(events(), headers=SSE)
        response.timeout = None
        return response

    @app.get("/ready")
    async def ready() -> str:
        return "ok"

    return app


def _payload(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    return {
        "model": MODEL,
        "max_tokens": body.get("max_tokens", 8192),
        "stream": True,
        "messages": [{"role": "user", "content": body["message"]}],
    }


_UPSTREAM_HEADERS = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream")],
}


async def _body(receive: Any) -> bytes:
    raw = b""
    while True:
        message = await receive()
        raw += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return raw


def _delta(line: str | bytes) -> bytes | None:
    """The SSE event the floor sends for one upstream line (None for all but text deltas);
    aiohttp gives a line as bytes with its line end, httpx2 as text without."""
    if isinstance(line, bytes):
        line = line.decode().rstrip("\r\n")
    if line.startswith("data: ") and '"text_delta"' in line:
        text = json.loads(line[6:])["delta"]["text"]
        return ("data: " + _dumps({"type": "delta", "text": text}) + "\n\n").encode()
    return None


#: a floor's HTTP client (made at startup), and the lines of one streamed request: an async
#: context manager around an async iterator of lines
Client = Any
Lines = Callable[[Client, str, dict[str, Any]], AbstractAsyncContextManager[AsyncIterator[Any]]]


def _floor_app(
    open_client: Callable[[], Client],
    close: Callable[[Client], Awaitable[None]],
    lines: Lines,
    upstream: str,
) -> Any:
    """A raw ASGI app, no framework: each upstream text delta forwarded as one SSE event."""
    state: dict[str, Client] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["client"] = open_client()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await close(state["client"])
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/ready":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        payload = _payload(await _body(receive))
        async with lines(state["client"], upstream + "/v1/messages", payload) as upstream_lines:
            await send(_SSE_START)
            async for line in upstream_lines:
                event = _delta(line)
                if event is not None:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b'data: {"type":"done"}\n\n'})

    return app


def bare_aiohttp_app(upstream: str) -> Any:
    import aiohttp

    @contextlib.asynccontextmanager
    async def lines(client: Any, url: str, payload: dict[str, Any]) -> AsyncIterator[Any]:
        async with client.post(url, json=payload, headers=_UPSTREAM_HEADERS) as response:
            yield response.content

    def open_client() -> Any:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
        )

    return _floor_app(open_client, aiohttp.ClientSession.close, lines, upstream)


def bare_app(upstream: str) -> Any:
    import httpx2

    @contextlib.asynccontextmanager
    async def lines(client: Any, url: str, payload: dict[str, Any]) -> AsyncIterator[Any]:
        async with client.stream("POST", url, json=payload, headers=_UPSTREAM_HEADERS) as response:
            yield response.aiter_lines()

    def open_client() -> Any:
        return httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=10_000))

    return _floor_app(open_client, httpx2.AsyncClient.aclose, lines, upstream)


def main() -> None:
    name, bind, upstream = sys.argv[1], sys.argv[2], sys.argv[3]
    redis_url = sys.argv[4] if len(sys.argv) > 4 else None
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app: Any
    if name == "quart_claude":
        app = quart_claude_app(upstream, redis_url)
    elif name == "budget":
        app = quart_claude_app(upstream, redis_url, budget="1000000000000 tokens/day")
    elif name in ("guard-cut", "guard-hold"):
        app = quart_claude_app(upstream, redis_url, guard=name.removeprefix("guard-"))
    elif name == "bedrock":
        app = quart_claude_app(upstream, redis_url, provider="bedrock")
    elif name == "conversations":
        database = tempfile.mkdtemp(prefix="qc-bench-db-") + "/chat.db"
        app = quart_claude_app(upstream, redis_url, database)
    elif name == "common":
        app = common_app(upstream)
    elif name == "bare-aiohttp":
        app = bare_aiohttp_app(upstream)
    else:
        app = bare_app(upstream)
    run(serve(app, config_for(bind)))


def config_for(bind: str) -> Config:
    """Hypercorn's settings for every system: no access log, a backlog for a burst, and
    keep-alive past a scenario's pauses."""
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.backlog = 4096
    config.keep_alive_timeout = 120
    return config


def run(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on uvloop, as production serves (asyncio's loop without it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    main()
