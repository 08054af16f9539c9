"""The Flask front end: the same routes, configuration, event protocol and guarantees for a
plain WSGI Flask app (Gunicorn's ``gthread`` worker, or ``flask run``).

    from flask import Flask
    from quart_claude.flask import Claude

    app = Flask(__name__)
    Claude(app)

Per process, one daemon thread runs an asyncio event loop that hosts what the Quart front end
runs on its own loop: the producers, the SDK client, the store. It starts on the first request
(so after Gunicorn forks, ``--preload`` included) and drains at exit. A view answers in its
request thread: it asks the ``authorize`` hook there, runs the route (:mod:`._http`, shared
with Quart) on the loop, and returns a response whose generator takes the stream's encoded
events from a queue the loop fills: one put and one wake-up per burst of events, never a poll.
While the stream is silent the generator checks the client's socket every second, so a
departed client is noticed even before the next heartbeat fails to write.

On Gunicorn, add the hook in ``deploy/gunicorn.conf.py`` (``post_worker_init``) so a SIGTERM
drains open streams with the retryable ``shutdown`` event before the graceful timeout.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import queue
import signal
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from ._core.guards import Blocked, InputCheck, OutputCheck
from ._core.http import (
    CORS_ALLOW_HEADERS,
    CORS_EXPOSE_HEADERS,
    CORS_MAX_AGE,
    CORS_METHODS,
    HttpRequest,
    Reply,
    Route,
    json_error,
    method_not_allowed,
    routes_for,
)
from ._core.request import RequestError
from ._core.state import ClaudeState, ExtensionBase, Unauthorized, state_of
from ._core.tools import ToolContext
from ._core.turns import Turn

__all__ = [
    "Blocked",
    "Claude",
    "InputCheck",
    "OutputCheck",
    "ToolContext",
    "Turn",
    "post_worker_init",
]

log: logging.Logger = logging.getLogger("quart_claude")

#: While a stream is silent, how often (seconds) its generator checks that the client is there.
LIVENESS_INTERVAL = 1.0
_END = object()  # the stream's end, through the queue


class LoopThread:
    """One app's event loop in a daemon thread of this process, started on first use (a
    forked child starts its own) and stopped, after draining, at exit."""

    def __init__(self, state: ClaudeState) -> None:
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_started(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self.loop is None or self._pid != os.getpid():  # first use, or a forked child
                self._start()
            assert self.loop is not None
            return self.loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="quart-claude-loop", daemon=True)
        self._thread.start()
        ready.wait()
        asyncio.run_coroutine_threadsafe(self.state.startup(), loop).result()
        self.loop, self._pid = loop, os.getpid()
        _running.add(self)

    def call(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` on the loop and wait for its result in this thread."""
        return asyncio.run_coroutine_threadsafe(work, self.ensure_started()).result()

    def drain_soon(self) -> None:
        """Begin draining without waiting (safe in a signal handler)."""
        loop = self.loop
        if loop is not None and self._pid == os.getpid():
            loop.call_soon_threadsafe(lambda: loop.create_task(self.state.drain()))

    def stop(self) -> None:
        """Drain and shut down the state, then stop the loop (at exit)."""
        loop, self.loop = self.loop, None
        if loop is None or self._pid != os.getpid():
            return
        grace = self.state.config.shutdown_grace + 5
        try:
            asyncio.run_coroutine_threadsafe(self.state.shutdown(), loop).result(grace)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("the Claude backend did not shut down within %ss", grace)
        try:  # as asyncio.run ends: what is still pending is cancelled and let finish
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("tasks of the Claude backend's loop did not end when cancelled")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
            if not self._thread.is_alive():
                loop.close()  # its selector and self-pipe, not left to the collector


async def _cancel_the_rest() -> None:
    """Cancel every other task of this loop and wait for them (their ``finally`` blocks close
    what they hold: a Redis connection, a socket), then close its async generators."""
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


_running: weakref.WeakSet[LoopThread] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for runner in list(_running):
        runner.stop()


class Claude(ExtensionBase[Flask]):
    """The extension for Flask. ``Claude(app)`` or, for app factories,
    ``claude.init_app(app)``; the same keyword options, ``CLAUDE_*`` keys and routes as the
    Quart extension. The ``authorize`` hook is called in the request thread, with Flask's
    request (an ``async def`` hook goes through Flask's ``ensure_sync``).
    """

    def init_app(self, app: Flask) -> None:
        state = self._create_state(app.extensions, app.config)
        # tools run on the loop thread, outside any request: give them the app's context
        # (current_app, and what extensions such as Flask-SQLAlchemy need)
        state.tool_scope = app.app_context
        runner = LoopThread(state)
        app.extensions[_RUNNER_KEY] = runner
        blueprint = _blueprint(state, runner)
        config = state.config
        if config.cors_origins:  # for the blueprint's routes only, never the host app's
            try:
                from flask_cors import CORS
            except ImportError:
                from ._core.config_error import ConfigError

                raise ConfigError(
                    "CLAUDE_CORS_ORIGINS on Flask needs flask-cors: "
                    "pip install 'quart-claude[flask]'"
                ) from None
            CORS(
                blueprint,
                origins="*" if "*" in config.cors_origins else list(config.cors_origins),
                allow_headers=CORS_ALLOW_HEADERS,
                methods=CORS_METHODS,
                expose_headers=CORS_EXPOSE_HEADERS,
                max_age=CORS_MAX_AGE,
            )
        app.register_blueprint(blueprint, url_prefix=config.url_prefix or None)
        if state.conversations_on:  # `flask claude db upgrade` / `quart claude db upgrade`
            from .migrate import cli_group

            app.cli.add_command(cli_group(lambda: config.database_url))

    @staticmethod
    def state(app: Flask | None = None) -> ClaudeState:
        """The state of ``app`` (default: the current app)."""
        return state_of(app.extensions if app is not None else current_app.extensions)

    @staticmethod
    def loop_thread(app: Flask) -> LoopThread:
        """The thread that runs ``app``'s streams in this process."""
        runner: LoopThread = app.extensions[_RUNNER_KEY]
        return runner


_RUNNER_KEY = "claude.loop"


# -- Gunicorn ------------------------------------------------------------------------------

_hooked = False
_warned = False


def post_worker_init(worker: Any) -> None:
    """Gunicorn's ``post_worker_init`` hook: a SIGTERM to the worker (a graceful stop or
    restart) first ends every open stream of every app in it with the retryable ``shutdown``
    event, so the worker's requests finish within Gunicorn's graceful timeout. Use it in the
    Gunicorn config: ``from quart_claude.flask import post_worker_init``."""
    global _hooked
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        for runner in list(_running):
            runner.drain_soon()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    _hooked = True


def _warn_if_unhooked() -> None:
    """Say once, loudly, when Gunicorn serves streams without the drain hook."""
    global _warned
    if _hooked or _warned:
        return
    if request.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn"):
        _warned = True
        log.warning(
            "Gunicorn serves Claude streams without quart_claude.flask.post_worker_init: a "
            "SIGTERM will not end open streams with a retryable 'shutdown' event, and a "
            "restart cuts them; add it to your Gunicorn config (deploy/gunicorn.conf.py)"
        )


# -- the blueprint -------------------------------------------------------------------------


def _read_body(stream: Any, limit: int) -> bytes:
    """The body, read from the request's input stream with our limit."""
    parts: list[bytes] = []
    size = 0
    while True:
        part = stream.read(65536)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body may be at most {limit} bytes")
        parts.append(part)


def _view(state: ClaudeState, runner: LoopThread, route: Route) -> Callable[..., Response]:
    handler = route.answer

    def view(**params: str) -> Response:
        _warn_if_unhooked()
        identity: str | None = None
        refused: Unauthorized | None = None
        if route.asks_identity:  # the hook runs here, in Flask's request context
            try:
                identity = state.auth.check_token(request.headers.get("Authorization"))
                hook = state.auth.hook
                if hook is not None:
                    identity = state.auth.hook_identity(current_app.ensure_sync(hook)(request))
            except Unauthorized as error:
                refused = error

        async def authorize() -> str | None:
            if refused is not None:
                raise refused
            return identity

        wsgi_input = request.stream  # taken here: the request context is this thread's

        async def read_body(limit: int) -> bytes:  # blocking reads, off the loop
            return await asyncio.to_thread(_read_body, wsgi_input, limit)

        req = HttpRequest(
            method=request.method,
            headers=request.headers,
            args=request.args,
            remote_addr=request.remote_addr,
            mimetype=request.mimetype,
            content_length=request.content_length,
            read_body=read_body,
            authorize=authorize,
            path_params=params,
            cookies=request.cookies,
            secure=request.scheme == "https",
        )
        reply: Reply = runner.call(handler(state, req))
        if isinstance(reply.body, bytes):
            return Response(reply.body, status=reply.status, headers=reply.headers)
        client = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
        events = _relayed(runner, reply.body, client)
        return Response(events, status=reply.status, headers=reply.headers)

    return view


def _relayed(runner: LoopThread, body: AsyncIterator[bytes], client: Any) -> Iterator[bytes]:
    """The stream's chunks in the WSGI thread: a task on the loop reads them and puts them in
    a queue; this generator takes them out and yields them to the server. When the server
    closes it (a write failed) or the client's socket is found closed, the task is cancelled,
    which is what a departed reader is on Quart: the resume grace starts."""
    chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
    put = chunks.put

    async def pump() -> None:
        try:
            async for chunk in body:
                put(chunk)
        finally:
            put(_END)

    future = asyncio.run_coroutine_threadsafe(pump(), runner.ensure_started())
    get = chunks.get
    try:
        while True:
            try:
                chunk = get(timeout=LIVENESS_INTERVAL)
            except queue.Empty:
                if client is not None and _departed(client):
                    return
                continue
            if chunk is _END:
                future.result()  # a failure of the pump surfaces here, in the server's log
                return
            yield chunk
    finally:
        future.cancel()


def _departed(sock: socket.socket) -> bool:
    """Whether the client closed its connection (an orderly EOF or a reset): one
    non-blocking peek, whatever the descriptor's number."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):  # nothing to read: still there
        return False
    except ValueError:  # a TLS socket takes no recv flags: the next write tells instead
        return False
    except OSError:
        return True


def _plain(reply: Reply) -> Response:
    assert isinstance(reply.body, bytes)
    return Response(reply.body, status=reply.status, headers=reply.headers)


def _fixed(reply: Reply) -> Callable[..., Response]:
    def view(**_: Any) -> Response:
        return _plain(reply)

    return view


def _http_error(error: HTTPException) -> Response:
    name = (error.name or "error").lower().replace(" ", "_")
    return _plain(json_error(error.code or 500, name, error.description or name))


def _internal_error(error: Exception) -> Response:
    log.error("unexpected error in %s %s", request.method, request.path, exc_info=error)
    return _plain(json_error(500, "internal_error", "an unexpected error occurred"))


def _blueprint(state: ClaudeState, runner: LoopThread) -> Blueprint:
    blueprint = Blueprint("claude", __name__)
    routes = routes_for(state)
    for route in routes:
        blueprint.add_url_rule(
            route.path, route.endpoint, _view(state, runner, route), methods=list(route.methods)
        )
    for index, (path, others, reply) in enumerate(method_not_allowed(routes)):
        blueprint.add_url_rule(path, f"method_not_allowed_{index}", _fixed(reply), methods=others)
    blueprint.register_error_handler(HTTPException, _http_error)
    blueprint.register_error_handler(Exception, _internal_error)
    return blueprint
