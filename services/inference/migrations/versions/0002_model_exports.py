"""Model exports requested over the API (``POST /v1/model-exports``).

Revision ID: inference_0002
Revises: inference_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "inference_0002"
down_revision = "inference_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_model_exports",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("model_uri", sa.String(length=512), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_inference_model_exports_status", "inference_model_exports", ["status"])


def downgrade() -> None:
    op.drop_index("ix_inference_model_exports_status", table_name="inference_model_exports")
    op.drop_table("inference_model_exports")
