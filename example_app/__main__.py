"""``python -m example_app``: serve the example app with Hypercorn on 127.0.0.1:$PORT."""

from __future__ import annotations

import logging
import os

from quart_claude.serving import run

from . import app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    port = int(os.environ.get("PORT", "8000"))
    run(app, host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
