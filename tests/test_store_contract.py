"""The store's contract: the repository run against every driver, with the same tests.

Every driver (SQLite and PostgreSQL) must pass this file unchanged, the way
River runs one driver test suite against each of its drivers.  A driver joins the suite
by adding one entry to ``DRIVERS``: a factory that makes a fresh, migrated, empty
database for one test and hands back how to open a ``Driver`` on it.  Tests speak only
the ``Store`` API (no SQL, no driver module), so what they assert is the repository's
behaviour as any driver must deliver it.

Times are explicit (``at(seconds)`` after a fixed ``T0``, whole seconds: every driver
stores at least millisecond precision), never the wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobserver.errors import Conflict, Gone, InvalidTransition, NotFound, ValidationError
from jobserver.jobs import Job, JobError, JobState, format_timestamp, new_job_id
from jobserver.store import (
    FAILURE,
    PRESSURE,
    RESCUE,
    Finish,
    IdempotencyKey,
    JobFilter,
    NewJob,
    QueueEntry,
    Requeue,
    SqliteDriver,
    Store,
    TaskRun,
    migrate,
    postgres,
)
from jobserver.store import repository as repo_module
from jobserver.store.driver import Driver
from tests.conftest import postgresql_database

pytestmark = pytest.mark.anyio

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LOCAL = "local"  # the node name a Store has by default
OTHER = "other"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the drivers under test ------------------------------------------------------------

# A factory gets the test's temp dir and yields a driver opener for a fresh, migrated,
# empty database (removed, if it needs removing, when the context exits).
DriverFactory = Callable[[Path], AbstractAsyncContextManager[Callable[[], Driver]]]


@asynccontextmanager
async def make_sqlite(tmp_path: Path) -> AsyncIterator[Callable[[], Driver]]:
    path = tmp_path / "contract.db"
    migrate(path)
    yield lambda: SqliteDriver(path)


@asynccontextmanager
async def make_postgresql(tmp_path: Path) -> AsyncIterator[Callable[[], Driver]]:
    # A new database on the server per test, dropped after it (skipped, saying why, when
    # no server is reachable, unless JOBSERVER_REQUIRE names postgresql).
    with postgresql_database() as url:
        yield lambda: postgres.PostgresDriver(url)


DRIVERS: dict[str, DriverFactory] = {"sqlite": make_sqlite, "postgresql": make_postgresql}


class Backend:
    """One fresh database of one driver: ``store(node)`` opens a repository on it (as
    many as a test needs, e.g. two nodes); every one is closed at teardown."""

    def __init__(self, name: str, connect: Callable[[], Driver]) -> None:
        self.name = name
        self._connect = connect
        self._opened: list[Store] = []

    def store(self, node: str = LOCAL) -> Store:
        opened = Store(self._connect(), node=node)
        self._opened.append(opened)
        return opened

    async def close(self) -> None:
        for opened in reversed(self._opened):
            await opened.close()
        self._opened.clear()


@pytest.fixture(params=list(DRIVERS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name: str = request.param
    async with DRIVERS[name](tmp_path) as connect:
        opened = Backend(name, connect)
        try:
            yield opened
        finally:
            await opened.close()


@pytest.fixture
def repo(backend: Backend) -> Store:
    """The repository of node ``local`` on a fresh database of each driver."""
    return backend.store()


# -- helpers, all through the Store API ------------------------------------------------


def new(
    task: str = "t",
    *,
    priority: int = 0,
    max_retries: int = 0,
    run_after: datetime | None = None,
    depends_on: Sequence[str] = (),
    idempotency: IdempotencyKey | None = None,
    owner: str | None = None,
    args: dict[str, Any] | None = None,
) -> NewJob:
    return NewJob(
        task,
        {"n": 1} if args is None else args,
        priority,
        max_retries,
        run_after=run_after,
        depends_on=tuple(depends_on),
        idempotency=idempotency,
        owner=owner,
    )


async def submit(repo: Store, job: NewJob | None = None, now: datetime = T0) -> Job:
    changed, created = await repo.submit(job or new(), new_job_id(), now)
    assert created
    return changed.job


def everything(head: list[QueueEntry], running: Mapping[str, int] = {}) -> list[str]:
    return [entry.id for entry in head]


def only(*ids: str) -> Callable[[list[QueueEntry], Mapping[str, int]], list[str]]:
    return lambda head, _: [entry.id for entry in head if entry.id in ids]


async def claim(repo: Store, job_id: str, now: datetime = T0) -> Job:
    """Claim this one job (it must be in the head)."""
    claimed = await repo.claim_head(now, 1000, only(job_id))
    assert [change.job.id for change in claimed] == [job_id], f"{job_id} was not claimed"
    return claimed[0].job


async def run_to(repo: Store, job_id: str, finish: Finish, start: datetime, end: datetime) -> Job:
    """Claim the job at ``start`` and end its attempt with ``finish`` at ``end``."""
    job = await claim(repo, job_id, start)
    changed = await repo.end_attempt(job_id, job.attempts, finish, end)
    assert changed is not None
    return changed.job


async def head_ids(repo: Store, now: datetime = T0, limit: int = 1000) -> list[str]:
    return everything(await repo.queue_head(limit, now))


async def stored_ids(repo: Store) -> set[str]:
    found: set[str] = set()
    before: str | None = None
    while page := await repo.page(limit=1000, before=before):
        found.update(job.id for job in page)
        before = page[-1].id
    return found


async def absent(repo: Store, job_id: str) -> bool:
    try:
        await repo.get(job_id)
    except NotFound:
        return True
    return False


def counts(**nonzero: int) -> dict[str, int]:
    """A full ``state_counts`` answer: every state, 0 unless given."""
    return {state.value: nonzero.get(state.value, 0) for state in JobState}


# -- 1. states and transitions -----------------------------------------------------------

TERMINAL_ENDINGS = [
    pytest.param(Finish(JobState.SUCCEEDED, result={"answer": 42}, exit_code=0), id="succeeded"),
    pytest.param(
        Finish(
            JobState.FAILED,
            error=JobError("ValueError", "boom", "Traceback: boom"),
            reason="the task raised",
            exit_code=1,
        ),
        id="failed",
    ),
    pytest.param(Finish(JobState.CANCELLED, reason="cancelled by request"), id="cancelled"),
]


@pytest.mark.parametrize("finish", TERMINAL_ENDINGS)
async def test_job_goes_queued_running_terminal_and_stays_terminal(
    repo: Store, finish: Finish
) -> None:
    job_id = new_job_id()
    submitted, created = await repo.submit(new(args={"x": [1, 2]}), job_id, at(0))
    assert created and submitted.source is None
    assert submitted.job.state is JobState.QUEUED
    queued = await repo.get(job_id)
    assert queued.state is JobState.QUEUED and queued.args == {"x": [1, 2]}
    assert queued.attempts == 0 and queued.history == () and queued.created_at == at(0)
    assert queued.started_at is None and queued.finished_at is None and queued.node is None

    # An attempt that does not exist (the job never ran) cannot be ended.
    assert await repo.end_attempt(job_id, 0, finish, at(1)) is None
    assert (await repo.get(job_id)).state is JobState.QUEUED

    (claimed,) = await repo.claim_head(at(10), 10, everything)
    assert claimed.source is JobState.QUEUED
    assert claimed.job.id == job_id and claimed.job.state is JobState.RUNNING
    assert claimed.job.attempts == 1 and claimed.job.node == LOCAL
    assert claimed.job.started_at == at(10)
    running = await repo.get(job_id)
    assert running.state is JobState.RUNNING and running.node == LOCAL
    (attempt,) = running.history
    assert (attempt.attempt, attempt.started_at, attempt.node) == (1, at(10), LOCAL)
    assert attempt.finished_at is None and attempt.outcome is None

    ended = await repo.end_attempt(job_id, 1, finish, at(20))
    assert ended is not None and ended.source is JobState.RUNNING and ended.cascaded == ()
    assert ended.job.state is finish.state and ended.job.finished_at == at(20)
    done = await repo.get(job_id)
    assert done.state is finish.state and done.finished_at == at(20)
    assert done.result == finish.result and done.error == finish.error
    assert done.reason == finish.reason and done.exit_code == finish.exit_code
    assert done.failures == (1 if finish.state is JobState.FAILED else 0)
    assert done.attempts == 1
    (closed,) = done.history
    assert closed.finished_at == at(20) and closed.outcome == finish.state.value
    assert closed.exit_code == finish.exit_code
    if finish.error is not None:
        assert (closed.error_type, closed.error) == (finish.error.type, finish.error.message)

    # Terminal states never change: not by a second end, a requeue, a claim or a cancel.
    assert await repo.end_attempt(job_id, 1, Finish(JobState.SUCCEEDED, result=0), at(30)) is None
    assert await repo.end_attempt(job_id, 1, Requeue("again", counts=FAILURE), at(30)) is None
    assert await repo.claim_head(at(30), 10, everything) == []
    with pytest.raises(InvalidTransition):
        await repo.request_cancel(job_id, at(30))
    assert await repo.get(job_id) == done


async def test_retry_only_from_failed_or_cancelled(repo: Store) -> None:
    queued = await submit(repo)
    with pytest.raises(InvalidTransition):
        await repo.retry(queued.id, at(1))
    await claim(repo, queued.id, at(1))
    with pytest.raises(InvalidTransition):
        await repo.retry(queued.id, at(2))
    await repo.end_attempt(queued.id, 1, Finish(JobState.SUCCEEDED), at(3))
    with pytest.raises(InvalidTransition):
        await repo.retry(queued.id, at(4))
    assert (await repo.get(queued.id)).state is JobState.SUCCEEDED


# -- 2. claim order ----------------------------------------------------------------------


async def test_head_is_priority_then_age(repo: Store) -> None:
    priorities = [0, 5, 0, 5, 1, -3, 1]
    ids = [(await submit(repo, new(priority=p), at(i))).id for i, p in enumerate(priorities)]
    expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-priorities[i], i))]
    head = await repo.queue_head(100, at(60))
    assert everything(head) == expected
    assert [entry.priority for entry in head] == sorted(priorities, reverse=True)
    assert head[0].ready_since == at(1) and head[0].task == "t"
    assert await head_ids(repo, at(60), limit=3) == expected[:3]
    claimed = await repo.claim_head(at(60), 100, everything)
    assert [change.job.id for change in claimed] == expected


async def test_a_limited_head_merges_the_top_ready_and_the_earliest_due(repo: Store) -> None:
    # The head of ``limit`` jobs is read as two index walks (so that delayed jobs that are
    # not due are never read): the first ``limit`` ready jobs by priority then age, and
    # the ``limit`` delayed jobs that fell due first; both merged by priority then age.
    plan = [(0, 10), (9, 50), (0, None), (5, 20), (9, None), (1, 30), (5, None), (9, 40)]
    ids = []
    for i, (priority, due) in enumerate(plan):
        run_after = None if due is None else at(due)
        ids.append((await submit(repo, new(priority=priority, run_after=run_after), at(i))).id)
    now = at(100)  # every delayed job is due
    by_rank = sorted(range(len(plan)), key=lambda i: (-plan[i][0], i))
    assert await head_ids(repo, now) == [ids[i] for i in by_rank]
    ready = [i for i in by_rank if plan[i][1] is None]
    delayed = sorted(
        (i for i in range(len(plan)) if plan[i][1] is not None), key=lambda i: plan[i][1] or 0
    )
    for limit in range(1, len(plan) + 1):
        walked = set(ready[:limit] + delayed[:limit])
        expected = [ids[i] for i in by_rank if i in walked][:limit]
        assert await head_ids(repo, now, limit=limit) == expected, limit
    claimed = await repo.claim_head(now, 2, everything)
    walked = set(ready[:2] + delayed[:2])
    assert [change.job.id for change in claimed] == [ids[i] for i in by_rank if i in walked][:2]


async def test_run_after_is_claimed_only_once_due(repo: Store) -> None:
    due = at(3600)
    later = await submit(repo, new(priority=9, run_after=due), at(0))
    ready = await submit(repo, new(priority=0), at(0))
    assert await head_ids(repo, at(1800)) == [ready.id]
    claimed = await repo.claim_head(at(1800), 10, everything)
    assert [change.job.id for change in claimed] == [ready.id]
    assert await repo.claim_head(at(3599), 10, everything) == []
    assert (await repo.get(later.id)).state is JobState.QUEUED
    (entry,) = await repo.queue_head(10, due)
    assert entry.id == later.id and entry.ready_since == due
    (claimed_later,) = await repo.claim_head(due, 10, everything)
    assert claimed_later.job.id == later.id and claimed_later.job.started_at == due


async def test_dependent_enters_head_only_once_its_dependency_succeeded(repo: Store) -> None:
    parent = await submit(repo)
    other = await submit(repo)
    child = await submit(repo, new(depends_on=[parent.id, other.id]))
    assert await head_ids(repo) == [parent.id, other.id]
    assert dict((await repo.get(child.id)).waiting_on) == {
        parent.id: "queued",
        other.id: "queued",
    }
    assert (await repo.get(child.id)).depends_on == tuple(sorted([parent.id, other.id]))

    await run_to(repo, parent.id, Finish(JobState.SUCCEEDED), at(1), at(2))
    assert await head_ids(repo) == [other.id]  # one dependency still to succeed
    claimed = await repo.claim_head(at(3), 10, everything)
    assert [change.job.id for change in claimed] == [other.id]
    assert await head_ids(repo) == []  # its dependency runs
    assert await repo.claim_head(at(3), 10, everything) == []

    await repo.end_attempt(other.id, 1, Finish(JobState.SUCCEEDED), at(4))
    assert await head_ids(repo) == [child.id]
    assert (await repo.get(child.id)).waiting_on == ()
    assert (await claim(repo, child.id, at(5))).state is JobState.RUNNING


async def test_claim_head_claims_only_what_choose_returns(repo: Store) -> None:
    ids = [(await submit(repo, new(task=f"t{i}"))).id for i in range(4)]
    offered: list[list[QueueEntry]] = []

    def choose(head: list[QueueEntry], running: Mapping[str, int]) -> list[str]:
        offered.append(list(head))
        return [ids[2], ids[0], "01NOSUCHJOB000000000000000"]

    expected_head = await repo.queue_head(3, at(1))
    claimed = await repo.claim_head(at(1), 3, choose)
    assert offered and offered[-1] == expected_head  # the head, within the limit
    assert everything(offered[-1]) == ids[:3]
    assert sorted(change.job.id for change in claimed) == sorted([ids[0], ids[2]])
    assert all(change.job.state is JobState.RUNNING for change in claimed)
    assert (await repo.get(ids[1])).state is JobState.QUEUED
    assert (await repo.get(ids[3])).state is JobState.QUEUED
    assert await head_ids(repo, at(1)) == [ids[1], ids[3]]
    assert await repo.claim_head(at(2), 10, lambda head, _: []) == []
    assert await repo.active_counts() == {"queued": 2, "running": 2}


async def test_claim_head_counts_limited_tasks_on_every_node_of_a_shared_database(
    backend: Backend, repo: Store
) -> None:
    other = backend.store(OTHER)
    first = await submit(repo, new(task="limited"))
    await submit(repo, new(task="limited"))
    await submit(repo, new(task="free"))
    assert await other.claim_head(at(1), 10, only(first.id), limited=("limited",))
    offered: list[dict[str, int]] = []

    def choose(head: list[QueueEntry], running: Mapping[str, int]) -> list[str]:
        offered.append(dict(running))
        return []

    await repo.claim_head(at(2), 10, choose, limited=("limited", "absent"))
    # A shared database (several nodes) counts the other node's claim, for the limited
    # tasks in the head only; on one server's own file the scheduler counts its own jobs.
    assert repo.shared is (backend.name == "postgresql")
    assert offered[-1] == ({"limited": 1} if repo.shared else {})


async def test_concurrent_claims_claim_each_job_exactly_once(backend: Backend, repo: Store) -> None:
    other = backend.store(OTHER)
    ids = {(await submit(repo)).id for _ in range(30)}
    claims = await asyncio.gather(
        *(store.claim_head(at(1), 1000, everything) for store in (repo, other, repo, other))
    )
    claimed = [change.job for batch in claims for change in batch]
    assert sorted(job.id for job in claimed) == sorted(ids)  # all, none twice
    assert all(job.attempts == 1 for job in claimed)
    for store, batch in zip((repo, other, repo, other), claims, strict=True):
        assert all(change.job.node == store.node for change in batch)
    assert await repo.state_counts() == counts(running=30)
    mine = {job.id for job in await repo.running()}
    theirs = {job.id for job in await other.running()}
    assert mine | theirs == ids and not mine & theirs


# -- 3. fencing ------------------------------------------------------------------------


async def test_writes_about_a_stale_attempt_change_nothing(repo: Store) -> None:
    job = await submit(repo)
    await claim(repo, job.id, at(1))
    requeued = await repo.end_attempt(job.id, 1, Requeue("requeued: shutdown"), at(2))
    assert requeued is not None and requeued.job.state is JobState.QUEUED
    second = await claim(repo, job.id, at(3))
    assert second.attempts == 2
    before = await repo.get(job.id)

    assert await repo.end_attempt(job.id, 1, Finish(JobState.SUCCEEDED, result=1), at(4)) is None
    assert await repo.end_attempt(job.id, 1, Finish(JobState.FAILED), at(4)) is None
    assert await repo.end_attempt(job.id, 1, Requeue("stale", counts=FAILURE), at(4)) is None
    assert await repo.record_process(job.id, 1, 4242, 12.5) is False
    assert await repo.set_progress(job.id, 1, 0.5, "stale", at(4)) is False
    assert await repo.end_attempt(job.id, 3, Finish(JobState.SUCCEEDED), at(4)) is None  # future
    after = await repo.get(job.id)
    assert after == before
    assert after.state is JobState.RUNNING and after.attempts == 2
    assert after.pid is None and after.progress is None and after.failures == 0
    assert [(a.attempt, a.outcome) for a in after.history] == [(1, "interrupted"), (2, None)]

    # The current attempt's writes still land.
    assert await repo.record_process(job.id, 2, 4242, 12.5) is True
    assert await repo.set_progress(job.id, 2, 0.25, "a quarter", at(5)) is True
    current = await repo.get(job.id)
    assert (current.pid, current.pid_started_at) == (4242, 12.5)
    assert current.progress is not None
    assert (current.progress.fraction, current.progress.message) == (0.25, "a quarter")
    assert current.progress.updated_at == at(5)
    done = await repo.end_attempt(job.id, 2, Finish(JobState.SUCCEEDED, result=2), at(6))
    assert done is not None and done.job.result == 2


async def test_another_node_cannot_write_this_nodes_attempt(backend: Backend, repo: Store) -> None:
    other = backend.store(OTHER)
    job = await submit(repo)
    await claim(repo, job.id, at(1))
    before = await repo.get(job.id)
    assert before.node == LOCAL

    assert await other.end_attempt(job.id, 1, Finish(JobState.SUCCEEDED), at(2)) is None
    assert await other.end_attempt(job.id, 1, Requeue("rescue", counts=RESCUE), at(2)) is None
    assert await other.record_process(job.id, 1, 99, 1.0) is False
    assert await other.set_progress(job.id, 1, 0.9, "not mine", at(2)) is False
    assert await repo.get(job.id) == before
    assert await other.get(job.id) == before  # and it reads the same job

    assert await repo.record_process(job.id, 1, 77, 2.0) is True
    done = await repo.end_attempt(job.id, 1, Finish(JobState.SUCCEEDED), at(3))
    assert done is not None and done.job.state is JobState.SUCCEEDED


async def test_running_and_cancel_requested_are_scoped_to_the_node(
    backend: Backend, repo: Store
) -> None:
    other = backend.store(OTHER)
    mine = await submit(repo)
    theirs = await submit(repo)
    queued = await submit(repo)
    await claim(repo, mine.id)
    await claim(other, theirs.id)
    assert [job.id for job in await repo.running()] == [mine.id]
    assert [job.id for job in await other.running()] == [theirs.id]
    assert (await other.get(theirs.id)).node == OTHER
    assert await repo.cancel_requested() == set()

    await repo.request_cancel(theirs.id, at(1))  # any node takes a client's request
    await other.request_cancel(mine.id, at(1))
    assert await repo.cancel_requested() == {mine.id}
    assert await other.cancel_requested() == {theirs.id}
    assert (await repo.get(queued.id)).state is JobState.QUEUED


# -- 4. requeue --------------------------------------------------------------------------

REQUEUES = [
    pytest.param(FAILURE, "failures", "retrying", id="failure"),
    pytest.param(RESCUE, "rescues", "interrupted", id="rescue"),
    pytest.param(PRESSURE, "pressure_requeues", "pressure", id="pressure"),
    pytest.param(None, None, "interrupted", id="uncounted"),
]
COUNTERS = ("failures", "rescues", "pressure_requeues")


@pytest.mark.parametrize(("counted", "counter", "outcome"), REQUEUES)
async def test_requeue_counts_what_it_names_and_delays(
    repo: Store, counted: str | None, counter: str | None, outcome: str
) -> None:
    job = await submit(repo, new(max_retries=3))
    await claim(repo, job.id, at(1))
    assert await repo.record_process(job.id, 1, 1234, 1.0)
    error = JobError("OSError", "lost", None)
    requeue = Requeue("requeued: x", counts=counted, run_after=at(60), error=error, exit_code=-9)
    changed = await repo.end_attempt(job.id, 1, requeue, at(2))
    assert changed is not None and changed.source is JobState.RUNNING
    assert changed.job.state is JobState.QUEUED and changed.job.run_after == at(60)

    stored = await repo.get(job.id)
    assert stored.state is JobState.QUEUED and stored.finished_at is None
    assert stored.run_after == at(60) and stored.reason == "requeued: x"
    assert stored.pid is None and stored.attempts == 1
    for name in COUNTERS:
        assert getattr(stored, name) == (1 if name == counter else 0), name
    (attempt,) = stored.history
    assert attempt.outcome == outcome and attempt.finished_at == at(2)
    assert (attempt.error_type, attempt.error, attempt.exit_code) == ("OSError", "lost", -9)

    assert await head_ids(repo, at(59)) == []
    assert await repo.claim_head(at(59), 10, everything) == []
    again = await claim(repo, job.id, at(60))
    assert again.attempts == 2
    for name in COUNTERS:
        assert getattr(again, name) == (1 if name == counter else 0), name


@pytest.mark.parametrize(("counted", "counter", "outcome"), REQUEUES)
async def test_requeue_of_a_cancel_requested_job_cancels_it(
    repo: Store, counted: str | None, counter: str | None, outcome: str
) -> None:
    job = await submit(repo)
    await claim(repo, job.id, at(1))
    flagged = await repo.request_cancel(job.id, at(2))
    assert flagged.source is JobState.RUNNING and flagged.job.state is JobState.RUNNING
    requeue = Requeue("requeued: server stopping", counts=counted, run_after=at(3))
    changed = await repo.end_attempt(job.id, 1, requeue, at(3))
    assert changed is not None and changed.source is JobState.RUNNING
    assert changed.job.state is JobState.CANCELLED and changed.job.finished_at == at(3)
    stored = await repo.get(job.id)
    assert stored.state is JobState.CANCELLED
    assert stored.history[-1].outcome == "cancelled"
    assert await head_ids(repo, at(3600)) == []
    assert await repo.claim_head(at(3600), 10, everything) == []
    assert await repo.cancel_requested() == set()
    assert await repo.state_counts() == counts(cancelled=1)


# -- 5. idempotency ----------------------------------------------------------------------


def key(
    name: str = "k1", body: str = "body-a", *, scope: str = "client", window: float = 3600
) -> IdempotencyKey:
    return IdempotencyKey(scope, name, body, window)


async def test_plain_submits_of_every_shape_in_one_batch_store_all_but_the_bad_one(
    repo: Store,
) -> None:
    # Submitted at once, plain submits share one batch: here rows of different columns
    # (a column left unset is not sent), and one whose id is taken.
    shapes = [
        new(),
        new(run_after=at(5)),
        new(owner="ann"),
        new(task="u", args={"k": ["v"]}, priority=3),
        NewJob("t", {}, 0, 2, timeout=1.5),
    ]
    ids = [new_job_id() for _ in shapes]
    taken = await submit(repo, new(task="first"))
    results = await asyncio.gather(
        *(repo.submit(shape, job_id, at(1)) for shape, job_id in zip(shapes, ids, strict=True)),
        repo.submit(new(task="second"), taken.id, at(1)),
        return_exceptions=True,
    )
    *stored, refused = results
    assert isinstance(refused, Exception), refused
    assert (await repo.get(taken.id)).task == "first"
    for shape, job_id, result in zip(shapes, ids, stored, strict=True):
        assert not isinstance(result, BaseException), result
        changed, created = result
        job = await repo.get(job_id)
        assert created and changed.job == job, job_id
        assert (job.task, job.args, job.priority, job.max_retries) == (
            shape.task,
            shape.args,
            shape.priority,
            shape.max_retries,
        )
        assert (job.run_after, job.owner, job.timeout) == (
            shape.run_after,
            shape.owner,
            shape.timeout,
        )
    assert await stored_ids(repo) == {taken.id, *ids}


async def test_same_key_same_body_is_the_original_job(repo: Store) -> None:
    first_id = new_job_id()
    first, created = await repo.submit(new(idempotency=key()), first_id, at(0))
    assert created and first.job.id == first_id
    second_id = new_job_id()
    again, created_again = await repo.submit(new(idempotency=key()), second_id, at(10))
    assert not created_again and again.job.id == first_id
    assert again.job.state is JobState.QUEUED and again.job.created_at == at(0)
    assert await absent(repo, second_id)

    # The original is returned whatever has become of it.
    await run_to(repo, first_id, Finish(JobState.SUCCEEDED, result=7), at(20), at(21))
    later, created_later = await repo.submit(new(idempotency=key()), new_job_id(), at(30))
    assert not created_later and later.job.id == first_id and later.job.result == 7

    # A key is per scope: another client's same key is another job.
    theirs, created_theirs = await repo.submit(
        new(idempotency=key(scope="someone-else")), new_job_id(), at(40)
    )
    assert created_theirs and theirs.job.id != first_id
    assert await stored_ids(repo) == {first_id, theirs.job.id}


async def test_same_key_other_body_conflicts_and_stores_nothing(repo: Store) -> None:
    first = await submit(repo, new(idempotency=key(body="body-a")))
    other_id = new_job_id()
    with pytest.raises(Conflict):
        await repo.submit(new(task="u", idempotency=key(body="body-b")), other_id, at(1))
    assert await absent(repo, other_id)
    assert await stored_ids(repo) == {first.id}
    # The key still belongs to the first body.
    again, created = await repo.submit(new(idempotency=key(body="body-a")), new_job_id(), at(2))
    assert not created and again.job.id == first.id


async def test_concurrent_submits_with_one_key_make_one_job(repo: Store) -> None:
    ids = [new_job_id() for _ in range(10)]
    results = await asyncio.gather(
        *(repo.submit(new(idempotency=key("race")), job_id, at(0)) for job_id in ids)
    )
    created = [changed.job.id for changed, was_created in results if was_created]
    assert len(created) == 1
    assert {changed.job.id for changed, _ in results} == set(created)
    assert await stored_ids(repo) == set(created)
    assert await repo.state_counts() == counts(queued=1)


async def test_a_key_older_than_its_window_is_forgotten(repo: Store) -> None:
    first = await submit(repo, new(idempotency=key(window=60)), at(0))
    within, created = await repo.submit(new(idempotency=key(window=60)), new_job_id(), at(60))
    assert not created and within.job.id == first.id
    fresh_id = new_job_id()
    fresh, created = await repo.submit(new(idempotency=key(window=60)), fresh_id, at(61))
    assert created and fresh.job.id == fresh_id
    # The key now names the new job, its window counted from the new submit.
    again, created = await repo.submit(new(idempotency=key(window=60)), new_job_id(), at(100))
    assert not created and again.job.id == fresh_id
    assert await stored_ids(repo) == {first.id, fresh_id}


async def test_forgetting_keys_drops_only_older_ones(repo: Store) -> None:
    old = await submit(repo, new(idempotency=key("old", window=86400)), at(0))
    young = await submit(repo, new(idempotency=key("young", window=86400)), at(100))
    assert await repo.forget_idempotency_keys(at(50)) == 1
    again, created = await repo.submit(new(idempotency=key("young", window=86400)), "x", at(200))
    assert not created and again.job.id == young.id
    fresh, created = await repo.submit(new(idempotency=key("old", window=86400)), "y", at(200))
    assert created and fresh.job.id != old.id
    assert (await repo.get(old.id)).state is JobState.QUEUED  # the job itself stays


# -- 6. cancel ---------------------------------------------------------------------------


async def test_cancel_of_a_queued_job_is_at_once(repo: Store) -> None:
    job = await submit(repo)
    changed = await repo.request_cancel(job.id, at(5))
    assert changed.source is JobState.QUEUED and changed.cascaded == ()
    assert changed.job.state is JobState.CANCELLED and changed.job.finished_at == at(5)
    stored = await repo.get(job.id)
    assert stored.state is JobState.CANCELLED and stored.finished_at == at(5)
    assert stored.history == () and stored.attempts == 0
    assert await head_ids(repo, at(6)) == []
    with pytest.raises(InvalidTransition):  # it is finished now
        await repo.request_cancel(job.id, at(7))


async def test_cancel_of_a_running_job_flags_it(repo: Store) -> None:
    job = await submit(repo)
    await claim(repo, job.id, at(1))
    first = await repo.request_cancel(job.id, at(2))
    assert first.source is JobState.RUNNING
    assert first.job.state is JobState.RUNNING and first.job.cancel_requested
    stored = await repo.get(job.id)
    assert stored.state is JobState.RUNNING and stored.cancel_requested
    assert stored.finished_at is None
    assert await repo.cancel_requested() == {job.id}

    second = await repo.request_cancel(job.id, at(3))  # harmless
    assert second.source is JobState.RUNNING
    assert second.job.state is JobState.RUNNING and second.job.cancel_requested
    assert await repo.cancel_requested() == {job.id}

    # The attempt's end is what finishes it.
    ended = await repo.end_attempt(job.id, 1, Finish(JobState.CANCELLED, reason="killed"), at(4))
    assert ended is not None and ended.job.state is JobState.CANCELLED
    assert await repo.cancel_requested() == set()


async def test_cancel_of_another_owners_job_is_not_found(repo: Store) -> None:
    queued = await submit(repo, new(owner="alice"))
    running = await submit(repo, new(owner="alice"))
    await claim(repo, running.id)
    for job_id in (queued.id, running.id):
        with pytest.raises(NotFound):
            await repo.request_cancel(job_id, at(1), owner="bob")
        with pytest.raises(NotFound):
            await repo.get(job_id, owner="bob")
    with pytest.raises(NotFound):
        await repo.request_cancel("01NOSUCHJOB000000000000000", at(1))
    assert (await repo.get(queued.id)).state is JobState.QUEUED
    assert not (await repo.get(running.id)).cancel_requested
    assert await repo.cancel_requested() == set()

    mine = await repo.request_cancel(queued.id, at(2), owner="alice")
    assert mine.job.state is JobState.CANCELLED and mine.job.owner == "alice"


# -- 7. dependencies and cascades ----------------------------------------------------------


async def test_a_failed_parent_cancels_its_queued_dependents_transitively(repo: Store) -> None:
    parent = await submit(repo)
    child = await submit(repo, new(depends_on=[parent.id]))
    grandchild = await submit(repo, new(depends_on=[child.id]))
    sibling = await submit(repo, new(depends_on=[parent.id]))
    unrelated = await submit(repo)
    await claim(repo, parent.id, at(1))
    error = JobError("RuntimeError", "nope")
    changed = await repo.end_attempt(parent.id, 1, Finish(JobState.FAILED, error=error), at(2))
    assert changed is not None and changed.job.state is JobState.FAILED
    cascaded = {job.id: job for job in changed.cascaded}
    assert set(cascaded) == {child.id, grandchild.id, sibling.id}
    expected_reason = {
        child.id: f"dependency {parent.id} failed",
        sibling.id: f"dependency {parent.id} failed",
        grandchild.id: f"dependency {child.id} cancelled",  # cancelled by the cascade
    }
    for job_id, reason in expected_reason.items():
        assert cascaded[job_id].state is JobState.CANCELLED
        assert cascaded[job_id].reason == reason
        stored = await repo.get(job_id)
        assert stored.state is JobState.CANCELLED and stored.finished_at == at(2)
        assert stored.reason == reason
        assert stored.error is not None and stored.error.type == "DependencyFailed"
    assert (await repo.get(unrelated.id)).state is JobState.QUEUED
    assert await head_ids(repo, at(3)) == [unrelated.id]
    assert await repo.state_counts() == counts(failed=1, cancelled=3, queued=1)


async def test_a_cancelled_parent_cancels_its_queued_dependents(repo: Store) -> None:
    parent = await submit(repo)
    child = await submit(repo, new(depends_on=[parent.id]))
    changed = await repo.request_cancel(parent.id, at(1))
    assert [job.id for job in changed.cascaded] == [child.id]
    stored = await repo.get(child.id)
    assert stored.state is JobState.CANCELLED
    assert stored.reason == f"dependency {parent.id} cancelled"


@pytest.mark.parametrize("parent_state", [JobState.FAILED, JobState.CANCELLED])
async def test_a_dependent_of_a_finished_unsucceeded_parent_is_cancelled_at_once(
    repo: Store, parent_state: JobState
) -> None:
    parent = await submit(repo)
    if parent_state is JobState.FAILED:
        await run_to(repo, parent.id, Finish(JobState.FAILED), at(1), at(2))
    else:
        await repo.request_cancel(parent.id, at(2))
    child_id = new_job_id()
    changed, created = await repo.submit(new(depends_on=[parent.id]), child_id, at(3))
    assert created and changed.job.id == child_id
    assert changed.job.state is JobState.CANCELLED and changed.job.finished_at == at(3)
    assert changed.job.reason == f"dependency {parent.id} {parent_state.value}"
    stored = await repo.get(child_id)
    assert stored.state is JobState.CANCELLED and stored.depends_on == (parent.id,)
    assert await head_ids(repo, at(4)) == []


async def test_unknown_dependency_is_rejected_and_nothing_stored(repo: Store) -> None:
    known = await submit(repo)
    job_id = new_job_id()
    with pytest.raises(ValidationError):
        await repo.submit(
            new(depends_on=[known.id, "01NOSUCHJOB000000000000000"], idempotency=key()),
            job_id,
            at(1),
        )
    assert await absent(repo, job_id)
    assert await stored_ids(repo) == {known.id}
    # The idempotency key was not remembered either.
    fresh, created = await repo.submit(new(idempotency=key()), new_job_id(), at(2))
    assert created and fresh.job.id != job_id


async def test_dependency_of_another_owner_is_unknown(repo: Store) -> None:
    theirs = await submit(repo, new(owner="alice"))
    job_id = new_job_id()
    with pytest.raises(ValidationError):
        await repo.submit(new(depends_on=[theirs.id], owner="bob"), job_id, at(1), owner="bob")
    assert await absent(repo, job_id)


async def test_retry_of_a_job_whose_dependency_failed_is_refused(repo: Store) -> None:
    parent = await submit(repo)
    child = await submit(repo, new(depends_on=[parent.id]))
    await run_to(repo, parent.id, Finish(JobState.FAILED), at(1), at(2))
    assert (await repo.get(child.id)).state is JobState.CANCELLED
    with pytest.raises(InvalidTransition):
        await repo.retry(child.id, at(3))
    assert (await repo.get(child.id)).state is JobState.CANCELLED

    # Once its dependency is retried, the dependent can be too.
    await repo.retry(parent.id, at(4))
    changed = await repo.retry(child.id, at(5))
    assert changed.source is JobState.CANCELLED and changed.job.state is JobState.QUEUED
    assert await head_ids(repo, at(6)) == [parent.id]  # the child waits for its parent again


async def test_retry_of_a_failed_job_requeues_it_with_failures_reset(repo: Store) -> None:
    job = await submit(repo, new(max_retries=1))
    await claim(repo, job.id, at(1))
    await repo.end_attempt(job.id, 1, Requeue("retry", counts=FAILURE), at(2))
    error = JobError("ValueError", "bad")
    failed = await run_to(repo, job.id, Finish(JobState.FAILED, error=error), at(3), at(4))
    assert failed.failures == 2 and failed.attempts == 2

    changed = await repo.retry(job.id, at(5))
    assert changed.source is JobState.FAILED
    queued = changed.job
    assert queued.state is JobState.QUEUED and queued.failures == 0 and queued.attempts == 2
    assert queued.finished_at is None and queued.error is None and queued.result is None
    assert queued.run_after is None and not queued.cancel_requested
    assert [a.outcome for a in queued.history] == ["retrying", "failed"]
    assert await head_ids(repo, at(6)) == [job.id]
    again = await claim(repo, job.id, at(6))
    assert again.attempts == 3
    assert [a.attempt for a in (await repo.get(job.id)).history] == [1, 2, 3]


# -- 7b. bulk cancel and retry -------------------------------------------------------------


async def test_cancel_matching_cancels_queued_flags_running_and_cascades(repo: Store) -> None:
    queued = await submit(repo, new("a"))
    running = await submit(repo, new("a"))
    await claim(repo, running.id, at(1))
    child = await submit(repo, new("b", depends_on=[queued.id]))
    other_task = await submit(repo, new("b"))
    later = await submit(repo, new("a"), now=at(10))  # submitted after the request

    changes = await repo.cancel_matching(JobFilter(task="a"), at(5))
    assert {(c.job.id, c.source, c.job.state) for c in changes} == {
        (queued.id, JobState.QUEUED, JobState.CANCELLED),
        (running.id, JobState.RUNNING, JobState.RUNNING),
    }
    (cancelled,) = [c for c in changes if c.job.id == queued.id]
    assert [job.id for job in cancelled.cascaded] == [child.id]
    assert (await repo.get(child.id)).state is JobState.CANCELLED
    assert (await repo.get(running.id)).cancel_requested
    assert await repo.cancel_requested() == {running.id}
    assert (await repo.get(other_task.id)).state is JobState.QUEUED
    assert (await repo.get(later.id)).state is JobState.QUEUED

    # Again: nothing left to change (the running job is already flagged).
    assert await repo.cancel_matching(JobFilter(task="a"), at(6)) == []


async def test_bulk_filters_state_age_and_owner(repo: Store) -> None:
    old = await submit(repo, new(owner="alice"), now=at(0))
    young = await submit(repo, new(owner="alice"), now=at(50))
    bobs = await submit(repo, new(owner="bob"), now=at(0))
    running = await submit(repo, new(owner="alice"), now=at(0))
    await claim(repo, running.id, at(1))

    only_queued = JobFilter(states=(JobState.QUEUED,), created_before=at(10), owner="alice")
    changes = await repo.cancel_matching(only_queued, at(60))
    assert [c.job.id for c in changes] == [old.id]
    assert (await repo.get(young.id)).state is JobState.QUEUED
    assert (await repo.get(bobs.id)).state is JobState.QUEUED
    assert not (await repo.get(running.id)).cancel_requested

    # A state the operation does not apply to selects nothing.
    assert await repo.cancel_matching(JobFilter(states=(JobState.FAILED,)), at(60)) == []
    assert await repo.retry_matching(JobFilter(states=(JobState.QUEUED,)), at(60)) == []


async def test_retry_matching_requeues_failed_and_cancelled_in_dependency_order(
    repo: Store,
) -> None:
    parent = await submit(repo)
    child = await submit(repo, new(depends_on=[parent.id]))
    await run_to(repo, parent.id, Finish(JobState.FAILED), at(1), at(2))
    lone = await submit(repo, new("other"))
    await run_to(repo, lone.id, Finish(JobState.FAILED), at(3), at(4))
    done = await submit(repo)
    await run_to(repo, done.id, Finish(JobState.SUCCEEDED), at(5), at(6))

    changes = await repo.retry_matching(JobFilter(task="t"), at(7))
    assert [(c.job.id, c.source) for c in changes] == [
        (parent.id, JobState.FAILED),
        (child.id, JobState.CANCELLED),  # its parent was retried first
    ]
    assert all(c.job.state is JobState.QUEUED and c.job.failures == 0 for c in changes)
    assert (await repo.get(lone.id)).state is JobState.FAILED
    assert (await repo.get(done.id)).state is JobState.SUCCEEDED
    assert await head_ids(repo, at(8)) == [parent.id]


async def test_retry_matching_leaves_a_job_whose_dependency_stays_failed(repo: Store) -> None:
    parent = await submit(repo, new("p"))
    child = await submit(repo, new("c", depends_on=[parent.id]))
    await run_to(repo, parent.id, Finish(JobState.FAILED), at(1), at(2))
    assert await repo.retry_matching(JobFilter(task="c"), at(3)) == []
    assert (await repo.get(child.id)).state is JobState.CANCELLED


async def test_bulk_cancel_walks_more_than_one_batch(repo: Store) -> None:
    count = repo_module.BULK_BATCH + 5
    for _ in range(count):
        await submit(repo)
    changes = await repo.cancel_matching(JobFilter(task="t"), at(1))
    assert len({c.job.id for c in changes}) == count
    assert await repo.state_counts() == counts(cancelled=count)


# -- 8. pagination -----------------------------------------------------------------------


async def walk(repo: Store, limit: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    before: str | None = None
    while True:
        page = await repo.page(limit=limit, before=before, **filters)
        assert len(page) <= limit
        if not page:
            return seen
        seen += [job.id for job in page]
        before = page[-1].id


async def test_pages_are_newest_first_and_walk_every_job_once(repo: Store) -> None:
    ids = [(await submit(repo, new(task=f"t{i % 3}"), at(i))).id for i in range(25)]
    newest_first = list(reversed(ids))
    assert [job.id for job in await repo.page(limit=5)] == newest_first[:5]
    for limit in (1, 7, 1000):
        assert await walk(repo, limit) == newest_first, limit
    assert await repo.page(limit=10, before=ids[0]) == []
    # A page carries each job's history like get() does.
    await claim(repo, ids[3], at(100))
    (page_job,) = await repo.page(limit=1, before=ids[4])
    assert page_job == await repo.get(ids[3])


async def test_page_filters_by_state_task_and_owner(repo: Store) -> None:
    ids = []
    for i in range(12):
        job = new(task="even" if i % 2 == 0 else "odd", owner="alice" if i % 3 == 0 else None)
        ids.append((await submit(repo, job, at(i))).id)
    running = {ids[1], ids[4], ids[7]}
    for job_id in sorted(running):
        await claim(repo, job_id, at(50))
    newest_first = list(reversed(ids))

    def expected(keep: Callable[[int], bool]) -> list[str]:
        return [job_id for job_id in newest_first if keep(ids.index(job_id))]

    assert await walk(repo, 2, state=JobState.RUNNING) == expected(lambda i: ids[i] in running)
    assert await walk(repo, 2, state=JobState.QUEUED) == expected(lambda i: ids[i] not in running)
    assert await walk(repo, 2, state=JobState.SUCCEEDED) == []
    assert await walk(repo, 3, task="even") == expected(lambda i: i % 2 == 0)
    assert await walk(repo, 3, owner="alice") == expected(lambda i: i % 3 == 0)
    assert await walk(repo, 1, task="odd", owner="alice", state=JobState.QUEUED) == expected(
        lambda i: i % 2 == 1 and i % 3 == 0 and ids[i] not in running
    )
    assert await walk(repo, 5, task="nope") == []


# -- 9. pruning --------------------------------------------------------------------------


async def test_prunable_is_finished_jobs_past_their_retention(repo: Store) -> None:
    hour = 3600.0
    old_ok = await submit(repo)
    await run_to(repo, old_ok.id, Finish(JobState.SUCCEEDED), at(0), at(10))
    old_failed = await submit(repo)
    await run_to(repo, old_failed.id, Finish(JobState.FAILED), at(0), at(20))
    old_cancelled = await submit(repo)
    await repo.request_cancel(old_cancelled.id, at(30))
    recent = await submit(repo)
    await run_to(repo, recent.id, Finish(JobState.SUCCEEDED), at(0), at(hour + 1800))
    kept_long = await submit(repo, new(task="keep"))
    await run_to(repo, kept_long.id, Finish(JobState.SUCCEEDED), at(0), at(10))
    short = await submit(repo, new(task="short"))
    await run_to(repo, short.id, Finish(JobState.SUCCEEDED), at(0), at(2 * hour - 120))
    await submit(repo, now=at(0))  # queued: never prunable
    old_running = await submit(repo, now=at(0))
    await claim(repo, old_running.id, at(1))

    now = at(2 * hour)
    found = await repo.prunable(now, hour, {"keep": 24 * hour, "short": 60.0})
    assert len(found) == len(set(found))
    assert set(found) == {old_ok.id, old_failed.id, old_cancelled.id, short.id}
    assert set(await repo.prunable(now, hour, {})) == {
        old_ok.id,
        old_failed.id,
        old_cancelled.id,
        kept_long.id,
    }
    assert len(await repo.prunable(now, hour, {}, limit=2)) <= 2


async def test_delete_finished_deletes_only_still_finished_jobs_with_their_history(
    repo: Store,
) -> None:
    done = await submit(repo, new(idempotency=key("done-key", window=86400)))
    await run_to(repo, done.id, Finish(JobState.SUCCEEDED), at(0), at(1))
    failed = await submit(repo)
    await run_to(repo, failed.id, Finish(JobState.FAILED), at(0), at(1))
    retried = await submit(repo)
    await run_to(repo, retried.id, Finish(JobState.FAILED), at(0), at(1))
    queued = await submit(repo)
    running = await submit(repo)
    await claim(repo, running.id, at(2))
    prunable = await repo.prunable(at(7200), 3600, {})
    assert set(prunable) == {done.id, failed.id, retried.id}
    await repo.retry(retried.id, at(7200))  # no longer finished when the delete comes

    candidates = [*prunable, queued.id, running.id, "01NOSUCHJOB000000000000000"]
    deleted = await repo.delete_finished(candidates, at(7200))
    assert sorted(deleted) == sorted([done.id, failed.id])
    assert await repo.delete_finished([], at(7200)) == []
    for job_id in (done.id, failed.id):
        assert await absent(repo, job_id)
    assert (await repo.get(retried.id)).state is JobState.QUEUED
    assert (await repo.get(queued.id)).state is JobState.QUEUED
    assert (await repo.get(running.id)).state is JobState.RUNNING
    assert await stored_ids(repo) == {retried.id, queued.id, running.id}

    # Its attempts and its idempotency key went with it: the id and the key are free.
    reused, created = await repo.submit(
        new(idempotency=key("done-key", window=86400)), done.id, at(7300)
    )
    assert created and reused.job.id == done.id
    again = await claim(repo, done.id, at(7301))
    assert again.attempts == 1
    (attempt,) = (await repo.get(done.id)).history
    assert attempt.started_at == at(7301) and attempt.finished_at is None


async def test_a_pruned_job_is_gone_with_when_to_its_owner_only(repo: Store) -> None:
    mine = await submit(repo, new(owner="alice"))
    await run_to(repo, mine.id, Finish(JobState.FAILED), at(0), at(1))
    open_job = await submit(repo)
    await run_to(repo, open_job.id, Finish(JobState.SUCCEEDED), at(0), at(1))
    never = "01NOSUCHJOB000000000000000"
    deleted = await repo.delete_finished([mine.id, open_job.id, never], at(7200))
    assert sorted(deleted) == sorted([mine.id, open_job.id])

    for job_id, owner in ((mine.id, None), (mine.id, "alice"), (open_job.id, None)):
        with pytest.raises(Gone) as gone:
            await repo.get(job_id, owner=owner)
        assert gone.value.details == {"id": job_id, "pruned_at": format_timestamp(at(7200))}
        # The writes a client can ask for say the same.
        with pytest.raises(Gone):
            await repo.request_cancel(job_id, at(7201), owner=owner)
        with pytest.raises(Gone):
            await repo.retry(job_id, at(7201), owner=owner)
    # Another client learns nothing (as for a stored job of someone else's), and an id
    # that named no job stays unknown.
    for job_id, owner in ((mine.id, "bob"), (open_job.id, "bob"), (never, None)):
        with pytest.raises(NotFound) as missing:
            await repo.get(job_id, owner=owner)
        assert not isinstance(missing.value, Gone)
        with pytest.raises(NotFound) as missing:
            await repo.request_cancel(job_id, at(7201), owner=owner)
        assert not isinstance(missing.value, Gone)


async def test_pruned_ids_are_forgotten_after_their_memory(repo: Store) -> None:
    first, second = await submit(repo), await submit(repo)
    for job in (first, second):
        await run_to(repo, job.id, Finish(JobState.SUCCEEDED), at(0), at(1))
    await repo.delete_finished([first.id], at(100))
    await repo.delete_finished([second.id], at(200))
    assert await repo.forget_pruned(at(100)) == 0  # strictly before
    assert await repo.forget_pruned(at(150)) == 1
    with pytest.raises(NotFound) as missing:
        await repo.get(first.id)
    assert not isinstance(missing.value, Gone)
    with pytest.raises(Gone):
        await repo.get(second.id)


# -- 10. cron slots ------------------------------------------------------------------------


async def test_a_cron_slot_fires_exactly_once(repo: Store) -> None:
    slot1, slot2, slot3 = at(60), at(120), at(180)

    async def fire(previous: datetime | None, slot: datetime, now: datetime) -> list[Job]:
        fired = await asyncio.gather(
            *(
                repo.fire_schedule("nightly", previous, slot, new(task="cron"), new_job_id(), now)
                for _ in range(5)
            )
        )
        return [job for job in fired if job is not None]

    (first,) = await fire(None, slot1, at(61))
    assert first.state is JobState.QUEUED and first.task == "cron"
    assert await repo.schedule_slots() == {"nightly": slot1}
    assert await fire(None, slot1, at(62)) == []  # a restart firing the first slot again

    (second,) = await fire(slot1, slot2, at(121))
    assert await repo.schedule_slots() == {"nightly": slot2}
    stale = await repo.fire_schedule("nightly", slot1, slot3, new(), new_job_id(), at(181))
    assert stale is None
    assert await repo.schedule_slots() == {"nightly": slot2}
    assert await stored_ids(repo) == {first.id, second.id}
    assert (
        await repo.get(second.id)
    ).reason == f"scheduled by nightly for {format_timestamp(slot2)}"

    # A slot may advance without a job (new=None); other schedules are independent.
    assert await repo.fire_schedule("nightly", slot2, slot3, None, new_job_id(), at(181)) is None
    assert await repo.schedule_slots() == {"nightly": slot3}
    hourly = await repo.fire_schedule("hourly", None, slot1, new(), new_job_id(), at(61))
    assert hourly is not None
    assert await repo.schedule_slots() == {"nightly": slot3, "hourly": slot1}
    assert await stored_ids(repo) == {first.id, second.id, hourly.id}


async def test_a_fired_job_keeps_its_schedule_and_slot_for_life(repo: Store) -> None:
    fired = await repo.fire_schedule("nightly", None, at(60), new(), new_job_id(), at(61))
    assert fired is not None
    assert (fired.schedule, fired.schedule_slot) == ("nightly", at(60))
    # The reason changes with every transition; the schedule stays.
    done = await run_to(repo, fired.id, Finish(JobState.SUCCEEDED), at(62), at(63))
    assert done.reason is None
    for job in (done, await repo.get(fired.id), *(await repo.page(limit=10))):
        assert (job.schedule, job.schedule_slot) == ("nightly", at(60))
    submitted = await submit(repo)
    assert (submitted.schedule, submitted.schedule_slot) == (None, None)
    assert (await repo.get(submitted.id)).schedule is None


# -- 11. concurrent writers ----------------------------------------------------------------


async def test_concurrent_writers_lose_nothing(backend: Backend, repo: Store) -> None:
    other = backend.store(OTHER)
    total = 200
    outcomes: dict[str, str] = {}

    async def worker(i: int) -> None:
        store = repo if (i // 4) % 2 == 0 else other
        job = await submit(store, new(task=f"w{i % 5}", priority=i % 3), at(0))
        # Another node's head read may hold the row for a moment (SKIP LOCKED): the job
        # is claimed on a later tick, as a scheduler would, and never twice.
        claimed = []
        for _tick in range(1000):
            claimed = await store.claim_head(at(1), 1000, only(job.id))
            if claimed:
                break
        assert [change.job.id for change in claimed] == [job.id]
        assert await store.record_process(job.id, 1, 10_000 + i, float(i))
        assert await store.set_progress(job.id, 1, i / total, f"step {i}", at(2))
        progress = (await store.get(job.id)).progress
        assert progress is not None and progress.message == f"step {i}"
        kind = i % 4
        if kind == 0:
            ending: Finish | Requeue = Finish(JobState.SUCCEEDED, result=i)
        elif kind == 1:
            ending = Finish(JobState.FAILED, error=JobError("E", str(i)))
        elif kind == 2:
            ending = Requeue("requeued: retry", counts=FAILURE)
        else:
            outcomes[job.id] = "running"
            return
        changed = await store.end_attempt(job.id, 1, ending, at(3))
        assert changed is not None
        outcomes[job.id] = changed.job.state.value

    results = await asyncio.gather(*(worker(i) for i in range(total)), return_exceptions=True)
    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors == [], f"{len(errors)} writers failed, e.g. {errors[0]!r}"

    quarter = total // 4
    assert len(outcomes) == total
    assert await repo.state_counts() == counts(
        succeeded=quarter, failed=quarter, queued=quarter, running=quarter
    )
    assert await repo.active_counts() == {"queued": quarter, "running": quarter}
    assert await other.active_counts() == {"queued": quarter, "running": quarter}
    for job_id, state in outcomes.items():
        job = await repo.get(job_id)
        assert job.state.value == state, job_id
        if state == "running":
            assert job.progress is not None and job.progress.updated_at == at(2)
    running_here = len(await repo.running())
    running_there = len(await other.running())
    assert running_here + running_there == quarter


# -- 12. stats ----------------------------------------------------------------------------


async def test_task_stats_count_states_and_duration_percentiles(repo: Store) -> None:
    durations = [1, 2, 10]
    rss = [100, 300, 200]
    for seconds, peak in zip(durations, rss, strict=True):
        job = await submit(repo, new(task="x"))
        finish = Finish(JobState.SUCCEEDED, peak_rss=peak)
        await run_to(repo, job.id, finish, at(100), at(100 + seconds))
    failed = await submit(repo, new(task="x"))
    await run_to(repo, failed.id, Finish(JobState.FAILED), at(100), at(500))
    await submit(repo, new(task="x"))  # queued
    running = await submit(repo, new(task="x"))
    await claim(repo, running.id, at(100))
    await submit(repo, new(task="y"))

    stats = {s.task: s for s in await repo.task_stats()}
    assert set(stats) == {"x", "y"}
    x = stats["x"]
    assert x.count == 6
    assert x.states == counts(succeeded=3, failed=1, queued=1, running=1)
    assert x.success_rate == 0.75
    assert x.samples == 3
    assert (x.duration_p50, x.duration_p95) == (2.0, 10.0)  # nearest rank
    assert (x.peak_rss_p95, x.peak_rss_max) == (300, 300)
    y = stats["y"]
    assert y.count == 1 and y.states == counts(queued=1)
    assert y.success_rate is None and y.samples == 0
    assert y.duration_p50 is None and y.duration_p95 is None and y.peak_rss_max is None

    (recent_x,) = [s for s in await repo.task_stats(recent=2) if s.task == "x"]
    assert recent_x.samples == 2 and recent_x.count == 6  # the two newest: 2 s and 10 s
    assert (recent_x.duration_p50, recent_x.duration_p95) == (2.0, 10.0)


def task_run(job: Job, attempt: int, outcome: str, finished: datetime, peak: int) -> TaskRun:
    return TaskRun(job.task, job.id, attempt, outcome, peak, 1.5, 2.25, finished)


async def test_recent_runs_are_written_with_the_attempts_end(repo: Store) -> None:
    job = await submit(repo, new(task="measured"))
    await claim(repo, job.id, at(1))
    first = task_run(job, 1, "requeued", at(2), 1000)
    requeue = Requeue("requeued: pressure", counts=PRESSURE)
    assert await repo.end_attempt(job.id, 1, requeue, at(2), run=first) is not None
    assert await repo.recent_runs("measured", 10) == [first]

    await claim(repo, job.id, at(3))
    stale = task_run(job, 1, "succeeded", at(4), 9999)
    assert await repo.end_attempt(job.id, 1, Finish(JobState.SUCCEEDED), at(4), run=stale) is None
    assert await repo.recent_runs("measured", 10) == [first]  # nothing of the stale end

    second = task_run(job, 2, "succeeded", at(5), 2000)
    done = await repo.end_attempt(job.id, 2, Finish(JobState.SUCCEEDED), at(5), run=second)
    assert done is not None
    assert await repo.recent_runs("measured", 10) == [second, first]  # newest first
    assert await repo.recent_runs("measured", 1) == [second]
    assert await repo.recent_runs("other", 10) == []


@pytest.mark.parametrize("result", ["go", "", "[1]", None, 1.5, [1, "two"], {"k": "v"}])
async def test_a_result_of_any_json_type_reads_back_as_it_was(repo: Store, result: Any) -> None:
    """A result that is a JSON string (``"go"``, even ``"[1]"``) is a string, not JSON text."""
    job_id = new_job_id()
    await repo.submit(new(args={"s": "text"}), job_id, at(0))
    (claimed,) = await repo.claim_head(at(1), 10, everything)
    ended = await repo.end_attempt(
        job_id, claimed.job.attempts, Finish(JobState.SUCCEEDED, result=result), at(2)
    )
    assert ended is not None and ended.job.result == result
    read = await repo.get(job_id)
    assert read.result == result and read.args == {"s": "text"}
    (listed,) = await repo.page()
    assert listed.result == result


# -- 13. the page's pictures ------------------------------------------------------------


async def test_recent_attempts_are_the_newest_started_jobs_and_every_running_one(
    repo: Store,
) -> None:
    old_running = await submit(repo, new(task="sleep"))
    await claim(repo, old_running.id, at(0))
    done = []
    for n in range(3):
        job = await submit(repo, new(owner="alice" if n == 2 else None, max_retries=1))
        done.append(job.id)
        start = 10 * (n + 1)
        if n == 1:  # a retried job: two attempts, the first requeued
            await claim(repo, job.id, at(start))
            requeue = Requeue("flaky", counts=FAILURE)
            assert await repo.end_attempt(job.id, 1, requeue, at(start + 1)) is not None
            start += 2
        await run_to(repo, job.id, Finish(JobState.SUCCEEDED), at(start), at(start + 1))
    await submit(repo, new())  # queued: no attempt

    spans = await repo.recent_attempts(2)
    # The two newest started jobs (the retried one with both attempts), and the running one.
    assert [(s.job_id, s.attempt) for s in spans] == [
        (old_running.id, 1),
        (done[1], 1),
        (done[1], 2),
        (done[2], 1),
    ]
    running, retried = spans[0], spans[1]
    assert (running.task, running.finished_at, running.outcome) == ("sleep", None, None)
    assert running.state is JobState.RUNNING and running.started_at == at(0)
    assert (retried.outcome, retried.state, retried.node) == ("retrying", JobState.SUCCEEDED, LOCAL)
    assert (retried.started_at, retried.finished_at) == (at(20), at(21))
    assert (spans[2].started_at, spans[2].outcome) == (at(22), "succeeded")
    # A client sees only its own jobs.
    assert [s.job_id for s in await repo.recent_attempts(10, owner="alice")] == [done[2]]


async def test_task_series_counts_and_percentiles_per_bucket(repo: Store) -> None:
    async def finish(task: str, start: float, seconds: float, state: JobState) -> None:
        job = await submit(repo, new(task=task))
        await run_to(repo, job.id, Finish(state), at(start), at(start + seconds))

    await finish("x", -30, 1, JobState.SUCCEEDED)  # ended before `since`
    for n, seconds in enumerate((1, 2, 3, 10)):  # ending in the first minute
        await finish("x", n, seconds, JobState.SUCCEEDED)
    await finish("x", 5, 4, JobState.FAILED)
    await finish("x", 125, 2, JobState.SUCCEEDED)  # the third minute
    await finish("y", 70, 5, JobState.CANCELLED)

    series = await repo.task_series(T0, 60)
    assert sorted(series) == ["x", "y"]
    first, third = series["x"]
    assert (first.start, third.start) == (T0, at(120))
    assert (first.finished, first.succeeded, first.failed, first.cancelled) == (5, 4, 1, 0)
    # Nearest-rank percentiles of the succeeded durations 1, 2, 3, 10 (not the failed 4).
    assert (first.duration_p50, first.duration_p95) == (2, 10)
    assert (third.finished, third.duration_p50, third.duration_p95) == (1, 2, 2)
    (cancelled,) = series["y"]
    assert (cancelled.start, cancelled.finished, cancelled.cancelled) == (at(60), 1, 1)
    assert cancelled.duration_p50 is None
    # The newest rows only, when told to read fewer.
    (newest,) = (await repo.task_series(T0, 60, rows=1))["x"]
    assert (newest.start, newest.finished) == (at(120), 1)
