"""The store on real SQLite files: schema, compare-and-set transitions, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from jobserver.errors import InvalidTransition, NotFound, ServerLocked
from jobserver.jobs import JobError, JobState, format_timestamp, new_job_id, parse_timestamp, utcnow
from jobserver.store import (
    QUEUE_HEAD_SQL,
    DatabaseLock,
    Finish,
    NewJob,
    Store,
    metadata,
    migrate,
    migrations_dir,
)

pytestmark = pytest.mark.anyio


async def insert(store: Store, task: str = "t", priority: int = 0) -> str:
    job = await store.insert(NewJob(task, {"x": 1}, priority, 0), new_job_id(), utcnow())
    return job.id


def test_migrations_match_the_models(database: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def test_migrate_is_idempotent_and_uses_wal(database: Path) -> None:
    migrate(database)
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        heads = ScriptDirectory(str(migrations_dir())).get_heads()
        assert len(heads) == 1  # one chain of migrations
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(heads[0],)]


def test_queue_head_reads_through_its_indexes_in_order(database: Path) -> None:
    # Ready jobs through ix_jobs_ready in priority order, due delayed jobs through a range
    # of ix_jobs_delayed in run_after order: no scan of the table, no sort, and never a
    # walk over jobs that are not due (issue 6).
    with sqlite3.connect(database) as db:
        rows = db.execute(
            f"EXPLAIN QUERY PLAN {QUEUE_HEAD_SQL}", {"limit": 10, "now": "2026"}
        ).fetchall()
    plan = " | ".join(row[-1] for row in rows)
    assert "SCAN jobs USING INDEX ix_jobs_ready" in plan
    assert "SEARCH jobs USING INDEX ix_jobs_delayed (run_after>? AND run_after<?)" in plan
    assert "TEMP B-TREE" not in plan
    assert "SCAN jobs |" not in plan + " |"


async def test_delayed_jobs_ahead_in_the_queue_are_not_read_until_due(store: Store) -> None:
    now = utcnow()
    later = NewJob("t", {}, 9, 0, run_after=now + timedelta(hours=1))
    for _ in range(300):  # more than the head's limit, all ahead of the ready job by priority
        await store.insert(later, new_job_id(), now)
    ready = await insert(store, priority=0)
    due_job = NewJob("t", {}, 5, 0, run_after=now - timedelta(seconds=1))
    due = (await store.insert(due_job, new_job_id(), now - timedelta(seconds=2))).id
    head = await store.queue_head(200, now)
    assert [entry.id for entry in head] == [due, ready]
    assert head[0].ready_since == parse_timestamp(format_timestamp(now - timedelta(seconds=1)))
    # Once due, the delayed ones come first (higher priority), in priority then age order;
    # the ready job with the lowest priority is behind the first 200.
    head = await store.queue_head(200, now + timedelta(hours=2))
    assert len(head) == 200 and ready not in {entry.id for entry in head}
    assert head == sorted(head, key=lambda entry: (-entry.priority, entry.id))


def test_schema_rejects_impossible_rows(database: Path) -> None:
    with sqlite3.connect(database) as db:
        insert_sql = (
            "INSERT INTO jobs (id, task, args, state, created_at, finished_at) "
            "VALUES (?, 't', ?, ?, '2026-01-01T00:00:00.000Z', ?)"
        )
        for values in [
            ("a", "{}", "bogus", None),
            ("b", "{}", "succeeded", None),  # terminal without finished_at
            ("c", "{}", "queued", "2026-01-01T00:00:00.000Z"),  # finished_at while queued
            ("d", "not json", "queued", None),
        ]:
            with pytest.raises(sqlite3.IntegrityError):
                db.execute(insert_sql, values)


async def test_insert_and_get_roundtrip(store: Store) -> None:
    job_id = await insert(store)
    job = await store.get(job_id)
    assert job.state is JobState.QUEUED and job.args == {"x": 1} and job.attempts == 0
    with pytest.raises(NotFound):
        await store.get("01ZZZZZZZZZZZZZZZZZZZZZZZZ")


async def test_claim_is_compare_and_set(store: Store) -> None:
    job_id = await insert(store)
    results = await asyncio.gather(*(store.claim(job_id, utcnow()) for _ in range(5)))
    claimed = [job for job in results if job is not None]
    assert len(claimed) == 1 and claimed[0].attempts == 1
    assert claimed[0].state is JobState.RUNNING


async def test_finish_only_from_running(store: Store) -> None:
    job_id = await insert(store)
    assert await store.finish(job_id, Finish(JobState.SUCCEEDED, result=1), utcnow()) is None
    await store.claim(job_id, utcnow())
    done = await store.finish(job_id, Finish(JobState.SUCCEEDED, result={"ok": True}), utcnow())
    assert done is not None and done.result == {"ok": True} and done.finished_at is not None
    # Terminal states never change.
    assert await store.finish(job_id, Finish(JobState.FAILED), utcnow()) is None
    assert await store.requeue(job_id, reason="x") is None
    with pytest.raises(InvalidTransition):
        await store.request_cancel(job_id, utcnow())
    assert (await store.get(job_id)).state is JobState.SUCCEEDED


async def test_requeue_counts_failures_and_rescues(store: Store) -> None:
    job_id = await insert(store)
    await store.claim(job_id, utcnow())
    later = utcnow() + timedelta(hours=1)
    job = await store.requeue(
        job_id, reason="retry", run_after=later, error=JobError("E", "boom"), failed=True
    )
    assert job is not None and job.failures == 1 and job.rescues == 0 and job.error is not None
    assert await store.queue_head(10, utcnow()) == []  # not before run_after
    assert [j.id for j in await store.queue_head(10, later)] == [job_id]
    await store.claim(job_id, later)
    job = await store.requeue(job_id, reason="rescued", rescued=True)
    assert job is not None and job.failures == 1 and job.rescues == 1 and job.attempts == 2


async def test_cancel_queued_at_once_running_by_flag(store: Store) -> None:
    queued = await insert(store)
    assert (await store.request_cancel(queued, utcnow())).state is JobState.CANCELLED
    running = await insert(store)
    await store.claim(running, utcnow())
    flagged = await store.request_cancel(running, utcnow())
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert await store.cancel_requested() == {running}


async def test_queue_head_order_priority_then_age(store: Store) -> None:
    low = await insert(store, priority=0)
    high = await insert(store, priority=5)
    low2 = await insert(store, priority=0)
    assert [job.id for job in await store.queue_head(10, utcnow())] == [high, low, low2]


async def test_concurrent_writes_never_fail_as_locked(store: Store) -> None:
    ids = await asyncio.gather(*(insert(store) for _ in range(200)))
    assert len(set(ids)) == 200
    await asyncio.gather(*(store.claim(job_id, utcnow()) for job_id in ids[:100]))
    assert (await store.active_counts()) == {"queued": 100, "running": 100}


async def test_writes_continue_while_an_admin_reads(store: Store, database: Path) -> None:
    admin = sqlite3.connect(database, isolation_level=None)
    admin.execute("BEGIN")
    admin.execute("SELECT count(*) FROM jobs").fetchall()  # holds a read snapshot
    try:
        for _ in range(20):
            await insert(store)
    finally:
        admin.execute("COMMIT")
        admin.close()
    assert (await store.active_counts())["queued"] == 20


async def test_writes_wait_for_an_admin_write(store: Store, database: Path) -> None:
    admin = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    admin.execute("BEGIN IMMEDIATE")
    admin.execute("UPDATE jobs SET priority = priority")

    def release() -> None:
        time.sleep(0.5)
        admin.execute("COMMIT")

    thread = threading.Thread(target=release)
    thread.start()
    try:
        await insert(store)  # waits on busy_timeout instead of failing
    finally:
        thread.join()
        admin.close()
    assert (await store.active_counts())["queued"] == 1


def test_one_server_per_database(tmp_path: Path) -> None:
    first = DatabaseLock(tmp_path / "x.db")
    first.acquire()
    try:
        with pytest.raises(ServerLocked, match=r"pid \d+"):
            DatabaseLock(tmp_path / "x.db").acquire()
    finally:
        first.release()
    again = DatabaseLock(tmp_path / "x.db")
    again.acquire()
    again.release()


async def test_queue_head_is_the_same_on_the_event_loop_and_the_pooled_path(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler reads the head on the event loop's own connection (issue 6); when
    # that connection cannot answer, the pooled path must give the same jobs.
    now = utcnow()
    parent = await store.insert(NewJob("t", {}, 0, 0), new_job_id(), now)
    ids = [await insert(store, priority=p) for p in (0, 5, 5, 1)]
    delayed = NewJob("t", {"later": True}, 9, 0, run_after=now + timedelta(hours=1))
    await store.insert(delayed, new_job_id(), now)
    dependent = NewJob("t", {}, 9, 0, depends_on=(parent.id,))
    await store.submit(dependent, new_job_id(), now)  # waits for parent: not in the head
    fast = await store.queue_head(10, utcnow())
    assert [job.id for job in fast] == [ids[1], ids[2], ids[3], parent.id, ids[0]]
    monkeypatch.setattr(store, "_fast_rows", lambda sql, parameters: None)
    assert await store.queue_head(10, utcnow()) == fast
