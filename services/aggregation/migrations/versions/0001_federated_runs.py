"""Federated runs, rounds, per-site dispatches and received updates.

Revision ID: aggregation_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "aggregation_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federated_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("dataset_version", sa.String(length=64), nullable=False),
        sa.Column("sites", sa.JSON(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("local_epochs", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("fedprox_mu", sa.Float(), nullable=False),
        sa.Column("server_optimizer", sa.JSON(), nullable=False),
        sa.Column("min_sites", sa.Integer(), nullable=False),
        sa.Column("round_timeout_seconds", sa.Float(), nullable=False),
        sa.Column("privacy", sa.JSON(), nullable=True),
        sa.Column("training_config", sa.JSON(), nullable=False),
        sa.Column("initial_weights_key", sa.String(length=1024), nullable=True),
        sa.Column("evaluate", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("model_version", sa.String(length=32), nullable=True),
        sa.Column("poll_task_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federated_runs")),
    )
    op.create_table(
        "federated_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("dispatched", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("num_updates", sa.Integer(), nullable=False),
        sa.Column("total_samples", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("noise_std", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["federated_runs.id"],
            name=op.f("fk_federated_rounds_run_id_federated_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federated_rounds")),
        sa.UniqueConstraint("run_id", "round", name=op.f("uq_federated_rounds_run_id")),
    )
    op.create_table(
        "federated_round_sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("attempt_id", sa.String(length=160), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("update_norm", sa.Float(), nullable=True),
        sa.Column("weights_key", sa.String(length=1024), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["federated_runs.id"],
            name=op.f("fk_federated_round_sites_run_id_federated_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federated_round_sites")),
        sa.UniqueConstraint("attempt_id", name=op.f("uq_federated_round_sites_attempt_id")),
        sa.UniqueConstraint("run_id", "round", "site", name=op.f("uq_federated_round_sites_run_id")),
    )
    op.create_table(
        "federated_site_updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("attempt_id", sa.String(length=160), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("etag", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["federated_runs.id"],
            name=op.f("fk_federated_site_updates_run_id_federated_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federated_site_updates")),
        sa.UniqueConstraint("run_id", "key", "etag", name=op.f("uq_federated_site_updates_run_id")),
    )
    op.create_index(op.f("ix_federated_runs_status"), "federated_runs", ["status"], unique=False)
    op.create_index(op.f("ix_federated_rounds_run_id"), "federated_rounds", ["run_id"], unique=False)
    op.create_index(op.f("ix_federated_round_sites_run_id"), "federated_round_sites", ["run_id"], unique=False)
    op.create_index(op.f("ix_federated_site_updates_run_id"), "federated_site_updates", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_table("federated_site_updates")
    op.drop_table("federated_round_sites")
    op.drop_table("federated_rounds")
    op.drop_table("federated_runs")
