"""Tables of the preprocessing service: candidate cases, dataset builds and versions, precompute jobs.

Revision ID: preprocessing_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "preprocessing_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "preprocessing_builds",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version_id", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preprocessing_builds")),
    )
    op.create_table(
        "preprocessing_cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection", sa.String(length=128), nullable=False),
        sa.Column("case_id", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("patient", sa.String(length=128), nullable=False),
        sa.Column("site", sa.String(length=128), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("image_key", sa.String(length=512), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("label_key", sa.String(length=512), nullable=True),
        sa.Column("label_sha256", sa.String(length=64), nullable=True),
        sa.Column("case_hash", sa.String(length=64), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preprocessing_cases")),
        sa.UniqueConstraint("collection", "case_id", name=op.f("uq_preprocessing_cases_collection")),
        sa.UniqueConstraint("source", name=op.f("uq_preprocessing_cases_source")),
    )
    op.create_index(op.f("ix_preprocessing_cases_collection"), "preprocessing_cases", ["collection"], unique=False)
    op.create_index(op.f("ix_preprocessing_cases_patient"), "preprocessing_cases", ["patient"], unique=False)
    op.create_table(
        "preprocessing_dataset_versions",
        sa.Column("version_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("manifest_key", sa.String(length=512), nullable=False),
        sa.Column("spec_name", sa.String(length=200), nullable=False),
        sa.Column("preprocessing_hash", sa.String(length=64), nullable=False),
        sa.Column("case_count", sa.Integer(), nullable=False),
        sa.Column("excluded_count", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("site_counts", sa.JSON(), nullable=False),
        sa.Column("split_names", sa.JSON(), nullable=False),
        sa.Column("qc_report", sa.JSON(), nullable=False),
        sa.Column("build_config", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version_id", name=op.f("pk_preprocessing_dataset_versions")),
    )
    op.create_index(
        op.f("ix_preprocessing_dataset_versions_name"), "preprocessing_dataset_versions", ["name"], unique=False
    )
    op.create_table(
        "preprocessing_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("version_id", sa.String(length=32), nullable=False),
        sa.Column("pipeline_hash", sa.String(length=64), nullable=False),
        sa.Column("case_ids", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("computed", sa.Integer(), nullable=False),
        sa.Column("cached", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["preprocessing_dataset_versions.version_id"],
            name=op.f("fk_preprocessing_jobs_version_id_preprocessing_dataset_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preprocessing_jobs")),
    )
    op.create_index(op.f("ix_preprocessing_jobs_version_id"), "preprocessing_jobs", ["version_id"], unique=False)
    op.create_table(
        "preprocessing_version_cases",
        sa.Column("version_id", sa.String(length=32), nullable=False),
        sa.Column("case_id", sa.String(length=200), nullable=False),
        sa.Column("case_hash", sa.String(length=64), nullable=False),
        sa.Column("patient", sa.String(length=128), nullable=False),
        sa.Column("site", sa.String(length=128), nullable=False),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["preprocessing_dataset_versions.version_id"],
            name=op.f("fk_preprocessing_version_cases_version_id_preprocessing_dataset_versions"),
        ),
        sa.PrimaryKeyConstraint("version_id", "case_id", name=op.f("pk_preprocessing_version_cases")),
    )
    op.create_index(
        op.f("ix_preprocessing_version_cases_case_hash"), "preprocessing_version_cases", ["case_hash"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_preprocessing_version_cases_case_hash"), table_name="preprocessing_version_cases")
    op.drop_table("preprocessing_version_cases")
    op.drop_index(op.f("ix_preprocessing_jobs_version_id"), table_name="preprocessing_jobs")
    op.drop_table("preprocessing_jobs")
    op.drop_index(op.f("ix_preprocessing_dataset_versions_name"), table_name="preprocessing_dataset_versions")
    op.drop_table("preprocessing_dataset_versions")
    op.drop_index(op.f("ix_preprocessing_cases_patient"), table_name="preprocessing_cases")
    op.drop_index(op.f("ix_preprocessing_cases_collection"), table_name="preprocessing_cases")
    op.drop_table("preprocessing_cases")
    op.drop_table("preprocessing_builds")
