"""Federated runs that keep their progress: site optimiser state and FedBN options, stopping on the global
validation Dice, the chosen round, and the test Dice per site and pooled.

Revision ID: aggregation_0002
Revises: aggregation_0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "aggregation_0002"
down_revision = "aggregation_0001"
branch_labels = None
depends_on = None

COLUMNS: list[sa.Column[Any]] = [
    # runs created before this revision behaved as "off" for both options: they keep that
    sa.Column("keep_optimizer_state", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("local_norm_layers", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("early_stopping", sa.JSON(), nullable=True),
    sa.Column("stopped_early", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("best_round", sa.Integer(), nullable=True),
    sa.Column("test_metrics", sa.JSON(), nullable=True),
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("federated_runs", column)


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("federated_runs", column.name)
