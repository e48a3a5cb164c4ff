"""An attempt's end kept in a file while the store cannot take it: what is read back is
what was kept, and only for the attempt it belongs to."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from jobserver.jobs import Artifact, JobError, JobState, format_timestamp, parse_timestamp, utcnow
from jobserver.store import (
    FAILURE,
    OUTCOME_FILE,
    Finish,
    KeptOutcome,
    Requeue,
    TaskRun,
    forget_outcome,
    keep_outcome,
    kept_outcome,
)


def test_a_finish_with_its_run_reads_back_the_same(tmp_path: Path) -> None:
    now = parse_timestamp(format_timestamp(utcnow()))  # the precision stored
    kept = KeptOutcome(
        attempt=2,
        end=Finish(
            JobState.SUCCEEDED,
            result={"rows": [1, 2.5, "x"]},
            exit_code=0,
            peak_rss=1234,
            cpu_seconds=0.5,
            artifacts=(Artifact("out.csv", 10, "ab" * 32),),
        ),
        now=now,
        run=TaskRun("t", "job", 2, "succeeded", 1234, 0.5, 1.25, now),
        reason=None,
    )
    keep_outcome(tmp_path / "job", kept)
    assert kept_outcome(tmp_path / "job", 2) == kept
    assert kept_outcome(tmp_path / "job", 3) is None  # another attempt's: stale
    assert [p.name for p in (tmp_path / "job").iterdir()] == [OUTCOME_FILE]  # no temp left
    forget_outcome(tmp_path / "job")
    assert kept_outcome(tmp_path / "job", 2) is None


def test_a_requeue_reads_back_the_same(tmp_path: Path) -> None:
    now = parse_timestamp(format_timestamp(utcnow()))  # the precision stored
    kept = KeptOutcome(
        attempt=1,
        end=Requeue(
            "attempt 1 failed; retry 1 of 2",
            counts=FAILURE,
            run_after=now + timedelta(seconds=3),
            error=JobError("ValueError", "bad", "Traceback ..."),
            exit_code=1,
        ),
        now=now,
        run=None,
        reason="attempt 1 failed; retry 1 of 2",
    )
    keep_outcome(tmp_path, kept)
    assert kept_outcome(tmp_path, 1) == kept


def test_an_unreadable_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / OUTCOME_FILE).write_text("{not json")
    assert kept_outcome(tmp_path, 1) is None
