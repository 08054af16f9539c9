"""A host app written as a user would; served by the ``hypercorn`` CLI in tests."""

import logging
import os

from quart import Quart, Response

from quart_claude import Claude

if os.environ.get("HOST_APP_LOG"):  # the extension's INFO lines, for tests that read them
    logging.basicConfig(level=os.environ["HOST_APP_LOG"])

app = Quart(__name__)
Claude(app)


@app.after_request
async def which_worker(response: Response) -> Response:
    response.headers["X-Worker-PID"] = str(os.getpid())  # lets tests see cross-worker resumes
    return response


@app.get("/")
async def index() -> str:
    return "the host app's own page"
