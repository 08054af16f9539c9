"""The shipped Alembic revisions make exactly the tables the code uses, in their own version
table, and a host's autogenerate is told to leave them alone."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine

from quart_claude.db import VERSION_TABLE, include_object, metadata

pytestmark = pytest.mark.server


def test_the_migrations_make_the_tables_the_code_uses(tmp_path: Path) -> None:
    database = tmp_path / "migrated.db"
    subprocess.run(
        [sys.executable, "-m", "quart_claude", "db", "upgrade", "--url",
         f"sqlite+aiosqlite:///{database}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with contextlib.closing(sqlite3.connect(database)) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in rows}
    assert tables == {*metadata.tables, VERSION_TABLE}
    assert {"claude_conversations", "claude_budget_holds", "claude_usage_ledger"} <= tables
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            options = {"version_table": VERSION_TABLE}
            context = MigrationContext.configure(connection, opts=options)
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_a_hosts_autogenerate_leaves_our_tables_alone() -> None:
    host = MetaData()
    mine = Table("orders", host)
    assert include_object(mine, "orders", "table", False, None)
    for name in (*metadata.tables, VERSION_TABLE):
        assert not include_object(metadata.tables.get(name), name, "table", True, None)
    column = metadata.tables["claude_messages"].c.content
    assert not include_object(column, "content", "column", True, None)
