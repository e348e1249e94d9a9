"""Alembic's environment for the events table, driven by :mod:`bridge.migrations._run`.

Online, the runner hands over a SQLAlchemy connection in ``config.attributes["connection"]``;
offline (``migrate --sql``) the SQL is written to the config's output buffer and no database is
touched. Either way the version table is ours (``analytics_alembic_version``) and each revision
runs in its own transaction, so a revision that needs an autocommit block (CREATE INDEX
CONCURRENTLY) commits only what came before it.
"""

from __future__ import annotations

from alembic import context

from bridge.migrations import VERSION_TABLE
from bridge.schema import metadata


def _offline() -> None:
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _online() -> None:
    context.configure(
        connection=context.config.attributes["connection"],
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _offline()
else:
    _online()
