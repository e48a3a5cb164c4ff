"""The node that claimed each attempt: every write about an attempt compares (node,
attempt), so a late write about an attempt that is over changes nothing.

On SQLite one server owns every row: its node is ``local``, and the rows of jobs that an
older version left running become that node's, for its start-up rescue.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: SQLite adds the columns in place, no table rebuild.
    op.add_column("jobs", sa.Column("node", sa.Text))
    op.add_column("attempts", sa.Column("node", sa.Text))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE jobs SET node = 'local' WHERE state = 'running'")


def downgrade() -> None:
    # In place (SQLite 3.35+ and PostgreSQL): a rebuild of jobs would fail on its views.
    op.execute("ALTER TABLE attempts DROP COLUMN node")
    op.execute("ALTER TABLE jobs DROP COLUMN node")
