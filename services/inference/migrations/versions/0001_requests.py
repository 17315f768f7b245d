"""Segmentation requests of the inference service.

Revision ID: inference_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "inference_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source_kind", sa.String(length=32), nullable=False),
        sa.Column("source_ref", sa.String(length=2048), nullable=False),
        sa.Column("patient_ref", sa.String(length=64), nullable=True),
        sa.Column("model_alias", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=16), nullable=True),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("registry_uri", sa.String(length=512), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("voxels", sa.Integer(), nullable=True),
        sa.Column("mask_key", sa.String(length=512), nullable=True),
        sa.Column("seg_key", sa.String(length=512), nullable=True),
        sa.Column("findings_key", sa.String(length=512), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=True),
        sa.Column("pacs_status", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_seconds", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_requests")),
    )
    op.create_index(op.f("ix_inference_requests_status"), "inference_requests", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_inference_requests_status"), table_name="inference_requests")
    op.drop_table("inference_requests")
