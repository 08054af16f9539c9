"""A host app written as a user would; served by the ``hypercorn`` CLI in tests."""

from quart import Quart

from quart_claude import Claude

app = Quart(__name__)
Claude(app)


@app.get("/")
async def index() -> str:
    return "the host app's own page"
