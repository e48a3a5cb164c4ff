"""The store on real SQLite files: what is SQLite's own (schema checks, migrations, query
plans, an admin beside the server, the file lock).  The repository's behaviour on every
driver is in test_store_contract.py."""

from __future__ import annotations

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

from jobserver.errors import ServerLocked
from jobserver.jobs import JobState, format_timestamp, new_job_id, parse_timestamp, utcnow
from jobserver.store import (
    RESCUE,
    DatabaseLock,
    NewJob,
    Requeue,
    Store,
    metadata,
    migrate,
    migrations_dir,
    open_store,
)
from jobserver.store.driver import Compiler
from jobserver.store.repository import QUEUE_HEAD
from jobserver.store.sqlite import dialect
from tests.conftest import insert as submit

pytestmark = pytest.mark.anyio


async def insert(store: Store, task: str = "t", priority: int = 0) -> str:
    return (await submit(store, NewJob(task, {"x": 1}, priority, 0))).id


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
        sql, literals, positions = Compiler(dialect())(QUEUE_HEAD)
        values = {**literals, "limit": 10, "now": "2026"}
        rows = db.execute(
            f"EXPLAIN QUERY PLAN {sql}", [values[name] for name in positions or ()]
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
        await submit(store, later, now=now)
    ready = await insert(store, priority=0)
    due_job = NewJob("t", {}, 5, 0, run_after=now - timedelta(seconds=1))
    due = (await submit(store, due_job, now=now - timedelta(seconds=2))).id
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
    parent = await submit(store, NewJob("t", {}, 0, 0), now=now)
    ids = [await insert(store, priority=p) for p in (0, 5, 5, 1)]
    delayed = NewJob("t", {"later": True}, 9, 0, run_after=now + timedelta(hours=1))
    await submit(store, delayed, now=now)
    dependent = NewJob("t", {}, 9, 0, depends_on=(parent.id,))
    await store.submit(dependent, new_job_id(), now)  # waits for parent: not in the head
    fast = await store.queue_head(10, utcnow())
    assert [job.id for job in fast] == [ids[1], ids[2], ids[3], parent.id, ids[0]]
    # The reader thread's connection (the quick one made busy) answers the same.
    blocker = sqlite3.connect(store.driver.database, isolation_level=None)  # type: ignore[attr-defined]
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert await store.queue_head(10, utcnow()) == fast
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


async def test_a_file_of_the_previous_schema_upgrades_in_place(tmp_path: Path) -> None:
    """A database made at revision 0006 (before nodes) keeps its rows; the jobs it left
    running become the one server's, so its start-up rescue finds them."""
    from alembic import command
    from alembic.config import Config

    database = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["connection"] = conn
        command.upgrade(config, "0006")
        for job_id, state, finished in (
            ("01J0000000000000000000000A", "running", None),
            ("01J0000000000000000000000B", "queued", None),
            ("01J0000000000000000000000C", "succeeded", "2026-01-01T00:00:01.000Z"),
        ):
            conn.exec_driver_sql(
                "INSERT INTO jobs (id, task, args, state, created_at, started_at, "
                "finished_at, attempts) VALUES (?, 't', '{}', ?, '2026-01-01T00:00:00.000Z', "
                "'2026-01-01T00:00:00.500Z', ?, 1)",
                (job_id, state, finished),
            )
    engine.dispose()
    assert migrate(database) == ("0006", ScriptDirectory(str(migrations_dir())).get_current_head())
    with sqlite3.connect(database) as db:
        nodes = dict(db.execute("SELECT id, node FROM jobs").fetchall())
    assert nodes == {
        "01J0000000000000000000000A": "local",
        "01J0000000000000000000000B": None,
        "01J0000000000000000000000C": None,
    }
    store = open_store(database)
    try:
        assert [job.id for job in await store.running()] == ["01J0000000000000000000000A"]
        assert (await store.get("01J0000000000000000000000C")).state is JobState.SUCCEEDED
        change = await store.end_attempt(
            "01J0000000000000000000000A", 1, Requeue("rescued", counts=RESCUE), utcnow()
        )
        assert change is not None and change.job.state is JobState.QUEUED
    finally:
        await store.close()
