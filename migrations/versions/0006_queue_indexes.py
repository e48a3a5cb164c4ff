"""Queue indexes that keep delayed jobs out of the scheduler's way: the jobs that may run
now (no run_after) by priority then age, and the delayed ones by run_after.  Without
them every scheduler wake walked every delayed job queued ahead of the first ready one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        [sa.text("priority DESC"), "id"],
        sqlite_where=sa.text("state = 'queued' AND run_after IS NULL"),
        postgresql_where=sa.text("state = 'queued' AND run_after IS NULL"),
    )
    op.create_index(
        "ix_jobs_delayed",
        "jobs",
        ["run_after"],
        sqlite_where=sa.text("state = 'queued' AND run_after IS NOT NULL"),
        postgresql_where=sa.text("state = 'queued' AND run_after IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_delayed", "jobs")
    op.drop_index("ix_jobs_ready", "jobs")
