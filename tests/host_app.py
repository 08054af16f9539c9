"""A host app written as a user would; served by the ``hypercorn`` CLI in tests."""

import asyncio
import logging
import os

from quart import Quart, Response

from quart_claude import Blocked, Claude, OutputCheck

if os.environ.get("HOST_APP_LOG"):  # the extension's INFO lines, for tests that read them
    logging.basicConfig(level=os.environ["HOST_APP_LOG"])

app = Quart(__name__)
if os.environ.get("HOST_APP_SECRET_KEY"):  # conversations without auth: the anonymous cookie
    app.config["SECRET_KEY"] = os.environ["HOST_APP_SECRET_KEY"]
claude = Claude(app)


def _note(line: str) -> None:
    """Each tool run, for tests that count them across processes (``HOST_APP_TOOL_LOG``)."""
    path = os.environ.get("HOST_APP_TOOL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{line} {os.getpid()}\n")


@claude.tool
async def fast_lookup(key: str) -> str:
    """Looks a key up at once."""
    _note(f"fast {key}")
    return f"fast value of {key}"


@claude.tool
async def slow_lookup(key: str) -> str:
    """Looks a key up, slowly."""
    _note(f"slow-start {key}")
    await asyncio.sleep(float(os.environ.get("HOST_APP_SLOW_TOOL", "3")))
    _note(f"slow-done {key}")
    return f"slow value of {key}"


@claude.on_turn
def kept(turn: object) -> None:
    """Each finished turn, for tests that count them across processes (``HOST_APP_TURN_LOG``)."""
    path = os.environ.get("HOST_APP_TURN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{getattr(turn, 'message_id', None)} {getattr(turn, 'status', None)}\n")


if os.environ.get("HOST_APP_GUARD_WORD"):  # an output guard, for the takeover tests

    @claude.output_guard
    def guard(check: OutputCheck) -> Blocked | None:
        """Refuses the window holding ``HOST_APP_GUARD_WORD``; notes each window it sees
        (``HOST_APP_GUARD_LOG``, a JSON line each)."""
        import json

        path = os.environ.get("HOST_APP_GUARD_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"pid": os.getpid(), "new": check.new}) + "\n")
        return Blocked("word") if os.environ["HOST_APP_GUARD_WORD"] in check.new else None


@app.after_request
async def which_worker(response: Response) -> Response:
    response.headers["X-Worker-PID"] = str(os.getpid())  # lets tests see cross-worker resumes
    return response


@app.get("/")
async def index() -> str:
    return "the host app's own page"
