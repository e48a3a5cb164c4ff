"""``python -m bench``: jobserver, a bare Starlette app and the tutorial's own stack
(FastAPI + Celery + Redis), in one run, alternating, several rounds.

Conditions (the same for every stack, stated in the JSON report too):

- Every HTTP server is one uvicorn process with the standard extra, and each names its
  event loop and HTTP implementation explicitly: ``uvloop`` and ``httptools`` (jobserver
  does in jobserver/server.py; the bare app and the FastAPI app are started with
  ``--loop uvloop --http httptools``), so an install never changes one side alone.
- The access log is on for all three (``--no-access-log`` turns it off for all three);
  jobserver and the Celery worker log at ``--log-level`` (info: a line per job).
- jobserver: ``python -m jobserver serve`` on a fresh database per figure and round, with
  the bench's tasks (bench/tasks.py) and the tutorial's task copied from the shipped
  config.toml (``run_long_analysis`` on ``POST /api/v1/start-analysis``); the fork server
  on; ``synchronous = FULL``.
- Bare: bench/baseline.py, the ceiling for any framework on this uvicorn.
- Celery: the tutorial's files (bench/celery_tasks.py, bench/celery_api.py), ``celery
  worker --concurrency=<cores>`` (prefork), Redis as broker and result backend at
  ``--redis`` (started if nothing answers there), in two database numbers of its own
  (``--redis-db`` and the next), flushed before every stack start.
- Load: ``wrk -t1 -c50`` (one thread, so the servers keep the other core) when wrk is
  installed, else an asyncio client (HTTP figures only).  The tutorial's submit is
  ``POST /api/v1/start-analysis`` with ``{"dataset_id": "bench", "complexity": 0}``: the
  job runs and ends at once.

Figures (``--only`` takes any of these names, comma-separated):

  submit       parked submits, req/s: jobserver POST /api/v1/jobs with ``delay`` (jobs wait,
               none runs); Celery the tutorial's submit with no worker running (the
               messages stay in Redis); bare POST /jobs
  running      submits with the jobs running: the tutorial's submit on jobserver and
               Celery (bare: POST /jobs); req/s, jobs started per second in the same
               window, the backlog then, the time to drain it and the drain rate with
               no submits.  Celery keeps no start time: its started/s counts the jobs
               finished in the window (a 0-s job ends as it starts)
  poll         GET a finished job: jobserver /api/v1/jobs/{id}; bare /jobs/{id};
               Celery has only the task-status route (its figure is under task_status)
  task_status  GET /api/v1/task-status/{id} of a finished job (jobserver and Celery)
  unknown      GET an id never issued: jobserver answers 404; Celery answers 200 PENDING
               (an unknown id is indistinguishable from a queued one there)
  dispatch     one job at a time on an idle stack: from just before the POST (jobserver
               /api/v1/jobs, Celery /api/v1/stamp on the FastAPI app) to the task body's
               ``time.time()``; p50 and p99
  e2e          no-op jobs end to end, from the first submit until the last one has
               finished (jobserver POST /api/v1/jobs, Celery POST /api/v1/noop on the
               FastAPI app, both by wrk): one client submitting in a loop (wrk -c1) and
               8 concurrent clients (wrk -c8); CPU per job of each process (jobserver:
               server, fork server, jobs; Celery: the FastAPI app, the worker's main
               process, its pool processes, redis-server; both: the client) and the
               jobs/s that the total CPU per job allows on this machine's cores.
               Celery also without its web app: the bench calls ``noop.delay()`` in a
               loop (delay_loop; the client's CPU is then the bench process's)
  sustained    50 clients (wrk -c50) submit the tutorial's job for --sustain-seconds;
               jobs completed / time until the last one finished; the time to drain
  overhead     jobserver alone: idle CPU and RSS; CPU while 100 jobs run

Prints medians with min-max per figure and the ratios (of medians, and paired within a
round for the HTTP figures), and writes every raw sample to JSON (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PARK = 86400  # seconds: submitted jobs wait this long, so the parked submit runs no job
# The tutorial's submit: complexity 0, so each job runs and ends at once.
TUTORIAL_ROUTE = "/api/v1/start-analysis"
TUTORIAL_BODY = {"dataset_id": "bench", "complexity": 0}
FIGURES = (
    "submit",
    "running",
    "poll",
    "task_status",
    "unknown",
    "dispatch",
    "e2e",
    "sustained",
    "overhead",
)
POLL_FIGURES = ("poll", "task_status", "unknown")
# Figures that measure the Celery stack as well (all but jobserver's own overhead).
CELERY_FIGURES = ("submit", "running", "task_status", "unknown", "dispatch", "e2e", "sustained")
E2E_CLIENTS = (1, 8)
SUSTAINED_CLIENTS = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    workdir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_ready(server: Server, path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = (server.workdir / "server.log").read_text(errors="replace")
            raise SystemExit(f"server exited with {server.process.returncode}:\n{log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=1).status_code < 500:
                return
        time.sleep(0.05)
    server.stop()
    raise SystemExit(f"server at {server.url} did not start")


def wait_fork_server(server: Server) -> None:
    """Until the fork server has imported the tasks: before that, jobs are spawned."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/api/v1/system", timeout=10).json()["fork_server"]
        if state is None or state["ready"]:
            return
        time.sleep(0.05)
    raise SystemExit(f"the fork server of {server.url} did not get ready")


CONFIG = """\
task_paths = ["{root}"]

[server]
host = "127.0.0.1"
port = {port}
database = "{workdir}/jobs.db"
jobs_dir = "{workdir}/jobs"
access_log = {access_log}
log_level = "{log_level}"

[scheduler]
max_jobs = 128
max_cpus = 2
max_memory = "4GiB"
reserve_cpus = 0
reserve_memory = "0"
kill_grace = "1s"

[tasks.noop]
function = "bench.tasks:noop"
cpus = 0.01
memory = "1MiB"

[tasks.stamp]
function = "bench.tasks:stamp"
cpus = 0.01
memory = "1MiB"

[tasks.sleep]
function = "bench.tasks:sleep"
cpus = 0.01
memory = "1MiB"

[tasks.run_long_analysis]
{tutorial_task}
"""


def tutorial_task() -> str:
    """The shipped config.toml's tutorial task, key for key (its route, cpus, memory)."""
    with (ROOT / "config.toml").open("rb") as file:
        table = tomllib.load(file)["tasks"]["run_long_analysis"]
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())


@contextlib.contextmanager
def jobserver(args: argparse.Namespace, prefill: Path | None = None) -> Iterator[Server]:
    """A fresh ``jobserver serve`` on its own database (a copy of ``prefill`` if given)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-jobserver-"))
    port = free_port()
    config = workdir / "config.toml"
    config.write_text(
        CONFIG.format(
            root=ROOT,
            port=port,
            workdir=workdir,
            access_log="true" if args.access_log else "false",
            log_level=args.log_level,
            tutorial_task=tutorial_task(),
        )
    )
    if prefill is not None:
        shutil.copyfile(prefill, workdir / "jobs.db")
    # Another interpreter (--server-python) runs the jobserver installed there, from a
    # directory where this checkout's jobserver/ cannot shadow it.
    python = args.server_python or sys.executable
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [python, "-m", "jobserver", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT if args.server_python is None else workdir,
        )
    server = Server(process, f"http://127.0.0.1:{port}", workdir)
    try:
        wait_ready(server, "/healthz")
        wait_fork_server(server)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def uvicorn_app(
    args: argparse.Namespace,
    app: str,
    ready_path: str,
    prefix: str,
    env: dict[str, str] | None = None,
) -> Server:
    """``app`` on one uvicorn process, on the loop and HTTP implementation jobserver names."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--host", "127.0.0.1"]
    command += ["--loop", "uvloop", "--http", "httptools", "--log-level", args.log_level]
    if not args.access_log:
        command.append("--no-access-log")
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env or os.environ.copy()
        )
    server = Server(process, f"http://127.0.0.1:{port}", workdir)
    wait_ready(server, ready_path)
    return server


@contextlib.contextmanager
def baseline(args: argparse.Namespace) -> Iterator[Server]:
    server = uvicorn_app(args, "bench.baseline:app", "/jobs/0", "bench-baseline-")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


# -- the Celery stack ------------------------------------------------------------------


@dataclass
class CeleryStack:
    web: Server
    worker: Server | None
    broker: Any  # redis.Redis on the broker's database
    results: Any  # redis.Redis on the result backend's database
    redis_pid: int


def redis_urls(args: argparse.Namespace) -> tuple[str, str]:
    base = args.redis.rstrip("/")
    return f"{base}/{args.redis_db}", f"{base}/{args.redis_db + 1}"


@contextlib.contextmanager
def redis_server(args: argparse.Namespace) -> Iterator[None]:
    """Redis at ``--redis``: the one running there, else one started here (and stopped)."""
    import redis

    where = urlsplit(args.redis)
    client = redis.Redis(host=where.hostname or "127.0.0.1", port=where.port or 6379)
    started: subprocess.Popen[bytes] | None = None
    try:
        client.ping()
    except redis.ConnectionError:
        if shutil.which("redis-server") is None:
            raise SystemExit(
                f"no Redis answers at {args.redis} and redis-server is not installed "
                "(apt-get install redis-server), or pass --no-celery"
            ) from None
        started = subprocess.Popen(
            ["redis-server", "--port", str(where.port or 6379), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or started.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
    # The Celery side's processes and this one find the stack through the environment.
    os.environ["BENCH_CELERY_BROKER"], os.environ["BENCH_CELERY_BACKEND"] = redis_urls(args)
    try:
        yield
    finally:
        client.close()
        if started is not None:
            started.terminate()
            started.wait(timeout=30)


@contextlib.contextmanager
def celery_stack(args: argparse.Namespace, worker: bool = True) -> Iterator[CeleryStack]:
    """The tutorial's three processes on emptied Redis databases: the FastAPI app on
    uvicorn, ``celery worker --concurrency=<cores>`` (unless ``worker`` is false) and Redis."""
    import redis

    broker_url, backend_url = redis_urls(args)
    broker, results = redis.Redis.from_url(broker_url), redis.Redis.from_url(backend_url)
    broker.flushdb()
    results.flushdb()
    redis_pid = int(broker.info("server")["process_id"])
    web = uvicorn_app(args, "bench.celery_api:app", "/api/v1/task-status/x", "bench-celery-")
    started: Server | None = None
    try:
        if worker:
            command = [sys.executable, "-m", "celery", "-A", "bench.celery_tasks", "worker"]
            command += [f"--loglevel={args.log_level}", f"--concurrency={os.cpu_count()}"]
            with (web.workdir / "worker.log").open("wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            started = Server(process, "", web.workdir)
            # Ready once it has run a job (the first of everything, as jobserver's is).
            response = httpx.post(f"{web.url}{TUTORIAL_ROUTE}", json=TUTORIAL_BODY, timeout=30)
            wait_celery_status(web.url, response.json()["task_id"], started)
        yield CeleryStack(web, started, broker, results, redis_pid)
    finally:
        if started is not None:
            started.stop()
        web.stop()
        broker.close()
        results.close()
        shutil.rmtree(web.workdir, ignore_errors=True)


def wait_celery_status(url: str, task_id: str, worker: Server) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            log = (worker.workdir / "worker.log").read_text(errors="replace")
            raise SystemExit(f"celery worker exited with {worker.process.returncode}:\n{log}")
        status = httpx.get(f"{url}/api/v1/task-status/{task_id}", timeout=30).json()["status"]
        if status == "SUCCESS":
            return
        time.sleep(0.02)
    raise SystemExit(f"celery task {task_id} did not succeed")


# -- load ------------------------------------------------------------------------------


def load(args: argparse.Namespace, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """Requests/s for ``args.duration`` seconds at 50 connections: wrk -t1 -c50 if
    installed (it uses one thread, so the server keeps the other core), else asyncio."""
    if use_wrk(args):
        return _wrk(args, url, body)
    return asyncio.run(_asyncio_load(args, url, body))


def use_wrk(args: argparse.Namespace) -> bool:
    return shutil.which("wrk") is not None and not args.asyncio_client


def _wrk(
    args: argparse.Namespace,
    url: str,
    body: dict[str, Any] | None,
    connections: int | None = None,
    stop_after: int | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    """wrk for ``duration`` (default ``args.duration``) seconds, or until ``stop_after``
    answers have come (the requests still in flight then are sent all the same)."""
    seconds = duration or args.duration if stop_after is None else 600
    command = ["wrk", "-t1", f"-c{connections or args.connections}", f"-d{seconds}s"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(
                'wrk.method = "POST"\n'
                f"wrk.body = {json.dumps(json.dumps(body))}\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
        if stop_after is not None:
            # wrk waits out its duration even once its thread stops: exit instead, with
            # the number of answers other than 2xx as the status.
            script.write(
                "local answered, bad = 0, 0\n"
                "function response(status, headers, body)\n"
                "  answered = answered + 1\n"
                "  if status >= 300 then bad = bad + 1 end\n"
                f"  if answered >= {stop_after} then os.exit(math.min(bad, 255)) end\n"
                "end\n"
            )
    try:
        done = subprocess.run(
            [*command, "-s", script.name, url], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(script.name)
    if stop_after is not None:
        return {"requests": stop_after, "non_2xx": done.returncode, "socket_errors": None}
    done.check_returncode()
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


async def _asyncio_load(
    args: argparse.Namespace, url: str, body: dict[str, Any] | None
) -> dict[str, Any]:
    counts = {"requests": 0, "non_2xx": 0}
    deadline = time.monotonic() + args.duration

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            if body is None:
                response = await client.get(url)
            else:
                response = await client.post(url, json=body)
            counts["requests"] += 1
            counts["non_2xx"] += not 200 <= response.status_code < 400

    limits = httpx.Limits(max_connections=args.connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        start = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(args.connections)))
        elapsed = time.monotonic() - start
    return {"rps": counts["requests"] / elapsed, **counts, "socket_errors": None}


def need_wrk(args: argparse.Namespace, figure: str) -> None:
    if not use_wrk(args):
        raise SystemExit(f"the {figure} figure needs wrk (apt-get install wrk)")


# -- when jobs ran ---------------------------------------------------------------------


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def jobserver_times(server: Server, timeout: float = 900) -> list[tuple[float, float]]:
    """Once no job is queued or running: (started, finished) of every job, from the
    database file (read beside the server, not through it, so as not to load it)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(server.workdir / "jobs.db")) as database:
        while True:
            (active,) = database.execute(
                "SELECT count(*) FROM jobs WHERE finished_at IS NULL"
            ).fetchone()
            if not active:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{active} jobserver jobs did not finish")
            time.sleep(0.05)
        rows = database.execute("SELECT state, started_at, finished_at FROM jobs").fetchall()
    failed = [state for state, _, _ in rows if state != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} jobserver jobs did not succeed ({failed[:3]})")
    return [(epoch(started), epoch(finished)) for _, started, finished in rows]


def celery_times(stack: CeleryStack, at_least: int, timeout: float = 900) -> list[float]:
    """Once the broker's queue is empty and at least ``at_least`` results have stayed
    put for a second: every result's ``date_done`` (Celery keeps no start time)."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while True:
        queued = stack.broker.llen("celery") + stack.broker.hlen("unacked")
        now_count = stack.results.dbsize()
        if now_count != count:
            count, since = now_count, time.monotonic()
        if not queued and count >= at_least and time.monotonic() - since >= 1:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"celery: {count} of {at_least} results, {queued} queued")
        time.sleep(0.01)
    keys = list(stack.results.scan_iter("celery-task-meta-*", count=1000))
    found = []
    for start in range(0, len(keys), 1000):
        for raw in stack.results.mget(keys[start : start + 1000]):
            meta = json.loads(raw)
            if meta["status"] != "SUCCESS":
                raise SystemExit(f"a celery task did not succeed: {meta}")
            found.append(epoch(meta["date_done"]))
    return found


# -- figures ---------------------------------------------------------------------------


def wait_finished(client: httpx.Client, url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc: dict[str, Any] = client.get(f"{url}/api/v1/jobs/{job_id}").json()
        if doc["state"] in ("succeeded", "failed", "cancelled"):
            return doc
        time.sleep(0.002)
    raise SystemExit(f"job {job_id} did not finish")


def wait_counts(client: httpx.Client, url: str, done: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done(client.get(f"{url}/api/v1/system").json()["jobs"]):
            return
        time.sleep(0.02)
    raise SystemExit("jobs did not reach the expected counts")


def finished_job(url: str) -> str:
    with httpx.Client(timeout=30) as client:
        job_id: str = client.post(f"{url}/api/v1/jobs", json={"task": "noop"}).json()["id"]
        wait_finished(client, url, job_id)
        return job_id


def dispatch_latency(url: str, samples: int) -> list[float]:
    """Milliseconds from just before the POST to the task body starting, one job at a
    time on an idle server, after one job not counted: the first job after a start
    waits for the fork server, and is the first of everything (as the Celery worker's
    first task is in its figure)."""
    finished_job(url)
    found = []
    with httpx.Client(timeout=60) as client:
        for _ in range(samples):
            before = time.time()
            response = client.post(f"{url}/api/v1/jobs", json={"task": "stamp"})
            assert response.status_code == 202, response.text
            # One long poll (as jobserver's client waits), not a stream of polls that
            # would load the server while it dispatches the job being measured.
            job_url = f"{url}/api/v1/jobs/{response.json()['id']}"
            doc = client.get(job_url, params={"wait": 30}).json()
            if doc["state"] != "succeeded":
                doc = wait_finished(client, url, doc["id"])
            found.append((doc["result"] - before) * 1000)
    return found


def celery_dispatch_latency(stack: CeleryStack, samples: int) -> list[float]:
    """The same through the tutorial stack: POST /api/v1/stamp on the FastAPI app, then
    one wait on the result backend (Redis pub/sub, as ``AsyncResult.get`` waits)."""
    from bench.celery_tasks import celery_app

    found = []
    with httpx.Client(timeout=60) as client:
        for _ in range(samples):
            before = time.time()
            response = client.post(f"{stack.web.url}/api/v1/stamp")
            assert response.status_code == 202, response.text
            started = celery_app.AsyncResult(response.json()["task_id"]).get(timeout=60)
            found.append((started - before) * 1000)
    return found


@dataclass
class Running:
    """What one window of submits with the jobs running gave: the submits (wrk's answer),
    the window (epoch seconds) and when each job started and finished."""

    load: dict[str, Any]
    began: float
    ended: float
    started: list[float]
    finished: list[float]

    def summary(self) -> dict[str, float]:
        window = self.ended - self.began
        last = max(self.finished)
        after = sum(1 for moment in self.finished if moment > self.ended)
        drain = max(0.0, last - self.ended)
        return {
            "submit_rps": float(self.load["rps"]),
            "jobs": len(self.finished),
            "started_per_s": sum(1 for m in self.started if m <= self.ended) / window,
            "backlog_at_end": len(self.finished) - sum(1 for m in self.finished if m <= self.ended),
            "drain_s": drain,
            "drain_per_s": after / drain if drain else 0.0,
            "completed_per_s": len(self.finished) / (last - self.began),
        }


def jobserver_running(args: argparse.Namespace, seconds: float, clients: int) -> Running:
    with jobserver(args) as server:
        began = time.time()
        url = server.url + TUTORIAL_ROUTE
        result = _wrk(args, url, TUTORIAL_BODY, clients, duration=seconds)
        ended = time.time()
        if result["non_2xx"] or result["socket_errors"]:
            raise SystemExit(f"jobserver's submits failed: {result}")
        times = jobserver_times(server)
    return Running(result, began, ended, [s for s, _ in times], [f for _, f in times])


def celery_running(args: argparse.Namespace, seconds: float, clients: int) -> Running:
    with celery_stack(args) as stack:
        stack.results.flushdb()  # the start-up job's result
        began = time.time()
        url = stack.web.url + TUTORIAL_ROUTE
        result = _wrk(args, url, TUTORIAL_BODY, clients, duration=seconds)
        ended = time.time()
        if result["non_2xx"] or result["socket_errors"]:
            raise SystemExit(f"celery's submits failed: {result}")
        finished = celery_times(stack, result["requests"])
    return Running(result, began, ended, finished, finished)


def process_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system, times.children_user + times.children_system


def client_cpu() -> float:
    """CPU seconds of this process's reaped children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_per_job(
    sample: Callable[[], dict[str, float]], run: Callable[[], int]
) -> tuple[int, dict[str, float]]:
    """Run; milliseconds of CPU per job of each process that ``sample`` reads."""
    before = sample()
    jobs = run()
    after = sample()
    return jobs, {name: 1000 * (after[name] - before[name]) / jobs for name in before}


def with_ceiling(per_job: dict[str, float]) -> dict[str, float]:
    """The per-job figures, their sum, and the jobs/s that sum allows on all cores."""
    total = sum(per_job.values())
    cores = os.cpu_count() or 1
    return {**per_job, "total_ms": total, "ceiling_per_s": 1000 * cores / total}


def jobserver_e2e(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """No-op jobs submitted by wrk with ``clients`` connections, from the first submit
    until the last one has finished (read from the database)."""
    with jobserver(args) as server:
        fork = httpx.get(f"{server.url}/api/v1/system", timeout=10).json()["fork_server"]
        fork_pid = fork["pid"] if fork else None
        began = time.time()

        def sample() -> dict[str, float]:
            server_cpu, _ = process_cpu(server.process.pid)
            fork_cpu, jobs_cpu = process_cpu(fork_pid) if fork_pid else (0.0, 0.0)
            return {"server": server_cpu, "fork_server": fork_cpu, "jobs": jobs_cpu,
                    "client": client_cpu()}  # fmt: skip

        def run() -> int:
            result = _wrk(args, f"{server.url}/api/v1/jobs", {"task": "noop"}, clients, args.jobs)
            if result["non_2xx"]:
                raise SystemExit(f"end-to-end submits failed: {result}")
            return len(jobserver_times(server))

        jobs, cpu = cpu_per_job(sample, run)
        last = max(f for _, f in jobserver_times(server))
    return {"jobs_per_s": jobs / (last - began), "jobs": jobs, "cpu_ms_per_job": with_ceiling(cpu)}


def celery_e2e(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    with celery_stack(args) as stack:
        stack.results.flushdb()
        assert stack.worker is not None
        worker = psutil.Process(stack.worker.process.pid)
        pool = worker.children()
        began = time.time()

        def sample() -> dict[str, float]:
            return {
                "web_app": process_cpu(stack.web.process.pid)[0],
                "worker_main": process_cpu(worker.pid)[0],
                "worker_pool": sum(process_cpu(child.pid)[0] for child in pool),
                "redis": process_cpu(stack.redis_pid)[0],
                "client": client_cpu(),
            }

        def run() -> int:
            result = _wrk(args, f"{stack.web.url}/api/v1/noop", {}, clients, args.jobs)
            if result["non_2xx"]:
                raise SystemExit(f"celery end-to-end submits failed: {result}")
            return len(celery_times(stack, args.jobs))

        jobs, cpu = cpu_per_job(sample, run)
        if {child.pid for child in worker.children()} != {child.pid for child in pool}:
            raise SystemExit("celery's pool processes changed during the run: CPU not counted")
        last = max(celery_times(stack, jobs))
    return {"jobs_per_s": jobs / (last - began), "jobs": jobs, "cpu_ms_per_job": with_ceiling(cpu)}


def celery_delay_loop(args: argparse.Namespace) -> dict[str, Any]:
    """No-op jobs end to end with no web app: this process calls ``noop.delay()`` in a
    loop (the client, whose CPU is counted), as a Celery user's code does."""
    from bench.celery_tasks import noop

    with celery_stack(args) as stack:
        stack.results.flushdb()
        assert stack.worker is not None
        worker = psutil.Process(stack.worker.process.pid)
        pool = worker.children()
        began = time.time()

        def sample() -> dict[str, float]:
            return {
                "worker_main": process_cpu(worker.pid)[0],
                "worker_pool": sum(process_cpu(child.pid)[0] for child in pool),
                "redis": process_cpu(stack.redis_pid)[0],
                "client": time.process_time(),
            }

        def run() -> int:
            for _ in range(args.jobs):
                noop.delay()
            return len(celery_times(stack, args.jobs))

        jobs, cpu = cpu_per_job(sample, run)
        last = max(celery_times(stack, jobs))
    return {"jobs_per_s": jobs / (last - began), "jobs": jobs, "cpu_ms_per_job": with_ceiling(cpu)}


def cpu_percent(pid: int, seconds: float) -> float:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return float(100 * used / seconds)


def overhead(args: argparse.Namespace) -> dict[str, float]:
    with jobserver(args) as server:
        time.sleep(2)  # past start-up work
        idle_cpu = cpu_percent(server.process.pid, args.sample_seconds)
        rss = psutil.Process(server.process.pid).memory_info().rss
        with httpx.Client(timeout=30) as client:
            for _ in range(100):
                body = {"task": "sleep", "args": {"seconds": 600}}
                client.post(f"{server.url}/api/v1/jobs", json=body).raise_for_status()
            wait_counts(client, server.url, lambda jobs: jobs["running"] == 100, 120)
            time.sleep(2)
            busy_cpu = cpu_percent(server.process.pid, args.sample_seconds)
    return {"idle_cpu_percent": idle_cpu, "idle_rss_mb": rss / 2**20, "cpu_100_running": busy_cpu}


def prefilled_database(args: argparse.Namespace, rows: int) -> Path:
    """A migrated database holding ``rows`` finished jobs (one executemany)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-prefill-"))
    with jobserver(args) as server:
        database = server.workdir / "jobs.db"
        server.stop()
        shutil.copyfile(database, workdir / "jobs.db")
    connection = sqlite3.connect(workdir / "jobs.db")
    stamp = "2026-01-01T00:00:00.000000Z"
    connection.executemany(
        "INSERT INTO jobs (id, task, args, state, priority, created_at, finished_at, "
        "attempts, max_retries, failures, rescues, result) "
        "VALUES (?, 'noop', '{}', 'succeeded', 0, ?, ?, 1, 0, 0, 0, 'null')",
        ((f"0000prefill{n:012d}", stamp, stamp) for n in range(rows)),
    )
    connection.commit()
    connection.close()
    return workdir / "jobs.db"


# -- one round -------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.raw: list[dict[str, Any]] = []

    def __call__(self, name: str, value: float, detail: Any = None) -> None:
        self.samples.setdefault(name, []).append(value)
        self.raw.append({"figure": name, "value": value, "detail": detail})
        print(f"  {name}: {value:,.2f}", flush=True)

    def many(self, prefix: str, values: dict[str, Any], detail: Any = None) -> None:
        for name, value in values.items():
            if isinstance(value, dict):
                self.many(f"{prefix}_{name}", value, detail)
            else:
                self(f"{prefix}_{name}", float(value), detail)


def http_load(args: argparse.Namespace, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    result = load(args, url, body)
    if result["socket_errors"]:
        raise SystemExit(f"{url}: socket errors {result['socket_errors']}")
    return result


def bare_round(args: argparse.Namespace, record: Recorder) -> None:
    only = args.only
    with baseline(args) as server:
        if "submit" in only or "running" in only:
            result = http_load(args, f"{server.url}/jobs", TUTORIAL_BODY)
            record("bare_submit_rps", result["rps"], result)
        if any(name in only for name in POLL_FIGURES):
            result = http_load(args, f"{server.url}/jobs/123", None)
            record("bare_poll_rps", result["rps"], result)


def jobserver_round(args: argparse.Namespace, record: Recorder, prefill: Path | None) -> None:
    only = args.only
    databases = [("", None)] + ([("prefilled_", prefill)] if prefill else [])
    for prefix, database in databases:
        if "submit" in only:
            with jobserver(args, database) as server:
                body = {"task": "noop", "args": {}, "delay": PARK}
                result = http_load(args, f"{server.url}/api/v1/jobs", body)
                if result["non_2xx"]:
                    raise SystemExit(f"submit answered non-2xx: {result}")
                record(f"{prefix}submit_rps", result["rps"], result)
        if not any(name in only for name in POLL_FIGURES):
            continue
        with jobserver(args, database) as server:
            job_id = finished_job(server.url)
            if "poll" in only:
                result = http_load(args, f"{server.url}/api/v1/jobs/{job_id}", None)
                record(f"{prefix}poll_rps", result["rps"], result)
            if "task_status" in only:
                result = http_load(args, f"{server.url}/api/v1/task-status/{job_id}", None)
                record(f"{prefix}task_status_rps", result["rps"], result)
            if "unknown" in only:
                unknown = "0" * 8 + job_id[8:]
                result = http_load(args, f"{server.url}/api/v1/jobs/{unknown}", None)
                if result["non_2xx"] != result["requests"]:
                    raise SystemExit(f"unknown id answered 2xx: {result}")
                record(f"{prefix}unknown_rps", result["rps"], result)
    if "running" in only:
        need_wrk(args, "running")
        found = jobserver_running(args, args.duration, args.connections)
        record.many("running", found.summary(), found.load)
    if "dispatch" in only:
        with jobserver(args) as server:
            latencies = dispatch_latency(server.url, args.dispatch_samples)
        record.samples.setdefault("dispatch_ms", []).extend(latencies)
        record("dispatch_p50_ms", percentile(latencies, 0.5))
        record("dispatch_p99_ms", percentile(latencies, 0.99))
    if "e2e" in only:
        need_wrk(args, "e2e")
        for clients in E2E_CLIENTS:
            found_e2e = jobserver_e2e(args, clients)
            record(f"e2e_{clients}_jobs_per_s", found_e2e["jobs_per_s"])
            record.many(f"e2e_{clients}_cpu_ms_per_job", found_e2e["cpu_ms_per_job"])
    if "sustained" in only:
        need_wrk(args, "sustained")
        found = jobserver_running(args, args.sustain_seconds, SUSTAINED_CLIENTS)
        record.many("sustained", found.summary(), found.load)


def celery_round(args: argparse.Namespace, record: Recorder) -> None:
    only = args.only
    if "submit" in only:
        with celery_stack(args, worker=False) as stack:
            result = http_load(args, stack.web.url + TUTORIAL_ROUTE, TUTORIAL_BODY)
            if result["non_2xx"]:
                raise SystemExit(f"celery submit answered non-2xx: {result}")
            record("celery_submit_rps", result["rps"], result)
    if "task_status" in only or "unknown" in only or "dispatch" in only:
        with celery_stack(args) as stack:
            url = f"{stack.web.url}/api/v1/task-status"
            if "task_status" in only:
                # The start-up job is the finished one (the only result stored).
                (key,) = stack.results.keys("celery-task-meta-*")
                job_id = key.decode().removeprefix("celery-task-meta-")
                result = http_load(args, f"{url}/{job_id}", None)
                record("celery_task_status_rps", result["rps"], result)
            if "unknown" in only:
                unknown = "00000000-0000-0000-0000-000000000000"
                answer = httpx.get(f"{url}/{unknown}", timeout=10)
                if answer.status_code != 200 or answer.json()["status"] != "PENDING":
                    raise SystemExit(f"celery's unknown id answered {answer.text}")
                result = http_load(args, f"{url}/{unknown}", None)
                record("celery_unknown_rps", result["rps"], result)
            if "dispatch" in only:
                latencies = celery_dispatch_latency(stack, args.dispatch_samples)
                record.samples.setdefault("celery_dispatch_ms", []).extend(latencies)
                record("celery_dispatch_p50_ms", percentile(latencies, 0.5))
                record("celery_dispatch_p99_ms", percentile(latencies, 0.99))
    if "running" in only:
        need_wrk(args, "running")
        found = celery_running(args, args.duration, args.connections)
        record.many("celery_running", found.summary(), found.load)
    if "e2e" in only:
        need_wrk(args, "e2e")
        for clients in E2E_CLIENTS:
            found_e2e = celery_e2e(args, clients)
            record(f"celery_e2e_{clients}_jobs_per_s", found_e2e["jobs_per_s"])
            record.many(f"celery_e2e_{clients}_cpu_ms_per_job", found_e2e["cpu_ms_per_job"])
    if "e2e" in only:
        found_e2e = celery_delay_loop(args)
        record("celery_e2e_delay_loop_jobs_per_s", found_e2e["jobs_per_s"])
        record.many("celery_e2e_delay_loop_cpu_ms_per_job", found_e2e["cpu_ms_per_job"])
    if "sustained" in only:
        need_wrk(args, "sustained")
        found = celery_running(args, args.sustain_seconds, SUSTAINED_CLIENTS)
        record.many("celery_sustained", found.summary(), found.load)


# -- report ----------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# (ratio name, numerator figure, denominator figure): each where both were measured.
RATIOS = (
    ("submit_vs_bare", "submit_rps", "bare_submit_rps"),
    ("celery_submit_vs_bare", "celery_submit_rps", "bare_submit_rps"),
    ("submit_vs_celery", "submit_rps", "celery_submit_rps"),
    ("running_submit_vs_bare", "running_submit_rps", "bare_submit_rps"),
    ("celery_running_submit_vs_bare", "celery_running_submit_rps", "bare_submit_rps"),
    ("running_submit_vs_celery", "running_submit_rps", "celery_running_submit_rps"),
    ("poll_vs_bare", "poll_rps", "bare_poll_rps"),
    ("task_status_vs_bare", "task_status_rps", "bare_poll_rps"),
    ("celery_task_status_vs_bare", "celery_task_status_rps", "bare_poll_rps"),
    ("poll_vs_celery_task_status", "poll_rps", "celery_task_status_rps"),
    ("task_status_vs_celery", "task_status_rps", "celery_task_status_rps"),
    ("unknown_vs_bare", "unknown_rps", "bare_poll_rps"),
    ("celery_unknown_vs_bare", "celery_unknown_rps", "bare_poll_rps"),
    ("unknown_vs_celery", "unknown_rps", "celery_unknown_rps"),
    ("dispatch_p50_vs_celery", "dispatch_p50_ms", "celery_dispatch_p50_ms"),
    ("dispatch_p99_vs_celery", "dispatch_p99_ms", "celery_dispatch_p99_ms"),
    ("e2e_1_vs_celery", "e2e_1_jobs_per_s", "celery_e2e_1_jobs_per_s"),
    ("e2e_8_vs_celery", "e2e_8_jobs_per_s", "celery_e2e_8_jobs_per_s"),
    ("e2e_1_vs_celery_delay_loop", "e2e_1_jobs_per_s", "celery_e2e_delay_loop_jobs_per_s"),
    ("sustained_vs_celery", "sustained_completed_per_s", "celery_sustained_completed_per_s"),
)
# Paired within each round: both sides ran minutes apart at most, which cancels much of a
# shared machine's drift between rounds.
PAIRED = tuple(ratio for ratio in RATIOS if ratio[2].startswith("bare_"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = Recorder()
    only = args.only
    celery = args.celery and any(name in only for name in CELERY_FIGURES)
    bare = any(name in only for name in ("submit", "running", *POLL_FIGURES))
    prefill = prefilled_database(args, args.prefill) if args.prefill else None
    with redis_server(args) if celery else contextlib.nullcontext():
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            sides: list[Callable[[], None]] = [lambda: jobserver_round(args, record, prefill)]
            if bare:
                sides.append(lambda: bare_round(args, record))
            if celery:
                sides.append(lambda: celery_round(args, record))
            # Rotate which side goes first, so drift in the machine's load hits all.
            for index in range(len(sides)):
                sides[(index + round_) % len(sides)]()
    if "overhead" in only and not args.skip_overhead:
        record.many("overhead", overhead(args))
    if prefill is not None:
        shutil.rmtree(prefill.parent, ignore_errors=True)

    samples = record.samples
    figures = {name: summary(values) for name, values in samples.items()}
    ratios = {
        name: figures[top]["median"] / figures[bottom]["median"]
        for name, top, bottom in RATIOS
        if top in figures and bottom in figures and figures[bottom]["median"]
    }
    if prefill is not None:
        for name in ("submit", *POLL_FIGURES):
            if f"prefilled_{name}_rps" in figures:
                ratios[f"{name}_prefilled_vs_empty"] = (
                    figures[f"prefilled_{name}_rps"]["median"] / figures[f"{name}_rps"]["median"]
                )
    paired = {
        name: summary([a / b for a, b in zip(samples[top], samples[bottom], strict=True)])
        for name, top, bottom in PAIRED
        if top in samples and bottom in samples
    }
    latencies = {}
    for prefix in ("dispatch", "celery_dispatch"):
        if values := samples.get(f"{prefix}_ms"):
            latencies[prefix] = {
                "p50": percentile(values, 0.5),
                "p99": percentile(values, 0.99),
                "count": len(values),
            }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_end": os.getloadavg(),
        },
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "jobserver": _version_of(args.server_python or sys.executable),
        "versions": _versions(args, celery),
        "load_generator": "wrk -t1" if use_wrk(args) else "asyncio",
        "access_log": args.access_log,
        "http_servers": "uvicorn --loop uvloop --http httptools, one process each",
        "celery_concurrency": os.cpu_count() if celery else None,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "figures": figures,
        "dispatch_all_samples_ms": latencies,
        "ratios": ratios,
        "paired_ratios": paired,
        "raw": record.raw,
    }


def _versions(args: argparse.Namespace, celery: bool) -> dict[str, str | None]:
    names = ["uvicorn", "uvloop", "httptools", "starlette"]
    names += ["celery", "redis", "fastapi"] if celery else []
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if celery:
        import redis

        with contextlib.closing(redis.Redis.from_url(redis_urls(args)[0])) as client:
            found["redis-server"] = str(client.info("server")["redis_version"])
    return found


def _version_of(python: str) -> str:
    """Which jobserver ``python`` runs: its git commit when it runs from a checkout."""
    where = subprocess.run(
        [python, "-c", "import jobserver, pathlib; print(pathlib.Path(jobserver.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir() if python != sys.executable else ROOT,
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return f"{where} ({commit or 'not a checkout'})"


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{report['date']}  load generator: {report['load_generator']}, "
        f"access log {'on' if report['access_log'] else 'off'}, {report['http_servers']}"
    )
    print(f"{'figure':48} {'median':>12} {'min':>12} {'max':>12}")
    for name, found in report["figures"].items():
        print(f"{name:48} {found['median']:12,.2f} {found['min']:12,.2f} {found['max']:12,.2f}")
    for name, found in report["dispatch_all_samples_ms"].items():
        print(
            f"{name}, all {found['count']} samples: "
            f"p50 {found['p50']:.2f} ms, p99 {found['p99']:.2f} ms"
        )
    print("per-round ratios to the bare app (median, min-max):")
    for name, found in report["paired_ratios"].items():
        print(f"  {name:34} {found['median']:6.2f}  ({found['min']:.2f}-{found['max']:.2f})")
    print("ratios (medians):")
    for name, value in report["ratios"].items():
        print(f"  {name:34} {value:6.2f}")


def _figure_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FIGURES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown figure(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FIGURES)}"
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per HTTP load run (default 10)"
    )
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk connections for the HTTP figures"
    )
    parser.add_argument(
        "--jobs", type=int, default=5000, help="no-op jobs per end-to-end run (default 5000)"
    )
    parser.add_argument(
        "--sustain-seconds",
        type=int,
        default=10,
        help="seconds the 50 clients of the sustained figure submit (default 10)",
    )
    parser.add_argument(
        "--dispatch-samples", type=int, default=100, help="dispatch samples per round and stack"
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=10, help="CPU sampling of the overhead figure"
    )
    parser.add_argument(
        "--prefill", type=int, default=0, help="also measure jobserver with this many jobs stored"
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="turn the access log off on every HTTP server (default: on, as shipped)",
    )
    parser.add_argument(
        "--log-level", default="info", help="of jobserver, the uvicorn apps and the Celery worker"
    )
    parser.add_argument(
        "--asyncio-client",
        action="store_true",
        help="load the HTTP figures with asyncio even if wrk exists (running, e2e and "
        "sustained need wrk)",
    )
    parser.add_argument("--skip-overhead", action="store_true", help="skip the overhead figure")
    parser.add_argument(
        "--only",
        type=_figure_list,
        default=FIGURES,
        metavar="FIGURES",
        help=f"comma-separated subset of {','.join(FIGURES)} (default: all); the bare app "
        "and the Celery stack run only what the chosen figures compare against",
    )
    parser.add_argument(
        "--no-celery",
        dest="celery",
        action="store_false",
        help="leave out the tutorial stack (FastAPI + Celery + Redis)",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379",
        help="the Redis the Celery stack uses; started (redis-server) if nothing answers",
    )
    parser.add_argument(
        "--redis-db",
        type=int,
        default=14,
        help="broker database number (the result backend uses the next); both are flushed",
    )
    parser.add_argument(
        "--server-python",
        help="the Python that runs jobserver (one with another version installed, to "
        "compare two versions with the same bench code); default: this checkout's",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results.json"),
        help="the JSON report (default bench-results.json)",
    )
    args = parser.parse_args()
    report = run(args)
    print_report(report)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
