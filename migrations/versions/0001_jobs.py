"""The jobs table.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from jobserver.store.schema import JSON_TEXT, TIMESTAMP

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("args", JSON_TEXT, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("run_after", TIMESTAMP),
        sa.Column("started_at", TIMESTAMP),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_retries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rescues", sa.Integer, nullable=False, server_default="0"),
        sa.Column("result", JSON_TEXT),
        sa.Column("error_type", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("cancel_requested_at", TIMESTAMP),
        sa.Column("pid", sa.Integer),
        sa.Column("pid_started_at", sa.Float),
        sa.Column("exit_code", sa.Integer),
        sa.Column("peak_rss", sa.Integer),
        sa.Column("cpu_seconds", sa.Float),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_jobs_state",
        ),
        sa.CheckConstraint(
            "(state IN ('cancelled', 'failed', 'succeeded')) = (finished_at IS NOT NULL)",
            name="ck_jobs_finished_at",
        ),
        # SQLite stores JSON as text and checks it; PostgreSQL's json type checks itself.
        *(
            [
                sa.CheckConstraint("json_valid(args)", name="ck_jobs_args_json"),
                sa.CheckConstraint(
                    "result IS NULL OR json_valid(result)", name="ck_jobs_result_json"
                ),
            ]
            if op.get_bind().dialect.name == "sqlite"
            else []
        ),
    )
    op.create_index("ix_jobs_queue", "jobs", ["state", sa.text("priority DESC"), "id"])
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_index("ix_jobs_task_id", "jobs", ["task", "id"])


def downgrade() -> None:
    op.drop_table("jobs")
