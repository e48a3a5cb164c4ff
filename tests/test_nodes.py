"""Nodes sharing one PostgreSQL database: incarnations, heartbeats, the leader lease, the
leader's rescue of dead nodes' jobs, self-fencing and definition conflicts
(``Store``'s node operations and ``maintenance.NodeLife``).  Each test gets a database of
its own; several ``Store`` objects on it act as nodes.  The processes' side (kill -9,
SIGSTOP, cron across nodes) is in test_cluster.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest

from jobserver.errors import ConfigError, StorageUnavailable
from jobserver.jobs import Job, JobState, new_job_id, utcnow
from jobserver.maintenance import NodeLife, definition_conflicts, rescue_end
from jobserver.store import Beat, Finish, NewJob, Requeue, Store, postgres
from jobserver.store.driver import Driver, Operation
from tests.conftest import PassThroughDriver, claim, postgresql_database

pytestmark = pytest.mark.anyio
T = TypeVar("T")

TIMEOUT = 0.6  # node_timeout of these tests (seconds)
RESOURCES = {"capacity": {"cpus": 2.0, "memory": 2**30}, "free": {"cpus": 2.0, "memory": 2**30}}
DEFINITIONS: dict[str, Any] = {
    "tasks": {"work": {"function": "tasks:work", "max_concurrency": None}},
    "schedules": {},
}


class Switchable(PassThroughDriver):
    """A driver whose writes fail with ``StorageUnavailable`` while ``failing`` is set (a
    database this node cannot reach), reads and all else passed through."""

    def __init__(self, inner: Driver) -> None:
        super().__init__(inner)
        self.failing = False

    async def write(self, op: Operation[T], *, batched: bool = True) -> T:
        if self.failing:
            raise StorageUnavailable("PostgreSQL is unreachable (test)")
        return await self.inner.write(op, batched=batched)

    async def insert(self, table: Any, rows: Any) -> None:
        if self.failing:
            raise StorageUnavailable("PostgreSQL is unreachable (test)")
        await self.inner.insert(table, rows)


@pytest.fixture
def url() -> Iterator[str]:
    with postgresql_database() as found:
        yield found


@pytest.fixture
async def open_node(url: str) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
    """Open a store as a node named ``name``, registered as a new incarnation."""
    opened: list[Store] = []

    async def factory(name: str, definitions: dict[str, Any] | None = None) -> Store:
        store = Store(Switchable(postgres.PostgresDriver(url)), node=name)
        opened.append(store)
        await store.register_node(
            f"{name}.{new_job_id()[-6:]}",
            url=None,
            resources=RESOURCES,
            definitions=DEFINITIONS if definitions is None else definitions,
            timeout=TIMEOUT,
            check=lambda live: None,
        )
        return store

    yield factory
    for store in opened:
        await store.close()


def rescue(job: Job) -> tuple[Finish | Requeue, str]:
    return rescue_end(job, 2, f"its node {job.node} was declared dead")


async def beat(store: Store) -> Beat:
    return await store.heartbeat(RESOURCES, timeout=TIMEOUT, lease=TIMEOUT / 2, rescue=rescue)


async def beat_until(
    store: Store, done: Callable[[Beat], bool], what: str, keep_alive: tuple[Store, ...] = ()
) -> Beat:
    """Heartbeat ``store`` (and ``keep_alive``) every 50 ms until ``done`` holds."""
    deadline = time.monotonic() + 10
    while True:
        for other in keep_alive:
            await beat(other)
        found = await beat(store)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def submit_and_claim(store: Store, new: NewJob | None = None) -> Job:
    changed, _ = await store.submit(new or NewJob("work", {}, 0, 0), new_job_id(), utcnow())
    job = await claim(store, changed.job.id)
    assert job is not None
    return job


# -- incarnations and the lease ----------------------------------------------------------


async def test_one_leader_and_a_restarted_node_is_a_new_incarnation(
    open_node: Callable[..., Awaitable[Store]],
) -> None:
    a, b = await open_node("a"), await open_node("b")
    assert (await beat(a)).leader and not (await beat(b)).leader
    assert (await beat(a)).leader  # the holder renews its own lease

    job = await submit_and_claim(a)
    assert job.node == "a"
    again = await open_node("a")  # "a" restarted while its old run still heartbeats
    assert again.incarnation != a.incarnation
    assert await again.running() == []  # never the other incarnation's attempts
    assert [found.id for found in await a.running()] == [job.id]
    # A late write under the name, from the new incarnation, changes nothing.
    done = Finish(JobState.SUCCEEDED, result=1)
    assert await again.end_attempt(job.id, job.attempts, done, utcnow()) is None

    # Renewed just before the listing: the lease lasts TIMEOUT / 2, less than the steps
    # above can take on a loaded machine.
    assert (await beat(a)).leader
    listed = {node.incarnation: node for node in await b.nodes(TIMEOUT)}
    assert set(listed) == {a.incarnation, b.incarnation, again.incarnation}
    assert listed[a.incarnation].leader and listed[a.incarnation].alive
    assert listed[a.incarnation].running == 1 and listed[b.incarnation].running == 0
    assert listed[b.incarnation].resources == RESOURCES


async def test_a_retired_node_is_dead_at_once_and_gives_up_the_lease(
    open_node: Callable[..., Awaitable[Store]],
) -> None:
    a, b = await open_node("a"), await open_node("b")
    assert (await beat(a)).leader
    await a.retire_node()
    assert (await beat(b)).leader  # no wait for the lease to run out
    assert not (await beat(a)).alive  # a retired incarnation renews nothing
    listed = {node.incarnation: node for node in await b.nodes(TIMEOUT)}
    assert not listed[a.incarnation].alive and listed[a.incarnation].dead_at is not None


async def test_an_expired_lease_passes_to_a_live_node(
    open_node: Callable[..., Awaitable[Store]],
) -> None:
    a, b = await open_node("a"), await open_node("b")
    assert (await beat(a)).leader
    # a stays alive (it heartbeats below through its own row) but stops renewing: once
    # its lease is past, b takes it; judged by the database's clock.
    found = await beat_until(b, lambda found: found.leader, "b to take the lease")
    assert found.alive and not (await beat(a)).leader


# -- a dead node's jobs ------------------------------------------------------------------


async def test_the_leader_rescues_a_silent_nodes_jobs_once_and_its_late_writes_change_nothing(
    open_node: Callable[..., Awaitable[Store]],
) -> None:
    a, b, c = await open_node("a"), await open_node("b"), await open_node("c")
    assert (await beat(b)).leader
    first = await submit_and_claim(a)
    second = await submit_and_claim(a)
    mine = await submit_and_claim(b)  # a live node's job is never touched

    found = await beat_until(
        b, lambda found: bool(found.rescued), "a to be declared dead", keep_alive=(c,)
    )
    assert found.declared_dead == (a.incarnation,)
    rescued = {change.job.id: change.job for change, _ in found.rescued}
    assert set(rescued) == {first.id, second.id}
    for job in rescued.values():
        assert job.state is JobState.QUEUED and job.rescues == 1
        assert "its node a was declared dead" in (job.reason or "")
    again = await beat(b)
    assert again.rescued == () and again.declared_dead == ()  # exactly once
    assert (await b.get(mine.id)).state is JobState.RUNNING

    # c claims a rescued job; a wakes up and reports its attempts: refused by the fence.
    taken = await claim(c, first.id)
    assert taken is not None and taken.attempts == 2
    late = Finish(JobState.SUCCEEDED, result="late")
    assert await a.end_attempt(first.id, first.attempts, late, utcnow()) is None
    assert await a.end_attempt(second.id, second.attempts, late, utcnow()) is None
    assert not await a.set_progress(first.id, first.attempts, 0.5, "late", utcnow())
    assert not await a.record_process(first.id, first.attempts, 1, None)
    assert not (await beat(a)).alive  # declared dead stays dead
    stored = await c.get(first.id)
    assert (stored.state, stored.attempts, stored.result) == (JobState.RUNNING, 2, None)
    assert [(h.node, h.outcome) for h in stored.history] == [("a", "interrupted"), ("c", None)]
    assert (await c.get(second.id)).state is JobState.QUEUED


async def test_a_dead_nodes_job_past_max_rescues_is_lost_and_a_cancel_is_kept(
    open_node: Callable[..., Awaitable[Store]],
) -> None:
    a, b = await open_node("a"), await open_node("b")
    assert (await beat(b)).leader
    cancelled = await submit_and_claim(a)
    await b.request_cancel(cancelled.id, utcnow())  # acknowledged, not yet acted on
    lost = await submit_and_claim(a)
    for rescues in range(2):  # rescued twice before: max_rescues (2) is reached
        requeue = Requeue("test", counts="rescue")
        assert await a.end_attempt(lost.id, lost.attempts, requeue, utcnow()) is not None
        claimed = await claim(a, lost.id)
        assert claimed is not None and claimed.rescues == rescues + 1
        lost = claimed

    await beat_until(b, lambda found: bool(found.rescued), "a to be declared dead")
    ended = await b.get(lost.id)
    assert ended.state is JobState.FAILED and ended.error is not None
    assert ended.error.type == "lost" and "max_rescues = 2" in ended.error.message
    kept = await b.get(cancelled.id)
    assert kept.state is JobState.CANCELLED and kept.rescues == 0


async def test_jobs_left_running_by_an_unknown_incarnation_are_rescued(
    open_node: Callable[..., Awaitable[Store]], url: str
) -> None:
    """A row an older version left running names no incarnation that heartbeats."""
    a = await open_node("a")
    job = await submit_and_claim(a)
    with psycopg.connect(postgres.conninfo(url)) as admin:
        admin.execute("UPDATE jobs SET incarnation = 'old-a' WHERE id = %s", [job.id])
    found = await beat(a)
    assert found.leader and [change.job.id for change, _ in found.rescued] == [job.id]


# -- self-fencing -------------------------------------------------------------------------


def node_life(store: Store, fenced: list[str], woken: list[int]) -> NodeLife:
    return NodeLife(
        store,
        heartbeat_interval=TIMEOUT / 6,
        node_timeout=TIMEOUT,
        url=None,
        definitions=DEFINITIONS,
        resources=lambda: RESOURCES,
        max_rescues=2,
        fence=fenced.append,
        wake=lambda: woken.append(1),
    )


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_node_that_cannot_heartbeat_fences_itself_then_claims_again(
    url: str,
) -> None:
    driver = Switchable(postgres.PostgresDriver(url))
    store = Store(driver, node="a")
    fenced: list[str] = []
    life = node_life(store, fenced, [])
    try:
        await life.register()
        await life.start()
        assert life.healthy() and (await life.tick()) is not None
        await wait_until(life.leading, "a to lead")
        driver.failing = True  # the database cannot be reached from here
        cut = time.monotonic()
        await wait_until(lambda: bool(fenced), "the fence")
        # Fenced after 0.75 of the timeout, and once, whatever the ticks since.
        assert time.monotonic() - cut <= 0.75 * TIMEOUT + TIMEOUT / 3
        assert not life.healthy() and not life.leading()
        assert "no heartbeat for" in fenced[0]
        for _ in range(3):  # more failing heartbeats: no second fence
            assert await life.tick() is None
        assert len(fenced) == 1
        driver.failing = False
        await wait_until(life.healthy, "heartbeats again")
        assert len(fenced) == 1
    finally:
        await life.stop()
        await store.close()


async def test_a_frozen_node_fences_first_then_joins_again_as_a_new_incarnation(
    open_node: Callable[..., Awaitable[Store]], url: str
) -> None:
    """No tick ran for longer than the timeout (the process was stopped): the first tick
    after kills the jobs before anything else, finds the incarnation declared dead and
    registers a new one, whose claims are its own."""
    leader = await open_node("leader")
    store = Store(postgres.PostgresDriver(url), node="a")
    fenced: list[str] = []
    woken: list[int] = []
    life = node_life(store, fenced, woken)
    try:
        await life.register()
        await beat(leader)
        job = await submit_and_claim(store)
        old = store.incarnation
        await beat_until(leader, lambda found: bool(found.rescued), "a to be declared dead")
        assert not life.healthy()  # no claim from here on, before any tick
        found = await life.tick()
        assert found is not None and not found.alive
        assert len(fenced) == 1 and store.incarnation != old and life.healthy()
        late = Finish(JobState.SUCCEEDED, result="late")
        assert await store.end_attempt(job.id, job.attempts, late, utcnow()) is None
        retaken = await claim(store, job.id)
        assert retaken is not None and retaken.attempts == 2
        assert [found.id for found in await store.running()] == [job.id]
    finally:
        await store.close()


# -- definitions ------------------------------------------------------------------------


def test_definition_conflicts_name_each_difference_and_ignore_unknown_names() -> None:
    mine = {
        "tasks": {"work": {"function": "new:work", "timeout": None}, "fresh": {"function": "x"}},
        "schedules": {"nightly": {"cron": "0 3 * * *", "task": "work"}},
    }
    live = [
        (
            "b",
            {
                "tasks": {"work": {"function": "old:work", "timeout": None}, "gone": {}},
                "schedules": {"nightly": {"cron": "0 4 * * *", "task": "work"}},
            },
        )
    ]
    assert definition_conflicts(mine, live) == [
        'tasks.work.function is "new:work" here but "old:work" on live node \'b\'',
        'schedules.nightly.cron is "0 3 * * *" here but "0 4 * * *" on live node \'b\'',
    ]
    assert definition_conflicts(mine, [("b", {"tasks": {"fresh": {"function": "x"}}})]) == []


async def test_a_node_whose_definitions_conflict_with_a_live_nodes_is_refused(
    open_node: Callable[..., Awaitable[Store]], url: str
) -> None:
    b = await open_node("b")
    store = Store(postgres.PostgresDriver(url), node="a")
    changed = {"tasks": {"work": {"function": "tasks:other", "max_concurrency": None}}}
    life = NodeLife(
        store,
        heartbeat_interval=TIMEOUT / 6,
        node_timeout=TIMEOUT,
        url=None,
        definitions=changed,
        resources=lambda: RESOURCES,
        max_rescues=2,
        fence=lambda note: None,
        wake=lambda: None,
    )
    try:
        with pytest.raises(ConfigError) as refused:
            await life.register()
        assert "tasks.work.function" in refused.value.message
        assert '"tasks:other" here but "tasks:work"' in refused.value.message
        assert {node.name for node in await b.nodes(TIMEOUT)} == {"b"}  # nothing stored
        # Once b is dead, a may join with its new definition (a rolling upgrade).
        await b.retire_node()
        await life.register()
        assert {node.name for node in await b.nodes(TIMEOUT)} == {"a", "b"}
    finally:
        await store.close()
