"""A Flask host app written as a user would: ``app`` (configured by ``CLAUDE_*`` variables)
is what Gunicorn and ``flask run`` serve in tests; ``create_app(**options)`` builds the same
app with keyword options, for the in-thread WSGI server of the server tier."""

import os
from typing import Any

from flask import Flask, Response, current_app

from quart_claude.flask import Claude


def create_app(**options: Any) -> Flask:
    """``input_guard``, ``output_guard``: registered as a user's decorators would."""
    app = Flask(__name__)
    input_guard = options.pop("input_guard", None)
    output_guard = options.pop("output_guard", None)
    claude = Claude(app, **options)
    if input_guard is not None:
        claude.input_guard(input_guard)
    if output_guard is not None:
        claude.output_guard(output_guard)

    @claude.tool
    def stock_level(sku: str) -> dict[str, object]:
        """Units of a product in stock (a sync tool, as a Flask app writes them)."""
        return {"sku": sku, "units": 7, "worker": os.getpid(), "app": current_app.name}

    @app.after_request
    def which_worker(response: Response) -> Response:
        response.headers["X-Worker-PID"] = str(os.getpid())  # lets tests see cross-worker resumes
        return response

    @app.get("/")
    def index() -> str:
        return "the host app's own page"

    return app


def __getattr__(name: str) -> Any:
    """``tests.flask_host_app:app``, built from the environment on first use (so importing
    this module for ``create_app`` configures nothing)."""
    if name != "app":
        raise AttributeError(name)
    app = create_app()
    globals()["app"] = app
    return app
