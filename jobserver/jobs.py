"""The domain: job states, the transitions between them, and the records the store returns.

States (stored as plain text in ``jobs.state``):

``queued``
    In: submitted through the API; a failed attempt with retries left; a running job
    rescued after the server died or was shut down.  Out: the scheduler claims it
    (``running``) or a client cancels it (``cancelled``).
``running``
    In: claimed by the scheduler just before its process starts.  Out: the process
    ends (``succeeded`` / ``failed`` / ``cancelled`` if a cancel was requested), or
    it is requeued (retry, rescue, shutdown).
``succeeded`` / ``failed`` / ``cancelled``
    Terminal: never left by the scheduler or a cancel.  ``finished_at`` is set exactly in
    these states (the schema checks it).  The one sanctioned exception is a client's
    explicit retry (``POST /api/v1/jobs/{id}/retry``): ``failed`` or ``cancelled`` back to
    ``queued`` as a new attempt, listed apart in ``RETRY_TRANSITIONS`` so that no other
    path can use it by accident.

No I/O here: this module is imported by everything and imports only ``errors``.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobserver.errors import InvalidTransition


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Files in a job's directory (<jobs_dir>/<id>/): the runner writes them, the API serves them.
JOB_LOG_NAME = "output.log"
ARTIFACTS_DIR_NAME = "artifacts"

# A client's explicit retry: the only way out of a terminal state (see the module docstring).
RETRY_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}

# The tutorial's (Celery's) names for our states.
CELERY_STATUS: dict[JobState, str] = {
    JobState.QUEUED: "PENDING",
    JobState.RUNNING: "STARTED",
    JobState.SUCCEEDED: "SUCCESS",
    JobState.FAILED: "FAILURE",
    JobState.CANCELLED: "REVOKED",
}


def can_transition(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[source]


def check_transition(source: JobState, target: JobState, job_id: str) -> None:
    if not can_transition(source, target):
        raise InvalidTransition(
            f"job {job_id} is {source.value}; it cannot become {target.value}",
            {"id": job_id, "state": source.value, "requested": target.value},
        )


def check_retry(source: JobState, job_id: str) -> None:
    """A retry re-queues a failed or cancelled job; anything else is InvalidTransition."""
    if JobState.QUEUED not in RETRY_TRANSITIONS.get(source, frozenset()):
        raise InvalidTransition(
            f"job {job_id} is {source.value}; only a failed or cancelled job can be retried",
            {"id": job_id, "state": source.value, "requested": "retry"},
        )


@dataclass(frozen=True)
class JobError:
    type: str
    message: str
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


@dataclass(frozen=True)
class Job:
    """One stored row of ``jobs``."""

    id: str
    task: str
    args: dict[str, Any]
    state: JobState
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_retries: int
    failures: int
    rescues: int
    result: Any
    error: JobError | None
    reason: str | None
    cancel_requested: bool
    run_after: datetime | None
    pid: int | None
    pid_started_at: float | None
    exit_code: int | None
    peak_rss: int | None
    cpu_seconds: float | None
    # --- lifecycle (issue 4) ---
    timeout: float | None = None  # per-job override of the task's timeout
    depends_on: tuple[str, ...] = ()
    progress: Progress | None = None
    artifacts: tuple[Artifact, ...] = ()
    history: tuple[Attempt, ...] = ()  # filled by the store's single-job and page reads
    waiting_on: tuple[tuple[str, str], ...] = ()  # (id, state) of unsucceeded dependencies

    owner: str | None = None  # the token name that submitted it; None: anonymous

    pressure_requeues: int = 0  # killed and requeued to protect the machine's memory
    node: str | None = None  # the node whose scheduler claimed the current attempt
    schedule: str | None = None  # the [schedules.NAME] that fired it; None: submitted
    schedule_slot: datetime | None = None  # the cron slot it was fired for


@dataclass(frozen=True)
class Progress:
    fraction: float | None
    message: str
    updated_at: datetime


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Attempt:
    """One row of ``attempts``: a start of the job's process and how it ended."""

    attempt: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None  # succeeded | failed | retrying | cancelled | interrupted | pressure
    #   | None (still running)
    error_type: str | None
    error: str | None
    exit_code: int | None
    node: str | None = None  # the node that ran it


@dataclass(frozen=True)
class Outcome:
    """How one attempt's process ended, as the runner saw it.

    ``result`` is meaningful only when ``error`` is None.
    """

    exit_code: int | None = None
    signal: int | None = None
    result: Any = None
    error: JobError | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


MAX_PRIORITY = 1000  # a job's priority is from -MAX_PRIORITY to MAX_PRIORITY
MAX_TIMEOUT = 366 * 86400.0  # seconds: the longest timeout a job may have (task or submit)


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: sorts as text, readable in sqlite3."""
    # isoformat (C) instead of strftime: a job document formats up to a dozen times, and
    # strftime was the largest single cost of rendering a poll (issue 6 profile).
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def utcnow() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two characters (10 bits) per lookup: half the steps of one per character (every submit).
_CROCKFORD_PAIRS = [high + low for high in _CROCKFORD for low in _CROCKFORD]
_last_ulid = (0, 0)


def new_job_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, 26 Crockford base32 characters.

    Ids sort by creation time as text; within one millisecond the random part is
    incremented, so ids made by this process are strictly increasing (keyset
    pagination depends on that).
    """
    global _last_ulid
    millis = time.time_ns() // 1_000_000
    last_millis, last_random = _last_ulid
    if millis <= last_millis:
        millis, random_part = last_millis, last_random + 1
    else:
        random_part = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
    _last_ulid = (millis, random_part)
    value = (millis << 80) | random_part
    return "".join([_CROCKFORD_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])
