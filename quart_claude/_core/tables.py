"""Our tables, in our own ``MetaData`` (never the host's model base), each ``claude_``-prefixed:
the conversations (:mod:`.db`) and the budgets' counts and usage ledger (:mod:`.ledger_sql`).
The shipped migrations create exactly these."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

__all__ = [
    "VERSION_TABLE",
    "budget_holds",
    "budget_windows",
    "conversations",
    "messages",
    "metadata",
    "usage_days",
    "usage_ledger",
]

#: Our tables' own metadata (never the host's): what the shipped migrations create.
metadata: MetaData = MetaData()

conversations = Table(
    "claude_conversations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(256), nullable=False),
    Column("title", String(200)),
    Column("leaf_id", String(32)),  # the last message of the branch readers see
    Column("active_stream_id", String(64)),  # the turn streaming now (one at a time)
    Column("created_at", BigInteger, nullable=False),  # milliseconds since the epoch, UTC
    Column("updated_at", BigInteger, nullable=False),
    Index("claude_conversations_owner_updated", "owner", "updated_at", "id"),
)

messages = Table(
    "claude_messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column(
        "conversation_id",
        String(32),
        ForeignKey("claude_conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("parent_id", String(32)),  # None: the first message; siblings are branches
    Column("role", String(16), nullable=False),  # user | assistant
    #: user: the content; assistant: {"messages": [API messages], "view": [reader blocks]}
    Column("content", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # streaming|complete|partial|cancelled|error
    Column("stream_id", String(64)),
    Column("client_message_id", String(128)),
    Column("model", String(128)),
    Column("stop_reason", String(64)),
    Column("usage", JSON),
    Column("fence", Integer, nullable=False, default=0),  # a takeover raises it
    Column("created_at", BigInteger, nullable=False),
    Index("claude_messages_conversation", "conversation_id", "created_at"),
    UniqueConstraint("conversation_id", "client_message_id", name="claude_messages_client_id"),
)

#: Alembic's version table for our revisions (never the host's ``alembic_version``).
VERSION_TABLE: str = "claude_alembic_version"

#: one row per identity and budget period: what was spent in it (holds are apart)
budget_windows = Table(
    "claude_budget_windows",
    metadata,
    Column("identity", String(256), nullable=False),
    Column("window", String(64), nullable=False),  # "<period>:<start, epoch seconds>"
    Column("used_tokens", BigInteger, nullable=False),
    Column("used_micro_usd", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),  # ms: the period's end and a day
    PrimaryKeyConstraint("identity", "window", name="claude_budget_windows_pk"),
)

#: the reservations of requests in flight, each with its expiry (a dead worker's lapse)
budget_holds = Table(
    "claude_budget_holds",
    metadata,
    Column("id", String(32), nullable=False),
    Column("identity", String(256), nullable=False),
    Column("window", String(64), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("micro_usd", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),  # ms
    PrimaryKeyConstraint("id", "window", name="claude_budget_holds_pk"),
    Index("claude_budget_holds_window", "identity", "window"),
)

#: one row per upstream request: raw token counts (to reprice) and the cost
usage_ledger = Table(
    "claude_usage_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", BigInteger, nullable=False),  # ms
    Column("identity", String(256), nullable=False),
    Column("stream_id", String(64), nullable=False),
    Column("step", Integer, nullable=False),
    Column("model", String(128), nullable=False),
    Column("conversation_id", String(32)),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("thinking_tokens", BigInteger, nullable=False),
    Column("cache_read_tokens", BigInteger, nullable=False),
    Column("cache_write_5m_tokens", BigInteger, nullable=False),
    Column("cache_write_1h_tokens", BigInteger, nullable=False),
    Column("web_search_requests", Integer, nullable=False),
    Column("web_fetch_requests", Integer, nullable=False),
    Column("cost_micro_usd", BigInteger, nullable=False),
    Index("claude_usage_ledger_identity_at", "identity", "at"),
)

#: per identity and UTC day: the sums GET /usage shows
usage_days = Table(
    "claude_usage_days",
    metadata,
    Column("identity", String(256), nullable=False),
    Column("day", Integer, nullable=False),  # days since the epoch, UTC
    Column("tokens", BigInteger, nullable=False),
    Column("micro_usd", BigInteger, nullable=False),
    Column("requests", Integer, nullable=False),
    PrimaryKeyConstraint("identity", "day", name="claude_usage_days_pk"),
)
