"""``Claude(app)``: configuration, per-app state, the client's lifecycle, the blueprint."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
from quart import Quart, Request, current_app, request

from ._config import ClaudeConfig, ConfigError, load_config
from ._errors import ERROR_CLASSES
from ._metrics import MULTIPROC_ENV, Metrics, metrics_for
from ._redact import install as install_redaction
from ._redact import register_secret
from ._relay import Relay
from ._schema import chat_body_model, openapi_document
from ._shutdown import ShutdownHooks
from ._stream import Stream, StreamRegistry
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._ratelimit import RateLimiter
    from ._redis_store import RedisStore

__all__ = ["Authorize", "Claude", "ClaudeState", "Unauthorized"]

log = logging.getLogger("quart_claude")

EXTENSION_KEY = "claude"


class ChatStreams:
    """Which stream a chat (the AI SDK's chat id, per identity) is answering right now, so
    ``useChat({resume: true})`` can find it: in memory, and in Redis when it is the store."""

    def __init__(self, limit: int = 10_000) -> None:
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self.store: RedisStore | None = None

    @staticmethod
    def _key(identity: str | None, chat_id: str) -> str:
        return hashlib.sha256(f"{identity or ''}\x00{chat_id}".encode()).hexdigest()

    async def remember(self, identity: str | None, chat_id: str, stream_id: str) -> None:
        key = self._key(identity, chat_id)
        self._recent[key] = stream_id
        self._recent.move_to_end(key)
        while len(self._recent) > self._limit:
            self._recent.popitem(last=False)
        if self.store is not None:
            await self.store.remember_chat(key, stream_id)

    async def active(self, identity: str | None, chat_id: str) -> str | None:
        key = self._key(identity, chat_id)
        if self.store is not None:
            return await self.store.active_chat(key) or self._recent.get(key)
        return self._recent.get(key)


#: ``fn(request) -> identity | None``, sync or async.
Authorize = Callable[[Request], Any]


class Unauthorized(Exception):
    """The request may not use the routes: answered 401."""


class ClaudeState:
    """Everything one app needs at run time; lives in ``app.extensions["claude"]``.

    The SDK client exists only while the app is serving (``before_serving`` to
    ``after_serving``), once per worker process.
    """

    def __init__(self, extension: Claude, config: ClaudeConfig) -> None:
        self.extension = extension
        self.config = config
        self.relay: Relay | None = None
        self.streams = StreamRegistry(
            ttl=config.stream_ttl,
            max_finished=config.max_finished_streams,
            max_bytes=config.max_finished_bytes,
        )
        self.producers: set[asyncio.Task[None]] = set()
        self.body_model = chat_body_model(config)  # validates bodies; the OpenAPI's source
        self.chats = ChatStreams()
        self.telemetry = Telemetry(
            _metrics(config) if config.metrics else None, extension.tracer_provider
        )
        self._openapi: dict[str, Any] | None = None
        self._per_client: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.rate_limiter: RateLimiter | None = None
        self.draining = False
        self.store: RedisStore | None = None  # None: streams live in this worker only
        self._hooks: ShutdownHooks | None = None

    @property
    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi_document(self.config)
        return self._openapi

    @property
    def ready(self) -> bool:
        return self.relay is not None and not self.draining

    def live_streams(self) -> int:
        return len(self.producers)

    def streams_of(self, client: str) -> int:
        """Open streams this worker produces for ``client`` (an identity or an address)."""
        return self._per_client.get(client, 0)

    def start_producer(self, stream: Stream, work: Coroutine[Any, Any, None], client: str) -> None:
        """Run ``work`` as the stream's producer task, counted per worker and per client."""
        task = asyncio.get_running_loop().create_task(work)
        stream.producer = task
        self.producers.add(task)
        self._per_client[client] = self._per_client.get(client, 0) + 1

        def done(task: asyncio.Task[None]) -> None:
            self.producers.discard(task)
            left = self._per_client.pop(client, 1) - 1
            if left:
                self._per_client[client] = left

        task.add_done_callback(done)

    async def authorize(self) -> str | None:
        """Who is asking: the identity that decides who may use the routes, who owns a stream
        and the rate-limit key. It is the ``authorize`` hook's answer when there is a hook,
        else the bearer token's (``CLAUDE_API_TOKENS``), else None (no auth: anyone may use
        the routes, and a stream id is the capability to read or stop it).

        Raises :class:`Unauthorized` when a hook answers None or no token matches.
        """
        identity = None
        tokens = self.config.api_tokens
        if tokens:
            scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
            offered = given.strip().encode() if scheme.lower() == "bearer" else b""
            # every token compared in constant time, none skipped: no timing says which failed
            matches = [t for t in tokens if hmac.compare_digest(offered, t.encode())]
            if not offered or not matches:
                raise Unauthorized("a valid 'Authorization: Bearer <token>' is required")
            identity = "token:" + hashlib.sha256(matches[0].encode()).hexdigest()[:16]
        hook = self.extension.authorize_hook
        if hook is not None:
            value = await current_app.ensure_async(hook)(request)
            if value is None:
                raise Unauthorized("this request is not authorized")
            identity = str(value)
        return identity

    def stream_idle(self, stream: Stream) -> None:
        """The last reader left before the end: give it ``CLAUDE_RESUME_GRACE`` seconds to
        come back (a returning reader cancels the timer), then stop paying for tokens nobody
        will read."""
        self._arm_idle(stream, self.config.resume_grace)

    def _arm_idle(self, stream: Stream, delay: float) -> None:
        loop = asyncio.get_running_loop()
        stream.idle_timer = loop.call_later(delay, self._idle_expired, stream)

    def _idle_expired(self, stream: Stream) -> None:
        stream.idle_timer = None
        if stream.readers or stream.finished:
            return
        if self.store is None:
            stream.cancel("disconnected")
        else:  # readers on other workers count too
            task = asyncio.get_running_loop().create_task(
                self._cancel_unless_read_elsewhere(stream)
            )
            self._background.add(task)  # a reference, so it is not collected mid-flight
            task.add_done_callback(self._background.discard)

    async def _cancel_unless_read_elsewhere(self, stream: Stream) -> None:
        store = self.store
        if store is not None and await store.has_remote_readers(stream.id):
            if stream.idle_timer is None and not stream.readers:
                self._arm_idle(stream, self.config.heartbeat_interval)
        elif not stream.readers and stream.idle_timer is None:
            stream.cancel("disconnected")

    async def startup(self) -> None:
        config = self.config
        client = anthropic.AsyncAnthropic(
            api_key=config.api_key,
            base_url=config.base_url,
            max_retries=0,  # this project owns the retry policy
            http_client=_http_client(config),
        )
        if config.stream_store != "memory":
            from ._redis_store import RedisStore

            self.store = RedisStore(config.stream_store, ttl=config.stream_ttl)
            await self.store.start()
            self.chats.store = self.store
        if config.rate_limit:
            from ._ratelimit import RateLimiter

            pool = self.store.redis.connection_pool if self.store is not None else None
            self.rate_limiter = RateLimiter(config.rate_limit, pool)
        self.relay = Relay(client, config, self.telemetry)
        self.draining = False
        if config.send_timeout > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_stalled_readers())
        if config.handle_signals:
            self._hooks = ShutdownHooks(self.drain)
            self._hooks.install(asyncio.get_running_loop())

    async def _sweep_stalled_readers(self) -> None:
        """Let go of readers whose client stopped reading: after ``CLAUDE_SEND_TIMEOUT``
        seconds on one write, the response task is cancelled, so the stream is no longer held
        (its resume grace starts, as for any departed reader). The connection itself stays
        Hypercorn's until the client or the OS closes it (a proxy's ``send_timeout`` does)."""
        timeout = self.config.send_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.25, timeout / 4))
            for reader in self.streams.stalled_readers(loop.time() - timeout):
                if reader.task is not None and not reader.task.done():
                    log.info("a client stopped reading for %ss: letting its stream go", timeout)
                    reader.task.cancel()

    async def drain(self) -> None:
        """Refuse new streams; end open ones with a retryable ``shutdown`` error event."""
        if not self.draining:
            log.info("draining: ending %d open stream(s)", len(self.producers))
        self.draining = True
        if self.store is not None:  # readers of other workers' streams end too
            self.store.closing.set()
        for stream in self.streams.live():
            stream.cancel("shutdown")
        if self.producers:
            await asyncio.wait(list(self.producers), timeout=self.config.shutdown_grace)

    async def shutdown(self) -> None:
        await self.drain()
        if self._hooks is not None:
            self._hooks.uninstall()
            self._hooks = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.client.close()
        store, self.store = self.store, None
        if store is not None:
            await store.close()


def _metrics(config: ClaudeConfig) -> Metrics:
    """The app's Prometheus metrics, their series for every allowed model created at 0."""
    metrics = metrics_for(ClaudeConfig.key("metrics"))
    metrics.prepare(dict.fromkeys((config.model, *config.allowed_models)), ERROR_CLASSES)
    directory = metrics.multiprocess_dir
    if directory is not None and not any(
        entry.name.endswith(f"_{os.getpid()}.db") for entry in os.scandir(directory)
    ):  # prometheus_client chose its mode on import, before the variable was set
        raise ConfigError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported, so this process "
            f"does not write to {directory!r}: set it in the environment the server starts with"
        )
    return metrics


def _http_client(config: ClaudeConfig) -> httpx2.AsyncClient:
    """The SDK's upstream transport: aiohttp when available (a quarter less CPU per relayed
    event in bench/, same behaviour under every fault), else the SDK's default httpx2 one.
    Pools hold one connection per allowed concurrent stream."""
    timeout = httpx2.Timeout(config.timeout, connect=config.connect_timeout)
    limits = httpx2.Limits(
        max_connections=config.max_concurrent_streams + 16, max_keepalive_connections=100
    )
    choice = config.http_client
    if choice in ("auto", "aiohttp"):
        try:
            return anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits)
        except RuntimeError:  # aiohttp is not installed
            if choice == "aiohttp":
                raise ConfigError(
                    "CLAUDE_HTTP_CLIENT=aiohttp needs aiohttp: pip install 'anthropic[aiohttp]'"
                ) from None
    return anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


class Claude:
    """The extension. ``Claude(app)`` or, for app factories, ``claude.init_app(app)``.

    Keyword options use the config names without the ``CLAUDE_`` prefix, lowercased:
    ``Claude(app, model="claude-opus-5", max_retries=5)``. They win over ``app.config``,
    which wins over environment variables. ``tracer_provider``: the OpenTelemetry provider
    the streams' spans go to (default: the global one, as OTel instrumentations do).
    """

    def __init__(
        self,
        app: Quart | None = None,
        *,
        authorize: Authorize | None = None,
        tracer_provider: TracerProvider | None = None,
        **options: Any,
    ) -> None:
        self._options = options
        self.authorize_hook = authorize
        self.tracer_provider = tracer_provider
        if app is not None:
            self.init_app(app)

    def authorize(self, hook: Authorize) -> Authorize:
        """Decorate the (sync or async) function that, given the request, returns who is
        asking (any value; ``str()`` of it is the identity) or None to refuse with a 401.

        The identity decides who may use the chat routes, who owns a stream (only the same
        identity may read or stop it; anyone else gets 404), and the rate-limit key.
        ``/health``, ``/ready`` and the client script stay open.
        """
        self.authorize_hook = hook
        return hook

    def init_app(self, app: Quart) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "Claude is already registered on this app; call init_app once per app."
            )
        config = load_config(self._options, app.config)
        if not config.api_key:
            raise ConfigError(
                "CLAUDE_API_KEY is not set (nor ANTHROPIC_API_KEY): set one, or point "
                "CLAUDE_BASE_URL at the emulator (quart_claude.testing) with any key"
            )
        register_secret(config.api_key)
        for token in config.api_tokens:
            register_secret(token)
        install_redaction()
        state = ClaudeState(self, config)
        app.extensions[EXTENSION_KEY] = state

        from ._routes import create_blueprint

        blueprint = create_blueprint(with_metrics=config.metrics)
        if config.cors_origins:  # for the blueprint's routes only, never the host app's
            from quart_cors import cors

            origins = "*" if "*" in config.cors_origins else list(config.cors_origins)
            cors(
                blueprint,
                allow_origin=origins,
                allow_headers=["Content-Type", "Last-Event-ID", "Authorization"],
                allow_methods=["GET", "POST", "DELETE"],
                expose_headers=[
                    "X-Stream-Id",
                    "Retry-After",
                    "RateLimit-Limit",
                    "RateLimit-Remaining",
                    "RateLimit-Reset",
                ],
                max_age=600,
            )
        app.register_blueprint(blueprint, url_prefix=config.url_prefix or None)
        app.before_serving(state.startup)
        app.after_serving(state.shutdown)

    @staticmethod
    def state(app: Quart | None = None) -> ClaudeState:
        """The state of ``app`` (default: the current app)."""
        extensions = app.extensions if app is not None else current_app.extensions
        try:
            state: ClaudeState = extensions[EXTENSION_KEY]
        except KeyError:
            raise RuntimeError(
                "Claude is not registered on this app; did you forget Claude(app) or "
                "claude.init_app(app)?"
            ) from None
        return state
