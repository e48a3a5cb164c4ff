"""decide_ending: how a finished attempt is stored, as a pure function of what the
scheduler saw (River's makeRetryDecision is the model)."""

from __future__ import annotations

import dataclasses
import signal
from datetime import UTC, datetime, timedelta

import pytest

from jobserver.jobs import Job, JobError, JobState, Outcome
from jobserver.scheduler import AttemptEnd, decide_ending
from jobserver.store import FAILURE, PRESSURE, RESCUE, Finish, Requeue

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
BOOM = JobError("ValueError", "boom")


def job(**fields: object) -> Job:
    values: dict[str, object] = {
        "id": "01J0000000000000000000000A",
        "task": "t",
        "args": {},
        "state": JobState.RUNNING,
        "priority": 0,
        "created_at": NOW,
        "started_at": NOW,
        "finished_at": None,
        "attempts": 1,
        "max_retries": 2,
        "failures": 0,
        "rescues": 0,
        "result": None,
        "error": None,
        "reason": None,
        "cancel_requested": False,
        "run_after": None,
        "pid": 10,
        "pid_started_at": 1.0,
        "exit_code": None,
        "peak_rss": None,
        "cpu_seconds": None,
    }
    values.update(fields)
    return Job(**values)  # type: ignore[arg-type]


def ending(outcome: Outcome, **fields: object) -> AttemptEnd:
    values: dict[str, object] = {
        "job": job(),
        "outcome": outcome,
        "stop_reason": None,
        "stop_note": None,
        "timeout": None,
        "oom_killed": False,
        "memory_limit": None,
        "peak_rss": 2**20,
        "cpu_seconds": 0.5,
        "artifacts": (),
        "retry_on_timeout": False,
        "retry_base": 1.0,
        "retry_cap": 60.0,
        "max_pressure_requeues": 3,
        "jitter": 0.0,
        "now": NOW,
    }
    values.update(fields)
    return AttemptEnd(**values)  # type: ignore[arg-type]


def test_success_finishes_with_the_result_and_the_usage() -> None:
    end, reason = decide_ending(ending(Outcome(exit_code=0, result={"r": 1})))
    assert end == Finish(
        JobState.SUCCEEDED,
        result={"r": 1},
        exit_code=0,
        peak_rss=2**20,
        cpu_seconds=0.5,
        artifacts=(),
    )
    assert reason is None


def test_a_failure_with_retries_left_is_requeued_with_backoff() -> None:
    end, reason = decide_ending(ending(Outcome(exit_code=1, error=BOOM)))
    assert isinstance(end, Requeue) and end.counts == FAILURE and end.error == BOOM
    assert end.run_after == NOW + timedelta(seconds=1)
    assert reason == "attempt 1 failed (boom); retry 1 of 2 after 1.0 s"


def test_a_failure_without_retries_left_fails() -> None:
    end, reason = decide_ending(ending(Outcome(exit_code=1, error=BOOM), job=job(failures=2)))
    assert isinstance(end, Finish) and end.state is JobState.FAILED and end.error == BOOM
    assert (end.reason, reason) == ("ValueError", "boom")


@pytest.mark.parametrize(("retry_on_timeout", "requeued"), [(False, False), (True, True)])
def test_a_timeout_is_retried_only_when_the_task_says_so(
    retry_on_timeout: bool, requeued: bool
) -> None:
    killed = Outcome(signal=signal.SIGTERM, error=JobError("Killed", "SIGTERM"))
    end, _ = decide_ending(
        ending(killed, stop_reason="timeout", timeout=5.0, retry_on_timeout=retry_on_timeout)
    )
    assert isinstance(end, Requeue) is requeued
    assert end.error == JobError("Timeout", "timed out after 5 s")


def test_a_shutdown_requeues_without_counting() -> None:
    killed = Outcome(exit_code=-15, error=JobError("Killed", "SIGTERM"))
    end, _ = decide_ending(ending(killed, stop_reason="shutdown"))
    assert end == Requeue("requeued: the server shut down while it ran", exit_code=-15)


def test_a_run_killed_by_its_fencing_node_requeues_counting_a_rescue() -> None:
    killed = Outcome(exit_code=-9, error=JobError("Killed", "SIGKILL"))
    end, reason = decide_ending(
        ending(killed, stop_reason="fenced", stop_note="no heartbeat for 1.2 s")
    )
    expected = "requeued: its node fenced itself (no heartbeat for 1.2 s)"
    assert end == Requeue(expected, counts=RESCUE, exit_code=-9) and reason == expected


def test_a_cancel_ends_cancelled() -> None:
    killed = Outcome(exit_code=-15, error=JobError("Killed", "SIGTERM"))
    end, reason = decide_ending(ending(killed, stop_reason="cancel"))
    assert isinstance(end, Finish) and end.state is JobState.CANCELLED
    assert reason == "cancelled by request while running"


def test_memory_pressure_requeues_until_its_budget_then_fails() -> None:
    killed = Outcome(signal=signal.SIGKILL, error=JobError("Killed", "SIGKILL"))
    under = ending(killed, stop_reason="pressure", stop_note="killed under memory pressure")
    end, _ = decide_ending(under)
    assert isinstance(end, Requeue) and end.counts == PRESSURE
    spent = dataclasses.replace(under, job=job(pressure_requeues=3))
    end, reason = decide_ending(spent)
    assert isinstance(end, Finish) and end.state is JobState.FAILED
    assert end.error is not None and end.error.type == "MemoryPressure"
    assert reason is not None and "already requeued 3 times" in reason


def test_an_oom_kill_at_the_jobs_own_limit_fails_without_retry() -> None:
    killed = Outcome(signal=signal.SIGKILL, error=JobError("Killed", "SIGKILL"))
    end, reason = decide_ending(ending(killed, oom_killed=True, memory_limit=2**20))
    assert isinstance(end, Finish) and end.state is JobState.FAILED
    assert end.error is not None and end.error.type == "OOMKilled" and end.reason == "oom_killed"
    assert reason is not None and reason.startswith("oom_killed: the kernel killed it")
