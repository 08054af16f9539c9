"""Alembic's environment for quart-claude's own revisions: our tables, our version table
(``claude_alembic_version``), never the host's. Run through ``quart_claude.migrate``."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from quart_claude._core.tables import VERSION_TABLE, metadata


def _migrate(connection: Any) -> None:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = context.config.attributes.get("engine") or create_async_engine(
        context.config.attributes["url"]
    )
    async with engine.connect() as connection:
        await connection.run_sync(_migrate)
        await connection.commit()
    if "engine" not in context.config.attributes:
        await engine.dispose()


asyncio.run(_main())
