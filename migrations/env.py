"""Alembic environment: jobserver passes the connection in (``store.migrate``)."""

from __future__ import annotations

from alembic import context

from jobserver.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `jobserver migrate`, which opens the database")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
