"""``python -m bench``: jobserver against a bare Starlette app, alternating, several rounds.

Starts its own servers on loopback (a fresh jobserver database for every figure and
round), drives them with wrk when it is installed (else a small asyncio client, see
``load``), prints median and min-max per figure and the ratios, and writes JSON.
See docs/performance.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
CELERY = {  # the measurements of the tutorial stack, for the ratios
    "submit_rps": 607.0,
    "poll_rps": 1158.0,
    "unknown_rps": 1059.0,
    "e2e_tasks_per_s": 778.0,
    "dispatch_p50_ms": 2.8,
    "dispatch_p99_ms": 4.6,
}
PARK = 86400  # seconds: submitted jobs wait this long, so the submit figure runs no job
# What --only may name; the poll figures (poll, task_status, unknown) share one server.
FIGURES = ("submit", "poll", "task_status", "unknown", "dispatch", "e2e", "overhead")
POLL_FIGURES = ("poll", "task_status", "unknown")


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
"""


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


@contextlib.contextmanager
def baseline(args: argparse.Namespace) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.baseline:app", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", args.log_level]
    if not args.access_log:
        command.append("--no-access-log")
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(process, f"http://127.0.0.1:{port}", workdir)
    try:
        wait_ready(server, "/jobs/0")
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- load ------------------------------------------------------------------------------


def load(args: argparse.Namespace, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """Requests/s for ``args.duration`` seconds at 50 connections: wrk -t1 -c50 if
    installed (it uses one thread, so the server keeps the other core), else asyncio."""
    if shutil.which("wrk") and not args.asyncio_client:
        return _wrk(args, url, body)
    return asyncio.run(_asyncio_load(args, url, body))


def _wrk(
    args: argparse.Namespace,
    url: str,
    body: dict[str, Any] | None,
    connections: int | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """wrk for ``args.duration`` seconds, or until ``stop_after`` answers have come (the
    requests still in flight then are sent all the same)."""
    duration = args.duration if stop_after is None else 600
    command = ["wrk", "-t1", f"-c{connections or args.connections}", f"-d{duration}s"]
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
    waits for the fork server, and is the first of everything (as a worker's first
    task is in the Celery figure)."""
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


async def _submit_many(url: str, count: int, concurrency: int) -> None:
    queue = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in queue:
            response = await client.post(f"{url}/api/v1/jobs", json={"task": "noop"})
            assert response.status_code == 202, response.text

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def end_to_end(args: argparse.Namespace, server: Server, count: int) -> float:
    """No-op jobs per second: from the first submit until the last one has finished.
    Submitted by wrk (8 connections) where installed, so that the client takes little
    of the two cores the server and its jobs share; else by httpx."""
    start = time.monotonic()
    if shutil.which("wrk") and not args.asyncio_client:
        result = _wrk(args, f"{server.url}/api/v1/jobs", {"task": "noop"}, 8, count)
        if result["non_2xx"] or result["socket_errors"]:
            raise SystemExit(f"end-to-end submits failed: {result}")
    else:
        asyncio.run(_submit_many(server.url, count, 8))
    with httpx.Client(timeout=30) as client:
        wait_counts(client, server.url, lambda jobs: jobs["queued"] == 0 and jobs["running"] == 0)
    elapsed = time.monotonic() - start
    with contextlib.closing(sqlite3.connect(server.workdir / "jobs.db")) as database:
        (done,) = database.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetchone()
    if done < count:
        raise SystemExit(f"only {done} of {count} end-to-end jobs succeeded")
    return float(done) / elapsed


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


# -- report ----------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    raw: list[dict[str, Any]] = []

    def record(name: str, value: float, detail: Any = None) -> None:
        samples.setdefault(name, []).append(value)
        raw.append({"figure": name, "value": value, "detail": detail})
        print(f"  {name}: {value:,.2f}", flush=True)

    only = args.only
    submit_body = {"task": "noop", "args": {}, "delay": PARK}
    polls = [name for name in POLL_FIGURES if name in only]
    prefill = prefilled_database(args, args.prefill) if args.prefill else None
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        # Alternate which side goes first, so drift in the machine's load hits both.
        order = ["jobserver", "baseline"] if round_ % 2 == 0 else ["baseline", "jobserver"]
        for side in order:
            if side == "baseline":
                if "submit" not in only and not polls:
                    continue
                with baseline(args) as server:
                    if "submit" in only:
                        result = load(args, f"{server.url}/jobs", submit_body)
                        record("baseline_submit_rps", result["rps"], result)
                    if polls:
                        result = load(args, f"{server.url}/jobs/123", None)
                        record("baseline_poll_rps", result["rps"], result)
                continue
            databases = [("", None)] + ([("prefilled_", prefill)] if prefill else [])
            for prefix, database in databases:
                if "submit" in only:
                    with jobserver(args, database) as server:
                        result = load(args, f"{server.url}/api/v1/jobs", submit_body)
                        if result["non_2xx"]:
                            raise SystemExit(f"submit answered non-2xx: {result}")
                        record(f"{prefix}submit_rps", result["rps"], result)
                if not polls:
                    continue
                with jobserver(args, database) as server:
                    job_id = finished_job(server.url)
                    if "poll" in only:
                        result = load(args, f"{server.url}/api/v1/jobs/{job_id}", None)
                        record(f"{prefix}poll_rps", result["rps"], result)
                    if "task_status" in only:
                        result = load(args, f"{server.url}/api/v1/task-status/{job_id}", None)
                        record(f"{prefix}task_status_rps", result["rps"], result)
                    if "unknown" in only:
                        unknown = "0" * 8 + job_id[8:]
                        result = load(args, f"{server.url}/api/v1/jobs/{unknown}", None)
                        if result["non_2xx"] != result["requests"]:
                            raise SystemExit(f"unknown id answered 2xx: {result}")
                        record(f"{prefix}unknown_rps", result["rps"], result)
        if "dispatch" in only:
            with jobserver(args) as server:
                latencies = dispatch_latency(server.url, args.dispatch_samples)
                samples.setdefault("dispatch_ms", []).extend(latencies)
                record("dispatch_p50_ms", percentile(latencies, 0.5))
                record("dispatch_p99_ms", percentile(latencies, 0.99))
        if "e2e" in only:
            with jobserver(args) as server:
                record("e2e_tasks_per_s", end_to_end(args, server, args.jobs))
    if "overhead" in only and not args.skip_overhead:
        found = overhead(args)
        for name, value in found.items():
            record(name, value)
    if prefill is not None:
        shutil.rmtree(prefill.parent, ignore_errors=True)

    figures = {name: summary(values) for name, values in samples.items()}
    dispatch = samples.get("dispatch_ms", [])
    ratios: dict[str, float] = {}
    measured = [name for name in ("submit", *POLL_FIGURES) if f"{name}_rps" in figures]
    for name in measured:
        base = "baseline_submit_rps" if name == "submit" else "baseline_poll_rps"
        ratios[f"{name}_vs_bare"] = figures[f"{name}_rps"]["median"] / figures[base]["median"]
        if f"{name}_rps" in CELERY:
            ratios[f"{name}_vs_celery"] = figures[f"{name}_rps"]["median"] / CELERY[f"{name}_rps"]
        if prefill is not None:
            ratios[f"{name}_prefilled_vs_empty"] = (
                figures[f"prefilled_{name}_rps"]["median"] / figures[f"{name}_rps"]["median"]
            )
    # Paired ratios: jobserver / baseline within each round (both ran minutes apart at
    # most), which cancels much of a shared machine's drift between rounds.
    paired: dict[str, dict[str, float]] = {}
    for name in measured:
        base = "baseline_submit_rps" if name == "submit" else "baseline_poll_rps"
        pairs = [a / b for a, b in zip(samples[f"{name}_rps"], samples[base], strict=True)]
        paired[f"{name}_vs_bare"] = summary(pairs)
    if "e2e_tasks_per_s" in figures:
        ratios["e2e_vs_celery"] = figures["e2e_tasks_per_s"]["median"] / CELERY["e2e_tasks_per_s"]
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
        "load_generator": "wrk" if shutil.which("wrk") and not args.asyncio_client else "asyncio",
        "access_log": args.access_log,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "figures": figures,
        "dispatch_all_samples_ms": {
            "p50": percentile(dispatch, 0.5),
            "p99": percentile(dispatch, 0.99),
            "count": len(dispatch),
        }
        if dispatch
        else None,
        "ratios": ratios,
        "paired_ratios": paired,
        "celery_reference": CELERY,
        "raw": raw,
    }


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
        f"access log {'on' if report['access_log'] else 'off'}"
    )
    print(f"{'figure':32} {'median':>12} {'min':>12} {'max':>12}")
    for name, found in report["figures"].items():
        print(f"{name:32} {found['median']:12,.2f} {found['min']:12,.2f} {found['max']:12,.2f}")
    if report["dispatch_all_samples_ms"]:
        d = report["dispatch_all_samples_ms"]
        print(f"dispatch, all {d['count']} samples: p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms")
    print("per-round ratios to the bare app (median, min-max):")
    for name, found in report["paired_ratios"].items():
        print(f"  {name:30} {found['median']:6.2f}  ({found['min']:.2f}-{found['max']:.2f})")
    print("ratios (medians):")
    for name, value in report["ratios"].items():
        print(f"  {name:30} {value:6.2f}")


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=5000, help="no-op jobs end to end")
    parser.add_argument("--dispatch-samples", type=int, default=100, help="per round")
    parser.add_argument("--sample-seconds", type=float, default=10, help="CPU sampling")
    parser.add_argument(
        "--prefill", type=int, default=0, help="also measure with this many jobs stored"
    )
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--asyncio-client", action="store_true", help="even if wrk exists")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument(
        "--only",
        type=_figure_list,
        default=FIGURES,
        metavar="FIGURES",
        help=f"comma-separated subset of {','.join(FIGURES)} (default: all); the bare app "
        "runs only what the chosen HTTP figures compare against",
    )
    parser.add_argument(
        "--server-python",
        help="the Python that runs jobserver (one with another version installed, to "
        "compare two versions with the same bench code); default: this checkout's",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args()
    report = run(args)
    print_report(report)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
