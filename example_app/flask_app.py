"""The example app on Flask: the same chat page and routes, from ``quart_claude.flask``.

``python -m example_app --flask`` serves it with Flask's development server; in production,
``gunicorn -c deploy/gunicorn.conf.py example_app.flask_app:app``. With no API key it runs in
demo mode: the emulator answers from a thread of its own, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any

from flask import Flask, Response

from quart_claude.flask import Claude
from quart_claude.testing import Emulator

from . import DEMO_BUDGET, demo_storage, order_status, page

__all__ = ["create_app"]

log = logging.getLogger("example_app")


def _emulator_thread() -> str:
    """Serve an emulator from a daemon thread; its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    emulator = Emulator(token_delay=float(os.environ.get("DEMO_TOKEN_DELAY", "0.03")))

    async def serve() -> None:
        await emulator.start_on(sock)
        await emulator.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), name="emulator", daemon=True).start()
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def create_app(**claude_options: Any) -> Flask:
    """The Flask app; ``claude_options`` go to ``Claude(app, ...)``."""
    app = Flask(__name__)
    demo = not (
        claude_options.get("api_key")
        or os.environ.get("CLAUDE_API_KEY")
        or os.environ.get("ANTHROPIC_API_KEY")
    )
    if demo:
        url = _emulator_thread()
        log.warning("demo mode: no API key set, answering from the emulator at %s", url)
        storage = demo_storage(os.environ.get("EXAMPLE_INSTANCE_PATH") or app.instance_path)
        if storage:
            app.config["SECRET_KEY"] = storage.pop("secret_key")
        if not os.environ.get("CLAUDE_BUDGET"):  # the page shows what is left of it
            storage["budget"] = DEMO_BUDGET
        claude_options = {"api_key": "demo-key", "base_url": url, **storage}
    Claude(app, **claude_options).tool(order_status)
    state = Claude.state(app)
    html = page(demo, state.config.url_prefix, state.conversations_on)

    @app.get("/")
    def index() -> Response:
        return Response(html, content_type="text/html; charset=utf-8")

    return app


_made: dict[str, Flask] = {}


def __getattr__(name: str) -> Any:
    """``app``, made on first use (``gunicorn example_app.flask_app:app``), so importing the module
    for ``create_app`` starts nothing and writes nothing."""
    if name != "app":
        raise AttributeError(name)
    if "app" not in _made:
        _made["app"] = create_app()
    return _made["app"]
