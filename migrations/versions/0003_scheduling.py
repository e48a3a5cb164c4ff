"""Resource-aware scheduling: measured task runs, and pressure requeues per job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import TIMESTAMP

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("pressure_requeues", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "task_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("peak_rss", sa.Integer, nullable=False),
        sa.Column("cpu_seconds", sa.Float, nullable=False),
        sa.Column("wall_seconds", sa.Float, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_task_runs_task_id", "task_runs", ["task", "id"])


def downgrade() -> None:
    op.drop_table("task_runs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pressure_requeues")
