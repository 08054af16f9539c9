"""Shared test helpers: serve an app for real, and read its SSE responses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
from hypercorn.config import Config
from quart import Quart
from werkzeug.serving import WSGIRequestHandler, make_server

from quart_claude import Claude, SSEParser
from quart_claude.flask import Claude as FlaskClaude
from quart_claude.serving import serve_app

if TYPE_CHECKING:
    from quart_claude._core.turns import TurnRef


@dataclass
class SSEResult:
    status: int
    headers: httpx2.Headers
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    raw: bytes = b""
    pings: int = 0
    body: Any = None

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta")

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


async def stream_chat(
    client: httpx2.AsyncClient,
    url: str,
    payload: Any = None,
    *,
    stop_after_deltas: int | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    attached: asyncio.Event | None = None,
    on_first: Callable[[SSEResult], None] | None = None,
) -> SSEResult:
    """POST ``payload`` and read the SSE answer (optionally leaving after N deltas).
    ``attached`` is set at the first event: the reader is following the stream; ``on_first``
    is given the result so far there (its ``start`` event, for one)."""
    kwargs: dict[str, Any] = {"headers": headers}
    if payload is not None:
        kwargs["json"] = payload
    async with client.stream(method, url, **kwargs) as response:
        result = SSEResult(response.status_code, response.headers)
        if response.status_code != 200 or "event-stream" not in response.headers.get(
            "content-type", ""
        ):
            await response.aread()
            result.body = response.json()
            return result
        parser = SSEParser()
        deltas = 0
        async for chunk in response.aiter_raw():
            result.raw += chunk
            for event in parser.feed(chunk):
                result.events.append(event.json())
                result.ids.append(event.id)
                result.received_at.append(time.time())
                if attached is not None:
                    attached.set()
                if on_first is not None and len(result.events) == 1:
                    on_first(result)
                if result.events[-1]["type"] == "delta":
                    deltas += 1
            result.pings = parser.comments
            if stop_after_deltas is not None and deltas >= stop_after_deltas:
                break
        return result


@contextlib.asynccontextmanager
async def serving(app: Quart) -> AsyncIterator[str]:
    """Serve ``app`` with Hypercorn in this event loop on a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.graceful_timeout = 2
    config.accesslog = None
    config.errorlog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(app, config, stop))
    url = f"http://127.0.0.1:{port}"
    ready = url + Claude.state(app).config.url_prefix + "/ready"
    try:
        async with httpx2.AsyncClient() as client:
            for _ in range(200):
                if task.done():  # the app failed to start: its error, not a hang
                    task.result()
                    raise RuntimeError("the test server stopped before it was ready")
                with contextlib.suppress(httpx2.TransportError):
                    if (await client.get(ready, timeout=2)).status_code == 200:
                        break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError("the test server did not become ready")
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        sock.detach()  # Hypercorn owns and has closed the descriptor


async def orphaned_turn(database_url: str, token: str, client_message_id: str) -> TurnRef:
    """The turn a worker killed between its row and its stream leaves behind, made exactly:
    ``streaming``, a stream no store knows, opened a whole lease (3 s) and more ago, for the
    identity of bearer ``token``."""
    from sqlalchemy import update

    from quart_claude._core.db import Conversations, Opened, Send, create_engine, now_ms
    from quart_claude._core.tables import messages

    owner = "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    dead = Conversations(create_engine(database_url), owned=True)
    try:
        orphan = Send(owner, None, "hello", "the-stream-that-never-started", "claude-sonnet-5-5")
        orphan.client_message_id = client_message_id
        opened = await dead.open_turn(orphan)
        assert isinstance(opened, Opened)
        stamp = update(messages).where(messages.c.conversation_id == opened.ref.conversation_id)
        too_old = now_ms() - 10_000
        await dead.runner.write(lambda conn: conn.execute(stamp.values(created_at=too_old)))
    finally:
        await dead.close()
    return opened.ref


async def eventually(check: Callable[[], Any], within: float = 5.0) -> None:
    """Until ``check()`` (or the coroutine it returns) is true, polled every 20 ms: for what
    a stream does after its last byte (its log line, its span, its gauges), instead of a
    guessed sleep."""
    async with asyncio.timeout(within):
        while True:
            outcome = check()
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(0.02)


def stream_ends(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage().startswith("stream_end")]


def listener() -> socket.socket:
    """A listening loopback socket on a free port, for a server process to inherit as
    ``fd://N``: unlike :func:`free_port`, nothing else can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports begin: what a bind to port 0 (an emulator, an
    in-process server) or an outgoing connection is given comes from there up."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: the ports free_port() hands out, one slice per pytest-xdist worker, all below the
#: ephemeral range: no other worker's free_port() and no bind to port 0 can take one
#: between its choosing and its server's bind (they did: a `flask run` found its port taken
#: by another test's emulator, and its readiness probe asked that emulator for /ready)
_PORTS_FROM, _SLICES = 20000, 32  # a Redis Cluster's bus ports (+10000) stay below it too
_ports: Iterator[int] | None = None


def _port_slice() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    size = max(1, (_ephemeral_start() - _PORTS_FROM) // _SLICES)
    first = _PORTS_FROM + (int(worker) % _SLICES if worker.isdigit() else 0) * size
    return itertools.cycle(range(first, first + size))


def free_port() -> int:
    """A loopback port for a server process to bind: this test worker's own, free now.
    (Where the server can inherit a socket, :func:`listener` is surer still.)"""
    global _ports
    if _ports is None:
        _ports = _port_slice()
    for port in itertools.islice(_ports, 2000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or still closing): the next one
            return port
    raise RuntimeError("no free port in this test worker's slice")


class CuttingProxy:
    """A TCP proxy in front of a server whose live connections a test can cut at will."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every open connection, both sides, as a network blip would."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no access log line per request


@contextlib.asynccontextmanager
async def wsgi_serving(options: dict[str, Any]) -> AsyncIterator[str]:
    """``tests.flask_host_app.create_app(**options)`` on Werkzeug's threaded WSGI server in
    a thread of this process (one thread per request, as Gunicorn's gthread worker runs it);
    yields its base URL. Ready in milliseconds: the server tier's Flask front end. What only
    Gunicorn does (its worker, its hook, its signals) is tested under Gunicorn itself."""
    from .flask_host_app import create_app

    app = create_app(**options)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="wsgi-server", daemon=True
    )
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        await wait_ready(url + str(options.get("url_prefix", "")) + "/ready")
        yield url
    finally:
        await asyncio.to_thread(server.shutdown)
        # the app's loop thread: drain its streams and stop, as the process's exit would
        await asyncio.to_thread(FlaskClaude.loop_thread(app).stop)
        server.server_close()
        thread.join(5)


async def wait_ready(url: str, attempts: int = 300) -> None:
    async with httpx2.AsyncClient() as client:
        for _ in range(attempts):
            with contextlib.suppress(httpx2.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.02)
    raise RuntimeError(f"{url} did not become ready")


ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(value)
    return str(value)


@contextlib.asynccontextmanager
async def gunicorn_serving(
    options: dict[str, Any], *, threads: int = 32, app: str = "tests.flask_host_app:app"
) -> AsyncIterator[str]:
    """``tests.flask_host_app`` under Gunicorn's gthread worker (the shipped config, one
    worker), configured by ``options`` as CLAUDE_* variables; yields its base URL."""
    for name in ("authorize", "tracer_provider"):
        if name in options:
            raise TypeError(f"{name} cannot be passed to a Gunicorn server through its environment")
    env = {**os.environ, **{"CLAUDE_" + k.upper(): _env_value(v) for k, v in options.items()}}
    sock = listener()  # inherited, so no other test's server can be on this port
    port = sock.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        GUNICORN,
        "-c",
        str(ROOT / "deploy" / "gunicorn.conf.py"),
        "-b",
        f"fd://{sock.fileno()}",
        "-w",
        "1",
        "--threads",
        str(threads),
        "--graceful-timeout",
        "5",
        "--access-logfile",
        "/dev/null",
        app,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: the master and its worker
        pass_fds=(sock.fileno(),),
    )
    sock.close()  # Gunicorn holds its own copy
    url = f"http://127.0.0.1:{port}"
    ready = url + str(options.get("url_prefix", "")) + "/ready"
    try:
        async with httpx2.AsyncClient() as client:
            for _ in range(300):
                if process.returncode is not None:
                    raise RuntimeError(f"gunicorn exited with {process.returncode}")
                with contextlib.suppress(httpx2.TransportError):
                    if (await client.get(ready)).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("gunicorn did not become ready")
        yield url
    finally:
        # killed, master and worker: a graceful stop takes Gunicorn seconds, and it is tested
        # on its own (test_flask.py, SIGTERM with open streams)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 20)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
        secret = options.get("api_key")
        assert not secret or str(secret).encode() not in output  # the key is never logged


def fresh_redis_db(redis_url: str, db: int) -> str:
    """Database ``db`` of the worker's redis-server, emptied: a test that counts what is in
    it (ledger entries, cooldowns) never counts what an earlier test of this worker left.
    Each test that needs one takes its own number."""
    import redis

    url = f"{redis_url}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url
