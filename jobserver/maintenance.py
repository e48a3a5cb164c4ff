"""Work on stored jobs that no request asked for: for now, the startup rescuer.

Rescue (at start, before the scheduler runs): a job left ``running`` by a server that died
has no process watching it any more.  Its leftover processes are killed first (the leader
only if pid *and* start time match, so a recycled pid is never signalled; anything else
found by the job-id tag in its environment, which also catches grandchildren that left
the process group), then the job goes back to the queue.  The guarantee this gives is
at-least-once: a task interrupted this way runs again from the start.  A job rescued more
than ``max_rescues`` times fails as ``lost`` so that a job that kills the server cannot
loop forever.
"""

from __future__ import annotations

import logging
from datetime import datetime

from jobserver.events import Events
from jobserver.jobs import Job, JobError, JobState
from jobserver.resources import find_tagged_processes, is_same_process
from jobserver.runner import JOB_ID_ENV, kill_group, kill_process
from jobserver.store import Finish, Store

log = logging.getLogger("jobserver.maintenance")


async def rescue_interrupted(
    store: Store, max_rescues: int, now: datetime, events: Events | None = None
) -> list[Job]:
    """Requeue (or fail as lost) every job a dead server left running; returns them."""
    events = events or Events()
    rescued = []
    for job in await store.in_state(JobState.RUNNING):
        kill_leftovers(job)
        if job.rescues >= max_rescues:
            error = JobError(
                "lost",
                f"lost: the server stopped while this job ran {job.rescues + 1} times "
                f"(max_rescues = {max_rescues}); not requeued again",
            )
            updated = await store.finish(
                job.id, Finish(JobState.FAILED, error=error, reason="lost"), now
            )
            reason = f"lost after {job.rescues} rescues"
        else:
            reason = (
                f"requeued after the server stopped while it ran "
                f"(rescue {job.rescues + 1} of {max_rescues})"
            )
            updated = await store.requeue(job.id, reason=reason, rescued=True)
        if updated is not None:
            events.transition(updated, JobState.RUNNING, reason=reason)
            rescued.append(updated)
    return rescued


def kill_leftovers(job: Job) -> None:
    if (
        job.pid is not None
        and job.pid_started_at is not None
        and is_same_process(job.pid, job.pid_started_at)
    ):
        kill_group(job.pid)
    for pid in find_tagged_processes(JOB_ID_ENV, job.id):
        kill_process(pid)
