"""The conversation tables' migrations: Alembic revisions shipped in the package, with their
own version table (``claude_alembic_version``), so they never touch the host's.

    python -m quart_claude db upgrade [--url URL]     (default: CLAUDE_DATABASE_URL)
    flask claude db upgrade / quart claude db upgrade (the app's configured URL)

A host that runs its own Alembic autogenerate passes :func:`quart_claude.db.include_object`
to ``context.configure`` so it never tries to drop these tables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["cli_group", "upgrade"]

_SCRIPTS = Path(__file__).parent / "_migrations"


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` (an async SQLAlchemy URL) up to ``revision``."""
    try:
        from alembic import command
        from alembic.config import Config
    except ImportError:
        raise SystemExit("the migrations need Alembic: pip install 'quart-claude[db]'") from None
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["url"] = url  # never through the ini parser (a password may hold %)
    command.upgrade(config, revision)


def cli_group(url_of: Any) -> Any:
    """``claude db upgrade`` for a Flask or Quart app's CLI; ``url_of()`` gives the URL."""
    import click

    @click.group("claude", help="quart-claude's commands.")
    def claude() -> None:
        pass

    @claude.group("db", help="The conversation tables.")
    def db() -> None:
        pass

    @db.command("upgrade", help="Create or update the conversation tables.")
    def upgrade_command() -> None:
        url = url_of()
        if not url:
            raise click.UsageError("CLAUDE_DATABASE_URL is not set")
        upgrade(url)
        click.echo("quart-claude: the conversation tables are up to date")

    return claude


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m quart_claude")
    sub = parser.add_subparsers(dest="group", required=True)
    db = sub.add_parser("db", help="the conversation tables")
    db_sub = db.add_subparsers(dest="command", required=True)
    up = db_sub.add_parser("upgrade", help="create or update them")
    up.add_argument("--url", default=os.environ.get("CLAUDE_DATABASE_URL"))
    up.add_argument("--revision", default="head")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("give --url or set CLAUDE_DATABASE_URL")
    upgrade(args.url, args.revision)
    print("quart-claude: the conversation tables are up to date")
