"""The body of every component's Alembic ``env.py`` (each is a two-line file that calls :func:`run`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine


def run() -> None:
    config = context.config
    version_table = config.attributes["version_table"]
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        context.configure(connection=connection, version_table=version_table, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
