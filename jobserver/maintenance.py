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

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from jobserver.jobs import Job, JobError, JobState
from jobserver.resources import find_tagged_processes, is_same_process
from jobserver.runner import JOB_ID_ENV, kill_group, kill_process
from jobserver.store import Checkpoint, Finish, Store

log = logging.getLogger("jobserver.maintenance")


async def rescue_interrupted(store: Store, max_rescues: int, now: datetime) -> list[Job]:
    """Requeue (or fail as lost) every job a dead server left running; returns them."""
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
            log.warning("job %s: running -> failed (lost after %d rescues)", job.id, job.rescues)
        else:
            updated = await store.requeue(
                job.id,
                reason=f"requeued after the server stopped while it ran "
                f"(rescue {job.rescues + 1} of {max_rescues})",
                rescued=True,
            )
            log.warning("job %s: running -> queued (rescued after a server crash)", job.id)
        if updated is not None:
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


class WalCheckpointer:
    """Keeps the write-ahead log bounded.

    SQLite checkpoints the WAL by itself every 1000 pages, but a reader that holds an old
    snapshot (an admin's open transaction in the ``sqlite3`` shell) stops it from being
    reset, and the log then grows with every write.  Every ``interval`` this service looks
    at the log's size and, past ``max_size``, runs ``PRAGMA wal_checkpoint(TRUNCATE)``
    without waiting on readers: once the reader leaves, the next tick truncates the log.
    """

    def __init__(self, store: Store, max_size: int, interval: float = 1.0) -> None:
        self._store = store
        self._max_size = max_size
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._warned = 0.0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="jobserver-wal-checkpointer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception:
                log.exception("WAL checkpoint failed; retrying on the next tick")

    async def tick(self) -> Checkpoint | None:
        """Checkpoint if the log is past its bound; returns what the checkpoint did."""
        size = self._store.wal_size()
        if size <= self._max_size:
            return None
        result = await self._store.checkpoint()
        if result.busy and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning(
                "the WAL is %d bytes (bound %d) and cannot be reset: a reader holds an old "
                "snapshot (an open transaction in a sqlite3 shell?); it is truncated as "
                "soon as that reader ends its transaction",
                size,
                self._max_size,
            )
        elif not result.busy:
            log.info("WAL checkpointed and truncated (was %d bytes)", size)
        return result
