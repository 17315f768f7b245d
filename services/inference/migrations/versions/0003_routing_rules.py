"""Routing rules (``/v1/routing-rules``): completed series segmented automatically.

Revision ID: inference_0003
Revises: inference_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "inference_0003"
down_revision = "inference_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_routing_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part_examined", sa.String(length=64), nullable=True),
        sa.Column("series_description_pattern", sa.String(length=256), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("site", sa.String(length=128), nullable=True),
        sa.Column("model_alias", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=512), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("inference_routing_rules")
