"""The example app: a chat page streaming Claude through quart-claude.

With no API key (``ANTHROPIC_API_KEY`` / ``CLAUDE_API_KEY``) it runs in demo mode: an
emulator of the Anthropic API starts inside the app, on a free loopback port, and answers.
Serve it with ``python -m example_app`` or ``hypercorn example_app:app``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from quart import Quart, Response

from quart_claude import Claude
from quart_claude.testing import Emulator

__all__ = ["app", "create_app", "order_status", "page"]

log = logging.getLogger("example_app")
_PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")


def page(demo: bool, prefix: str) -> str:
    """The chat page (both front ends serve it)."""
    return _PAGE.replace("{{DEMO}}", "true" if demo else "false").replace("{{PREFIX}}", prefix)


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

        claude = Claude(app, api_key="demo-key", base_url=f"http://127.0.0.1:{port}")
    else:
        claude = Claude(app, **claude_options)

    # the example's tool: ask "what is the order status of A-17?" (in demo mode, the
    # emulator calls a tool whose name the prompt says)
    claude.tool(order_status)
    html = page(demo, Claude.state(app).config.url_prefix)

    @app.get("/")
    async def index() -> Response:
        return Response(html, content_type="text/html; charset=utf-8")

    return app


app = create_app()
