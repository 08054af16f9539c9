"""A Flask host app written as a user would; served by Gunicorn (gthread) in tests."""

import os

from flask import Flask, Response, current_app

from quart_claude.flask import Claude

app = Flask(__name__)
claude = Claude(app)


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
