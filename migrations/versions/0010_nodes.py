"""Nodes and their incarnations, and leases: what several ``jobserver serve`` processes
sharing one PostgreSQL database need to see each other alive, to declare a silent one
dead and to agree on one leader.

- ``jobs.incarnation``: the start of a node that claimed the current attempt (the
  fence is now (incarnation, attempt)).  Running rows get their node's name, an
  incarnation no live node has: on SQLite the one server's (``local``), whose start-up
  rescue takes them; on PostgreSQL the leader's rescue.
- ``nodes``: one row per incarnation (heartbeat, resources, definitions).
- ``leases``: named roles (the leader) held until a time on the database's clock.

SQLite gets the tables too (one schema history), and uses none but ``jobs.incarnation``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import JSON_TEXT, TIMESTAMP

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: SQLite adds the column in place, no table rebuild.
    op.add_column("jobs", sa.Column("incarnation", sa.Text))
    op.execute("UPDATE jobs SET incarnation = node WHERE state = 'running'")
    op.create_table(
        "nodes",
        sa.Column("incarnation", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.Column("dead_at", TIMESTAMP),
        sa.Column("url", sa.Text),
        sa.Column("resources", JSON_TEXT, nullable=False),
        sa.Column("definitions", JSON_TEXT, nullable=False),
        sa.Column("cordoned", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_nodes_name", "nodes", ["name"])
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_nodes_name", "nodes")
    op.drop_table("nodes")
    # In place (SQLite 3.35+ and PostgreSQL): a rebuild of jobs would fail on its views.
    op.execute("ALTER TABLE jobs DROP COLUMN incarnation")
