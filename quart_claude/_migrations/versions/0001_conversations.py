"""Conversations and their messages.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claude_conversations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("title", sa.String(200)),
        sa.Column("leaf_id", sa.String(32)),
        sa.Column("active_stream_id", sa.String(64)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "claude_conversations_owner_updated",
        "claude_conversations",
        ["owner", "updated_at", "id"],
    )
    op.create_table(
        "claude_messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "conversation_id",
            sa.String(32),
            sa.ForeignKey("claude_conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("parent_id", sa.String(32)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stream_id", sa.String(64)),
        sa.Column("client_message_id", sa.String(128)),
        sa.Column("model", sa.String(128)),
        sa.Column("stop_reason", sa.String(64)),
        sa.Column("usage", sa.JSON),
        sa.Column("fence", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint(
            "conversation_id", "client_message_id", name="claude_messages_client_id"
        ),
    )
    op.create_index(
        "claude_messages_conversation", "claude_messages", ["conversation_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("claude_messages")
    op.drop_table("claude_conversations")
