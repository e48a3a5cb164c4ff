"""The events hub: one log line per transition, and the per-job change notifier."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import sys
from typing import Any

import pytest
import uvicorn.config
import uvicorn.logging

from jobserver.cli import ProgressBar
from jobserver.client import Job as ClientJob
from jobserver.events import (
    NOTICE_JOBS,
    Events,
    JsonFormatter,
    PassStreamHandler,
    TextFormatter,
    Transition,
    Wakeups,
    configure_logging,
)
from jobserver.jobs import Job, JobState, utcnow
from jobserver.store.repository import QUEUE_NOTICE


class Recording:
    def __init__(self) -> None:
        self.seen: list[Transition] = []

    def transition(self, transition: Transition) -> None:
        self.seen.append(transition)

    def admission(self, task: str) -> None: ...

    def hold(self, kind: str) -> None: ...

    def pressure_event(self, resource: str) -> None: ...


def test_describe_reads_as_one_line() -> None:
    submitted = Transition("01A", "add", None, JobState.QUEUED)
    assert submitted.describe() == "job 01A (add): submitted -> queued"
    failed = Transition("01A", "add", JobState.RUNNING, JobState.FAILED, "it broke", 2.0)
    assert failed.describe() == "job 01A (add): running -> failed after 2.000 s: it broke"


def test_to_dict_has_every_field_with_states_as_text() -> None:
    failed = Transition("01A", "add", JobState.RUNNING, JobState.FAILED, "it broke", 2.0)
    expected = dataclasses.asdict(failed) | {"source": "running", "target": "failed"}
    assert failed.to_dict() == expected
    assert Transition("01A", "add", None, JobState.QUEUED).to_dict()["source"] is None


@pytest.mark.anyio
async def test_a_change_wakes_only_that_jobs_readers_and_leaves_nothing_behind() -> None:
    events = Events()
    with events.subscription("a") as a, events.subscription("b") as b:
        events.changed("a")
        await asyncio.wait_for(a, 1)
        assert not b.done()
    assert events._waiters == {}  # no per-job state outlives its readers


@pytest.mark.anyio
async def test_transition_feeds_the_recorder_and_wakes_readers() -> None:
    recorder = Recording()
    events = Events(recorder)
    job = Job(
        id="01A", task="add", args={}, state=JobState.QUEUED, priority=0,
        created_at=utcnow(), started_at=None, finished_at=None, attempts=0, max_retries=0,
        failures=0, rescues=0, result=None, error=None, reason=None, cancel_requested=False,
        run_after=None, pid=None, pid_started_at=None, exit_code=None, peak_rss=None,
        cpu_seconds=None,
    )  # fmt: skip
    with events.subscription(job.id) as changed:
        event = events.transition(job, None)
        await asyncio.wait_for(changed, 1)
    assert recorder.seen == [event]
    assert event.source is None and event.target is JobState.QUEUED


def test_cli_progress_bar_uses_the_jobs_progress() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    document: dict[str, Any] = {"id": "01A", "task": "t", "state": "running"}
    job = ClientJob.from_document(None, document)  # type: ignore[arg-type]
    bar.update(job)
    job.document = document | {"progress": {"fraction": 0.5, "message": "half way"}}
    bar.update(job)
    bar.update(job)  # unchanged: not printed again
    job.document = document | {"state": "succeeded"}
    bar.update(job)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1] == "01A running   [############------------] 50% half way"
    assert lines[2].endswith("[########################]")


@pytest.mark.parametrize("status", [200, 202, 404, 422, 503, 599])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_access_lines_carry_uvicorns_text_in_our_formats(status: int, level: int) -> None:
    fmt = uvicorn.config.LOGGING_CONFIG["formatters"]["access"]["fmt"]
    theirs = uvicorn.logging.AccessFormatter(fmt, use_colors=False)
    args = ("127.0.0.1:5555", "GET", "/api/v1/jobs/01A?wait=5", "1.1", status)
    record = logging.LogRecord(
        "uvicorn.access", level, "", 0, '%s - "%s %s HTTP/%s" %d', args, None
    )
    record.created, record.msecs = 1_800_000_000.25, 250.0
    # uvicorn's line is "LEVEL:    <text>"; ours puts our time, level and logger first.
    text = theirs.format(record).split(" ", 1)[1].lstrip()
    ours = TextFormatter()
    assert (
        ours.format(record)
        == f"{ours.formatTime(record)} {record.levelname} uvicorn.access: {text}"
    )
    assert json.loads(JsonFormatter().format(record))["message"] == text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_uvicorn_and_alembic_lines_follow_our_format(log_format: str) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # configure_logging also turns off what no format of ours shows: put it back after.
    flags = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved_flags = {name: getattr(logging, name) for name in flags}
    stream = io.StringIO()
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_saved = {
        name: (logger.handlers[:], logger.propagate, logger.level)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        for logger in [logging.getLogger(name)]
    }
    try:
        configure_logging("info", log_format)
        uvicorn_error.setLevel(logging.INFO)  # what uvicorn.Config(log_level="info") sets
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("alembic.runtime.plugins").info("setup plugin %s", "x")
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 1)
        logging.getLogger("jobserver").info("ours")
        root.handlers[0].flush()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger("alembic").setLevel(logging.NOTSET)
        for name, (handlers, propagate, level) in uvicorn_saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
        for name, value in saved_flags.items():
            setattr(logging, name, value)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and not any("plugin" in line for line in lines)  # no alembic chatter
    if log_format == "json":
        documents = [json.loads(line) for line in lines]
        assert [d["logger"] for d in documents] == ["uvicorn", "jobserver"]
        assert all(d["time"].endswith("Z") for d in documents)
    else:
        pattern = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO (uvicorn|jobserver): "
        assert all(re.match(pattern, line) for line in lines), lines


def _pass_handler() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = PassStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("pass-test")
    logger.addHandler(handler)
    return logger, stream


@pytest.mark.anyio
async def test_pass_handler_writes_a_pass_of_the_loop_at_once_at_its_end() -> None:
    logger, stream = _pass_handler()
    logger.warning("one")
    logger.warning("two")
    assert stream.getvalue() == ""  # still in this pass of the loop
    await asyncio.sleep(0)
    assert stream.getvalue() == "one\ntwo\n"
    logger.warning("three")
    # Another thread (no loop there) writes at once, after what this pass has pending.
    await asyncio.to_thread(logger.warning, "four")
    assert stream.getvalue() == "one\ntwo\nthree\nfour\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "one\ntwo\nthree\nfour\n"


def test_pass_handler_without_a_loop_writes_at_once() -> None:
    logger, stream = _pass_handler()
    logger.warning("now")
    assert stream.getvalue() == "now\n"


def test_text_formatter_writes_what_the_default_formatter_does() -> None:
    theirs = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = TextFormatter()
    for created in (1_790_000_000.0, 1_790_000_000.999, 1_790_000_001.5, 1_790_000_000.25):
        record = logging.LogRecord("jobserver.jobs", logging.INFO, "", 0, "job %s", ("x",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == theirs.format(record)
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, "", 0, "failed", None, sys.exc_info())
    assert ours.format(record) == theirs.format(record)  # with the traceback


# -- the other nodes sharing the database (Wakeups) -------------------------------------------


class Node:
    """Two nodes' Events and Wakeups, wired to each other the way PostgreSQL delivers
    NOTIFY (to every listener, the sender included)."""

    def __init__(self, network: list[Node], interval: float = 0.05) -> None:
        self.events = Events()
        self.sent: list[str] = []
        self.woken: list[str] = []
        self.network = network
        network.append(self)

        async def send(payload: str) -> None:
            self.sent.append(payload)
            for node in self.network:
                assert node.events.wakeups is not None
                node.events.wakeups.received(payload)

        self.events.wakeups = Wakeups(
            send,
            wake_readers=self.events.wake_readers,
            wake_all=self.events.wake_all_readers,
            wake_scheduler=lambda: self.woken.append("scheduler"),
            job_changed=self.woken.append,
            interval=interval,
        )


def a_job(job_id: str, state: JobState) -> Job:
    return Job(
        id=job_id, task="add", args={}, state=state, priority=0,
        created_at=utcnow(), started_at=None, finished_at=None, attempts=0, max_retries=0,
        failures=0, rescues=0, result=None, error=None, reason=None, cancel_requested=False,
        run_after=None, pid=None, pid_started_at=None, exit_code=None, peak_rss=None,
        cpu_seconds=None,
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_change_here_wakes_the_readers_and_scheduler_of_another_node() -> None:
    network: list[Node] = []
    here, there = Node(network), Node(network)
    with there.events.subscription("J1") as changed:
        here.events.transition(a_job("J1", JobState.SUCCEEDED), JobState.RUNNING)
        await asyncio.wait_for(changed, 1)
    # The other node's scheduler checks the job (a cancel?) and looks at the queue (an end
    # may let a limited task or a dependent start); the sender ignores its own notice.
    assert there.woken == ["J1", "scheduler"]
    assert here.woken == []
    # A submission names no job (nobody waits on it yet): only the schedulers wake.
    here.events.transition(a_job("J2", JobState.QUEUED), None)
    await here.events.wakeups.drain()  # type: ignore[union-attr]
    assert json.loads(here.sent[-1]) == {"from": json.loads(here.sent[-1])["from"], "queue": True}
    # Progress, a cancel request: the job's readers and a check of the job, no queue wake.
    there.woken.clear()
    here.events.changed("J3")
    await here.events.wakeups.drain()  # type: ignore[union-attr]
    assert there.woken == ["J3"]


@pytest.mark.anyio
async def test_notices_are_folded_and_rate_limited() -> None:
    network: list[Node] = []
    here, there = Node(network, interval=0.2), Node(network)
    for n in range(50):
        here.events.changed(f"J{n}")
    here.events.settings_changed()
    await asyncio.sleep(0)  # the first notice goes at once, with what was told so far
    await here.events.wakeups.drain()  # type: ignore[union-attr]
    assert len(here.sent) == 1
    notice = json.loads(here.sent[0])
    assert notice["queue"] is True and len(notice["jobs"]) == 50
    # Past NOTICE_JOBS changed jobs, a notice wakes every reader instead of naming them.
    many = [f"K{n}" for n in range(NOTICE_JOBS + 1)]
    with there.events.subscription("unrelated") as changed:
        for job_id in many:
            here.events.changed(job_id)
        await asyncio.wait_for(changed, 2)
    assert json.loads(here.sent[-1])["jobs"] == "*"
    assert "*" in there.woken


@pytest.mark.anyio
async def test_a_reconnection_wakes_everything_and_bad_payloads_are_ignored() -> None:
    node = Node([])
    wakeups = node.events.wakeups
    assert wakeups is not None
    for payload in ("not json", "[1]", '{"jobs": [1, null]}', '{"jobs": "?"}'):
        wakeups.received(payload)
    assert node.woken == []
    with node.events.subscription("J1") as changed:
        wakeups.reconnected()
        await asyncio.wait_for(changed, 1)
    assert node.woken == ["*", "scheduler"]
    # A notice from outside the nodes (jobserver.store.postgres.enqueue) wakes the scheduler.
    wakeups.received(QUEUE_NOTICE)
    assert node.woken[-1] == "scheduler"
