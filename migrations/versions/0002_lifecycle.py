"""Job lifecycle: attempts history, dependencies, cron slots, idempotency keys, progress,
artifacts and per-job timeouts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import JSON_TEXT, TIMESTAMP

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("timeout", sa.Float))
    op.add_column("jobs", sa.Column("progress_fraction", sa.Float))
    op.add_column("jobs", sa.Column("progress_message", sa.Text))
    op.add_column("jobs", sa.Column("progress_updated_at", TIMESTAMP))
    op.add_column("jobs", sa.Column("artifacts", JSON_TEXT))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_table(
        "attempts",
        sa.Column(
            "job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("outcome", sa.Text),
        sa.Column("error_type", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("exit_code", sa.Integer),
    )
    op.create_table(
        "dependencies",
        sa.Column(
            "job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column(
            "depends_on", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
    )
    op.create_index("ix_dependencies_depends_on", "dependencies", ["depends_on"])
    op.create_table(
        "schedules",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("last_slot", TIMESTAMP, nullable=False),
        sa.Column("last_job_id", sa.Text),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("body_hash", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("schedules")
    op.drop_index("ix_dependencies_depends_on", "dependencies")
    op.drop_table("dependencies")
    op.drop_table("attempts")
    op.drop_index("ix_jobs_finished_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "artifacts",
            "progress_updated_at",
            "progress_message",
            "progress_fraction",
            "timeout",
        ):
            batch.drop_column(column)
