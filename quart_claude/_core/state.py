"""The per-app state both front ends share: configuration, the SDK client, the streams, the
store, telemetry, and the rules of who may do what. It knows no web framework: the Quart and
Flask front ends call it from their views (Flask through a loop thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from .answer import Answer, Prior
from .auth import Auth, Authorize, Unauthorized
from .budget import BudgetHook, BudgetRefused, Budgets
from .config import ClaudeConfig, ConfigError, load_config
from .fallback import Fallbacks
from .guards import Blocked, Guards, InputGuard, InputGuarding, OutputGuard, OutputGuarding
from .ledger import LedgerStore
from .metrics import MULTIPROC_ENV, Metrics, metrics_for
from .policy import AnswerContext, PolicyMaker
from .producers import Producers
from .protocol import ERROR_CLASSES
from .providers import (
    CREDENTIAL_ENV,
    Upstreams,
    endpoints,
    missing_api_key,
    primary_endpoint,
    require_extra,
)
from .redact import install as install_redaction
from .redact import register_secret
from .relay import Relay
from .request import ChatRequest
from .schema import chat_body_model
from .store import Claim, Found, StreamStore, Timings, memory_store
from .stream import Cancel, StoreUnavailable, Stream
from .telemetry import Telemetry, parent_context
from .tools import Show, ToolBox, ToolScope
from .turns import TurnHook, TurnKeeper, TurnRef

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from pydantic import BaseModel
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .db import Conversations
    from .ratelimit import RateLimiter

__all__ = ["Authorize", "ClaudeState", "Extension", "Unauthorized"]

log = logging.getLogger("quart_claude")

#: Where the state lives: ``app.extensions["claude"]``, on Quart and Flask alike.
EXTENSION_KEY = "claude"


class Extension(Protocol):
    """What the state needs of a front end's extension object."""

    @property
    def authorize_hook(self) -> Authorize | None: ...

    @property
    def tools(self) -> ToolBox: ...

    @property
    def turn_hooks(self) -> list[TurnHook]: ...

    @property
    def budget_hook(self) -> BudgetHook | None: ...

    @property
    def input_guard_hook(self) -> InputGuard | None: ...

    @property
    def output_guard_hook(self) -> OutputGuard | None: ...


class ClaudeState:
    """Everything one app needs at run time, whatever the web framework; it lives in
    ``app.extensions["claude"]``.

    The SDK client, the store and the background tasks exist only while the app is serving
    (:meth:`startup` to :meth:`shutdown`, on the event loop that serves the streams), once
    per worker process.
    """

    def __init__(
        self, extension: Extension, config: ClaudeConfig, tracer_provider: TracerProvider | None
    ) -> None:
        self.extension = extension
        self.config = config
        self.relay: Relay | None = None
        #: where streams live (memory, or Redis for every worker): a new one each startup
        self.store: StreamStore = _create_store(config)
        #: this worker's producer tasks, counted per client
        self.producers: Producers = Producers()
        #: who is asking: tokens, the authorize hook, the anonymous cookie's key
        self.auth: Auth = Auth(
            config.api_tokens, lambda: self.extension.authorize_hook, lambda: self.conversations_on
        )
        self.body_model: type[BaseModel] = chat_body_model(
            config
        )  # validates bodies; the OpenAPI's source
        self.telemetry: Telemetry = Telemetry(
            _metrics(config) if config.metrics else None, tracer_provider
        )
        self._openapi: dict[str, Any] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.rate_limiter: RateLimiter | None = None
        self.draining: bool = False
        #: entered around each tool call (the Flask front end: the app context); None: the
        #: producer task's own context (Quart copies the request's into it)
        self.tool_scope: ToolScope | None = None
        #: the host's engine (``Claude(app, engine=...)``), else one made from the URL
        self.engine: AsyncEngine | None = None
        self.turns: TurnKeeper = TurnKeeper(None, lambda: self.extension.turn_hooks, lambda: None)
        self._purger: asyncio.Task[None] | None = None
        #: budgets and the usage ledger (where the ledger has a home), while serving
        self.budgets: Budgets | None = None

    @property
    def conversations(self) -> Conversations | None:
        """The app's conversations (``CLAUDE_DATABASE_URL`` or ``engine=``), while serving."""
        return self.turns.conversations

    @property
    def conversations_on(self) -> bool:
        return self.engine is not None or self.config.database_url is not None

    @property
    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:  # its models are made the first time it is asked for
            from .openapi import openapi_document

            self._openapi = openapi_document(self.config, self.conversations_on)
        return self._openapi

    @property
    def ledger(self) -> LedgerStore | None:
        """Where budgets count and usage is recorded (None: nowhere), while serving."""
        return self.budgets.ledger if self.budgets is not None else None

    @property
    def ready(self) -> bool:
        return self.relay is not None and not self.draining

    async def open_stream(
        self,
        stream_id: str,
        chat: ChatRequest,
        *,
        owner: str | None,
        client: str,
        headers: Any = None,
        turn: TurnRef | None = None,
    ) -> Stream:
        """Register a validated request's stream (in the store too, so any worker finds it at
        once) and start its producer. ``owner``: the identity that may read or stop it;
        ``client``: whom it counts against; ``headers``: the request's, for the trace the
        stream's span joins. Raises a policy's refusal (``Blocked``, ``BudgetRefused``) before
        anything is kept, and :class:`StoreUnavailable` when the store (or a budget's) cannot
        take it."""
        relay = self.relay
        assert relay is not None, "open_stream before startup"
        stream = Stream(stream_id, retry_ms=self.config.sse_retry, owner=owner)
        fields = {**_shallow(chat), "client": client}
        cid = turn.conversation_id if turn is not None else None
        context = AnswerContext(owner or client, stream_id, chat, cid)
        parent = parent_context(headers) if headers is not None else None
        try:
            answer = await relay.begin(stream, chat, context, parent)
        except (Blocked, BudgetRefused):
            raise
        except Exception as exc:  # the budget hook raised, or the ledger's store is down
            log.exception("stream %s: its policies could not admit it", stream_id)
            raise StoreUnavailable(str(type(exc).__name__)) from None
        if turn is not None:
            fields["turn"] = _shallow(turn)
            answer.start_fields = {
                "conversation_id": turn.conversation_id,
                "user_message_id": turn.user_message_id,
                "assistant_message_id": turn.message_id,
                **answer.start_fields,
            }
        try:
            await self.store.open(stream, fields)
        except BaseException:
            await relay.abandon(answer)
            raise
        self.producers.start(stream, self._produce(answer, chat, None, turn), client)
        return stream

    async def _produce(
        self, answer: Answer, chat: ChatRequest, prior: Prior | None, turn: TurnRef | None
    ) -> None:
        """The producer task: the answer, then the turn kept (stored, and the hooks told)."""
        assert self.relay is not None
        stream = answer.stream
        ended = await self.relay.produce(answer, prior)
        if ended.status is not None and not await stream.settled(self.config.stream_lease):
            # taken over while this worker was paused: the stream's end, its turn and its
            # hooks are the successor's (what every reader saw)
            log.warning("stream %s: superseded at its end; its turn is kept elsewhere", stream.id)
            return
        await self.turns.keep(stream, chat, ended, turn)

    async def take_over(self, claim: Claim) -> bool:
        """Continue a stream another worker produced until it died or drained (the store
        claimed it for this worker): False when this worker cannot take it now."""
        relay = self.relay
        if relay is None or self.draining:
            return False
        if len(self.producers) >= self.config.max_concurrent_streams:
            log.warning("stream %s: not taken over, this worker is at capacity", claim.stream_id)
            return False
        fields = dict(claim.request)
        client = str(fields.pop("client", ""))
        stored = fields.pop("turn", None)
        fields["stop_sequences"] = tuple(fields.get("stop_sequences") or ())
        chat = ChatRequest(**fields)
        stream = Stream(claim.stream_id, retry_ms=self.config.sse_retry, owner=claim.owner)
        self.store.adopt(claim, stream)
        prior = Prior.from_events(claim.events, claim.usage, claim.steps)
        turn = await self.turns.claim(TurnRef(**stored)) if stored else None
        cid = turn.conversation_id if turn is not None else None
        context = AnswerContext(claim.owner or client, claim.stream_id, chat, cid, prior)
        answer = await relay.resume(stream, chat, context)  # its policies go on here
        self.producers.start(stream, self._produce(answer, chat, prior, turn), client)
        return True

    async def find(self, stream_id: str, identity: str | None) -> Found | None:
        """The stream (produced here, or elsewhere when Redis is the store) if it exists and
        ``identity`` may see it; otherwise None, as if it did not exist. Raises
        :class:`StoreUnavailable` when the store cannot answer."""
        found = await self.store.lookup(stream_id)
        if found is None or (found.owner is not None and found.owner != identity):
            return None
        return found

    def read(
        self, found: Found, after: int, *, live_only: bool = False
    ) -> AsyncIterator[bytes] | None:
        """The encoded events after index ``after``, then live ones with heartbeats; None
        when there is nothing more, ever (or, ``live_only``, when the stream has finished)."""
        return self.store.read(found, after, self.config.heartbeat_interval, live_only=live_only)

    async def stop(self, found: Found) -> bool:
        """Stop a stream wherever it is produced: whether it was still running."""
        return await self.store.cancel(found)

    async def remember_chat(self, identity: str | None, chat_id: str, stream_id: str) -> None:
        """The AI SDK chat ``chat_id`` of ``identity`` is answered by ``stream_id``."""
        await self.store.remember_chat(_chat_key(identity, chat_id), stream_id)

    async def active_chat(self, identity: str | None, chat_id: str) -> str | None:
        """The stream answering the chat right now (for ``useChat({resume: true})``)."""
        return await self.store.active_chat(_chat_key(identity, chat_id))

    async def startup(self) -> None:
        config = self.config
        # how each endpoint is sent to (the SDK's max_retries=0: the retries are ours)
        upstreams = Upstreams(config)
        self.store = _create_store(config)
        self.store.take_over = self.take_over
        await self.store.start()
        if config.rate_limit:
            from .ratelimit import RateLimiter, storage_for

            self.rate_limiter = RateLimiter(config.rate_limit, storage_for(self.store.link))
        self.turns = TurnKeeper(
            await self._open_conversations(),
            lambda: self.extension.turn_hooks,
            lambda: self.tool_scope,
        )
        if self._ledger_on():
            self.budgets = Budgets(
                self._ledger(), config, self.telemetry, lambda: self.extension.budget_hook
            )
        self.relay = Relay(
            upstreams,
            config,
            self.telemetry,
            self.extension.tools,
            self.tool_scope,
            self._policy_makers(),
        )
        self.draining = False
        if config.send_timeout > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_stalled_readers())

    def _policy_makers(self) -> list[PolicyMaker]:
        """What shapes each answer, in the order the relay calls them: the guards (the input
        before anything is reserved), the budget, the fallback chain."""
        config, extension = self.config, self.extension
        guards = Guards(config, self.telemetry, self.tool_scope)
        guards.input, guards.output = extension.input_guard_hook, extension.output_guard_hook
        makers: list[PolicyMaker] = [InputGuarding(guards), OutputGuarding(guards)]
        if self.budgets is not None:
            makers.append(self.budgets)
        if config.fallbacks:
            fallbacks = Fallbacks(config, primary_endpoint(config), self.telemetry)
            redis = self.store.redis
            if redis is not None:  # a hop that failed is skipped by all
                from .fallback import RedisCooldowns

                fallbacks.cooldowns = RedisCooldowns(redis)
            makers.append(fallbacks)
        return makers

    def _ledger_on(self) -> bool:
        """Budgets need the ledger; without one it records wherever the database or Redis
        gives it a home (``CLAUDE_LEDGER`` true: in memory too; false: only for budgets)."""
        config = self.config
        if config.budget or self.extension.budget_hook is not None:
            return True
        if config.ledger is None:
            return self.conversations is not None or self.store.redis is not None
        return config.ledger

    def _ledger(self) -> LedgerStore:
        """Where budgets count: the database with conversations on, else Redis when it is
        the stream store, else this worker's memory."""
        from .ledger import MemoryLedger, RedisLedger

        if self.conversations is not None:
            from .ledger_sql import SqlLedger

            return SqlLedger(self.conversations.runner)
        redis = self.store.redis
        return RedisLedger(redis) if redis is not None else MemoryLedger()

    async def _open_conversations(self) -> Conversations | None:
        """The conversations' tables, ready: SQLite's made at once (development), any other
        database's made by the shipped migrations (``python -m quart_claude db upgrade``).
        A database that does not answer now is reported by ``/ready``, not fatal."""
        if not self.conversations_on:
            return None
        from .db import Conversations, create_engine

        owned = self.engine is None
        engine = self.engine or create_engine(str(self.config.database_url))
        conversations = Conversations(engine, owned=owned)
        try:
            if conversations.sqlite:
                await conversations.create_tables()
            elif not await conversations.migrated():
                raise ConfigError(
                    "the conversation tables do not exist: run 'python -m quart_claude db "
                    "upgrade' (or 'flask claude db upgrade') against CLAUDE_DATABASE_URL"
                )
        except ConfigError:
            await conversations.close()
            raise
        except Exception as exc:
            log.error("the conversation database is unavailable at startup: %s", type(exc).__name__)
        if self.config.conversation_ttl > 0:
            self._purger = asyncio.get_running_loop().create_task(self._purge(conversations))
        return conversations

    async def _purge(self, conversations: Conversations) -> None:
        """Erase conversations older than ``CLAUDE_CONVERSATION_TTL`` days, hourly."""
        from .db import now_ms

        while True:
            cutoff = now_ms() - int(self.config.conversation_ttl * 86_400_000)
            try:
                purged = await conversations.purge(cutoff)
                if purged:
                    log.info("purged %d conversation(s) past CLAUDE_CONVERSATION_TTL", purged)
            except Exception as exc:
                log.warning("purging old conversations failed: %s", type(exc).__name__)
            await asyncio.sleep(3600)

    async def _sweep_stalled_readers(self) -> None:
        """Let go of readers whose client stopped reading: after ``CLAUDE_SEND_TIMEOUT``
        seconds on one write, the response task is cancelled, so the stream is no longer held
        (its resume grace starts, as for any departed reader). The connection itself stays
        Hypercorn's until the client or the OS closes it (a proxy's ``send_timeout`` does)."""
        timeout = self.config.send_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.25, timeout / 4))
            for reader in self.store.stalled_readers(loop.time() - timeout):
                if reader.task is not None and not reader.task.done():
                    log.info("a client stopped reading for %ss: letting its stream go", timeout)
                    reader.task.cancel()

    async def drain(self) -> None:
        """Refuse new streams. With Redis, hand open ones to other workers (this worker's
        readers get a retryable ``shutdown`` event that says to resume); in memory, end them
        with a retryable ``shutdown`` error event."""
        store = self.store
        if not self.draining:
            verb = "handing off" if store.hands_off else "ending"
            log.info("draining: %s %d open stream(s)", verb, len(self.producers))
        self.draining = True
        store.closing.set()  # readers of other workers' streams end too
        for stream in store.live():
            stream.cancel(Cancel.HANDOFF if store.hands_off else Cancel.SHUTDOWN)
        if self.producers:
            await asyncio.wait(list(self.producers.tasks), timeout=self.config.shutdown_grace)
        await store.hand_off()

    async def shutdown(self) -> None:
        await self.drain()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.upstreams.close()
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        if self.turns.conversations is not None:
            await self.turns.conversations.close()
        if self.rate_limiter is not None:
            await self.rate_limiter.aclose()
        await self.store.close()


def _create_store(config: ClaudeConfig) -> StreamStore:
    timings = Timings(
        ttl=config.stream_ttl, resume_grace=config.resume_grace, lease=config.stream_lease
    )
    limits = {"max_finished": config.max_finished_streams, "max_bytes": config.max_finished_bytes}
    if config.stream_store == "memory":
        return memory_store(timings, **limits)
    from .redis_store import redis_store

    return redis_store(config.stream_store, timings, max_takeovers=config.max_takeovers, **limits)


def _chat_key(identity: str | None, chat_id: str) -> str:
    return hashlib.sha256(f"{identity or ''}\x00{chat_id}".encode()).hexdigest()


def _metrics(config: ClaudeConfig) -> Metrics:
    """The app's Prometheus metrics, their series for every allowed model created at 0."""
    metrics = metrics_for(ClaudeConfig.key("metrics"))
    models = dict.fromkeys((config.model, *config.allowed_models))
    metrics.prepare(models, ERROR_CLASSES, config.provider)
    directory = metrics.multiprocess_dir
    if directory is not None and not any(
        entry.name.endswith(f"_{os.getpid()}.db") for entry in os.scandir(directory)
    ):  # prometheus_client chose its mode on import, before the variable was set
        raise ConfigError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported, so this process "
            f"does not write to {directory!r}: set it in the environment the server starts with"
        )
    return metrics


def create_state(
    extension: Extension,
    extensions: dict[str, Any],
    app_config: Any,
    options: dict[str, Any],
    tracer_provider: TracerProvider | None,
) -> ClaudeState:
    """The checks and the state every front end's ``init_app`` begins with."""
    if EXTENSION_KEY in extensions:
        raise RuntimeError("Claude is already registered on this app; call init_app once per app.")
    config = load_config(options, app_config)
    for endpoint in endpoints(config):
        require_extra(endpoint)  # fails at init_app, naming the extra to install
    first_party = any(e.provider == "anthropic" for e in endpoints(config))
    if first_party and not config.api_key:
        raise missing_api_key()
    if config.api_key:
        register_secret(config.api_key)
    for name in CREDENTIAL_ENV:  # the cloud credential chains' secrets, where they are set
        register_secret(os.environ.get(name))
    for token in config.api_tokens:
        register_secret(token)
    for url in (config.database_url, config.stream_store):  # their passwords: never logged
        password = re.search(r"://[^:/@]*:([^@]+)@", url or "")
        register_secret(password.group(1) if password else None)
    install_redaction()
    state = ClaudeState(extension, config, tracer_provider)
    extensions[EXTENSION_KEY] = state
    return state


AppT = TypeVar("AppT")
F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=TurnHook)
#: ``@claude.budget``: an identity's budget (a CLAUDE_BUDGET string, several, or None)
B = TypeVar("B", bound=BudgetHook)
IG = TypeVar("IG", bound=InputGuard)
OG = TypeVar("OG", bound=OutputGuard)


class ExtensionBase(Generic[AppT]):
    """What both front ends' ``Claude`` share: the options, the ``authorize`` hook, the
    tracer provider, and the lookup of an app's state. A front end adds ``init_app``."""

    def __init__(
        self,
        app: AppT | None = None,
        *,
        authorize: Authorize | None = None,
        tracer_provider: TracerProvider | None = None,
        engine: AsyncEngine | None = None,
        **options: Any,
    ) -> None:
        self._options = options
        self.authorize_hook = authorize
        self.tools: ToolBox = ToolBox()
        self.tracer_provider = tracer_provider
        self.engine = engine
        self.turn_hooks: list[TurnHook] = []
        self.budget_hook: BudgetHook | None = None
        self.input_guard_hook: InputGuard | None = None
        self.output_guard_hook: OutputGuard | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: AppT) -> None:
        raise NotImplementedError

    def authorize(self, hook: Authorize) -> Authorize:
        """Decorate the function that, given the request, returns who is asking (any value;
        ``str()`` of it is the identity) or None to refuse with a 401. Quart awaits an
        ``async def`` one; Flask calls it in the request thread (an ``async def`` one
        through Flask's ``ensure_sync``).

        The identity decides who may use the chat routes, who owns a stream (only the same
        identity may read or stop it; anyone else gets 404), and the rate-limit key.
        ``/health``, ``/ready`` and the client script stay open.
        """
        self.authorize_hook = hook
        return hook

    def on_turn(self, hook: H) -> H:
        """Decorate a function (sync or async) called once per finished turn, after the turn
        is stored, with a :class:`~quart_claude.Turn`: who asked, the conversation and
        message ids (with conversations on), the request's messages, the answer's content
        blocks, the stop reason, the status (``complete``, ``partial``, ``cancelled``,
        ``error``) and the usage. It runs in the producer (a sync one in a thread), on
        whichever worker finished the turn; what it raises is logged, never streamed."""
        self.turn_hooks.append(hook)
        return hook

    def budget(self, hook: B) -> B:
        """Decorate the function (sync or async) that, given an identity, returns its budget:
        a ``CLAUDE_BUDGET`` string (``"50000 tokens/day"``), a sequence of them, or None for
        unlimited. It decides over ``CLAUDE_BUDGET``, on every request."""
        self.budget_hook = hook
        return hook

    def input_guard(self, hook: IG) -> IG:
        """Decorate the function (sync or async) that looks at each send before anything is
        reserved or sent to Claude, given an :class:`~quart_claude.InputCheck` (who asked,
        the conversation, the messages with the new user turn last). It returns None to let
        the send through, or returns (or raises) :class:`~quart_claude.Blocked` to refuse it:
        a 400 ``{"error": "blocked", "reason", "message"}``, on every chat route. One that
        raises anything else, or outlasts ``CLAUDE_GUARD_TIMEOUT``, refuses
        (``guard_error``)."""
        self.input_guard_hook = hook
        return hook

    def output_guard(self, hook: OG) -> OG:
        """Decorate the function (sync or async) that looks at the answer as it streams,
        given an :class:`~quart_claude.OutputCheck` each ``CLAUDE_OUTPUT_GUARD_EVERY``
        characters and once more before ``done`` (``final``). A
        :class:`~quart_claude.Blocked` ends the answer with ``stop_reason: "blocked"``.
        ``CLAUDE_OUTPUT_GUARD_MODE``: ``cut`` (text flows as it comes; a block closes the
        request) or ``hold`` (readers get only text the guard passed)."""
        self.output_guard_hook = hook
        return hook

    @overload
    def tool(
        self,
        function: F,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        show: Show = "full",
    ) -> F: ...

    @overload
    def tool(
        self,
        function: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        show: Show = "full",
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        function: F | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        show: Show = "full",
    ) -> F | Callable[[F], F]:
        """Decorate a function (sync or async) the model may call; it runs on the server.

        Its input schema comes from its signature (pydantic; ``Annotated[int, Field(ge=1,
        description=...)]`` refines it), its description from its docstring (or
        ``description``). ``timeout``: seconds (default ``CLAUDE_TOOL_TIMEOUT``). ``show``:
        what readers see, ``"full"`` (input and output), ``"hidden"`` (the name only) or a
        function of the output returning a summary. A parameter annotated
        :class:`ToolContext` receives who asked. Raises ValueError at once for a function
        that cannot be a tool. The function is returned unchanged.
        """

        def register(fn: F) -> F:
            self.tools.register(fn, name=name, description=description, timeout=timeout, show=show)
            return fn

        return register(function) if function is not None else register

    def _create_state(self, extensions: dict[str, Any], app_config: Any) -> ClaudeState:
        state = create_state(self, extensions, app_config, self._options, self.tracer_provider)
        state.engine = self.engine
        if self.engine is not None:  # conversations on: the body's fields are theirs
            state.body_model = chat_body_model(state.config, conversations=True)
        state.auth.secret_key = app_config.get("SECRET_KEY")
        if state.auth.anonymous and not state.auth.secret_key:
            del extensions[EXTENSION_KEY]
            raise ConfigError(
                "SECRET_KEY is not set: with conversations on (CLAUDE_DATABASE_URL) and no "
                "auth (CLAUDE_API_TOKENS or an authorize hook), each browser's conversations "
                "are its own through a cookie signed with the app's SECRET_KEY"
            )
        return state


def state_of(extensions: Mapping[str, Any]) -> ClaudeState:
    """The state registered in an app's ``extensions``, or a RuntimeError saying how to fix it."""
    try:
        state: ClaudeState = extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "Claude is not registered on this app; did you forget Claude(app) or "
            "claude.init_app(app)?"
        ) from None
    return state


def _shallow(record: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, not copied: a store encodes it at once (asdict's deep
    copy of every message was most of a stream's registration)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
