"""API tokens expire and may be scoped to a project (issue 14).

Tokens created before this revision keep ``expires_at`` NULL (no expiry): revoke and re-create them to give
them one (docs/security.md).

Revision ID: shared_0002
Revises: shared_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "shared_0002"
down_revision = "shared_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("project", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("project")
        batch.drop_column("expires_at")
