"""Catalogue tables of the ingest service.

Revision ID: ingest_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_patients")),
        sa.UniqueConstraint("pseudonym", name=op.f("uq_ingest_patients_pseudonym")),
    )
    op.create_table(
        "ingest_pull_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("pacs", sa.String(length=64), nullable=False),
        sa.Column("query", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("studies_found", sa.Integer(), nullable=False),
        sa.Column("instances_stored", sa.Integer(), nullable=False),
        sa.Column("instances_failed", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_pull_jobs")),
    )
    op.create_table(
        "ingest_reidentification",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("original", sa.String(length=128), nullable=False),
        sa.Column("date_offset_days", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_reidentification")),
        sa.UniqueConstraint("kind", "pseudonym", name=op.f("uq_ingest_reidentification_kind")),
    )
    op.create_index(op.f("ix_ingest_reidentification_original"), "ingest_reidentification", ["original"], unique=False)
    op.create_table(
        "ingest_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("study_description", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["ingest_patients.id"], name=op.f("fk_ingest_studies_patient_id_ingest_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_ingest_studies_study_instance_uid")),
    )
    op.create_index(op.f("ix_ingest_studies_patient_id"), "ingest_studies", ["patient_id"], unique=False)
    op.create_index(op.f("ix_ingest_studies_study_date"), "ingest_studies", ["study_date"], unique=False)
    op.create_table(
        "ingest_series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=256), nullable=True),
        sa.Column("manufacturer", sa.String(length=128), nullable=True),
        sa.Column("site", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("non_volumetric_reason", sa.Text(), nullable=True),
        sa.Column("volumes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["ingest_studies.id"], name=op.f("fk_ingest_series_study_id_ingest_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_ingest_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_ingest_series_modality"), "ingest_series", ["modality"], unique=False)
    op.create_index(op.f("ix_ingest_series_study_id"), "ingest_series", ["study_id"], unique=False)
    op.create_table(
        "ingest_instances",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("object_key", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dicom_json", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"], ["ingest_series.id"], name=op.f("fk_ingest_instances_series_id_ingest_series")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_ingest_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_ingest_instances_series_id"), "ingest_instances", ["series_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ingest_instances_series_id"), table_name="ingest_instances")
    op.drop_table("ingest_instances")
    op.drop_index(op.f("ix_ingest_series_study_id"), table_name="ingest_series")
    op.drop_index(op.f("ix_ingest_series_modality"), table_name="ingest_series")
    op.drop_table("ingest_series")
    op.drop_index(op.f("ix_ingest_studies_study_date"), table_name="ingest_studies")
    op.drop_index(op.f("ix_ingest_studies_patient_id"), table_name="ingest_studies")
    op.drop_table("ingest_studies")
    op.drop_index(op.f("ix_ingest_reidentification_original"), table_name="ingest_reidentification")
    op.drop_table("ingest_reidentification")
    op.drop_table("ingest_pull_jobs")
    op.drop_table("ingest_patients")
