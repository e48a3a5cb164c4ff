"""Who submitted each job: the ``owner`` column (a token name) and its index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: SQLite adds it in place, no table rebuild.
    op.add_column("jobs", sa.Column("owner", sa.Text))
    op.create_index("ix_jobs_owner_id", "jobs", ["owner", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
