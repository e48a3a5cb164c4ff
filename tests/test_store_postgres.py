"""The store on a real PostgreSQL server: what is PostgreSQL's own (the migrations'
schema and views, how values are stored, errors, migrating under a lock, writes that
race other transactions).  The repository's behaviour on every driver is in
test_store_contract.py.  Each test gets a database of its own (``postgresql_database``);
without a reachable server they skip, unless ``JOBSERVER_REQUIRE`` names postgresql."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from jobserver.errors import NotFound, StorageUnavailable, ValidationError
from jobserver.jobs import Job, JobError, JobState, new_job_id
from jobserver.store import (
    Finish,
    NewJob,
    Requeue,
    Store,
    enqueue,
    metadata,
    migrations_dir,
    postgres,
)
from jobserver.store.repository import task_lock_key
from tests.conftest import postgresql_database

pytestmark = pytest.mark.anyio
T = TypeVar("T")

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def url() -> Iterator[str]:
    with postgresql_database() as found:
        yield found


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    opened = Store(postgres.PostgresDriver(url))
    yield opened
    await opened.close()


@pytest.fixture
def admin(url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, as an admin (or another node) would have."""
    with psycopg.connect(postgres.conninfo(url)) as connection:
        yield connection


async def submit(store: Store, new: NewJob | None = None, now: datetime = T0) -> Job:
    changed, _ = await store.submit(new or NewJob("t", {"n": 1}, 0, 0), new_job_id(), now)
    return changed.job


# -- the tests' own databases ------------------------------------------------------------


def test_an_unreachable_server_skips_unless_postgresql_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    monkeypatch.delenv("JOBSERVER_REQUIRE", raising=False)
    with (
        pytest.raises(pytest.skip.Exception, match="not reachable"),
        postgresql_database(server=nowhere),
    ):
        pass
    monkeypatch.setenv("JOBSERVER_REQUIRE", "postgresql")
    with (
        pytest.raises(pytest.fail.Exception, match="JOBSERVER_REQUIRE names postgresql"),
        postgresql_database(server=nowhere),
    ):
        pass


# -- the schema ----------------------------------------------------------------------------


def test_migrations_match_the_models(url: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            heads = ScriptDirectory(str(migrations_dir())).get_heads()
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                (heads[0],)
            ]
    finally:
        engine.dispose()


def test_columns_are_typed(admin: psycopg.Connection[Any]) -> None:
    types = dict(
        admin.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'jobs'"
        ).fetchall()
    )
    assert types["created_at"] == "timestamp with time zone"
    assert types["args"] == types["result"] == types["artifacts"] == "json"


async def test_admin_views_exist_and_answer(store: Store, admin: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    running = await submit(store, NewJob("work", {"n": 1}, 0, 0), now)
    failing = await submit(store, NewJob("work", {"n": 2}, 0, 0), now)
    done = await submit(store, NewJob("other", {"n": 3}, 0, 0), now)
    claimed = await store.claim_head(now, 10, lambda head, _: [entry.id for entry in head])
    assert len(claimed) == 3
    error = JobError("ValueError", "boom")
    await store.end_attempt(failing.id, 1, Finish(JobState.FAILED, error=error), now)
    await store.end_attempt(done.id, 1, Finish(JobState.SUCCEEDED, result=1), now)

    rows = admin.execute("SELECT id, task, running_seconds, args FROM jobs_running").fetchall()
    assert [(row[0], row[1], row[3]) for row in rows] == [(running.id, "work", {"n": 1})]
    assert rows[0][2] >= 0
    (failed,) = admin.execute("SELECT id, error_type, error FROM jobs_failed_recent").fetchall()
    assert failed == (failing.id, "ValueError", "boom")
    summary = admin.execute(
        "SELECT task, total, queued, running, succeeded, failed, cancelled, success_percent "
        "FROM task_summary"
    ).fetchall()
    assert [tuple(row[:7]) for row in summary] == [
        ("other", 1, 0, 0, 1, 0, 0),
        ("work", 2, 0, 1, 0, 1, 0),
    ]
    assert [float(row[7]) for row in summary] == [100.0, 0.0]


# -- values ----------------------------------------------------------------------------------


async def test_times_and_json_are_stored_typed(
    store: Store, admin: psycopg.Connection[Any]
) -> None:
    job = await submit(store, NewJob("t", {"n": [1, "two"]}, 0, 0, run_after=at(60)), at(0))
    # Plain SQL (no bind casts) binds ISO text too: the cron slot's conflict-free insert.
    assert await store.fire_schedule("cron", None, at(120), None, new_job_id(), at(120)) is None
    created, run_after, second = admin.execute(
        "SELECT created_at, run_after, args -> 'n' ->> 1 FROM jobs WHERE id = %s", [job.id]
    ).fetchone() or (None, None, None)
    assert (created, run_after, second) == (at(0), at(60), "two")
    (slot,) = admin.execute("SELECT last_slot FROM schedules").fetchone() or (None,)
    assert slot == at(120)
    assert await store.schedule_slots() == {"cron": at(120)}
    assert (await store.get(job.id)).args == {"n": [1, "two"]}


# -- errors -----------------------------------------------------------------------------------


async def test_an_unreachable_server_is_storage_unavailable() -> None:
    # Port 1 on loopback: nothing listens there.
    store = Store(postgres.PostgresDriver("postgresql://postgres@127.0.0.1:1/none"))
    try:
        with pytest.raises(StorageUnavailable):
            await store.get(new_job_id())
        with pytest.raises(StorageUnavailable):
            await submit(store)
    finally:
        await store.close()


async def test_a_lost_connection_is_unavailable_once_then_replaced(
    store: Store, admin: psycopg.Connection[Any], url: str
) -> None:
    job = await submit(store)
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    admin.commit()
    outcomes = []
    for _ in range(2 * postgres.POOL_SIZE):
        try:
            outcomes.append((await store.get(job.id)).id)
        except StorageUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] == job.id  # broken connections were dropped, new ones opened


async def test_integrity_errors_pass_through(store: Store) -> None:
    job_id = new_job_id()
    await store.submit(NewJob("t", {}, 0, 0), job_id, T0)
    with pytest.raises(psycopg.IntegrityError):
        await store.submit(NewJob("t", {}, 0, 0), job_id, T0)


# -- migrating ---------------------------------------------------------------------------------


def test_nodes_starting_at_once_migrate_once() -> None:
    with postgresql_database(migrated=False) as url, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(postgres.migrate, [url] * 4))
        heads = ScriptDirectory(str(migrations_dir())).get_heads()
        # One of them migrated from empty; the others waited for its lock, then found the
        # schema at head.
        assert sorted(results, key=str) == sorted(
            [(None, heads[0])] + [(heads[0], heads[0])] * 3, key=str
        )
        assert postgres.migrate(url) == (heads[0], heads[0])


# -- writes that race another transaction ------------------------------------------------------
# ``admin`` plays another node: it changes a job's row and holds the transaction open;
# the store's write runs meanwhile, waits on the row, and must decide on what the other
# transaction committed.


async def blocked_behind(admin_url: str, write: Awaitable[T]) -> asyncio.Task[T]:
    """Start ``write`` and return once it waits on a lock (or has finished)."""
    task = asyncio.ensure_future(write)
    deadline = time.monotonic() + 10
    with psycopg.connect(postgres.conninfo(admin_url), autocommit=True) as watcher:
        while not task.done():
            (waiting,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone() or (0,)
            if waiting:
                break
            assert time.monotonic() < deadline, "the write never waited on the lock"
            await asyncio.sleep(0.01)
    return task


async def test_a_cancel_racing_a_claim_flags_the_claimed_job(
    store: Store, admin: psycopg.Connection[Any], url: str
) -> None:
    job = await submit(store)
    admin.execute(  # another node claims it, not yet committed
        "UPDATE jobs SET state = 'running', attempts = 1, node = 'other', started_at = %s "
        "WHERE id = %s",
        [at(1), job.id],
    )
    cancel = await blocked_behind(url, store.request_cancel(job.id, at(2)))
    admin.commit()
    changed = await cancel
    assert changed.job.state is JobState.RUNNING and changed.job.cancel_requested
    assert (await store.get(job.id)).cancel_requested


async def test_a_requeue_racing_a_cancel_request_cancels(
    store: Store, admin: psycopg.Connection[Any], url: str
) -> None:
    job = await submit(store)
    await store.claim_head(at(1), 10, lambda head, _: [job.id])
    admin.execute(  # a client's cancel request, not yet committed
        "UPDATE jobs SET cancel_requested_at = %s WHERE id = %s", [at(2), job.id]
    )
    requeue = await blocked_behind(
        url, store.end_attempt(job.id, 1, Requeue("requeued: shutdown"), at(3))
    )
    admin.commit()
    changed = await requeue
    assert changed is not None and changed.job.state is JobState.CANCELLED


async def test_a_dependent_submitted_while_its_parent_fails_is_cancelled(
    store: Store, admin: psycopg.Connection[Any], url: str
) -> None:
    parent = await submit(store)
    await store.claim_head(at(1), 10, lambda head, _: [parent.id])
    admin.execute(  # the parent's attempt ends failed, not yet committed
        "UPDATE jobs SET state = 'failed', finished_at = %s WHERE id = %s", [at(2), parent.id]
    )
    child = await blocked_behind(
        url, store.submit(NewJob("t", {}, 0, 0, depends_on=(parent.id,)), new_job_id(), at(3))
    )
    admin.commit()
    changed, created = await child
    assert created
    # Never queued forever behind a failed parent (CLUSTER-NOTES: 983 orphans in 1,000
    # without a lock on the parent).
    assert changed.job.state is JobState.CANCELLED
    assert (await store.get(changed.job.id)).reason == f"dependency {parent.id} failed"


# -- cluster-wide max_concurrency: a lock per limited task in the claim ------------------------


def up_to(limit: int, task: str = "t") -> Any:
    """A ``choose`` that admits head jobs of ``task`` while fewer than ``limit`` run on
    all nodes (as the scheduler's plan does with the counts)."""

    def choose(head: list[Any], running: Any) -> list[str]:
        free = limit - running.get(task, 0)
        return [entry.id for entry in head if entry.task == task][: max(0, free)]

    return choose


async def test_a_limited_claim_waits_for_another_nodes_claim_and_counts_it(
    store: Store, admin: psycopg.Connection[Any], url: str
) -> None:
    jobs = [await submit(store) for _ in range(3)]
    # Another node's claim, not yet committed: it holds the task's lock.
    admin.execute("SELECT pg_advisory_xact_lock(%s)", [task_lock_key("t")])
    admin.execute(
        "UPDATE jobs SET state = 'running', attempts = 1, node = 'other', started_at = %s "
        "WHERE id = %s",
        [at(1), jobs[0].id],
    )
    offered: list[dict[str, int]] = []

    def choose(head: list[Any], running: Any) -> list[str]:
        offered.append(dict(running))
        return up_to(2)(head, running)

    claim = await blocked_behind(url, store.claim_head(at(2), 10, choose, limited=("t",)))
    admin.commit()
    claimed = await claim
    assert offered[-1] == {"t": 1}  # the other node's claim, committed while this waited
    assert [change.job.id for change in claimed] == [jobs[1].id]
    assert (await store.active_counts())["running"] == 2


async def test_racing_claims_on_three_nodes_never_exceed_a_task_limit(url: str) -> None:
    nodes = [Store(postgres.PostgresDriver(url), node=f"n{i}") for i in range(3)]
    try:
        ids = [(await submit(nodes[0])).id for _ in range(40)]
        done: set[str] = set()
        for round_ in range(8):
            claims = await asyncio.gather(
                *(node.claim_head(at(round_), 3, up_to(2), limited=("t",)) for node in nodes * 2)
            )
            claimed = [change.job for batch in claims for change in batch]
            # Without the lock each of 6 claims counted 0 and took 2 (CLUSTER-NOTES: 6
            # running for a limit of 2).
            assert len(claimed) == 2
            assert (await nodes[0].active_counts())["running"] == 2
            for job in claimed:
                owner = next(node for node in nodes if node.node == job.node)
                await owner.end_attempt(job.id, 1, Finish(JobState.SUCCEEDED), at(round_))
                done.add(job.id)
        assert len(done) == 16 and done <= set(ids)
    finally:
        for node in nodes:
            await node.close()


async def test_an_unlimited_task_takes_no_lock(
    store: Store, admin: psycopg.Connection[Any]
) -> None:
    await submit(store)
    admin.execute("SELECT pg_advisory_xact_lock(%s)", [task_lock_key("t")])
    offered: list[dict[str, int]] = []

    def choose(head: list[Any], running: Any) -> list[str]:
        offered.append(dict(running))
        return [entry.id for entry in head]

    # Not blocked behind the held lock: "t" is not limited here.
    claimed = await asyncio.wait_for(store.claim_head(at(1), 10, choose, limited=("u",)), 10)
    assert len(claimed) == 1
    assert offered == [{}]
    admin.rollback()


# -- notifications: LISTEN on a connection of its own -------------------------------------------


async def wait_until_true(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_the_listener_hands_on_notices_and_reconnects(
    store: Store, admin: psycopg.Connection[Any]
) -> None:
    received: list[str] = []
    connected: list[float] = []
    listener = postgres.Listener(
        postgres_url(admin), received.append, lambda: connected.append(time.monotonic())
    )
    await listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        await store.notify('{"queue":true}')
        await wait_until_true(lambda: received == ['{"queue":true}'], "the notice")
        # A notice rolled back is never sent.
        admin.execute("SELECT pg_notify('jobserver', 'rolled back')")
        admin.rollback()
        # The connection is lost (a restart, a failover): the listener connects again and
        # says so, so that its owner wakes everything.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        )
        admin.commit()
        await wait_until_true(lambda: len(connected) == 2, "the reconnection", timeout=20)
        await asyncio.wait_for(listener.listening.wait(), 10)
        await store.notify("again")
        await wait_until_true(lambda: received[-1:] == ["again"], "a notice after it")
        assert "rolled back" not in received
    finally:
        await listener.stop()
        await listener.stop()  # safe twice


def postgres_url(admin: psycopg.Connection[Any]) -> str:
    info = admin.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


# -- enqueueing in the application's own transaction ---------------------------------------------


async def test_enqueue_stores_the_job_only_when_the_callers_transaction_commits(
    store: Store, url: str
) -> None:
    received: list[str] = []
    listener = postgres.Listener(url, received.append, lambda: None)
    await listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        with psycopg.connect(url) as app:
            app.execute("CREATE TABLE orders (id int)")
            app.execute("INSERT INTO orders VALUES (1)")
            job_id = enqueue(
                app, "ship", {"order": 1, "note": "é"}, priority=5, max_retries=2, timeout=30
            )
            # Not visible, and nobody woken, before the commit.
            with pytest.raises(NotFound):
                await store.get(job_id)
            await asyncio.sleep(0.2)
            assert received == []
            app.commit()
            job = await store.get(job_id)
            await wait_until_true(lambda: len(received) == 1, "the notice at commit")
            # Rolled back: neither the job nor a notice.
            gone = enqueue(app, "ship", {"order": 2})
            app.rollback()
            with pytest.raises(NotFound):
                await store.get(gone)
        assert (job.task, job.args, job.priority, job.max_retries, job.timeout) == (
            "ship",
            {"order": 1, "note": "é"},
            5,
            2,
            30.0,
        )
        assert job.state is JobState.QUEUED and job.attempts == 0
        # The same row as a submit through the store: every column but the id and times.
        submitted = await submit(store, NewJob("ship", {"order": 1, "note": "é"}, 5, 2, 30.0))
        assert replace(job, id="", created_at=T0) == replace(submitted, id="", created_at=T0)
        await asyncio.sleep(0.2)
        assert len(received) == 1
        # A node claims it like any job.
        (claimed,) = await store.claim_head(datetime.now(UTC), 10, lambda head, _: [job_id])
        assert claimed.job.id == job_id
    finally:
        await listener.stop()


async def test_enqueue_through_a_sqlalchemy_connection(store: Store, url: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            run_at = datetime.now(UTC) + timedelta(hours=1)
            job_id = enqueue(conn, "ship", {"order": 3}, run_after=run_at)
        job = await store.get(job_id)
        assert job.args == {"order": 3} and job.run_after is not None
        assert abs((job.run_after - run_at).total_seconds()) < 0.01
        with pytest.raises(ZeroDivisionError), engine.begin() as conn:
            rolled_back = enqueue(conn, "ship", {"order": 4})
            raise ZeroDivisionError  # the application's transaction fails
        with pytest.raises(NotFound):
            await store.get(rolled_back)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"task": ""}, "task"),
        ({"args": [1, 2]}, "args"),
        ({"args": {"x": float("nan")}}, "args"),
        ({"args": {"x": object()}}, "args"),
        ({"priority": 1001}, "priority"),
        ({"priority": True}, "priority"),
        ({"max_retries": -1}, "max_retries"),
        ({"timeout": 0}, "timeout"),
        ({"run_after": datetime(2030, 1, 1)}, "run_after"),  # no time zone
    ],
)
async def test_enqueue_refuses_bad_values_and_stores_nothing(
    store: Store, url: str, kwargs: dict[str, Any], field: str
) -> None:
    values: dict[str, Any] = {"task": "ship", "args": {}} | kwargs
    with psycopg.connect(url) as app:
        with pytest.raises(ValidationError) as caught:
            enqueue(app, values.pop("task"), values.pop("args"), **values)
        assert [problem["field"] for problem in caught.value.details] == [field]
        app.commit()
    assert (await store.active_counts())["queued"] == 0


def test_enqueue_needs_a_psycopg_connection() -> None:
    with pytest.raises(TypeError, match="psycopg 3 connection"):
        enqueue(object(), "ship")  # type: ignore[arg-type]
