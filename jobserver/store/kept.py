"""An attempt's end kept in the job's directory while the database cannot take it (disk
full, read-only, unreachable): the scheduler keeps it and retries; a restart applies it
before rescuing, so a finished job is not rerun.  Written only when a write failed: the
happy path costs no file."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jobserver.jobs import Artifact, JobError, JobState, format_timestamp, parse_timestamp
from jobserver.store.repository import Finish, Requeue, TaskRun

log = logging.getLogger("jobserver.store")

OUTCOME_FILE = "outcome.json"


@dataclass(frozen=True)
class KeptOutcome:
    """An attempt's decided end that the store could not write (disk full, read-only,
    unreachable), kept in the job's directory until it can: a restart in between applies
    it instead of rerunning a finished job.  Written only on a failed write, so the happy
    path costs no file."""

    attempt: int
    end: Finish | Requeue
    now: datetime
    run: TaskRun | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        end = self.end
        document: dict[str, Any]
        if isinstance(end, Finish):
            document = {
                "kind": "finish",
                "state": end.state.value,
                "result": end.result,
                "error": None if end.error is None else end.error.to_dict(),
                "reason": end.reason,
                "exit_code": end.exit_code,
                "peak_rss": end.peak_rss,
                "cpu_seconds": end.cpu_seconds,
                "artifacts": None
                if end.artifacts is None
                else [[a.name, a.size, a.sha256] for a in end.artifacts],
            }
        else:
            document = {
                "kind": "requeue",
                "reason": end.reason,
                "counts": end.counts,
                "run_after": None if end.run_after is None else format_timestamp(end.run_after),
                "error": None if end.error is None else end.error.to_dict(),
                "exit_code": end.exit_code,
            }
        run = self.run
        return {
            "attempt": self.attempt,
            "end": document,
            "now": format_timestamp(self.now),
            "reason": self.reason,
            "run": None
            if run is None
            else {
                **{f: getattr(run, f) for f in _RUN_FIELDS},
                "finished_at": format_timestamp(run.finished_at),
            },
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> KeptOutcome:
        data = document["end"]
        error = None if data["error"] is None else JobError(**data["error"])
        end: Finish | Requeue
        if data["kind"] == "finish":
            artifacts = data["artifacts"]
            end = Finish(
                JobState(data["state"]),
                result=data["result"],
                error=error,
                reason=data["reason"],
                exit_code=data["exit_code"],
                peak_rss=data["peak_rss"],
                cpu_seconds=data["cpu_seconds"],
                artifacts=None if artifacts is None else tuple(Artifact(*a) for a in artifacts),
            )
        else:
            run_after = data["run_after"]
            end = Requeue(
                data["reason"],
                counts=data["counts"],
                run_after=None if run_after is None else parse_timestamp(run_after),
                error=error,
                exit_code=data["exit_code"],
            )
        run = document["run"]
        return cls(
            attempt=document["attempt"],
            end=end,
            now=parse_timestamp(document["now"]),
            run=None
            if run is None
            else TaskRun(
                **{f: run[f] for f in _RUN_FIELDS},
                finished_at=parse_timestamp(run["finished_at"]),
            ),
            reason=document["reason"],
        )


_RUN_FIELDS = ("task", "job_id", "attempt", "outcome", "peak_rss", "cpu_seconds", "wall_seconds")


def keep_outcome(job_dir: Path, kept: KeptOutcome) -> None:
    """Write ``kept`` to the job's directory atomically (temp file, fsync, rename)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    temporary = job_dir / f".{OUTCOME_FILE}.tmp"
    with temporary.open("w") as file:
        json.dump(kept.to_json(), file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, job_dir / OUTCOME_FILE)
    directory = os.open(job_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a power loss
    finally:
        os.close(directory)


def kept_outcome(job_dir: Path, attempt: int) -> KeptOutcome | None:
    """The outcome kept for ``attempt`` of the job, if any (one kept for an earlier attempt
    is stale: that attempt's end was written after all)."""
    try:
        document = json.loads((job_dir / OUTCOME_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("%s: unreadable kept outcome (%s); ignored", job_dir / OUTCOME_FILE, exc)
        return None
    kept = KeptOutcome.from_json(document)
    return kept if kept.attempt == attempt else None


def forget_outcome(job_dir: Path) -> None:
    (job_dir / OUTCOME_FILE).unlink(missing_ok=True)
