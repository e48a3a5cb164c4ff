"""The ids of pruned jobs, for a while: a reader of a pruned job is told ``410 Gone``
(with when it was pruned) instead of a ``404`` that looks like a typo.  Written in the
pruner's delete transaction; forgotten after ``[jobs] pruned_memory``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import TIMESTAMP

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pruned_jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text),
        sa.Column("pruned_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_pruned_jobs_pruned_at", "pruned_jobs", ["pruned_at"])


def downgrade() -> None:
    op.drop_index("ix_pruned_jobs_pruned_at", "pruned_jobs")
    op.drop_table("pruned_jobs")
