"""Views for admins reading the file with sqlite3: jobs_running, jobs_failed_recent,
task_summary (see docs/admin.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# SQLite: times are ISO 8601 text in UTC; julianday() turns them into days.
VIEWS = {
    "jobs_running": """
        CREATE VIEW jobs_running AS
        SELECT id, task, started_at,
               round((julianday('now') - julianday(started_at)) * 86400.0, 1)
                   AS running_seconds,
               attempts, pid,
               cancel_requested_at IS NOT NULL AS cancel_requested,
               priority, args
        FROM jobs
        WHERE state = 'running'
        ORDER BY started_at
    """,
    "jobs_failed_recent": """
        CREATE VIEW jobs_failed_recent AS
        SELECT id, task, finished_at, attempts, error_type, error, exit_code,
               round((julianday(finished_at) - julianday(started_at)) * 86400.0, 1)
                   AS duration_seconds,
               args
        FROM jobs
        WHERE state = 'failed'
          AND finished_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')
        ORDER BY finished_at DESC
    """,
    "task_summary": """
        CREATE VIEW task_summary AS
        SELECT task,
               count(*) AS total,
               sum(state = 'queued') AS queued,
               sum(state = 'running') AS running,
               sum(state = 'succeeded') AS succeeded,
               sum(state = 'failed') AS failed,
               sum(state = 'cancelled') AS cancelled,
               round(100.0 * sum(state = 'succeeded')
                     / nullif(sum(state IN ('succeeded', 'failed')), 0), 1)
                   AS success_percent,
               round(avg(CASE WHEN state = 'succeeded' THEN
                     (julianday(finished_at) - julianday(started_at)) * 86400.0 END), 1)
                   AS avg_seconds,
               max(peak_rss) AS max_peak_rss,
               max(finished_at) AS last_finished_at
        FROM jobs
        GROUP BY task
        ORDER BY task
    """,
}


# PostgreSQL: the same views over timestamptz columns.
POSTGRESQL_VIEWS = {
    "jobs_running": """
        CREATE VIEW jobs_running AS
        SELECT id, task, started_at,
               round(extract(epoch FROM now() - started_at)::numeric, 1) AS running_seconds,
               attempts, pid,
               cancel_requested_at IS NOT NULL AS cancel_requested,
               priority, args
        FROM jobs
        WHERE state = 'running'
        ORDER BY started_at
    """,
    "jobs_failed_recent": """
        CREATE VIEW jobs_failed_recent AS
        SELECT id, task, finished_at, attempts, error_type, error, exit_code,
               round(extract(epoch FROM finished_at - started_at)::numeric, 1)
                   AS duration_seconds,
               args
        FROM jobs
        WHERE state = 'failed' AND finished_at >= now() - interval '1 day'
        ORDER BY finished_at DESC
    """,
    "task_summary": """
        CREATE VIEW task_summary AS
        SELECT task,
               count(*) AS total,
               count(*) FILTER (WHERE state = 'queued') AS queued,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
               round(100.0 * count(*) FILTER (WHERE state = 'succeeded')
                     / nullif(count(*) FILTER (WHERE state IN ('succeeded', 'failed')), 0), 1)
                   AS success_percent,
               round(avg(extract(epoch FROM finished_at - started_at))
                     FILTER (WHERE state = 'succeeded')::numeric, 1) AS avg_seconds,
               max(peak_rss) AS max_peak_rss,
               max(finished_at) AS last_finished_at
        FROM jobs
        GROUP BY task
        ORDER BY task
    """,
}


def upgrade() -> None:
    views = VIEWS if op.get_bind().dialect.name == "sqlite" else POSTGRESQL_VIEWS
    for sql in views.values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
