"""The crash loop: SIGKILL a real server at random moments while clients submit, poll,
cancel and retry and jobs run and finish; restart it; check that nothing was lost or went
backwards, that every acknowledged cancel and retry held, and that no job is stuck.

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
from collections import Counter
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
# Cancels go to jobs that succeed unless cancelled, retries to jobs that always fail: each
# job's end then tells which of the two acted on it.
CANCELLED_TASKS = ("add", "sleep")
RETRIED_TASKS = ("fail",)


@dataclass
class Ledger:
    """What clients were told, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    terminal_seen: dict[str, tuple[str, Any]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    url: str = ""
    # Per job, the answers its cancels and retries got: the status, or None when the
    # server was killed before it answered.
    cancels: dict[str, list[int | None]] = field(default_factory=dict)
    retries: dict[str, list[int | None]] = field(default_factory=dict)


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
            action = rng.random()
            try:
                if action < 0.15 and len(ledger.accepted) < MAX_ACCEPTED:
                    submit_one(http, ledger, rng)
                    pause = rng.uniform(0.1, 0.4)  # spread submissions over the whole run
                elif action < 0.17:
                    change_one(http, ledger, rng, "cancel", CANCELLED_TASKS, ledger.cancels)
                elif action < 0.18:
                    change_one(http, ledger, rng, "retry", RETRIED_TASKS, ledger.retries)
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


def change_one(
    http: httpx.Client,
    ledger: Ledger,
    rng: random.Random,
    verb: str,
    tasks: tuple[str, ...],
    answers: dict[str, list[int | None]],
) -> None:
    """Cancel or retry one of the accepted jobs of ``tasks``, noting the answer: one not
    seen finished for a cancel, one seen failed for a retry, if there is one."""
    with ledger.lock:
        candidates = [job_id for job_id, (task, _) in ledger.accepted.items() if task in tasks]
        finished = set(ledger.terminal_seen)
        likely = [c for c in candidates if (c in finished) == (verb == "retry")]
        if not candidates:
            return
        job_id = rng.choice(likely or candidates)
        # Noted before it is sent: a retried job may leave its final state from now on.
        answers.setdefault(job_id, []).append(None)
    response = http.post(f"{ledger.url}/api/v1/jobs/{job_id}/{verb}")
    with ledger.lock:
        answers[job_id][-1] = response.status_code
    if response.status_code >= 500:
        ledger.server_errors.append(f"{verb} {response.status_code} {response.text}")
    elif response.status_code not in (200, 202, 409):
        ledger.violations.append(f"{verb} {job_id} answered {response.status_code}")


def observe(ledger: Ledger, job_id: str, job: dict[str, Any]) -> None:
    state = job["state"]
    seen = (state, job["result"])
    with ledger.lock:
        before = ledger.terminal_seen.get(job_id)
        # A client's retry is the one way out of a final state (back to queued).
        retried = job_id in ledger.retries and state not in TERMINAL
        if before is not None and before != seen and not retried:
            ledger.violations.append(f"{job_id} went from terminal {before} to {seen}")
        elif state in TERMINAL:
            ledger.terminal_seen[job_id] = seen


def check_cancels(job: dict[str, Any], result: Any, answers: list[int | None]) -> str | None:
    """What is wrong with the end of a job that succeeds unless cancelled, given the
    answers its cancels got (docs/guarantees.md): None if nothing."""
    state, history = job["state"], [entry["outcome"] for entry in job["history"]]
    if state == "succeeded":
        if job["result"] != result:
            return "a wrong result"
        if 200 in answers:
            return "succeeded after a cancel answered 200 (cancelled while queued)"
        # 202 and then succeeded: the process had finished on its own; that it did not
        # start after the cancel is checked in the file.
    elif state == "cancelled":
        if not answers or set(answers) == {409}:
            return "cancelled, yet no cancel was acknowledged or lost in a kill"
        if history and history[-1] not in ("cancelled", "interrupted"):
            return f"cancelled after an attempt that ended {history[-1]}"
    else:
        return f"ended {state}"
    return None


def check_retries(job: dict[str, Any], answers: list[int | None]) -> str | None:
    """What is wrong with the attempts of a job that always fails, given the answers its
    retries got: one failed attempt more for each retry acknowledged, and at most one
    more for each retry whose answer a kill cut off."""
    failed = [entry["outcome"] for entry in job["history"]].count("failed")
    acknowledged, unknown = answers.count(202), answers.count(None)
    if not 1 + acknowledged <= failed <= 1 + acknowledged + unknown:
        return f"{failed} failed attempts for {acknowledged} retries told 202, {unknown} cut off"
    return None


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
        assert len(job["history"]) == job["attempts"], (context, job)
        if job_id in ledger.cancels:
            problem = check_cancels(job, result, ledger.cancels[job_id])
            assert problem is None, (context, problem, ledger.cancels[job_id], job)
            continue
        assert job["state"] == state, (context, job)
        if state == "succeeded":
            assert job["result"] == result, (context, job)
        else:
            assert job["error"]["message"] == args["message"], (context, job)
            problem = check_retries(job, ledger.retries.get(job_id, []))
            assert problem is None, (context, problem, ledger.retries.get(job_id), job)
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
        # An acknowledged cancel is never followed by a start (a rescue included).
        started_after_cancel = db.execute(
            "SELECT jobs.id, attempts.attempt FROM jobs JOIN attempts ON attempts.job_id = jobs.id "
            "WHERE attempts.started_at > jobs.cancel_requested_at"
        ).fetchall()
    assert set(ledger.accepted) <= stored, context
    assert set(ledger.accepted) <= terminal, context
    assert not started_after_cancel, (context, started_after_cancel)
    told = Counter(status for answers in ledger.cancels.values() for status in answers)
    retried = Counter(status for answers in ledger.retries.values() for status in answers)
    record(f"cancels answered {dict(told)}; retries answered {dict(retried)}")
    record(f"crash loop passed: {cycle} kills, {len(ledger.accepted)} jobs, seed {seed}")
