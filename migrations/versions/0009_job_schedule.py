"""The schedule that fired a job, and the slot it fired for: kept for the job's whole
life (its ``reason`` changes with every transition, so it could not keep them).

Jobs fired before this revision have neither.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import TIMESTAMP

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: SQLite adds the columns in place, no table rebuild.
    op.add_column("jobs", sa.Column("schedule", sa.Text))
    op.add_column("jobs", sa.Column("schedule_slot", TIMESTAMP))


def downgrade() -> None:
    # In place (SQLite 3.35+ and PostgreSQL): a rebuild of jobs would fail on its views.
    op.execute("ALTER TABLE jobs DROP COLUMN schedule_slot")
    op.execute("ALTER TABLE jobs DROP COLUMN schedule")
