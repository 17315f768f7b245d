"""The training_config fields a run took from its dataset version's plan (issue 11, self-configuring plans).

Revision ID: aggregation_0003
Revises: aggregation_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "aggregation_0003"
down_revision = "aggregation_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # runs created before this revision took nothing from a plan
    op.add_column("federated_runs", sa.Column("plan_fields", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    op.drop_column("federated_runs", "plan_fields")
