"""The crash loop: SIGKILL a real server at random moments while clients submit and poll
and jobs run and finish; restart it; check that nothing was lost or went backwards.

The kill schedule comes from a seeded RNG; the seed and every kill are printed (and kept
in ``crash-log.txt`` in the test's directory), so a failure can be replayed with
``JOBSERVER_CRASH_SEED=<seed>``.  ``JOBSERVER_CRASH_SECONDS`` sets how long the killing
goes on (default 35 s).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, start_server, write_config

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "cancelled"}
CRASH_TASKS = {
    "add": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "16MiB"},
    "sleep": {"function": "sample_tasks:sleep", "cpus": 0.1, "memory": "16MiB"},
    "fail": {"function": "sample_tasks:fail", "cpus": 0.1, "memory": "16MiB"},
}
MAX_ACCEPTED = 400  # keeps the final drain short on a 2-core machine


@dataclass
class Ledger:
    """What clients were told, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    terminal_seen: dict[str, tuple[str, Any]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    url: str = ""


def expected_result(task: str, args: dict[str, Any]) -> tuple[str, Any]:
    if task == "add":
        return "succeeded", args["a"] + args.get("b", 0)
    if task == "sleep":
        return "succeeded", args["seconds"]
    return "failed", None


def client(ledger: Ledger, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=5) as http:
        while not stop.is_set():
            pause = rng.uniform(0.005, 0.03)
            try:
                if rng.random() < 0.15 and len(ledger.accepted) < MAX_ACCEPTED:
                    submit_one(http, ledger, rng)
                    pause = rng.uniform(0.1, 0.4)  # spread submissions over the whole run
                elif ledger.accepted:
                    poll_one(http, ledger, rng)
            except httpx.HTTPError:
                pause = 0.05  # the server is down (killed) or restarting
            time.sleep(pause)


def submit_one(http: httpx.Client, ledger: Ledger, rng: random.Random) -> None:
    task = rng.choice(["add", "add", "sleep", "fail"])
    args: dict[str, Any] = {
        "add": {"a": rng.randint(-(10**12), 10**12), "b": rng.randint(0, 99)},
        "sleep": {"seconds": rng.choice([0.0, 0.05, 0.3])},
        "fail": {"message": f"boom {rng.random()}"},
    }[task]
    response = http.post(f"{ledger.url}/api/v1/jobs", json={"task": task, "args": args})
    if response.status_code >= 500:
        ledger.server_errors.append(f"POST {response.status_code} {response.text}")
    elif response.status_code == 202:
        with ledger.lock:
            ledger.accepted[response.json()["id"]] = (task, args)
    else:
        ledger.violations.append(f"submit answered {response.status_code}: {response.text}")


def poll_one(http: httpx.Client, ledger: Ledger, rng: random.Random) -> None:
    with ledger.lock:
        job_id = rng.choice(list(ledger.accepted))
    response = http.get(f"{ledger.url}/api/v1/jobs/{job_id}")
    if response.status_code >= 500:
        ledger.server_errors.append(f"GET {response.status_code} {response.text}")
        return
    if response.status_code == 404:
        ledger.violations.append(f"{job_id} was answered 202 but is now 404 (lost)")
        return
    observe(ledger, job_id, response.json())


def observe(ledger: Ledger, job_id: str, job: dict[str, Any]) -> None:
    state = job["state"]
    seen = (state, job["result"])
    with ledger.lock:
        before = ledger.terminal_seen.get(job_id)
        if before is not None and before != seen:
            ledger.violations.append(f"{job_id} went from terminal {before} to {seen}")
        elif state in TERMINAL:
            ledger.terminal_seen[job_id] = seen


def test_sigkill_loop_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("JOBSERVER_CRASH_SEED", random.randrange(2**32)))
    seconds = float(os.environ.get("JOBSERVER_CRASH_SECONDS", "35"))
    rng = random.Random(seed)
    log_path = tmp_path / "crash-log.txt"

    def record(line: str) -> None:
        print(line, file=sys.stderr)
        with log_path.open("a") as log:
            log.write(line + "\n")

    record(f"crash loop: seed {seed} (replay with JOBSERVER_CRASH_SEED={seed}), {seconds:g} s")
    config_path = write_config(
        tmp_path,
        server={"durability": "full"},
        scheduler={"max_jobs": 4, "max_rescues": 1000, "kill_grace": "1s"},
        tasks=CRASH_TASKS,
    )
    database = tmp_path / "data" / "jobserver.db"
    ledger = Ledger()
    server: ServerProcess = start_server(config_path)
    ledger.url = server.url
    stop = threading.Event()
    threads = [
        threading.Thread(target=client, args=(ledger, rng.randrange(2**32), stop), daemon=True)
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    ends = time.monotonic() + seconds
    cycle = 0
    try:
        while time.monotonic() < ends:
            cycle += 1
            delay = rng.uniform(0.05, 2.0)
            time.sleep(delay)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
            with sqlite3.connect(database) as db:
                states = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
            record(
                f"cycle {cycle}: SIGKILL pid {server.process.pid} {delay:.3f} s after it "
                f"served; {len(ledger.accepted)} jobs accepted so far; in the file: {states}"
            )
            server = start_server(config_path)
            ledger.url = server.url
        stop.set()
        for thread in threads:
            thread.join(timeout=10)

        # The last server runs every accepted job to one terminal state.
        deadline = time.monotonic() + 90
        final: dict[str, dict[str, Any]] = {}
        with httpx.Client(timeout=10) as http:
            pending = set(ledger.accepted)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    response = http.get(f"{server.url}/api/v1/jobs/{job_id}")
                    assert response.status_code == 200, f"seed {seed}: {job_id}: {response.text}"
                    job = response.json()
                    observe(ledger, job_id, job)
                    if job["state"] in TERMINAL:
                        final[job_id] = job
                        pending.discard(job_id)
                time.sleep(0.2)
        assert server.stop() == 0
    finally:
        stop.set()
        if server.process.poll() is None:
            server.process.kill()

    context = f"seed {seed}; kill log in {log_path}"
    assert cycle >= 5, context
    assert len(ledger.accepted) >= 50, context
    assert not ledger.server_errors, (context, ledger.server_errors[:5])
    assert not ledger.violations, (context, ledger.violations[:5])
    assert not pending, (context, f"{len(pending)} jobs never finished", sorted(pending)[:5])
    for job_id, (task, args) in ledger.accepted.items():
        state, result = expected_result(task, args)
        job = final[job_id]
        assert job["state"] == state, (context, job)
        if state == "succeeded":
            assert job["result"] == result, (context, job)
        else:
            assert job["error"]["message"] == args["message"], (context, job)
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", context
        stored = {row[0] for row in db.execute("SELECT id FROM jobs")}
        terminal = {
            row[0]
            for row in db.execute(
                "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
                "AND finished_at IS NOT NULL"
            )
        }
    assert set(ledger.accepted) <= stored, context
    assert set(ledger.accepted) <= terminal, context
    record(f"crash loop passed: {cycle} kills, {len(ledger.accepted)} jobs, seed {seed}")
