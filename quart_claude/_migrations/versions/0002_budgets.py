"""Budgets' counts and holds, and the usage ledger.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claude_budget_windows",
        sa.Column("identity", sa.String(256), nullable=False),
        sa.Column("window", sa.String(64), nullable=False),
        sa.Column("used_tokens", sa.BigInteger, nullable=False),
        sa.Column("used_micro_usd", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("identity", "window", name="claude_budget_windows_pk"),
    )
    op.create_table(
        "claude_budget_holds",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("identity", sa.String(256), nullable=False),
        sa.Column("window", sa.String(64), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("micro_usd", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", "window", name="claude_budget_holds_pk"),
    )
    op.create_index("claude_budget_holds_window", "claude_budget_holds", ["identity", "window"])
    op.create_table(
        "claude_usage_ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("identity", sa.String(256), nullable=False),
        sa.Column("stream_id", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("conversation_id", sa.String(32)),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("thinking_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_5m_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_1h_tokens", sa.BigInteger, nullable=False),
        sa.Column("web_search_requests", sa.Integer, nullable=False),
        sa.Column("web_fetch_requests", sa.Integer, nullable=False),
        sa.Column("cost_micro_usd", sa.BigInteger, nullable=False),
    )
    op.create_index("claude_usage_ledger_identity_at", "claude_usage_ledger", ["identity", "at"])
    op.create_table(
        "claude_usage_days",
        sa.Column("identity", sa.String(256), nullable=False),
        sa.Column("day", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("micro_usd", sa.BigInteger, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("identity", "day", name="claude_usage_days_pk"),
    )


def downgrade() -> None:
    op.drop_table("claude_usage_days")
    op.drop_table("claude_usage_ledger")
    op.drop_table("claude_budget_holds")
    op.drop_table("claude_budget_windows")
