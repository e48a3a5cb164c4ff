"""The cron firer and the pruner, driven by a fake clock over a real SQLite file; the
schedule and lifecycle config keys; the retry transition."""

from __future__ import annotations

import sqlite3
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobserver import config
from jobserver.api import job_document
from jobserver.errors import ConfigError, Gone, InvalidTransition, NotFound
from jobserver.jobs import (
    RETRY_TRANSITIONS,
    JobError,
    JobState,
    check_retry,
    format_timestamp,
    new_job_id,
)
from jobserver.maintenance import CronJob, CronService, Pruner, latest_slot
from jobserver.server import build
from jobserver.store import Finish, NewJob, Store, migrate
from tests.conftest import FakeProbe, claim, end, insert, write_config

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 10, 2, 30, tzinfo=UTC)


def nightly(**overrides: Any) -> CronJob:
    values: dict[str, Any] = {
        "name": "nightly",
        "task": "add",
        "cron": "0 3 * * *",
        "args": {"a": 1},
        "timezone": "UTC",
        "catch_up": 3600.0,
        "priority": 0,
        "max_retries": 0,
    }
    return CronJob(**(values | overrides))


def cron(store: Store, job: CronJob) -> CronService:
    woken: list[int] = []
    return CronService(store, {job.name: job}, lambda: woken.append(1))


async def jobs_of(store: Store) -> list[Any]:
    return await store.page(task="add")


# -- the retry transition ---------------------------------------------------------------


def test_retry_is_the_one_way_out_of_a_terminal_state() -> None:
    assert {
        JobState.FAILED: {JobState.QUEUED},
        JobState.CANCELLED: {JobState.QUEUED},
    } == RETRY_TRANSITIONS
    for state in (JobState.FAILED, JobState.CANCELLED):
        check_retry(state, "j")
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED):
        with pytest.raises(InvalidTransition):
            check_retry(state, "j")


# -- cron -------------------------------------------------------------------------------


async def test_each_slot_fires_once_also_across_restarts(store: Store) -> None:
    job = nightly()
    assert await cron(store, job).tick(T0) == []  # first sight: baseline, no past slot
    assert await cron(store, job).tick(T0 + timedelta(minutes=20)) == []
    at_three = T0 + timedelta(minutes=30)
    fired = await cron(store, job).tick(at_three)
    assert len(fired) == 1 and fired[0].args == {"a": 1}
    assert fired[0].reason == "scheduled by nightly for 2026-01-10T03:00:00.000Z"
    # The same slot again, from this service or a restarted one: nothing.
    service = cron(store, job)
    assert await service.tick(at_three) == []
    assert await service.tick(at_three + timedelta(minutes=5)) == []
    assert await cron(store, job).tick(at_three + timedelta(hours=23)) == []
    assert len(await jobs_of(store)) == 1
    # Next day's slot.
    assert len(await cron(store, job).tick(at_three + timedelta(days=1, seconds=1))) == 1
    assert len(await jobs_of(store)) == 2


async def test_missed_slots_within_catch_up_fire_once(store: Store) -> None:
    job = nightly(cron="*/10 * * * *", catch_up=1800.0)
    await cron(store, job).tick(T0)  # baseline at 02:30
    # Down from 02:30 to 03:05: slots 02:40 .. 03:00 missed; the latest fires once.
    fired = await cron(store, job).tick(T0 + timedelta(minutes=35))
    assert len(fired) == 1
    assert fired[0].reason == "scheduled by nightly for 2026-01-10T03:00:00.000Z"
    assert len(await jobs_of(store)) == 1


async def test_slots_older_than_catch_up_are_skipped_and_logged(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    job = nightly(catch_up=600.0)
    await cron(store, job).tick(T0)
    # Back at 05:00: the 03:00 slot is 2 h old, older than catch_up = 10 min.
    assert await cron(store, job).tick(T0 + timedelta(hours=2, minutes=30)) == []
    assert "skipped 1 slot(s)" in caplog.text
    assert await jobs_of(store) == []
    # ...and it is not fired later either; the next slot is.
    assert await cron(store, job).tick(T0 + timedelta(hours=3)) == []
    assert len(await cron(store, job).tick(T0 + timedelta(days=1, minutes=31))) == 1


async def test_cron_reads_the_expression_in_its_time_zone(store: Store) -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    # 03:00 in Paris is 02:00 UTC in winter, 01:00 UTC in summer.
    assert latest_slot("0 3 * * *", paris, T0) == datetime(2026, 1, 10, 2, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 10, 1, 30, tzinfo=UTC)
    assert latest_slot("0 3 * * *", paris, summer) == datetime(2026, 7, 10, 1, 0, tzinfo=UTC)
    exact = datetime(2026, 1, 10, 3, 0, tzinfo=UTC)
    assert latest_slot("0 3 * * *", zoneinfo.ZoneInfo("UTC"), exact) == exact
    job = nightly(timezone="Europe/Paris")
    await cron(store, job).tick(datetime(2026, 1, 10, 1, 0, tzinfo=UTC))
    assert len(await cron(store, job).tick(datetime(2026, 1, 10, 2, 0, 1, tzinfo=UTC))) == 1


async def test_two_services_racing_fire_a_slot_once(store: Store) -> None:
    job = nightly()
    await cron(store, job).tick(T0)
    first, second = cron(store, job), cron(store, job)
    at_three = T0 + timedelta(minutes=30)
    slots = await store.schedule_slots()
    # Both read the same previous slot; only one compare-and-set wins.
    previous = slots["nightly"]
    new = NewJob("add", {"a": 1}, 0, 0)
    wins = [
        await store.fire_schedule("nightly", previous, at_three, new, new_job_id(), at_three),
        await store.fire_schedule("nightly", previous, at_three, new, new_job_id(), at_three),
    ]
    assert [w is not None for w in wins] == [True, False]
    assert await first.tick(at_three) == [] and await second.tick(at_three) == []
    assert len(await jobs_of(store)) == 1


async def test_scheduled_jobs_run_in_the_server(tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TASKS

    path = write_config(
        tmp_path,
        tasks={"add": SAMPLE_TASKS["add"]},
        schedules={"every_minute": {"task": "add", "cron": "* * * * *", "args": {"a": 7}}},
    )
    settings = config.load(path)
    migrate(settings.server.database)
    application = build(settings, probe=FakeProbe())
    assert application.cron is not None
    async with application.app.router.lifespan_context(application.app):
        # The server's own cron loop ticks on the real clock; minutes ahead of it, the
        # test's ticks decide what fires, whatever second of the minute this runs at.
        now = datetime.now(UTC).replace(second=30, microsecond=0) + timedelta(minutes=10)
        await application.cron.tick(now - timedelta(minutes=1))
        fired = await application.cron.tick(now)
        assert len(fired) == 1
        import anyio

        with anyio.fail_after(20):
            while (job := await application.store.get(fired[0].id)).state is not JobState.SUCCEEDED:
                await anyio.sleep(0.02)
        assert job.result == 7
        # Once run, the reason no longer names the schedule; the document still does.
        slot = now.replace(second=0)
        assert job.reason is None and (job.schedule, job.schedule_slot) == ("every_minute", slot)
        assert job_document(job, None)["schedule"] == {
            "name": "every_minute",
            "slot": format_timestamp(slot),
        }


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "0 3 * * *"}, "missing the required key 'task'"),
        ({"task": "add"}, "missing the required key 'cron'"),
        ({"task": "nope", "cron": "0 3 * * *"}, "no [tasks.nope] table"),
        ({"task": "add", "cron": "every night"}, "5-field cron"),
        ({"task": "add", "cron": "0 3 * * * *"}, "5-field cron"),
        ({"task": "add", "cron": "61 3 * * *"}, "5-field cron"),
        ({"task": "add", "cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"task": "add", "cron": "0 3 * * *", "catch_up": "soon"}, "expected a duration"),
        ({"task": "add", "cron": "0 3 * * *", "when": 1}, "unknown key schedules.s.when"),
    ],
)
def test_bad_schedules_are_config_errors(
    tmp_path: Path, schedule: dict[str, Any], message: str
) -> None:
    from tests.conftest import SAMPLE_TASKS

    path = write_config(tmp_path, tasks={"add": SAMPLE_TASKS["add"]}, schedules={"s": schedule})
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert message in caught.value.message
    assert str(path) in caught.value.message


def test_schedule_args_are_checked_against_the_task_at_start(tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TASKS

    path = write_config(
        tmp_path,
        tasks={"add": SAMPLE_TASKS["add"]},
        schedules={"s": {"task": "add", "cron": "0 3 * * *", "args": {"a": "one"}}},
    )
    settings = config.load(path)
    with pytest.raises(ConfigError, match=r"schedules.s.args do not fit task 'add': a: expected"):
        build(settings, probe=FakeProbe())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"command": "ls -l"}, "expected a list of non-empty strings"),
        ({"command": ["ls", "{x"]}, "brace that is not a {name} placeholder"),
        ({"command": ["ls", "{x}"]}, "placeholder {x} has no type"),
        ({"command": ["ls"], "params": {"x": "str"}}, "no {x} placeholder"),
        ({"command": ["ls", "{x}"], "params": {"x": "path"}}, "expected one of str, int"),
        ({"command": ["ls"], "function": "m:f"}, "either function or command"),
        ({"function": "m:f", "params": {"x": "str"}}, "apply to command tasks only"),
        (
            {"command": ["ls", "{x}"], "params": {"x": "str"}, "allow_leading_dash": ["y"]},
            "'y' is not a param",
        ),
        ({"function": "m:f", "retry_on_timeout": "yes"}, "expected true or false"),
        ({"function": "m:f", "retention": "forever"}, "expected a duration"),
    ],
)
def test_bad_command_and_lifecycle_task_keys(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    path = write_config(tmp_path, tasks={"t": table})
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert message in caught.value.message


def test_jobs_table_keys(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        jobs={
            "retry_base": "2s",
            "retry_cap": "1m",
            "max_retries_limit": 5,
            "max_log_size": "1MiB",
            "retention": "1d",
            "prune_interval": "10s",
            "idempotency_window": "1h",
            "pruned_memory": "2d",
            "progress_interval": "500ms",
        },
    )
    jobs = config.load(path).jobs
    assert (jobs.retry_base, jobs.retry_cap, jobs.max_retries_limit) == (2.0, 60.0, 5)
    assert (jobs.max_log_size, jobs.retention, jobs.prune_interval) == (2**20, 86400.0, 10.0)
    assert (jobs.idempotency_window, jobs.progress_interval) == (3600.0, 0.5)
    assert jobs.pruned_memory == 2 * 86400.0
    with pytest.raises(ConfigError, match=r"jobs\.retention"):
        config.load(write_config(tmp_path, jobs={"retention": 0}))
    for bad in (0, "-1d", "soon"):
        with pytest.raises(ConfigError, match=r"jobs\.pruned_memory"):
            config.load(write_config(tmp_path, jobs={"pruned_memory": bad}))
    with pytest.raises(ConfigError, match=r"unknown key jobs\.keep"):
        config.load(write_config(tmp_path, jobs={"keep": 1}))


# -- pruning ----------------------------------------------------------------------------


async def finished_job(store: Store, task: str, when: datetime, state: JobState) -> str:
    job = await insert(store, NewJob(task, {}, 0, 0), now=when)
    claimed = await claim(store, job.id, when)
    assert claimed is not None
    error = None if state is JobState.SUCCEEDED else JobError("E", "e")
    await end(store, claimed, Finish(state, error=error), when)
    return job.id


async def test_pruner_deletes_old_finished_jobs_only(store: Store, tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    now = T0 + timedelta(days=30)
    old_ok = await finished_job(store, "a", T0, JobState.SUCCEEDED)
    old_failed = await finished_job(store, "a", T0, JobState.FAILED)
    recent = await finished_job(store, "a", now - timedelta(hours=1), JobState.SUCCEEDED)
    kept_longer = await finished_job(store, "keep", T0, JobState.SUCCEEDED)
    short = await finished_job(store, "short", now - timedelta(hours=2), JobState.SUCCEEDED)
    queued = (await insert(store, NewJob("a", {}, 0, 0), now=T0)).id
    running = (await insert(store, NewJob("a", {}, 0, 0), now=T0)).id
    await claim(store, running, T0)
    for job_id in (old_ok, recent, queued):
        (jobs_dir / job_id / "artifacts").mkdir(parents=True)
        (jobs_dir / job_id / "output.log").write_text("log")
    pruner = Pruner(store, jobs_dir, 7 * 86400.0, {"keep": 90 * 86400.0, "short": 3600.0})
    assert sorted(await pruner.due(now)) == sorted([old_ok, old_failed, short])
    deleted = await pruner.run_until_done(now)
    assert sorted(deleted) == sorted([old_ok, old_failed, short])
    assert not (jobs_dir / old_ok).exists()
    assert (jobs_dir / recent).exists() and (jobs_dir / queued).exists()
    left = {job.id for job in await store.page(limit=100)}
    assert left == {recent, kept_longer, queued, running}
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        attempts = {row[0] for row in db.execute("SELECT job_id FROM attempts")}
    assert attempts == {recent, kept_longer, running}
    assert await pruner.tick(now) == []


async def test_pruner_remembers_pruned_ids_for_pruned_memory(store: Store, tmp_path: Path) -> None:
    job_id = await finished_job(store, "a", T0, JobState.SUCCEEDED)
    pruner = Pruner(store, tmp_path / "jobs", 3600.0, {}, pruned_memory=600.0)
    pruned_at = T0 + timedelta(hours=2)
    assert await pruner.tick(pruned_at) == [job_id]
    with pytest.raises(Gone):
        await store.get(job_id)
    await pruner.tick(pruned_at + timedelta(seconds=599))
    with pytest.raises(Gone):
        await store.get(job_id)
    await pruner.tick(pruned_at + timedelta(seconds=601))
    with pytest.raises(NotFound) as missing:
        await store.get(job_id)
    assert not isinstance(missing.value, Gone)


def test_shipped_config_lifecycle_defaults_and_example(tmp_path: Path) -> None:
    import re

    from jobserver.config import JobsSettings

    text = (Path(__file__).parent.parent / "config.toml").read_text()
    jobs = text.split("\n[jobs]\n")[1].split("# schedules:")[0]
    jobs = re.sub(r"^# (\w+ = .*)$", r"\1", jobs, flags=re.MULTILINE)
    path = tmp_path / "c.toml"
    path.write_text("[jobs]\n" + jobs)
    assert config.load(path).jobs == JobsSettings()
    example = text.split("# [schedules.nightly_report]")[1].split("\n# ---")[0]  # to the next part
    example = "[schedules.nightly_report]" + re.sub(r"^# ", "", example, flags=re.MULTILINE)
    task = '[tasks.run_long_analysis]\nfunction = "jobserver.demo:run_long_analysis"\n'
    path.write_text(task + example)
    schedule = config.load(path).schedules["nightly_report"]
    assert (schedule.cron, schedule.timezone, schedule.catch_up) == (
        "0 3 * * *",
        "Europe/Paris",
        3600.0,
    )
