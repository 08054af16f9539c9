"""``python -m example_app``: serve the example app with Hypercorn on 127.0.0.1:$PORT;
``python -m example_app --flask``: the Flask version, with Flask's development server."""

from __future__ import annotations

import logging
import os
import sys


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    port = int(os.environ.get("PORT", "8000"))
    if "--flask" in sys.argv[1:]:
        from .flask_app import app as flask_app

        flask_app.run(host="127.0.0.1", port=port, threaded=True)
        return
    from quart_claude.serving import run

    from . import app

    run(app, host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
