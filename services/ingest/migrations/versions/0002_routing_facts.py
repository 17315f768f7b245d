"""What inference's routing rules match on besides the catalogue: the AE title that C-STOREd an instance and
the series description as sent (de-identification removes it from the stored instances).

Revision ID: ingest_0002
Revises: ingest_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ingest_instances", sa.Column("calling_ae_title", sa.String(length=16), nullable=True))
    op.add_column("ingest_series", sa.Column("routing_description", sa.String(length=256), nullable=True))


def downgrade() -> None:
    op.drop_column("ingest_series", "routing_description")
    op.drop_column("ingest_instances", "calling_ae_title")
