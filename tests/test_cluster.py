"""jobserver on PostgreSQL, end to end: real ``jobserver serve`` processes on loopback,
each test on a fresh database of its own (``postgresql_database``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from jobserver.store import enqueue, postgres
from tests.conftest import (
    SAMPLE_TASKS,
    ServerProcess,
    poll_value,
    postgresql_database,
    start_server,
    write_config,
)
from tests.test_e2e import run_cli, submit, wait_for_job

pytestmark = pytest.mark.integration


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh, empty database: the server migrates it itself."""
    with postgresql_database(migrated=False) as found:
        yield found


def test_serve_on_postgresql_walkthrough(tmp_path: Path, url: str, server_factory: Any) -> None:
    config_path = write_config(tmp_path, server={"database": url}, jobs={"retry_base": "50ms"})
    server: ServerProcess = server_factory(config_path)
    assert not (tmp_path / "data" / "jobserver.db").exists()

    # submit, poll, result
    added = submit(server.url, "add", a=2, b=3)
    done = wait_for_job(server.url, added["id"], "succeeded")
    assert done["result"] == 5 and done["attempts"] == 1

    # logs
    echoed = submit(server.url, "echo", text="hello")
    wait_for_job(server.url, echoed["id"], "succeeded")
    logs = httpx.get(f"{server.url}/api/v1/jobs/{echoed['id']}/logs", timeout=10)
    assert logs.status_code == 200 and "echo hello" in logs.text

    # cancel a running job
    gate = tmp_path / "gate"
    waiting = submit(server.url, "wait_for_file", path=str(gate))
    wait_for_job(server.url, waiting["id"], "running")
    cancelled = httpx.post(f"{server.url}/api/v1/jobs/{waiting['id']}/cancel", timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    wait_for_job(server.url, waiting["id"], "cancelled")

    # a failure, then a retry by request
    failing = submit(server.url, "fail", message="boom")
    failed = wait_for_job(server.url, failing["id"], "failed")
    assert failed["error"]["message"] == "boom"
    retried = run_cli("retry", failing["id"], "--json", "--url", server.url)
    assert retried.returncode == 0 and json.loads(retried.stdout)["state"] == "queued"
    again = wait_for_job(server.url, failing["id"], "failed")
    assert again["attempts"] == 2 and len(again["history"]) == 2

    listed = httpx.get(f"{server.url}/api/v1/jobs?state=succeeded", timeout=10).json()
    assert {job["id"] for job in listed["jobs"]} == {added["id"], echoed["id"]}
    system = httpx.get(f"{server.url}/api/v1/system", timeout=10).json()
    assert system["jobs"] == {"queued": 0, "running": 0}
    assert server.stop() == 0


def test_backup_on_postgresql_points_at_pg_dump(tmp_path: Path, url: str) -> None:
    config_path = write_config(tmp_path, server={"database": url})
    result = run_cli("backup", str(tmp_path / "copy.db"), "--config", str(config_path))
    assert result.returncode == 2
    assert "pg_dump" in result.stderr


def test_migrate_on_postgresql(tmp_path: Path, url: str) -> None:
    config_path = write_config(tmp_path, server={"database": url})
    for _ in range(2):  # the second run finds nothing to do
        result = run_cli("migrate", "--config", str(config_path))
        assert result.returncode == 0, result.stderr
        assert "PostgreSQL database is up to date" in result.stdout


def test_a_restarted_node_rescues_only_its_own_jobs(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Two nodes on one database: each claims under its own name, and a node's start-up
    rescue requeues only what it ran itself, never the other node's running job."""
    servers = {}
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        config_path = write_config(
            directory,
            server={"database": url},
            tasks={"wait_for_file": {"function": "sample_tasks:wait_for_file", "cpus": 0.1}},
            scheduler={"max_jobs": 1},
        )
        config_path.write_text(config_path.read_text() + f'\n[cluster]\nnode = "{name}"\n')
        servers[name] = (config_path, server_factory(config_path))
    gates = {name: tmp_path / f"gate-{name}" for name in ("a", "b")}
    jobs = [submit(servers["a"][1].url, "wait_for_file", path=str(gate)) for gate in gates.values()]
    running = [wait_for_job(servers["a"][1].url, job["id"], "running") for job in jobs]
    assert {job["history"][0]["node"] for job in running} == {"a", "b"}
    on = {job["history"][0]["node"]: job["id"] for job in running}

    config_a, server_a = servers["a"]
    server_a.stop()  # shutdown_grace 0: its job goes back to the queue
    server_factory(config_a)
    other = httpx.get(f"{servers['b'][1].url}/api/v1/jobs/{on['b']}", timeout=10).json()
    assert other["state"] == "running" and other["attempts"] == 1
    for gate in gates.values():
        gate.write_text("go")
    for job_id in on.values():
        done = wait_for_job(servers["b"][1].url, job_id, "succeeded")
        assert done["result"] == "go"
    assert httpx.get(f"{servers['b'][1].url}/api/v1/jobs/{on['b']}").json()["attempts"] == 1


# -- several nodes at once: the proofs of issue 14 -------------------------------------------


def start_nodes(
    tmp_path: Path,
    url: str,
    server_factory: Any,
    tasks: dict[str, dict[str, dict[str, Any]]],
    *,
    scheduler: dict[str, Any] | None = None,
    cluster: str = "",
) -> dict[str, ServerProcess]:
    """A ``jobserver serve`` process per name in ``tasks`` (its own port and jobs
    directory, the tasks given), all on the database at ``url``."""
    nodes = {}
    for name, known in tasks.items():
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        config_path = write_config(
            directory, server={"database": url}, tasks=known, scheduler=scheduler
        )
        config_path.write_text(
            config_path.read_text() + f'\n[cluster]\nnode = "{name}"\n{cluster}\n'
        )
        nodes[name] = server_factory(config_path)
    return nodes


STAMP = {"function": "sample_tasks:stamp", "cpus": 0.1, "memory": "16MiB"}
WAIT = {"function": "sample_tasks:wait_for_file", "cpus": 0.1, "memory": "16MiB"}


def runs_recorded(directory: Path) -> dict[str, list[tuple[float, float]]]:
    """Per job id, the (start, end) of every run the job itself recorded."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for path in directory.iterdir():
        job_id = path.name.split("-")[0]
        started, ended = map(float, path.read_text().split())
        runs.setdefault(job_id, []).append((started, ended))
    return runs


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of spans that overlap at one moment (an end before a start at
    the same instant: back to back is not overlapping)."""
    points = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in points:
        current += step
        most = max(most, current)
    return most


# 2,000 jobs took 84 s on the 2-core development machine (three nodes and their jobs
# share the two cores): 1,500 keep the test near a minute.  The 10,000:
# JOBSERVER_CLUSTER_JOBS=10000 (and a --timeout to match).
JOBS = int(os.environ.get("JOBSERVER_CLUSTER_JOBS", "1500"))


@pytest.mark.timeout(300)
def test_three_nodes_run_every_job_exactly_once_within_a_cluster_wide_limit(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Issue 14, proof 2: 3 nodes, JOBS jobs submitted through all three; every job runs
    exactly once, and a task with max_concurrency = 2 never has more than 2 running on
    the whole cluster, judged from the start and end times the jobs wrote themselves."""
    stamps, limited_stamps = tmp_path / "stamps", tmp_path / "limited"
    stamps.mkdir()
    limited_stamps.mkdir()
    tasks = {"stamp": STAMP, "limited": STAMP | {"max_concurrency": 2}}
    nodes = start_nodes(
        tmp_path,
        url,
        server_factory,
        {name: tasks for name in ("a", "b", "c")},
        scheduler={"max_jobs": 6, "poll_interval": "200ms"},
    )
    limited_count = JOBS // 10
    bodies = [
        # First in every node's queue head, and long enough to overlap: without the lock
        # each node would run 2 at once.
        {
            "task": "limited",
            "args": {"directory": str(limited_stamps), "seconds": 0.1},
            "priority": 10,
        }
        if n % 10 == 0
        else {"task": "stamp", "args": {"directory": str(stamps)}}
        for n in range(JOBS)
    ]
    urls = [node.url for node in nodes.values()]
    started = time.monotonic()

    async def submit_all() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            gate = asyncio.Semaphore(24)

            async def one(n: int) -> str:
                async with gate:
                    answer = await client.post(f"{urls[n % 3]}/api/v1/jobs", json=bodies[n])
                assert answer.status_code == 202, answer.text
                return str(answer.json()["id"])

            return await asyncio.gather(*(one(n) for n in range(JOBS)))

    ids = asyncio.run(submit_all())
    assert len(set(ids)) == JOBS

    with psycopg.connect(url) as db:

        def states() -> dict[str, int]:
            rows = db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
            db.commit()
            return dict(rows)

        poll_value(
            lambda: states() == {"succeeded": JOBS}, "every job to succeed", timeout=JOBS / 8
        )
        took = time.monotonic() - started
        (attempts,) = db.execute("SELECT max(attempts) FROM jobs").fetchone() or (None,)
        by_node = dict(
            db.execute(
                "SELECT node, count(*) FROM jobs WHERE task = 'limited' GROUP BY node"
            ).fetchall()
        )
    assert attempts == 1  # never claimed twice
    plain, limited = runs_recorded(stamps), runs_recorded(limited_stamps)
    assert len(plain) + len(limited) == JOBS and set(plain) | set(limited) == set(ids)
    assert all(len(runs) == 1 for runs in [*plain.values(), *limited.values()])  # 0 twice
    # The limit held on the whole cluster, while every node ran some of the task's jobs.
    assert len(limited) == limited_count
    assert most_at_once([span for runs in limited.values() for span in runs]) == 2
    assert set(by_node) == {"a", "b", "c"}
    print(f"{JOBS} jobs on 3 nodes in {took:.1f} s")


def test_one_idempotency_key_sent_to_three_nodes_at_once_makes_one_job(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Issue 14, proof 6a."""
    nodes = start_nodes(
        tmp_path, url, server_factory, {name: {"add": SAMPLE_TASKS["add"]} for name in "abc"}
    )
    keys = [f"key-{n}" for n in range(30)]

    async def race(key: str, client: httpx.AsyncClient) -> set[str]:
        answers = await asyncio.gather(
            *(
                client.post(
                    f"{node.url}/api/v1/jobs",
                    json={"task": "add", "args": {"a": 1, "b": 2}},
                    headers={"Idempotency-Key": key},
                )
                for node in nodes.values()
            )
        )
        assert all(answer.status_code in (200, 202) for answer in answers), answers
        return {answer.json()["id"] for answer in answers}

    async def all_keys() -> list[set[str]]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [await race(key, client) for key in keys]

    found = asyncio.run(all_keys())
    assert all(len(ids) == 1 for ids in found)  # each key: one job, whichever node answered
    with psycopg.connect(url) as db:
        (count,) = db.execute("SELECT count(*) FROM jobs").fetchone() or (0,)
    assert count == len(keys)


def test_dependents_submitted_while_their_parent_fails_are_never_orphaned(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Issue 14, proof 6b: dependents submitted through two other nodes while the parent
    runs and fails on one: every dependent ends cancelled, none stays queued."""
    tasks = {"fail": SAMPLE_TASKS["fail"], "add": SAMPLE_TASKS["add"]}
    nodes = start_nodes(
        tmp_path,
        url,
        server_factory,
        {"a": tasks, "b": {"add": SAMPLE_TASKS["add"]}, "c": {"add": SAMPLE_TASKS["add"]}},
        scheduler={"poll_interval": "50ms"},
    )
    a, b, c = nodes.values()

    async def one_parent(client: httpx.AsyncClient) -> list[str]:
        parent = await client.post(f"{a.url}/api/v1/jobs", json={"task": "fail"})
        parent_id = parent.json()["id"]
        dependents = []
        ended = 0
        # Keep submitting until a few dependents came after the parent had failed.
        for n in range(200):
            answer = await client.post(
                f"{(b, c)[n % 2].url}/api/v1/jobs",
                json={"task": "add", "args": {"a": n}, "depends_on": [parent_id]},
            )
            assert answer.status_code == 202, answer.text
            dependents.append(answer.json()["id"])
            if answer.json()["state"] == "cancelled":
                ended += 1
                if ended >= 3:
                    break
        return dependents

    async def parents() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [job for _ in range(20) for job in await one_parent(client)]

    dependents = asyncio.run(parents())
    with psycopg.connect(url) as db:

        def left() -> dict[str, int]:
            rows = db.execute(
                "SELECT state, count(*) FROM jobs WHERE task = 'add' GROUP BY state"
            ).fetchall()
            db.commit()
            return dict(rows)

        poll_value(lambda: left() == {"cancelled": len(dependents)}, "every dependent to end")


@pytest.mark.parametrize("listen", [True, False], ids=["notify", "polling"])
def test_long_poll_and_cancel_across_nodes(
    tmp_path: Path, url: str, server_factory: Any, listen: bool
) -> None:
    """Issue 14, proof 7: a long-poll on one node of a job that another node runs answers
    within 100 ms of the change with LISTEN/NOTIFY, within a poll interval without; a
    cancel sent to one node stops the job on the other as fast.  Node ``b`` does not know
    the task, so ``a`` runs it (and ``b`` leaves it queued meanwhile: a rolling upgrade)."""
    poll = 2.0 if listen else 0.5
    nodes = start_nodes(
        tmp_path,
        url,
        server_factory,
        {"a": {"wait_for_file": WAIT}, "b": {"add": SAMPLE_TASKS["add"]}},
        scheduler={"poll_interval": f"{poll}s"},
        cluster=f"listen = {'true' if listen else 'false'}",
    )
    a, b = nodes["a"], nodes["b"]
    slack = 0.1 if listen else poll + 0.25

    gate = tmp_path / "gate"
    job = submit(a.url, "wait_for_file", path=str(gate))
    running = wait_for_job(b.url, job["id"], "running")
    assert running["history"][0]["node"] == "a"
    etag = httpx.get(f"{b.url}/api/v1/jobs/{job['id']}", timeout=10).headers["etag"]

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            httpx.get,
            f"{b.url}/api/v1/jobs/{job['id']}?wait=20",
            headers={"If-None-Match": etag},
            timeout=30,
        )
        time.sleep(0.3)  # the long-poll is waiting on b
        gate.write_text("go")
        answer = waiting.result()
        answered = time.time()
    document = answer.json()
    assert document["state"] == "succeeded"
    late = answered - parse_time(document["finished_at"])
    assert late < slack, f"b answered {late:.3f} s after a finished the job"
    print(f"long-poll on b answered {late * 1000:.0f} ms after a finished the job")

    # An event stream on b follows a job that runs on a to its end.
    gate = tmp_path / "gate-2"
    streamed = submit(a.url, "wait_for_file", path=str(gate))
    wait_for_job(b.url, streamed["id"], "running")
    states: list[str] = []
    url_b = f"{b.url}/api/v1/jobs/{streamed['id']}/events"
    with httpx.stream("GET", url_b, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                document = json.loads(line.removeprefix("data: "))
                states.append(document["state"])
                if document["state"] == "running":
                    gate.write_text("go")
                elif document["state"] == "succeeded":
                    late = time.time() - parse_time(document["finished_at"])
            if line == "event: end":
                break
    assert states[0] == "running" and states[-1] == "succeeded"
    assert late < slack, f"the stream on b told the end {late:.3f} s after a finished it"

    # Cancel through b a job that runs on a.
    other = submit(a.url, "wait_for_file", path=str(tmp_path / "never"))
    wait_for_job(b.url, other["id"], "running")
    asked = time.time()
    cancelled = httpx.post(f"{b.url}/api/v1/jobs/{other['id']}/cancel", timeout=10)
    assert cancelled.status_code == 202
    ended = wait_for_job(b.url, other["id"], "cancelled")
    late = parse_time(ended["finished_at"]) - asked
    # NOTIFY: the cancel reaches a at once (its own reading of cancel flags is every
    # poll interval / 2 = 1 s); polling: within a poll interval, plus the stop.
    assert late < (0.5 if listen else poll + 0.5), f"stopped {late:.3f} s after the cancel"
    print(f"cancel through b stopped the job on a in {late * 1000:.0f} ms")


def test_a_node_leaves_a_job_of_a_task_it_does_not_know_queued_for_one_that_does(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Issue 14, rolling upgrades: the job comes from the application's own transaction
    (``jobserver.store.enqueue``) before any node knows its task; node ``old`` skips it
    (never fails it), and ``new``, started later, runs it."""
    old = start_nodes(tmp_path, url, server_factory, {"old": {"add": SAMPLE_TASKS["add"]}})["old"]
    with psycopg.connect(url) as app:
        job_id = enqueue(app, "added_later", {"a": 2, "b": 3})
        app.commit()
    waiting = poll_value(
        lambda: (
            "waits for a node that knows it"
            in (httpx.get(f"{old.url}/api/v1/jobs/{job_id}", timeout=5).text)
        ),
        "old to leave the job queued, saying why",
    )
    assert waiting
    assert httpx.get(f"{old.url}/api/v1/jobs/{job_id}").json()["state"] == "queued"
    new = start_nodes(
        tmp_path,
        url,
        server_factory,
        {"new": {"added_later": SAMPLE_TASKS["add"], "add": SAMPLE_TASKS["add"]}},
    )["new"]
    done = wait_for_job(old.url, job_id, "succeeded")
    assert done["result"] == 5 and done["history"][0]["node"] == "new"
    assert new.process.poll() is None


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- nodes dying: kill -9, SIGSTOP, the leader killed under cron ---------------------------

HEARTBEAT, NODE_TIMEOUT = 0.2, 1.5  # seconds: short, so that a death is noticed quickly
# Two jobs at a time per node, by memory (capacities as a real box's would be set).
RECORDING = {"record_run": {"function": "sample_tasks:record_run", "cpus": 0.01, "memory": "32MiB"}}


def node_config(
    tmp_path: Path, name: str, url: str, schedules: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A node of its own, as if on a box of its own: directory (so jobs_dir), name and
    capacity (two jobs)."""
    directory = tmp_path / name
    directory.mkdir()
    path = write_config(
        directory,
        server={"database": url},
        tasks=RECORDING,
        # No per-job cgroups: nodes on one box share their parent, and a node creating a
        # rescued job's cgroup would kill another node's run of it, which separate boxes
        # would not do.
        scheduler={"max_memory": "64MiB", "job_cgroups": False},
        schedules=schedules,
    )
    path.write_text(
        path.read_text() + f'\n[cluster]\nnode = "{name}"\n'
        f'heartbeat_interval = "{HEARTBEAT}s"\nnode_timeout = "{NODE_TIMEOUT}s"\n'
    )
    return path


@dataclass(frozen=True)
class Run:
    """One run of a job's process, as it recorded itself (``sample_tasks.record_run``)."""

    job: str
    attempt: int
    first: float  # time.time() when it began
    last: float  # the last time it was seen alive
    ended: bool  # ran to its end (not killed)


def recorded_runs(directory: Path) -> dict[str, list[Run]]:
    """Each job's runs, by start time."""
    found: dict[str, list[Run]] = {}
    for path in directory.iterdir():
        job, attempt, _pid = path.name.split(".")
        lines = path.read_text().split()
        times = [float(line) for line in lines if line != "end"]
        run = Run(job, int(attempt), times[0], times[-1], lines[-1] == "end")
        found.setdefault(job, []).append(run)
    return {job: sorted(runs, key=lambda run: run.first) for job, runs in found.items()}


def overlap(runs: list[Run]) -> float:
    """How long two runs of one job were alive at once (seconds), at most."""
    return max(
        [max(0.0, earlier.last - later.first) for earlier, later in itertools.pairwise(runs)],
        default=0.0,
    )


def job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=5).json()
    return document


def nodes(server: ServerProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{server.url}/api/v1/system", timeout=5).json()[
        "nodes"
    ]
    return found


def test_a_killed_nodes_jobs_are_rescued_once_and_never_run_twice_at_once(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    servers = {name: server_factory(node_config(tmp_path, name, url)) for name in "abc"}
    victim, survivor = servers["b"], servers["c"]
    ids = [
        submit(servers["a"].url, "record_run", directory=str(runs_dir), seconds=3)["id"]
        for _ in range(6)
    ]

    def running_on_victim() -> bool:
        found = [job(survivor, job_id) for job_id in ids]
        return any(d["state"] == "running" and d["history"][-1]["node"] == "b" for d in found)

    poll_value(running_on_victim, "a job running on b")
    victim.process.kill()  # kill -9: its jobs' processes die with it (pdeathsig)
    victim.process.wait(timeout=10)
    killed = time.time()

    done = {job_id: wait_for_job(survivor.url, job_id, "succeeded") for job_id in ids}
    runs = recorded_runs(runs_dir)
    rescued = 0
    for job_id, document in done.items():
        history = [(attempt["node"], attempt["outcome"]) for attempt in document["history"]]
        if history[0] == ("b", "interrupted"):
            # Rescued once, by the leader, after b was silent for node_timeout.
            rescued += 1
            assert document["attempts"] == 2, document
            assert history[1][0] in ("a", "c")
            first, second = runs[job_id]
            assert not first.ended and second.ended and second.attempt == 2
            assert second.first > killed + NODE_TIMEOUT - 2 * HEARTBEAT
        else:
            assert document["attempts"] == 1 and history == [(history[0][0], "succeeded")]
            assert [run.ended for run in runs[job_id]] == [True]
        assert document["result"]["attempt"] == document["attempts"]
        assert overlap(runs[job_id]) == 0.0, runs[job_id]
    assert rescued >= 1

    listed = {node["name"]: node for node in nodes(survivor)}
    assert not listed["b"]["alive"] and listed["b"]["dead_at"] is not None
    assert listed["a"]["alive"] and listed["c"]["alive"]
    assert [node["leader"] for node in listed.values()].count(True) == 1
    assert listed["a"]["capacity"]["memory"] == 64 * 2**20


def test_a_frozen_node_is_declared_dead_its_late_results_refused_and_it_fences_on_waking(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """SIGSTOP nodes past node_timeout: their job processes go on running (nothing frozen
    with the server stops them), the leader rescues their jobs and another node runs them
    again.  On SIGCONT each kills what still runs within a heartbeat, the result of a run
    that ended meanwhile is refused, and each joins again as a new incarnation.  (Two
    frozen nodes, so that the two jobs run at once even on a machine whose CPUs are busy:
    a node always admits a first job.)"""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    frozen = {name: server_factory(node_config(tmp_path, name, url)) for name in ("a", "d")}
    a = frozen["a"]
    # Long on a frozen node (it must outlast the freeze), short when it runs again.
    long = submit(a.url, "record_run", directory=str(runs_dir), seconds=2, first_seconds=40)["id"]
    short = submit(a.url, "record_run", directory=str(runs_dir), seconds=3)["id"]
    for job_id in (long, short):
        wait_for_job(a.url, job_id, "running")
    for server in frozen.values():
        os.kill(server.process.pid, signal.SIGSTOP)
    stopped = time.time()
    resumed = None
    try:
        b = server_factory(node_config(tmp_path, "b", url))
        for job_id in (long, short):
            # Rescued: the frozen node's attempt closed by the leader, b.
            poll_value(
                lambda job_id=job_id: job(b, job_id)["history"][0]["outcome"] == "interrupted",
                f"{job_id} rescued",
            )
        # The short run on its frozen node ran to its end: its result waits there.
        poll_value(
            lambda: any(run.ended for run in recorded_runs(runs_dir).get(short, [])),
            "the frozen node's short run to end",
        )
    finally:
        for server in frozen.values():
            os.kill(server.process.pid, signal.SIGCONT)
        resumed = time.time()

    for job_id in (long, short):
        document = wait_for_job(b.url, job_id, "succeeded")
        assert document["attempts"] == 2
        assert document["result"] == {"job": job_id, "attempt": 2}  # never the late one
        history = [(attempt["node"], attempt["outcome"]) for attempt in document["history"]]
        # Run again by b, or by a woken node's new incarnation if b had no room before.
        assert history[0][0] in frozen and history[0][1] == "interrupted"
        assert len(history) == 2 and history[1][1] == "succeeded"
    runs = recorded_runs(runs_dir)
    first, second = runs[long]
    # The run went on while its node was frozen, past node_timeout, and was killed within
    # a heartbeat of the node's waking.
    assert not first.ended and first.last > stopped + NODE_TIMEOUT
    assert first.last <= resumed + HEARTBEAT + 1.0, (first, resumed)
    # The overlap is within the documented window: from the rerun's start to the waking
    # (zero when the rerun started only after that).
    assert overlap(runs[long]) <= max(0.0, resumed - second.first) + HEARTBEAT + 1.0
    assert [run.ended for run in runs[short]] == [True, True]  # the late result: refused

    def rejoined() -> bool:
        listed = nodes(b)
        return all(
            sorted(node["alive"] for node in listed if node["name"] == name) == [False, True]
            for name in frozen
        )

    poll_value(rejoined, "the frozen nodes to join again as new incarnations")
    # /metrics names the node and its incarnation: the new one only.
    metrics = httpx.get(f"{a.url}/metrics", timeout=5).text
    (info,) = [line for line in metrics.splitlines() if line.startswith("jobserver_node_info{")]
    alive = next(node for node in nodes(b) if node["name"] == "a" and node["alive"])
    assert f'incarnation="{alive["incarnation"]}"' in info and 'node="a"' in info
    assert "was declared dead" in a.log()
    # Alive again: it claims and runs jobs.
    again = submit(a.url, "record_run", directory=str(runs_dir), seconds=0)["id"]
    assert wait_for_job(a.url, again, "succeeded")["attempts"] == 1


def test_cron_fires_once_per_slot_across_three_nodes_when_the_leader_is_killed(
    tmp_path: Path, server_factory: Any
) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    schedule = {
        "task": "record_run",
        "cron": "* * * * *",
        "args": {"directory": str(runs_dir), "seconds": 2},
    }
    with postgresql_database() as url, psycopg.connect(postgres.conninfo(url)) as admin:
        # The schedule last fired a minute ago: the current minute's slot is due at once.
        admin.execute(
            "INSERT INTO schedules (name, last_slot) "
            "VALUES ('every', date_trunc('minute', now()) - interval '1 minute')"
        )
        admin.commit()
        configs = {name: node_config(tmp_path, name, url, {"every": schedule}) for name in "abc"}
        servers = {name: start_server(path, wait=False) for name, path in configs.items()}
        try:

            def leader() -> str | None:
                row = admin.execute(
                    "SELECT holder FROM leases WHERE name = 'leader' AND expires_at > now()"
                ).fetchone()
                admin.commit()
                return None if row is None else str(row[0]).rpartition(".")[0]

            first = poll_value(leader, "a leader")
            servers[first].process.kill()  # kill -9 the leader, whatever it was doing
            servers[first].process.wait(timeout=10)
            second = poll_value(lambda: (found := leader()) != first and found, "another leader")
            assert second in servers

            def fired() -> list[tuple[Any, ...]]:
                rows = admin.execute(
                    "SELECT schedule_slot, count(*), min(state), max(state) FROM jobs "
                    "WHERE schedule = 'every' GROUP BY schedule_slot"
                ).fetchall()
                admin.commit()
                return rows

            rows = poll_value(
                lambda: (
                    (found := fired()) and all(r[2] == r[3] == "succeeded" for r in found) and found
                ),
                "the slot's job to succeed",
                timeout=30,
            )
            assert [count for _, count, _, _ in rows] == [1] * len(rows), rows
            for runs in recorded_runs(runs_dir).values():
                assert overlap(runs) == 0.0 and [run.ended for run in runs][-1]
        finally:
            for server in servers.values():
                server.process.kill()
                server.process.wait(timeout=10)


def test_a_node_whose_task_conflicts_with_a_live_nodes_is_refused_at_start(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    server_factory(node_config(tmp_path, "a", url))
    path = node_config(tmp_path, "b", url)
    path.write_text(path.read_text().replace("sample_tasks:record_run", "sample_tasks:sleep"))
    refused = server_factory(path, wait=False)
    assert refused.process.wait(timeout=30) != 0
    assert (
        "node 'b' cannot join: its definitions conflict with live nodes': "
        'tasks.record_run.function is "sample_tasks:sleep" here but '
        "\"sample_tasks:record_run\" on live node 'a'"
    ) in refused.log()
