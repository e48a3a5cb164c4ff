"""Races between clients of one real server: two cancels of one job, a cancel against the
job's own end, concurrent retries, one Idempotency-Key submitted at once, dependents
submitted while their parent fails; each also with the server SIGKILLed in the middle of
the race and restarted on the same file.

Every test asserts the end state and the history (the job document's ``attempts`` and
``history``; without a kill, also the documents the job's event stream sent) against
docs/guarantees.md, for whichever order the race took.  The moments of the kills and of
the cancels come from a seeded RNG whose seed is printed: replay a failure with
``JOBSERVER_RACE_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import SAMPLE_TASKS, ServerProcess, write_config
from tests.test_e2e import submit, wait_for_job, wait_until
from tests.test_reliability import STUBBORN, runs

pytestmark = pytest.mark.integration

T = TypeVar("T")
TERMINAL = ("succeeded", "failed", "cancelled")
RACE_TASKS = {
    **{name: SAMPLE_TASKS[name] for name in ("add", "sleep", "flaky", "wait_for_file")},
    **STUBBORN,
    "fail_when_file": {"function": "sample_tasks:fail_when_file", "cpus": 0.1, "memory": "16MiB"},
}
KILL = pytest.mark.parametrize("kill", [False, True], ids=["served", "sigkill"])


@dataclass(frozen=True)
class Answer:
    """A server's answer; ``status`` None: none came (the server was killed first)."""

    status: int | None
    body: Any = None

    @property
    def code(self) -> str | None:
        """The error code of an error answer."""
        return self.body["error"]["code"] if self.status and self.status >= 400 else None


def at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Every call in a thread of its own, all released together."""
    barrier = threading.Barrier(len(calls))

    def run(one: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return one()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def outcomes(job: dict[str, Any]) -> list[str | None]:
    """Each attempt's outcome, from the job's history (which must count every attempt)."""
    assert len(job["history"]) == job["attempts"], job
    return [entry["outcome"] for entry in job["history"]]


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("JOBSERVER_RACE_SEED", random.randrange(2**32)))
    print(f"race seed {seed} (replay with JOBSERVER_RACE_SEED={seed})")
    return random.Random(seed)


class Served:
    """One database file, served by one real server at a time: ``killer`` SIGKILLs the
    server at a random moment of a race, ``restart`` serves the same file again."""

    def __init__(
        self,
        tmp_path: Path,
        server_factory: Callable[..., ServerProcess],
        rng: random.Random,
        **config: Any,
    ) -> None:
        self.config_path = write_config(tmp_path, tasks=RACE_TASKS, **config)
        self._factory = server_factory
        self.rng = rng
        self.server: ServerProcess = server_factory(self.config_path)
        # One client for all threads: making one per request (an SSL context each) costs
        # more than the requests on a loaded 2-core machine, and spreads out the race.
        self.http = httpx.Client(timeout=10)

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, **kwargs: Any) -> Answer:
        """``method path`` on the server serving the file now."""
        try:
            response = self.http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.TransportError:
            return Answer(None)
        return Answer(response.status_code, response.json())

    def document(self, job_id: str) -> dict[str, Any]:
        answer = self.call("GET", f"/api/v1/jobs/{job_id}")
        assert answer.status == 200, answer
        found: dict[str, Any] = answer.body
        return found

    def killer(self, within: float, after: float = 0.0) -> Callable[[], Answer]:
        """A call for ``at_once``: the SIGKILL, ``after`` to ``within`` seconds into the
        race."""
        delay, process = self.rng.uniform(after, within), self.server.process

        def kill() -> Answer:
            time.sleep(delay)  # the race's moment of the kill, not a wait for anything
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            print(f"SIGKILL {delay:.3f} s into the race")
            return Answer(None)

        return kill

    def restart(self) -> None:
        assert self.server.process.poll() is not None, "restart after the kill"
        self.server = self._factory(self.config_path)


@pytest.fixture
def serve(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], rng: random.Random
) -> Iterator[Callable[..., Served]]:
    """``serve(**config)``: a Served file in the test's directory; its client is closed
    at the end."""
    made: list[Served] = []

    def factory(**config: Any) -> Served:
        made.append(Served(tmp_path, server_factory, rng, **config))
        return made[-1]

    yield factory
    for served in made:
        served.http.close()


class EventLog:
    """The job documents ``GET /api/v1/jobs/{id}/events`` sends, followed in a thread
    until the stream's ``end``."""

    def __init__(self, served: Served, job_id: str) -> None:
        self.documents: list[dict[str, Any]] = []
        self.ended = False
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(served, job_id), daemon=True)
        self._thread.start()
        assert self._opened.wait(timeout=10), "the event stream did not open"

    def _follow(self, served: Served, job_id: str) -> None:
        path = f"{served.url}/api/v1/jobs/{job_id}/events"
        with served.http.stream("GET", path, timeout=60) as response:
            self._opened.set()
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                    self.ended = name == "end"
                elif line.startswith("data: ") and name == "job":
                    self.documents.append(json.loads(line.removeprefix("data: ")))

    def check(self, final: dict[str, Any]) -> list[str]:
        """The states the stream went through: one final state, last, the job's; a cancel
        flag once raised stays raised.  Returns the states."""
        self._thread.join(timeout=30)
        assert self.ended, self.documents
        states = [sent["state"] for sent in self.documents]
        assert states[-1] == final["state"], (states, final)
        assert all(state not in TERMINAL for state in states[:-1]), states
        states = [s for n, s in enumerate(states) if n == 0 or states[n - 1] != s]
        assert self.documents[-1]["history"] == final["history"]
        flags = [sent["cancel_requested"] for sent in self.documents]
        assert flags == sorted(flags), flags  # False… then True…
        return states


# -- two cancels of one job ------------------------------------------------------------------


@KILL
def test_two_cancels_of_a_queued_job(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    served = serve()
    job = served.call("POST", "/api/v1/jobs", json={"task": "add", "args": {"a": 1}, "delay": 3600})
    job_id = job.body["id"]
    events = None if kill else EventLog(served, job_id)
    cancel = f"/api/v1/jobs/{job_id}/cancel"
    race: list[Callable[[], Answer]] = [lambda: served.call("POST", cancel) for _ in range(4)]
    answers = at_once([*race, served.killer(0.05)] if kill else race)[: len(race)]

    # One cancel cancels it (200, cancelled); each other one finds it cancelled (409).
    assert {a.status for a in answers} <= ({200, 409, None} if kill else {200, 409}), answers
    done = [a for a in answers if a.status == 200]
    assert len(done) <= 1 if kill else len(done) == 1, answers
    assert all(a.body["state"] == "cancelled" for a in done)
    assert all(a.code == "invalid_state" for a in answers if a.status == 409)
    if kill:
        served.restart()
    final = served.document(job_id)
    if kill and not any(a.status for a in answers):
        # No answer came: the cancels committed (cancelled) or none did (still delayed).
        assert final["state"] in ("cancelled", "queued"), final
    else:
        assert final["state"] == "cancelled", final
    if final["state"] == "cancelled":
        assert final["reason"] == "cancelled by request before it started"
    assert outcomes(final) == []
    if events is not None:
        assert events.check(final) == ["queued", "cancelled"]


@KILL
def test_two_cancels_of_a_running_job(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    # The task ignores SIGTERM: the job runs out kill_grace with its cancel pending, so a
    # kill lands while the cancel is acknowledged but not yet carried out.
    served = serve(scheduler={"kill_grace": "1s"})
    note = tmp_path / "runs.txt"
    job_id = submit(served.url, "stubborn", note=str(note))["id"]
    wait_until(lambda: runs(note) == 1)
    events = None if kill else EventLog(served, job_id)
    cancel = f"/api/v1/jobs/{job_id}/cancel"
    race: list[Callable[[], Answer]] = [lambda: served.call("POST", cancel) for _ in range(4)]
    answers = at_once([*race, served.killer(0.05)] if kill else race)[: len(race)]

    # Each cancel is acknowledged (202, still running, flagged); one that comes after the
    # job has ended (past kill_grace) is refused as for any finished job.
    acknowledged = [a for a in answers if a.status == 202]
    assert {a.status for a in answers} <= ({202, 409, None} if kill else {202, 409}), answers
    assert kill or acknowledged, answers
    for answer in acknowledged:
        assert answer.body["state"] == "running" and answer.body["cancel_requested"] is True
    assert all(a.code == "invalid_state" for a in answers if a.status == 409)
    if kill:
        served.restart()
    final = wait_for_job(served.url, job_id, *TERMINAL, "queued", "running")
    if final["state"] != "cancelled" and not any(a.status for a in answers):
        # Killed before any cancel was answered or committed: the rescue requeued the job,
        # which runs again (cancelled now, to end it).
        assert kill, final
        wait_until(lambda: runs(note) == 2)
        assert served.call("POST", f"/api/v1/jobs/{job_id}/cancel").status == 202
        final = wait_for_job(served.url, job_id, *TERMINAL)
        assert final["state"] == "cancelled", final
        assert outcomes(final) == ["interrupted", "cancelled"], final
        return
    final = wait_for_job(served.url, job_id, *TERMINAL)
    # One cancellation: cancelled, the one attempt closed as cancelled, never started again.
    assert final["state"] == "cancelled", final
    assert outcomes(final) == ["cancelled"], final
    assert "cancelled by request" in final["reason"]
    assert runs(note) == 1
    if events is not None:
        assert set(events.check(final)) == {"running", "cancelled"}


# -- a cancel against the job's own end --------------------------------------------------------


def check_cancel_against_end(job: dict[str, Any], answer: Answer, seconds: float) -> str:
    """The end state a cancel's answer allows (docs/guarantees.md, "A cancel racing the
    job's end"); returns "answer → end" for the tally."""
    state, history = job["state"], outcomes(job)
    if answer.status == 200:  # cancelled while queued: never started
        assert answer.body["state"] == "cancelled"
        assert state == "cancelled" and history == [], job
    elif answer.status == 202:  # flagged while running: stopped, or it had finished
        assert answer.body["state"] == "running" and answer.body["cancel_requested"] is True
        assert job["cancel_requested"] is True, job
        assert (state, history) in [("cancelled", ["cancelled"]), ("succeeded", ["succeeded"])]
    elif answer.status == 409:  # it had already finished: the cancel changed nothing
        assert answer.code == "invalid_state"
        assert state == "succeeded" and history == ["succeeded"], job
        assert job["cancel_requested"] is False, job
    else:  # no answer (killed): either; a rescued attempt may precede the end
        assert answer.status is None, answer
        assert (state, history) in [
            ("cancelled", []),
            ("cancelled", ["cancelled"]),
            ("succeeded", ["succeeded"]),
            ("succeeded", ["interrupted", "succeeded"]),
        ], job
    if state == "succeeded":
        assert job["result"] == seconds, job
    else:
        assert "cancelled by request" in job["reason"], job
    return f"{answer.status} → {state}"


@KILL
def test_a_cancel_racing_the_jobs_own_end(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    # Many short jobs, each cancelled at a random moment: most once the job runs, from at
    # once to past its end (so the cancel comes before, while and after the process
    # exits and its end is stored), every fourth right after the submit (queued).  Each
    # end must be one the cancel's answer allows, whichever order the race took.
    served = serve(scheduler={"kill_grace": "1s"})
    seconds = 0.1
    count = 12 if kill else 24
    # With a kill, the rounds start spread out, so that the kill finds some done, some in
    # the middle (a cancel acknowledged and not carried out) and some not started.
    starts = [served.rng.uniform(0, 0.4) if kill else 0.0 for _ in range(count)]
    delays = [served.rng.uniform(0, 0.25) for _ in range(count)]

    def one_round(number: int) -> tuple[str, Answer, EventLog | None] | None:
        time.sleep(starts[number])  # the round's moment in the race
        args = {"seconds": seconds}
        job = served.call("POST", "/api/v1/jobs", json={"task": "sleep", "args": args})
        if job.status is None:  # the server was killed before it answered
            return None
        assert job.status == 202, job
        job_id = job.body["id"]
        events = None if kill else EventLog(served, job_id)
        if number % 4:
            started_or_gone(served, job_id)
        time.sleep(delays[number])  # the race's moment of the cancel, not a wait for anything
        return job_id, served.call("POST", f"/api/v1/jobs/{job_id}/cancel"), events

    with ThreadPoolExecutor(count + 1 if kill else 6) as pool:
        if kill:
            pool.submit(served.killer(0.6, after=0.15))
        ran = list(pool.map(one_round, range(count)))
    if kill:
        served.restart()
    tally: Counter[str] = Counter()
    for job_id, answer, events in [r for r in ran if r is not None]:
        final = wait_for_job(served.url, job_id, *TERMINAL)
        tally[check_cancel_against_end(final, answer, seconds)] += 1
        if events is not None:
            events.check(final)
    print(f"cancel against the end: {dict(tally)}")
    assert kill or sum(tally.values()) == count


def started_or_gone(served: Served, job_id: str) -> None:
    """Returns once the job has left ``queued``, or the server is gone (killed)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = served.call("GET", f"/api/v1/jobs/{job_id}")
        if answer.status is None or answer.body["state"] != "queued":
            return
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never started")


# -- concurrent retries of one failed job ------------------------------------------------------


@KILL
def test_concurrent_retries_of_one_failed_job(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    # The job fails its first attempt and succeeds on any later one: a second retry could
    # only be told 202 if two retries were taken for one.
    served = serve()
    body = {"task": "flaky", "args": {"marker_dir": str(tmp_path / "marks"), "failures": 1}}
    job_id = served.call("POST", "/api/v1/jobs", json={**body, "max_retries": 0}).body["id"]
    assert wait_for_job(served.url, job_id, "failed")["attempts"] == 1
    race: list[Callable[[], Answer]] = [
        *(lambda: served.call("POST", f"/api/v1/jobs/{job_id}/retry") for _ in range(5)),
        lambda: served.call("POST", "/api/v1/jobs/retry", json={"task": "flaky"}),  # bulk
    ]
    answers = at_once([*race, served.killer(0.05)] if kill else race)[: len(race)]
    singles, bulk = answers[:-1], answers[-1]

    assert {a.status for a in singles} <= ({202, 409, None} if kill else {202, 409}), answers
    assert all(a.body["state"] == "queued" for a in singles if a.status == 202)
    assert all(a.code == "invalid_state" for a in singles if a.status == 409)
    assert bulk.status in ((200, None) if kill else (200,)), bulk
    bulk_count = bulk.body["count"] if bulk.status == 200 else 0
    assert bulk.status != 200 or bulk.body["ids"] == [job_id] * bulk_count
    retried = sum(a.status == 202 for a in singles) + bulk_count
    assert retried <= 1 if kill else retried == 1, answers  # exactly one new attempt
    if kill:
        served.restart()
    final = wait_for_job(served.url, job_id, *TERMINAL)
    history = outcomes(final)
    committed = retried or any(a.status == 409 for a in singles)
    if final["state"] == "failed":  # no retry committed (only if the kill came first)
        assert not committed and kill and history == ["failed"], (answers, final)
    else:  # the one retry: its attempt, rerun only if the kill cut it short
        assert final["state"] == "succeeded", final
        assert history[0] == "failed" and history[-1] == "succeeded", final
        assert set(history[1:-1]) <= ({"interrupted"} if kill else set()), final


# -- concurrent submits with one Idempotency-Key ------------------------------------------------


@KILL
def test_concurrent_submits_with_one_idempotency_key(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    served = serve()
    same = {"task": "add", "args": {"a": 1}}
    other = {"task": "add", "args": {"a": 2}}

    def post(key: str, body: dict[str, Any]) -> Answer:
        return served.call("POST", "/api/v1/jobs", json=body, headers={"Idempotency-Key": key})

    # Rounds of six submits with one key at once: the same body, then two bodies.
    keys = [f"race-{n}-{uuid.uuid4()}" for n in range(1 if kill else 3)]
    for round_number, key in enumerate(keys):
        bodies = [same] * 6 if round_number < 2 else [same, other] * 3
        race: list[Callable[[], Answer]] = [lambda k=key, b=b: post(k, b) for b in bodies]
        answers = at_once([*race, served.killer(0.05)] if kill else race)[: len(race)]
        assert {a.status for a in answers} <= {202, 200, 409, None}, answers
        assert None not in {a.status for a in answers} or kill, answers
        created = [a for a in answers if a.status == 202]
        assert len(created) <= 1 if kill else len(created) == 1, answers
        ids = {a.body["id"] for a in answers if a.status in (200, 202)}
        if kill:
            served.restart()
            # The key names the one job if any submit committed; a new submit tells.
            again = served.call("POST", "/api/v1/jobs", json=same, headers={"Idempotency-Key": key})
            assert again.status in ((200,) if ids else (200, 202)), again
            ids.add(again.body["id"])
        assert len(ids) == 1, answers  # every answer names the same job
        winner = next(iter(ids))
        for answer, body in zip(answers, bodies, strict=True):
            if answer.status == 409:  # the other body: refused, naming the original job
                assert (
                    answer.code == "conflict"
                    and answer.body["error"]["details"]["job_id"] == winner
                )
            elif answer.status is not None:
                assert answer.body["args"] == body["args"], (answer, body)
    listed = served.call("GET", "/api/v1/jobs", params={"task": "add"}).body["jobs"]
    assert len(listed) == len(keys), listed  # one job per key


# -- dependents submitted while their parent fails -------------------------------------------


@KILL
def test_dependents_submitted_while_their_parent_fails(
    tmp_path: Path, serve: Callable[..., Served], kill: bool
) -> None:
    # Four clients submit dependents (and a dependent of each) until the parent has failed
    # and a little after: some before the failure, some after, some while it commits.
    served = serve()
    gate = tmp_path / "fail-now"
    parent = submit(served.url, "fail_when_file", path=str(gate))["id"]
    wait_for_job(served.url, parent, "running")
    parent_failed = threading.Event()
    answers: list[Answer] = []
    lock = threading.Lock()

    def client() -> None:
        extra = 3  # submits after the parent was seen failed
        while extra:
            if parent_failed.is_set():
                extra -= 1
            child = served.call(
                "POST",
                "/api/v1/jobs",
                json={"task": "add", "args": {"a": 1}, "depends_on": [parent]},
            )
            grandchild = Answer(None)
            if child.status == 202:
                grandchild = served.call(
                    "POST",
                    "/api/v1/jobs",
                    json={"task": "add", "args": {"a": 2}, "depends_on": [child.body["id"]]},
                )
            with lock:
                answers.extend([child, grandchild] if child.status == 202 else [child])
            if child.status is None:
                time.sleep(0.05)  # the server is down or restarting

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: sum(a.status == 202 for a in answers) >= 8)
        gate.mkdir()  # the parent fails now
        if kill:
            served.killer(0.2)()
            served.restart()
        wait_for_job(served.url, parent, "failed")
    finally:
        parent_failed.set()
        for thread in clients:
            thread.join(timeout=30)

    # Refused (no answer) or accepted; an accepted dependent is never left queued behind
    # the failed parent: it is cancelled by the time the parent reads failed, or at once.
    assert {a.status for a in answers} <= ({202, None} if kill else {202}), answers
    accepted = [a.body for a in answers if a.status == 202]
    assert {sent["state"] for sent in accepted} <= {"queued", "cancelled"}
    print(f"dependents answered: {Counter(sent['state'] for sent in accepted)}")
    if not kill:  # the clients ran before and after the failure
        assert {sent["state"] for sent in accepted} == {"queued", "cancelled"}
    for sent in accepted:
        final = served.document(sent["id"])
        assert final["state"] == "cancelled", final
        assert final["reason"] == f"dependency {sent['depends_on'][0]} " + (
            "failed" if sent["depends_on"] == [parent] else "cancelled"
        )
        assert final["error"]["type"] == "DependencyFailed" and outcomes(final) == []
    # Nor is one whose answer was lost in the kill: no dependent is left waiting.
    for state in ("queued", "running"):
        left = served.call("GET", "/api/v1/jobs", params={"task": "add", "state": state})
        assert left.body["jobs"] == [], left
