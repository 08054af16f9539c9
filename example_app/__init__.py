"""The example app: a chat page streaming Claude through quart-claude.

With no API key (``ANTHROPIC_API_KEY`` / ``CLAUDE_API_KEY``) it runs in demo mode: an
emulator of the Anthropic API starts inside the app, on a free loopback port, and answers.
Serve it with ``python -m example_app`` or ``hypercorn example_app:app``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from quart import Quart, Response

from quart_claude import Claude
from quart_claude.testing import Emulator

__all__ = ["app", "create_app", "demo_storage", "order_status", "page"]

log = logging.getLogger("example_app")
#: demo mode's budget per visitor (CLAUDE_BUDGET overrides it)
DEMO_BUDGET = "200000 tokens/day"
_PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")


def page(demo: bool, prefix: str, conversations: bool = False) -> str:
    """The chat page (both front ends serve it); with ``conversations``, the server keeps
    the chats (a list, edit, regenerate, branches) instead of the browser."""
    return (
        _PAGE.replace("{{DEMO}}", "true" if demo else "false")
        .replace("{{CONVERSATIONS}}", "true" if conversations else "false")
        .replace("{{PREFIX}}", prefix)
    )


def demo_storage(instance: str) -> dict[str, Any]:
    """Demo mode's defaults: conversations in SQLite in the app's instance folder, and a
    SECRET_KEY kept there (the anonymous cookie survives a restart). Set
    ``CLAUDE_DATABASE_URL`` to use another database, or ``EXAMPLE_CONVERSATIONS=0`` for
    browser-held history."""
    if os.environ.get("EXAMPLE_CONVERSATIONS", "1") == "0":
        return {}
    folder = Path(instance)
    key_file = folder / "secret_key"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            key_file.write_text(secrets.token_urlsafe(32))
            key_file.chmod(0o600)
    except OSError as exc:  # a read-only image, say: the browser keeps the history then
        log.warning("demo mode: no conversations (%s is not writable: %s)", folder, exc)
        return {}
    url = os.environ.get("CLAUDE_DATABASE_URL") or f"sqlite+aiosqlite:///{folder / 'chat.db'}"
    return {"database_url": url, "secret_key": key_file.read_text().strip()}


async def order_status(order_id: str) -> dict[str, str]:
    """Look up an order of the example shop by its id."""
    return {"order_id": order_id, "status": "shipped", "carrier": "Example Post"}


def create_app(**claude_options: Any) -> Quart:
    """The app; ``claude_options`` go to ``Claude(app, ...)`` (tests point it at an emulator)."""
    app = Quart(__name__)
    demo = not (
        claude_options.get("api_key")
        or os.environ.get("CLAUDE_API_KEY")
        or os.environ.get("ANTHROPIC_API_KEY")
    )
    if demo:
        # Bind now, so the URL is known before the extension reads its config; serve the
        # emulator on this socket once the app's event loop runs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        emulator = Emulator(token_delay=float(os.environ.get("DEMO_TOKEN_DELAY", "0.03")))

        @app.before_serving
        async def start_emulator() -> None:
            await emulator.start_on(sock)
            log.warning(
                "demo mode: no API key set, answering from the emulator at %s", emulator.url
            )

        @app.after_serving
        async def stop_emulator() -> None:
            await emulator.stop()

        storage = demo_storage(os.environ.get("EXAMPLE_INSTANCE_PATH") or app.instance_path)
        if storage:
            app.config["SECRET_KEY"] = storage.pop("secret_key")
        if not os.environ.get("CLAUDE_BUDGET"):  # the page shows what is left of it
            storage["budget"] = DEMO_BUDGET
        claude = Claude(app, api_key="demo-key", base_url=f"http://127.0.0.1:{port}", **storage)
    else:
        claude = Claude(app, **claude_options)

    # the example's tool: ask "what is the order status of A-17?" (in demo mode, the
    # emulator calls a tool whose name the prompt says)
    claude.tool(order_status)
    state = Claude.state(app)
    html = page(demo, state.config.url_prefix, state.conversations_on)

    @app.get("/")
    async def index() -> Response:
        return Response(html, content_type="text/html; charset=utf-8")

    return app


app = create_app()
