"""Shared tables: api_tokens, audit_events, dead_letters.

Revision ID: shared_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "shared_0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("occurred_at", TS, nullable=False, index=True),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(200)),
        sa.Column("role", sa.String(32)),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("object_uids", sa.JSON, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("client", sa.String(128)),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("service", sa.String(64), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), nullable=False, unique=True),
        sa.Column("task_name", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(200)),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("kwargs", sa.JSON, nullable=False),
        sa.Column("exception_type", sa.String(200), nullable=False),
        sa.Column("exception_message", sa.Text, nullable=False),
        sa.Column("traceback", sa.Text, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("failed_at", TS, nullable=False),
        sa.Column("requeued_at", TS),
        sa.Column("requeued_task_id", sa.String(64)),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
