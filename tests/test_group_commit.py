"""Group commit in the store: concurrent submits share one transaction, each answered only
after the commit that holds its row; a bad row never fails the others."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobserver.errors import NotFound, StorageUnavailable
from jobserver.jobs import Job, JobState, new_job_id, utcnow
from jobserver.store import Finish, IdempotencyKey, NewJob, SqliteDriver, Store
from jobserver.store.driver import Compiler, Tx
from jobserver.store.repository import (
    DECODED_JOBS,
    DECODED_TEXT,
    JOB_WITH_EXTRAS,
    OPEN_ATTEMPT,
)
from jobserver.store.sqlite import dialect
from tests.conftest import claim, end, write_config


async def add(store: Store, new: NewJob, job_id: str | None = None, now: Any = None) -> Job:
    change, _ = await store.submit(new, job_id or new_job_id(), now or utcnow())
    return change.job


async def finish(store: Store, job_id: str, ending: Finish) -> Job | None:
    job = await store.get(job_id)
    change = await end(store, job, ending)
    return None if change is None else change.job


pytestmark = pytest.mark.anyio


def stored_ids(database: Path) -> set[str]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(database) as db:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}


async def test_concurrent_inserts_share_one_commit_and_answer_after_it(
    store: Store, database: Path
) -> None:
    seen_committed: list[bool] = []

    async def insert(n: int) -> str:
        job = await add(store, NewJob("t", {"n": n}, n % 3, 1), new_job_id(), utcnow())
        # The moment the caller has its answer, the row is already in the file.
        seen_committed.append(job.id in stored_ids(database))
        return job.id

    ids = await asyncio.gather(*(insert(n) for n in range(20)))
    assert seen_committed == [True] * 20
    assert stored_ids(database) == set(ids)
    assert store.submits.transactions == 1
    assert store.submits.rows == 20
    for n, job_id in enumerate(ids):
        job = await store.get(job_id)
        assert (job.state, job.args, job.priority, job.max_retries) == (
            JobState.QUEUED,
            {"n": n},
            n % 3,
            1,
        )


async def test_answers_are_each_callers_own_job(store: Store) -> None:
    ids = [new_job_id() for _ in range(10)]
    jobs = await asyncio.gather(
        *(add(store, NewJob(f"task{n}", {}, 0, 0), ids[n], utcnow()) for n in range(10))
    )
    assert [(job.id, job.task) for job in jobs] == [(ids[n], f"task{n}") for n in range(10)]
    assert all(job.history == () and job.depends_on == () for job in jobs)


async def test_answers_are_the_jobs_as_stored(store: Store) -> None:
    # The batch builds its answers from the values and column defaults, not by reading
    # the rows back: they must equal what a read of the stored row gives.
    now = utcnow()
    news = [
        NewJob("t", {"n": 1, "text": "é", "list": [1, 2.5, None]}, -3, 2),
        NewJob("t", {}, 0, 0, timeout=5, run_after=now + timedelta(hours=1), owner="alice"),
        NewJob("u", {"nested": {"b": 1, "a": True}}, 7, 0, timeout=0.25),
    ]
    answers = await asyncio.gather(*(add(store, new, new_job_id(), now) for new in news))
    assert store.submits.transactions == 1
    for job in answers:
        assert job == await store.get(job.id)
        assert repr(job) == repr(await store.get(job.id))  # 5.0 and 5 compare equal


async def test_a_failing_row_does_not_fail_the_others(store: Store, database: Path) -> None:
    taken = (await add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow())).id
    results = await asyncio.gather(
        add(store, NewJob("t", {"n": 1}, 0, 0), new_job_id(), utcnow()),
        add(store, NewJob("t", {"n": 2}, 0, 0), taken, utcnow()),  # duplicate primary key
        add(store, NewJob("t", {"n": 3}, 0, 0), new_job_id(), utcnow()),
        return_exceptions=True,
    )
    assert isinstance(results[1], sqlite3.IntegrityError)
    good = [r for r in results if not isinstance(r, BaseException)]
    assert [job.args for job in good] == [{"n": 1}, {"n": 3}]
    assert stored_ids(database) == {taken, *(job.id for job in good)}
    assert (await store.get(taken)).args == {}  # the original row is untouched


async def test_a_caller_that_goes_away_does_not_cancel_the_others(
    store: Store, database: Path
) -> None:
    ids = [new_job_id() for _ in range(5)]
    tasks = [
        asyncio.create_task(add(store, NewJob("t", {}, 0, 0), job_id, utcnow())) for job_id in ids
    ]
    await asyncio.sleep(0)  # every insert is queued
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [job.id for job in done if not isinstance(job, BaseException)] == (ids[:2] + ids[3:])
    # Cancelling the wait does not un-commit the row: like a crash after the commit, the
    # client never saw the id, but the job exists.
    assert stored_ids(database) >= set(ids[:2] + ids[3:])


async def test_submits_that_read_first_keep_their_own_transaction(store: Store) -> None:
    key = IdempotencyKey("anonymous", "k1", "hash", 3600.0)
    first, created = await store.submit(
        NewJob("t", {}, 0, 0, idempotency=key), new_job_id(), utcnow()
    )
    again, created_again = await store.submit(
        NewJob("t", {}, 0, 0, idempotency=key), new_job_id(), utcnow()
    )
    assert (created, created_again, again.job.id) == (True, False, first.job.id)
    assert store.submits.transactions == 0


def test_every_202_survives_a_sigkill(tmp_path: Path, server_factory: Any) -> None:
    """Many concurrent submits (group committed), the server SIGKILLed right after the
    last 202: every id a client was given is in the file."""
    server = server_factory(write_config(tmp_path))
    database = tmp_path / "data" / "jobserver.db"

    async def submit_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"task": "add", "args": {"a": 1, "b": 2}, "delay": 3600}
            responses = await asyncio.gather(
                *(client.post("/api/v1/jobs", json=body) for _ in range(60))
            )
        assert {r.status_code for r in responses} == {202}
        return [r.json()["id"] for r in responses]

    ids = asyncio.run(submit_all())
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    assert set(ids) <= stored_ids(database)


async def test_get_reads_the_same_job_as_a_page(store: Store) -> None:
    """``get`` (one statement on the event loop) and ``page`` (the pooled path with its
    extra queries) agree on a job with attempts and dependencies."""
    now = utcnow()
    parent = await add(store, NewJob("t", {}, 0, 0), new_job_id(), now)
    other = await add(store, NewJob("t", {}, 0, 0), new_job_id(), now)
    child = await add(store, NewJob("t", {"a": [1, "x"]}, 5, 2, depends_on=(parent.id, other.id)))
    assert await claim(store, parent.id, now) is not None
    await finish(store, parent.id, Finish(JobState.SUCCEEDED, result={"r": 1}))
    for job_id in (parent.id, other.id, child.id):
        (paged,) = [job for job in await store.page(limit=10) if job.id == job_id]
        assert await store.get(job_id) == paged
    got = await store.get(child.id)
    assert got.depends_on == tuple(sorted((parent.id, other.id)))
    assert got.waiting_on == ((other.id, "queued"),)
    assert [a.outcome for a in (await store.get(parent.id)).history] == ["succeeded"]


async def test_get_gives_back_the_same_job_while_its_row_is_unchanged(store: Store) -> None:
    job = await add(store, NewJob("t", {"a": 1}, 0, 0), new_job_id(), utcnow())
    first = await store.get(job.id)
    assert await store.get(job.id) is first  # decoded once
    assert await claim(store, job.id) is not None
    await finish(store, job.id, Finish(JobState.SUCCEEDED, result={"r": 2}))
    done = await store.get(job.id)
    assert done is not first and done.state is JobState.SUCCEEDED
    (paged,) = [found for found in await store.page(limit=10) if found.id == job.id]
    assert done == paged  # what the pooled path reads
    assert await store.get(job.id) is done


async def test_the_jobs_get_keeps_are_bounded_in_number_and_size(store: Store) -> None:
    now = utcnow()
    big = await add(store, NewJob("t", {"text": "x" * DECODED_TEXT}, 0, 0), new_job_id(), now)
    assert await store.get(big.id) is not await store.get(big.id)  # too large to keep
    news = [NewJob("t", {"n": n}, 0, 0) for n in range(DECODED_JOBS + 10)]
    jobs = await asyncio.gather(*(add(store, new, new_job_id(), now) for new in news))
    for job in jobs:
        await store.get(job.id)
    assert len(store._decoded) == DECODED_JOBS
    assert await store.get(jobs[-1].id) is await store.get(jobs[-1].id)


async def test_get_of_an_unknown_id_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get("no-such-job")


async def test_an_unwritable_database_fails_every_row_of_the_batch(database: Path) -> None:
    # A short busy timeout, so the locked file fails fast.
    store = Store(SqliteDriver(database, busy_timeout_ms=100))
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        results = await asyncio.gather(
            *(add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow()) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StorageUnavailable) for r in results), results
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert stored_ids(database) == set()
    job = await add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow())
    assert stored_ids(database) == {job.id}
    await store.close()


async def test_close_commits_and_answers_what_is_queued(database: Path) -> None:
    store = Store(SqliteDriver(database))
    tasks = [
        asyncio.create_task(add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow()))
        for _ in range(5)
    ]
    await asyncio.sleep(0)  # queued, the flusher started
    await store.close()
    jobs = await asyncio.gather(*tasks)
    assert stored_ids(database) == {job.id for job in jobs}


def test_get_reads_by_primary_keys_only(database: Path) -> None:
    """Polling one job stays O(log n): the row, its attempts and its dependencies are all
    primary-key searches, never a scan of a table."""
    compiled = Compiler(dialect())
    details = []
    with sqlite3.connect(database) as db:
        for statement in (JOB_WITH_EXTRAS,):
            sql, literals, positions = compiled(statement)
            values = {**literals, "job_id": "x"}
            query = db.execute(
                f"EXPLAIN QUERY PLAN {sql}", [values[name] for name in positions or ()]
            )
            details += [row[-1] for row in query.fetchall()]
    assert not [d for d in details if d.startswith("SCAN")], details
    assert any("SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)" in d for d in details)
    assert any(d.startswith("SEARCH attempts USING") and "(job_id=?)" in d for d in details)
    assert any(d.startswith("SEARCH dependencies USING") and "(job_id=?)" in d for d in details)


# -- the scheduler's writes share transactions (issue 6) ----------------------------------


async def test_concurrent_claims_and_outcomes_share_commits_and_answer_after_them(
    store: Store, database: Path
) -> None:
    ids = [(await add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow())).id for _ in range(12)]
    before = dataclasses.replace(store.driver.commits)

    def states() -> dict[str, str]:
        with sqlite3.connect(database) as db:
            return dict(db.execute("SELECT id, state FROM jobs").fetchall())

    async def run_one(job_id: str) -> tuple[str, str]:
        claimed = await claim(store, job_id)
        assert claimed is not None and claimed.attempts == 1
        seen_running = states()[job_id]  # committed by the time the caller hears of it
        finished = await end(store, claimed, Finish(JobState.SUCCEEDED, result=job_id))
        assert finished is not None and finished.job.result == job_id
        return seen_running, states()[job_id]

    seen = await asyncio.gather(*(run_one(job_id) for job_id in ids))
    assert seen == [("running", "succeeded")] * 12
    # 12 claims and 12 outcomes: far fewer transactions than operations.
    assert store.driver.commits.rows - before.rows == 24
    assert store.driver.commits.transactions - before.transactions <= 4
    for job_id in ids:
        job = await store.get(job_id)
        assert [(a.attempt, a.outcome) for a in job.history] == [(1, "succeeded")]


async def test_a_failing_write_in_a_shared_transaction_fails_only_its_caller(
    store: Store, database: Path
) -> None:
    good = (await add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow())).id
    other = (await add(store, NewJob("t", {}, 0, 0), new_job_id(), utcnow())).id
    assert await claim(store, other) is not None  # opens attempt 1 of `other`

    def open_attempt_again(tx: Tx) -> None:
        row = {
            "v_job_id": other,
            "v_attempt": 1,
            "v_started_at": "2026-01-01T00:00:00.000Z",
            "v_node": "local",
        }
        tx.run(OPEN_ATTEMPT, row)

    claimed, failure = await asyncio.gather(
        claim(store, good), store.driver.write(open_attempt_again), return_exceptions=True
    )
    assert isinstance(failure, sqlite3.IntegrityError)
    assert not isinstance(claimed, BaseException) and claimed is not None
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT state FROM jobs WHERE id = ?", (good,)).fetchone() == ("running",)
        assert db.execute("SELECT count(*) FROM attempts").fetchone() == (2,)


def test_returning_statements_list_the_columns_job_rows_are_decoded_with() -> None:
    from jobserver.store.repository import _set_state_statement
    from jobserver.store.schema import JOB_COLUMNS

    statement = _set_state_statement(JobState.QUEUED, JobState.RUNNING, ("pid",), (), False)
    sql, _, _ = Compiler(dialect())(statement)
    assert sql.endswith("RETURNING " + ", ".join(JOB_COLUMNS))
