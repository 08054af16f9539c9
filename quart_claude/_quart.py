"""The Quart front end: ``Claude(app)`` registers a blueprint whose views translate Quart's
request into the routes of :mod:`._http` and their replies into Quart responses.

The streams, the SDK client and the store live on the app's own event loop, created in
``before_serving`` and closed in ``after_serving``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Quart, Response, current_app, request
from werkzeug.exceptions import HTTPException

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
from ._core.state import ClaudeState, ExtensionBase, state_of
from ._shutdown import ShutdownHooks

if TYPE_CHECKING:
    pass

__all__ = ["Claude"]

log = logging.getLogger("quart_claude")


class Claude(ExtensionBase[Quart]):
    """The extension. ``Claude(app)`` or, for app factories, ``claude.init_app(app)``.

    Keyword options use the config names without the ``CLAUDE_`` prefix, lowercased:
    ``Claude(app, model="claude-opus-5", max_retries=5)``. They win over ``app.config``,
    which wins over environment variables. ``tracer_provider``: the OpenTelemetry provider
    the streams' spans go to (default: the global one, as OTel instrumentations do).
    """

    def init_app(self, app: Quart) -> None:
        state = self._create_state(app.extensions, app.config)
        blueprint = _blueprint(state)
        config = state.config
        if config.cors_origins:  # for the blueprint's routes only, never the host app's
            from quart_cors import cors

            origins = "*" if "*" in config.cors_origins else list(config.cors_origins)
            cors(
                blueprint,
                allow_origin=origins,
                allow_headers=CORS_ALLOW_HEADERS,
                allow_methods=CORS_METHODS,
                expose_headers=CORS_EXPOSE_HEADERS,
                max_age=CORS_MAX_AGE,
            )
        app.register_blueprint(blueprint, url_prefix=config.url_prefix or None)
        if state.conversations_on:  # `flask claude db upgrade` / `quart claude db upgrade`
            from .migrate import cli_group

            app.cli.add_command(cli_group(lambda: config.database_url))
        hooks: list[ShutdownHooks] = []

        async def startup() -> None:
            await state.startup()
            if config.handle_signals:
                hooks.append(ShutdownHooks(state.drain))
                hooks[-1].install(asyncio.get_running_loop())

        async def shutdown() -> None:
            await state.drain()
            while hooks:
                hooks.pop().uninstall()
            await state.shutdown()

        app.before_serving(startup)
        app.after_serving(shutdown)

    @staticmethod
    def state(app: Quart | None = None) -> ClaudeState:
        """The state of ``app`` (default: the current app)."""
        return state_of(app.extensions if app is not None else current_app.extensions)


# -- the blueprint -------------------------------------------------------------------------


async def _read_body(limit: int) -> bytes:
    """The body, streamed with our limit (Quart's is fixed per app)."""
    parts: list[bytes] = []
    size = 0
    async for part in request.body:
        size += len(part)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body may be at most {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _view(state: ClaudeState, route: Route) -> Callable[..., Awaitable[Response]]:
    handler = route.answer

    async def authorize() -> str | None:
        identity = state.auth.check_token(request.headers.get("Authorization"))
        hook = state.auth.hook
        if hook is not None:
            identity = state.auth.hook_identity(await current_app.ensure_async(hook)(request))
        return identity

    async def view(**params: str) -> Response:
        req = HttpRequest(
            method=request.method,
            headers=request.headers,
            args=request.args,
            remote_addr=request.remote_addr,
            mimetype=request.mimetype,
            content_length=request.content_length,
            read_body=_read_body,
            authorize=authorize,
            path_params=params,
            cookies=request.cookies,
            secure=request.scheme == "https",
        )
        return _response(await handler(state, req))

    return view


def _response(reply: Reply) -> Response:
    response = Response(reply.body, status=reply.status, headers=reply.headers)
    if reply.streaming:
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would silently stall long streams
    return response


def _fixed(reply: Reply) -> Callable[..., Awaitable[Response]]:
    async def view(**_: Any) -> Response:
        return _response(reply)

    return view


async def _http_error(error: HTTPException) -> Response:
    """Errors Quart raises inside our views (a body it refused, say) answer JSON too."""
    name = (error.name or "error").lower().replace(" ", "_")
    return _response(json_error(error.code or 500, name, error.description or name))


async def _internal_error(error: Exception) -> Response:
    log.error("unexpected error in %s %s", request.method, request.path, exc_info=error)
    return _response(json_error(500, "internal_error", "an unexpected error occurred"))


def _blueprint(state: ClaudeState) -> Blueprint:
    blueprint = Blueprint("claude", __name__)
    routes = routes_for(state)
    for route in routes:
        blueprint.add_url_rule(
            route.path, route.endpoint, _view(state, route), methods=list(route.methods)
        )
    for index, (path, others, reply) in enumerate(method_not_allowed(routes)):
        blueprint.add_url_rule(path, f"method_not_allowed_{index}", _fixed(reply), methods=others)
    blueprint.register_error_handler(HTTPException, _http_error)
    blueprint.register_error_handler(Exception, _internal_error)
    return blueprint
