"""Resource-aware scheduling in the running service: memory limits (kernel cgroup and
sampling), pressure actions, learned requests, task limits and runtime changes.  Real
child processes; a fake probe sets the machine where the test must control it."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from jobserver.cgroups import JobCgroups
from jobserver.config import format_size
from jobserver.errors import ConfigError
from jobserver.resources import Gpu, NvmlProbe, Snapshot
from tests.conftest import SAMPLE_TASKS, FakeProbe, GiB, skip_for_want_of, write_config

pytestmark = pytest.mark.anyio
MiB = 2**20

GATED = {"function": "sample_tasks:wait_for_file", "cpus": 0.1, "memory": "16MiB"}
HOG = {"function": "sample_tasks:hold_memory", "cpus": 0.1, "memory": "16MiB"}


class FallingProbe(FakeProbe):
    """A fake machine whose available memory can be made to keep falling, 1 MiB a read,
    for ``falls`` reads (then it stays flat)."""

    def __init__(self) -> None:
        super().__init__(cpus=8, memory=16 * GiB)
        self.falling = False
        self.falls = 1_000_000

    def set_available(self, available: int) -> None:
        self.snapshot_value = dataclasses.replace(self.snapshot_value, memory_available=available)

    def snapshot(self) -> Snapshot:
        if self.falling and self.falls > 0:
            self.falls -= 1
            self.set_available(self.snapshot_value.memory_available - MiB)
        return self.snapshot_value


async def poll(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await anyio.sleep(0.02)


async def submit(h: Any, task: str, **args: Any) -> str:
    body: dict[str, Any] = {"task": task, "args": args}
    if "priority" in args:
        body["priority"] = args.pop("priority")
    response = await h.client.post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def document(h: Any, job_id: str) -> dict[str, Any]:
    return dict((await h.client.get(f"/api/v1/jobs/{job_id}")).json())


# -- memory limits ------------------------------------------------------------------------


async def test_memory_limit_in_a_cgroup_ends_in_an_oom_kill(make_harness: Any) -> None:
    if JobCgroups.detect() is None:
        skip_for_want_of("cgroup", "no writable memory cgroup here (needs root or a delegated one)")
    tasks = {"hog": {**HOG, "memory_limit": "64MiB"}, "add": {"function": "sample_tasks:add"}}
    async with make_harness(tasks=tasks) as h:
        view = (await h.client.get("/api/v1/system")).json()
        assert view["memory_limits"].startswith("cgroup v")
        job_id = await submit(h, "hog", mib=300, seconds=30)
        done = await h.wait_for_state(job_id, "failed", timeout=60)
        assert done["reason"] == "oom_killed"
        assert done["error"]["type"] == "OOMKilled"
        assert "memory limit 64.0 MiB" in done["error"]["message"]
        # The server survived and the job's cgroup is gone.
        ok = await submit(h, "add", a=1)
        assert (await h.wait_for_state(ok, "succeeded"))["result"] == 1
        cgroups = JobCgroups.detect()
        assert cgroups is not None
        await poll(lambda: _async(not (cgroups.parent / job_id).exists()))


async def _async(value: Any) -> Any:
    return value


async def test_memory_limit_without_cgroups_is_sampled(make_harness: Any) -> None:
    tasks = {"hog": {**HOG, "memory_limit": "64MiB"}}
    async with make_harness(tasks=tasks, scheduler={"job_cgroups": False}) as h:
        view = (await h.client.get("/api/v1/system")).json()
        assert view["memory_limits"].startswith("sampling")
        job_id = await submit(h, "hog", mib=200, seconds=60)
        done = await h.wait_for_state(job_id, "failed", timeout=60)
        assert done["reason"].startswith("exceeded memory limit 64.0 MiB (peak ")
        assert done["error"]["type"] == "MemoryLimitExceeded"
        assert done["peak_rss"] > 64 * MiB


# -- pressure ---------------------------------------------------------------------------


async def test_memory_pressure_requeues_the_youngest_lowest_priority_job(
    make_harness: Any, tmp_path: Path
) -> None:
    probe = FallingProbe()
    gate = str(tmp_path / "gate")
    async with make_harness(
        probe=probe, tasks={"gated": GATED}, scheduler={"memory_floor": "1GiB"}
    ) as h:
        older = await submit(h, "gated", path=gate)
        low = await submit(h, "gated", path=gate, priority=-1)
        younger = await submit(h, "gated", path=gate)
        for job_id in (older, low, younger):
            await h.wait_for_state(job_id, "running")

        # Two readings under the floor, the second lower: one job is acted on; after
        # that the reading stays flat, so nothing else is.
        probe.falls = 2
        probe.set_available(512 * MiB)
        probe.falling = True
        victim = await poll(lambda: _queued(h, low))
        probe.falling = False
        assert victim["reason"].startswith("requeued: killed under memory pressure (memory floor: ")
        # attempts counts starts; the retry budget (failures) is untouched.
        assert "pressure requeue 1 of 3, not counted against max_retries" in victim["reason"]
        assert victim["attempts"] == 1
        assert victim["history"][-1]["outcome"] == "pressure"
        assert (await poll(lambda: _reason(h, low))).startswith("memory floor: ")
        # One at a time: the others still run.
        assert (await document(h, older))["state"] == "running"
        assert (await document(h, younger))["state"] == "running"

        probe.set_available(16 * GiB)
        again = await h.wait_for_state(low, "running")
        assert again["attempts"] == 2
        Path(gate).write_text("go")
        for job_id in (older, low, younger):
            await h.wait_for_state(job_id, "succeeded")


async def _queued(h: Any, job_id: str) -> dict[str, Any] | None:
    found = await document(h, job_id)
    return found if found["state"] == "queued" else None


async def test_a_job_requeued_too_often_fails(make_harness: Any, tmp_path: Path) -> None:
    probe = FallingProbe()
    settings = {"memory_floor": "1GiB", "max_pressure_requeues": 0}
    async with make_harness(probe=probe, tasks={"gated": GATED}, scheduler=settings) as h:
        job_id = await submit(h, "gated", path=str(tmp_path / "never"))
        await h.wait_for_state(job_id, "running")
        probe.set_available(512 * MiB)
        probe.falling = True
        done = await h.wait_for_state(job_id, "failed")
        assert done["error"]["type"] == "MemoryPressure"
        assert "max_pressure_requeues = 0" in done["reason"]


async def test_pause_stops_the_tree_and_continues_it(make_harness: Any, tmp_path: Path) -> None:
    probe = FallingProbe()
    settings = {"memory_floor": "1GiB", "pressure_action": "pause"}
    gate = tmp_path / "gate"
    async with make_harness(probe=probe, tasks={"gated": GATED}, scheduler=settings) as h:
        job_id = await submit(h, "gated", path=str(gate))
        await h.wait_for_state(job_id, "running")
        pid = (await h.client.get("/api/v1/system")).json()["running"][0]["pid"]
        probe.set_available(512 * MiB)
        probe.falling = True
        await poll(lambda: _async(_process_state(pid) == "T"))
        view = (await h.client.get("/api/v1/system")).json()
        assert view["running"][0]["paused"] is True
        probe.falling = False
        probe.set_available(16 * GiB)
        await poll(lambda: _async(_process_state(pid) != "T"))
        gate.write_text("go")
        await h.wait_for_state(job_id, "succeeded")


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


async def test_psi_pressure_stops_admission(make_harness: Any) -> None:
    probe = FakeProbe()
    probe.snapshot_value = dataclasses.replace(probe.snapshot_value, memory_pressure=34.0)
    async with make_harness(probe=probe, tasks={"add": {"function": "sample_tasks:add"}}) as h:
        job_id = await submit(h, "add", a=1)
        waiting = await poll(lambda: _reason(h, job_id))
        assert waiting == "PSI memory pressure 34% > 20%"
        system = (await h.client.get("/api/v1/system")).json()
        assert system["queue_head"][0]["waiting_reason"] == waiting
        assert system["signals"]["memory_pressure"] == {
            "value": 34.0,
            "source": None,
            "limit": 20.0,
        }
        probe.snapshot_value = dataclasses.replace(probe.snapshot_value, memory_pressure=1.0)
        await h.wait_for_state(job_id, "succeeded")


async def test_cpu_admission_subtracts_the_averaged_outside_load(make_harness: Any) -> None:
    """Other programs keep 7.5 of the fake machine's 8 CPUs busy: the system view shows
    it averaged, and a job that needs more than what is left waits saying so (the first
    job, on an otherwise idle server, starts anyway: CPU is compressible)."""
    probe = FakeProbe(cpus=8)
    probe.snapshot_value = dataclasses.replace(probe.snapshot_value, cpu_idle=0.5)
    tasks = {"gated": {**GATED, "cpus": 1}}
    async with make_harness(probe=probe, tasks=tasks) as h:
        first = await submit(h, "gated", path="/nonexistent-gate")
        await h.wait_for_state(first, "running")
        second = await submit(h, "gated", path="/nonexistent-gate")
        reason = await poll(lambda: _reason(h, second))
        assert reason.startswith("waiting for CPU: needs 1.00 CPU, 0.00 free after reserve (")
        assert "busy outside jobserver's jobs, on average)" in reason
        signal = (await h.client.get("/api/v1/system")).json()["signals"]["cpu_outside"]
        assert signal["source"].startswith("average over 20 s")
        assert 6.0 <= signal["value"] <= 7.5
        await h.client.post(f"/api/v1/jobs/{first}/cancel")
        await h.client.post(f"/api/v1/jobs/{second}/cancel")
        await h.wait_for_state(first, "cancelled")


async def _reason(h: Any, job_id: str) -> str | None:
    found = await document(h, job_id)
    reason = found.get("waiting_reason")
    return reason if reason and "next tick" not in reason else None


# -- task limits and reasons ----------------------------------------------------------------


async def test_task_limit_and_exclusive_reasons(make_harness: Any, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    tasks = {
        "limited": {**GATED, "max_concurrency": 1},
        "alone": {**GATED, "exclusive": True},
    }
    async with make_harness(tasks=tasks) as h:
        first = await submit(h, "limited", path=gate)
        second = await submit(h, "limited", path=gate)
        alone = await submit(h, "alone", path=gate)
        await h.wait_for_state(first, "running")
        assert await poll(lambda: _reason(h, second)) == (
            "task limit 1 reached: 1 limited jobs running"
        )
        assert await poll(lambda: _reason(h, alone)) == (
            "exclusive: waits for the 1 running job(s) to finish"
        )
        Path(gate).write_text("go")
        for job_id in (first, second, alone):
            await h.wait_for_state(job_id, "succeeded")


# -- learned requests ------------------------------------------------------------------------


async def test_a_task_without_a_memory_request_learns_one(make_harness: Any) -> None:
    tasks = {"hog": {"function": "sample_tasks:hold_memory", "cpus": 0.1}}
    settings = {"learn_margin": 1.5, "learn_percentile": 100}
    async with make_harness(tasks=tasks, scheduler=settings) as h:
        before = (await h.client.get("/api/v1/tasks")).json()["tasks"][0]
        assert before["declared"]["memory"] is None
        assert before["learned"]["runs"] == 0
        assert before["scheduled_with"] == {
            "cpus": 0.1,
            "memory": 256 * MiB,
            "source": "default_memory",
            "why": "no memory declared and no measured run: default_memory 256.0 MiB",
        }
        job_id = await submit(h, "hog", mib=100, seconds=1.0)
        done = await h.wait_for_state(job_id, "succeeded")
        # The run is recorded just after the job's final state.
        after = await poll(lambda: _learned(h))
        assert after["learned"]["runs"] == 1
        assert after["learned"]["peak_rss_max"] == done["peak_rss"] >= 100 * MiB
        assert after["learned"]["memory"] == int(done["peak_rss"] * 1.5)
        assert after["scheduled_with"]["memory"] == int(done["peak_rss"] * 1.5)
        assert after["scheduled_with"]["source"] == "learned"
        assert after["learned"]["wall_seconds_median"] >= 1.0


async def test_runs_over_the_declared_request_raise_it(make_harness: Any) -> None:
    tasks = {"hog": {**HOG, "memory": "32MiB"}}
    async with make_harness(tasks=tasks, scheduler={"learn_margin": 1.0}) as h:
        job_id = await submit(h, "hog", mib=100, seconds=0.5)
        done = await h.wait_for_state(job_id, "succeeded")
        figures = await poll(lambda: _learned(h))
        assert figures["declared"]["memory"] == 32 * MiB
        assert figures["scheduled_with"] == {
            "cpus": 0.1,
            "memory": done["peak_rss"],
            "source": "learned",
            "why": "a recent run used more than declared 32.0 MiB; p95 of the last 1 run(s)' "
            f"peaks x learn_margin 1 = {format_size(done['peak_rss'])}",
        }


@pytest.mark.parametrize(
    ("job_cgroups", "fork_server"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["cgroup-forked", "cgroup-spawned", "rusage-forked", "rusage-spawned"],
)
async def test_sub_second_jobs_are_measured_and_learned_from(
    make_harness: Any, job_cgroups: bool, fork_server: bool
) -> None:
    """Jobs that end long before the first usage sample (poll_interval / 2) still get the
    kernel's figure: the cgroup's peak, or wait4's rusage where there is no cgroup (for
    a spawned job only above the server's own peak: until its exec, a spawned child
    runs in the server's memory, which the kernel counts as the child's peak)."""
    if job_cgroups and JobCgroups.detect() is None:
        skip_for_want_of("cgroup", "no writable memory cgroup here (needs root or a delegated one)")
    mib = 40
    if not (job_cgroups or fork_server):
        mib += resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    tasks = {"hog": {"function": "sample_tasks:hold_memory", "cpus": 0.1}}
    settings = {"job_cgroups": job_cgroups, "poll_interval": "2s", "learn_margin": 1.0}
    async with make_harness(
        tasks=tasks, scheduler=settings, server={"fork_server": fork_server}
    ) as h:
        if fork_server:
            assert await h.application.runner.fork_server_ready()
        peaks = []
        for _ in range(3):
            job_id = await submit(h, "hog", mib=mib, seconds=0)
            done = await h.wait_for_state(job_id, "succeeded")
            assert done["peak_rss"] >= mib * MiB
            peaks.append(done["peak_rss"])
        figures = await poll(lambda: _learned_runs(h, 3))
        assert figures["learned"]["peak_rss_max"] == max(peaks)
        assert figures["scheduled_with"]["memory"] == max(peaks)  # p95 of 3, margin 1
        assert figures["scheduled_with"]["source"] == "learned"
        if fork_server and job_cgroups:
            # The cgroup counts what the job allocated, not the fork server's pages.
            assert max(peaks) < 40 * MiB + 32 * MiB


async def test_a_job_of_several_processes_is_measured_whole_in_its_cgroup(
    make_harness: Any,
) -> None:
    """wait4's ru_maxrss is the largest single process; the job's cgroup counts the whole
    tree, so a job of two processes holding 60 MiB each at once is measured at 120 MiB."""
    if JobCgroups.detect() is None:
        skip_for_want_of("cgroup", "no writable memory cgroup here (needs root or a delegated one)")
    tasks = {"two": {"function": "sample_tasks:hold_memory_in_two", "cpus": 0.1}}
    async with make_harness(tasks=tasks, scheduler={"poll_interval": "2s"}) as h:
        job_id = await submit(h, "two", mib=60)
        done = await h.wait_for_state(job_id, "succeeded")
        assert done["peak_rss"] >= 120 * MiB


async def test_a_killed_outlier_never_leaves_a_task_stuck(make_harness: Any) -> None:
    """The issue's repro: memory 64 MiB, memory_limit 100 MiB, no cgroups; a run killed
    far past the limit must not teach a request that keeps the next small job waiting
    for ever once max_memory is lowered."""
    tasks = {"hog": {**HOG, "memory": "64MiB", "memory_limit": "100MiB"}}
    async with make_harness(tasks=tasks, scheduler={"job_cgroups": False}) as h:
        killed = await submit(h, "hog", mib=300, seconds=60)
        done = await h.wait_for_state(killed, "failed", timeout=60)
        assert done["error"]["type"] == "MemoryLimitExceeded"
        peak = done["peak_rss"]
        assert peak > 100 * MiB
        figures = await poll(lambda: _learned_runs(h, 1))
        used = figures["scheduled_with"]
        # The limit plus the measured overshoot (the peak), not the peak x 1.2.
        assert figures["learned"]["memory"] == int(peak * 1.2)
        assert used["memory"] == peak and used["source"] == "learned"
        assert "+ the measured overshoot" in used["why"]
        assert "enforced by sampling" in used["why"]

        response = await h.client.patch(
            "/api/v1/system", json={"scheduler": {"max_memory": f"{peak // MiB - 10}MiB"}}
        )
        assert response.status_code == 200, response.text
        small = await submit(h, "hog", mib=1, seconds=0)
        assert (await h.wait_for_state(small, "succeeded"))["result"] == 1
        figures = await poll(lambda: _learned_runs(h, 2))
        assert "capped at the capacity after reserve" in figures["scheduled_with"]["why"]


async def test_a_kernel_enforced_limit_caps_the_learned_request(make_harness: Any) -> None:
    if JobCgroups.detect() is None:
        skip_for_want_of("cgroup", "no writable memory cgroup here (needs root or a delegated one)")
    tasks = {"hog": {**HOG, "memory": "32MiB", "memory_limit": "64MiB"}}
    async with make_harness(tasks=tasks) as h:
        killed = await submit(h, "hog", mib=300, seconds=60)
        done = await h.wait_for_state(killed, "failed", timeout=60)
        assert done["reason"] == "oom_killed"
        figures = await poll(lambda: _learned_runs(h, 1))
        assert figures["learned"]["memory"] > 64 * MiB  # the peak x 1.2
        assert figures["scheduled_with"]["memory"] == 64 * MiB
        assert "which the kernel enforces" in figures["scheduled_with"]["why"]


async def _learned_runs(h: Any, runs: int) -> dict[str, Any] | None:
    task = dict((await h.client.get("/api/v1/tasks")).json()["tasks"][0])
    return task if task["learned"]["runs"] >= runs else None


async def _learned(h: Any) -> dict[str, Any] | None:
    task = dict((await h.client.get("/api/v1/tasks")).json()["tasks"][0])
    return task if task["learned"]["runs"] else None


async def test_backfill_starts_what_ends_before_the_first_waiting_jobs_turn(
    make_harness: Any, tmp_path: Path
) -> None:
    """The service hands plan() each task's learned run time and each running job's
    expected end: a job that would outlast the big job's turn waits, a quick one starts."""
    gate = tmp_path / "gate"
    tasks = {
        "blocker": {**GATED, "memory": "8GiB", "timeout": "30s"},
        "big": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "13GiB"},
        "slow": {**GATED, "memory": "4GiB", "timeout": "60s"},
        "quick": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "4GiB"},
    }
    async with make_harness(tasks=tasks) as h:

        async def run_time(task: str) -> dict[str, Any] | None:
            found = (await h.client.get("/api/v1/tasks")).json()["tasks"]
            figure = next(t for t in found if t["name"] == task)["run_time"]
            return dict(figure) if figure["seconds"] is not None else None

        assert (await run_time("quick")) is None  # no history, no timeout: not known
        # With a timeout and no history, the timeout + kill_grace (2s here) bounds it.
        assert await run_time("slow") == {
            "seconds": 62.0,
            "why": "no measured run: timeout + kill_grace 1m02s",
        }
        await h.wait_for_state(await submit(h, "quick", a=1), "succeeded")
        learned = await poll(lambda: run_time("quick"))
        assert learned["seconds"] < 30, learned
        assert learned["why"].startswith("p95 of the last 1 run(s)' wall times"), learned

        blocker = await submit(h, "blocker", path=str(gate))
        await h.wait_for_state(blocker, "running")
        # 13 GiB of 16: waits for the blocker's 8 GiB; 3 GiB will be left beside it then.
        big = await submit(h, "big", a=1)
        slow = await submit(h, "slow", path=str(gate))  # 4 GiB: fits now, would outlast it
        quick = await submit(h, "quick", a=2)  # fits now, and ends long before
        await h.wait_for_state(quick, "succeeded")
        held = await document(h, slow)
        assert held["state"] == "queued"
        assert held["waiting_reason"].startswith(
            f"held for job {big} (first in the queue): it should start within "
        ), held["waiting_reason"]
        assert held["waiting_reason"].endswith("and this job may run 1m02s")
        gate.touch()
        for job_id in (blocker, big, slow):
            await h.wait_for_state(job_id, "succeeded")


# -- changes at run time ----------------------------------------------------------------------


async def test_patch_system_changes_limits_for_the_next_tick(
    make_harness: Any, tmp_path: Path
) -> None:
    gate = str(tmp_path / "gate")
    async with make_harness(tasks={"gated": GATED}, scheduler={"max_jobs": 1}) as h:
        ids = [await submit(h, "gated", path=gate) for _ in range(3)]
        await h.wait_for_state(ids[0], "running")
        assert await poll(lambda: _reason(h, ids[1])) == "max_jobs limit 1 reached"

        response = await h.client.patch(
            "/api/v1/system",
            json={
                "scheduler": {"max_jobs": 3, "max_memory": "8GiB", "starvation_after": None},
                "tasks": {"gated": {"max_concurrency": 2, "memory": None}},
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert "scheduler.max_jobs: 1 -> 3" in body["changed"]
        assert "tasks.gated.max_concurrency: None -> 2" in body["changed"]
        assert body["system"]["max_jobs"] == 3
        assert body["system"]["signals"]["memory_capacity"] == {
            "value": 8 * GiB,
            "source": "config cap",
        }
        await h.wait_for_state(ids[1], "running")
        assert await poll(lambda: _reason(h, ids[2])) == (
            "task limit 2 reached: 2 gated jobs running"
        )
        tasks = (await h.client.get("/api/v1/tasks")).json()["tasks"]
        assert tasks[0]["declared"]["max_concurrency"] == 2
        assert tasks[0]["declared"]["memory"] is None
        Path(gate).write_text("go")
        for job_id in ids:
            await h.wait_for_state(job_id, "succeeded")


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ({"scheduler": {"max_jobs": 0}}, "scheduler.max_jobs", "expected an integer >= 1"),
        ({"scheduler": {"max_jobs": None}}, "scheduler.max_jobs", "needs a value"),
        ({"scheduler": {"pressure_action": "kill"}}, "scheduler.pressure_action", "one of"),
        ({"scheduler": {"max_memroy": "1GiB"}}, "scheduler.max_memroy", "did you mean"),
        ({"tasks": {"nope": {"cpus": 1}}}, "tasks.nope", "no task named 'nope'"),
        ({"tasks": {"gated": {"function": "a:b"}}}, "tasks.gated.function", "unknown key"),
        ({"tasks": {"gated": {"memory": "lots"}}}, "tasks.gated.memory", "expected a size"),
        # Found by the fuzz test: a task default too large for its column made every
        # later submit of the task a 500.
        (
            {"tasks": {"gated": {"max_retries": 10**23}}},
            "tasks.gated.max_retries",
            "expected an integer >= 0",
        ),
        ({"tasks": {"gated": {"timeout": 1e300}}}, "tasks.gated.timeout", "at most 100 years"),
        ({"tasks": {"gated": {"timeout": "400d"}}}, "tasks.gated.timeout", "at most 366 days"),
        ({"scheduler": {"max_rescues": 2**63}}, "scheduler.max_rescues", "an integer >= 0"),
        ({"scheduler": {"kill_grace": 1e12}}, "scheduler.kill_grace", "at most 100 years"),
        ({"server": {"port": 1}}, "server", "unknown key server"),
        ([1, 2], None, "expected an object like"),
    ],
)
async def test_patch_system_rejects_bad_changes_and_changes_nothing(
    make_harness: Any, body: Any, key: str | None, message: str
) -> None:
    async with make_harness(tasks={"gated": GATED}, scheduler={"max_jobs": 2}) as h:
        before = (await h.client.get("/api/v1/system")).json()
        response = await h.client.patch("/api/v1/system", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert message in error["message"]
        assert error["details"]["key"] == key
        after = (await h.client.get("/api/v1/system")).json()
        assert after["max_jobs"] == before["max_jobs"] == 2
        assert after["settings"] == before["settings"]
        submitted = await h.client.post(
            "/api/v1/jobs", json={"task": "gated", "args": {"path": "/none"}, "delay": 3600}
        )
        assert submitted.status_code == 202, submitted.text


@pytest.mark.parametrize(
    ("scheduler", "key", "message"),
    [
        ({"memory_floor": "16GiB"}, "scheduler.memory_floor", "available memory can never reach"),
        ({"reserve_memory": "20GiB"}, "scheduler.reserve_memory", "leaves nothing of the 16.0"),
        (
            {"max_memory": "1GiB", "reserve_memory": "1GiB"},
            "scheduler.reserve_memory",
            "or raise max_memory",
        ),
        ({"reserve_cpus": 8}, "scheduler.reserve_cpus", "leaves nothing of the 8 CPUs"),
    ],
)
async def test_settings_that_could_never_admit_anything_are_refused(
    make_harness: Any, tmp_path: Path, scheduler: dict[str, Any], key: str, message: str
) -> None:
    """At start (naming the key, file and line), and by PATCH (a 422, nothing changed);
    the fake machine has 8 CPUs and 16 GiB."""
    with pytest.raises(ConfigError) as refused:
        async with make_harness(tasks={"gated": GATED}, scheduler=scheduler):
            pass
    assert refused.value.details is not None
    assert refused.value.details["key"] == key
    assert refused.value.details["file"] == str(tmp_path / "config.toml")
    line = refused.value.details["line"]
    assert isinstance(line, int)
    name = key.split(".")[1]
    assert (tmp_path / "config.toml").read_text().splitlines()[line - 1].startswith(name)
    assert message in refused.value.message and "no job would ever start" in refused.value.message

    async with make_harness(tasks={"gated": GATED}) as h:
        before = (await h.client.get("/api/v1/system")).json()["settings"]
        response = await h.client.patch("/api/v1/system", json={"scheduler": scheduler})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["details"]["key"] == key and message in error["message"]
        assert (await h.client.get("/api/v1/system")).json()["settings"] == before


async def test_a_reload_that_could_never_admit_anything_keeps_the_running_settings(
    make_harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_harness(tasks={"gated": GATED}, scheduler={"max_jobs": 3}) as h:
        runtime = h.application.runtime
        assert runtime is not None
        write_config(tmp_path, tasks={"gated": GATED}, scheduler={"memory_floor": "32GiB"})
        caplog.set_level(logging.ERROR, logger="jobserver")
        assert runtime.reload() == []
        assert "failed; keeping the running settings" in caplog.text
        assert "config.toml:" in caplog.text and "memory_floor 32.0 GiB is not below" in caplog.text
        view = (await h.client.get("/api/v1/system")).json()
        assert view["max_jobs"] == 3 and view["signals"]["memory_floor"]["value"] != 32 * GiB


@pytest.mark.parametrize(
    ("job_cgroups", "expected"),
    [
        (False, "sampling (per-job cgroups turned off in config: job_cgroups = false)"),
        (True, None),
    ],
)
async def test_the_system_view_says_why_memory_is_sampled(
    make_harness: Any, job_cgroups: bool, expected: str | None
) -> None:
    async with make_harness(tasks={"gated": GATED}, scheduler={"job_cgroups": job_cgroups}) as h:
        found = (await h.client.get("/api/v1/system")).json()["memory_limits"]
        detected = JobCgroups.detect()
        if expected is None:  # on: cgroups where writable, else it says they are not
            expected = (
                "sampling (per-job cgroups are not writable here)"
                if detected is None
                else detected.describe()
            )
        assert found == expected
        if not job_cgroups and detected is not None:
            # Turned on at run time: looked for then, and used.
            response = await h.client.patch(
                "/api/v1/system", json={"scheduler": {"job_cgroups": True}}
            )
            assert response.status_code == 200, response.text
            found = (await h.client.get("/api/v1/system")).json()["memory_limits"]
            assert found.startswith("cgroup v")


async def test_patch_system_needs_json(make_harness: Any) -> None:
    async with make_harness(tasks={"gated": GATED}) as h:
        response = await h.client.patch("/api/v1/system", content=b"max_jobs=3")
        assert response.status_code == 415
        assert response.json()["error"]["code"] == "unsupported_media_type"


# -- GPUs (a fake NVML probe: this machine has no GPU) ---------------------------------------


class FakeGpus:
    def __init__(self, *free_gib: float) -> None:
        self.devices: tuple[Gpu, ...] | None = tuple(
            Gpu(index=i, name="Fake H100", memory_total=80 * GiB, memory_free=int(free * GiB))
            for i, free in enumerate(free_gib)
        )
        self.problem: str | None = None

    def gpus(self) -> tuple[Gpu, ...] | None:
        return self.devices


CUDA = {"function": "sample_tasks:cuda_devices", "cpus": 0.1, "memory": "16MiB"}


async def test_gpu_jobs_get_their_own_devices(make_harness: Any, tmp_path: Path) -> None:
    tasks = {
        "cuda": {**CUDA, "gpus": 1, "gpu_memory": "10GiB"},
        "gated_gpu": {**GATED, "gpus": 1},
    }
    async with make_harness(gpu_probe=FakeGpus(5, 40, 60), tasks=tasks) as h:
        # The device with the most free memory that fits.
        job_id = await submit(h, "cuda")
        assert (await h.wait_for_state(job_id, "succeeded"))["result"] == "2"
        gate = str(tmp_path / "gate")
        held = [await submit(h, "gated_gpu", path=gate) for _ in range(3)]
        for job_id in held[:2]:
            await h.wait_for_state(job_id, "running")
        # Devices 2 and 1 are taken; device 0 has 5 GiB free, too little for "cuda".
        waiting = await submit(h, "cuda")
        assert await poll(lambda: _reason(h, waiting)) == (
            "waiting for GPUs: needs 1 with 10.0 GiB free each, 0 available"
        )
        system = (await h.client.get("/api/v1/system")).json()
        assert sorted(d for r in system["running"] for d in r["gpu_devices"]) == [0, 1, 2]
        assert len(system["gpus"]) == 3
        Path(gate).write_text("go")
        assert (await h.wait_for_state(waiting, "succeeded"))["result"] in ("1", "2")


async def test_gpu_task_without_nvml_is_rejected_at_submit(make_harness: Any) -> None:
    probe = FakeGpus()
    probe.devices, probe.problem = None, "the optional nvidia-ml-py package is not installed"
    async with make_harness(gpu_probe=probe, tasks={"cuda": {**CUDA, "gpus": 2}}) as h:
        response = await h.client.post("/api/v1/jobs", json={"task": "cuda", "args": {}})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert "needs GPUs but this server cannot see any" in error["message"]
        assert "nvidia-ml-py" in error["message"]
        assert (await h.client.get("/api/v1/jobs")).json()["jobs"] == []


@pytest.mark.parametrize("may_appear", [False, True])
async def test_gpu_tasks_without_nvml_are_warned_about_at_start(
    make_harness: Any, caplog: pytest.LogCaptureFixture, may_appear: bool
) -> None:
    probe = FakeGpus()
    probe.devices, probe.problem = None, "the optional nvidia-ml-py package is not installed"
    tasks = {"cuda": {**CUDA, "gpus": 1}, "add": SAMPLE_TASKS["add"]}
    caplog.set_level(logging.WARNING, logger="jobserver")
    async with make_harness(gpu_probe=probe, tasks=tasks, scheduler={"gpu_may_appear": may_appear}):
        pass
    (warning,) = [m for m in caplog.messages if "ask for GPUs" in m]
    assert warning.startswith("task(s) cuda ask for GPUs but this server cannot see any (the ")
    assert ("wait until a GPU appears" in warning) is may_appear
    caplog.clear()
    # GPUs visible, or no task asking for one: nothing to say.
    async with make_harness(gpu_probe=FakeGpus(80), tasks=tasks):
        pass
    async with make_harness(gpu_probe=probe, tasks={"add": SAMPLE_TASKS["add"]}):
        pass
    assert not [m for m in caplog.messages if "GPU" in m]


async def test_gpu_task_waits_when_a_gpu_may_appear(make_harness: Any) -> None:
    probe = FakeGpus()
    probe.devices = None
    settings = {"gpu_may_appear": True}
    tasks = {"cuda": {**CUDA, "gpus": 1}}
    async with make_harness(gpu_probe=probe, tasks=tasks, scheduler=settings) as h:
        job_id = await submit(h, "cuda")
        assert await poll(lambda: _reason(h, job_id)) == (
            "waiting for 1 GPU(s): NVML does not answer (no GPU driver yet)"
        )
        probe.devices = FakeGpus(80).devices
        assert (await h.wait_for_state(job_id, "succeeded"))["result"] == "0"


def test_nvml_probe_without_nvidia_ml_py_reports_why() -> None:
    import importlib.util

    if importlib.util.find_spec("pynvml") is not None:
        skip_for_want_of("gpu", "nvidia-ml-py is installed here: the probe without it is not seen")
    probe = NvmlProbe()
    assert probe.gpus() is None
    assert probe.problem == "the optional nvidia-ml-py package is not installed"
