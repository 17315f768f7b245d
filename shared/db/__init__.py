"""Database access: SQLAlchemy 2 models and engines, Alembic migrations per component."""
