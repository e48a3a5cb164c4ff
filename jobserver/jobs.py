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
    Terminal: never left.  ``finished_at`` is set exactly in these states (the schema
    checks it).

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
    pressure_requeues: int = 0  # killed and requeued to protect the machine's memory


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


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: sorts as text, readable in sqlite3."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def utcnow() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
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
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
