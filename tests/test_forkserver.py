"""The fork server (jobserver/forkserver.py) with real processes: what a forked job process
is, that it behaves as a spawned one did, and what happens when things die around it."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from jobserver.config import ServerSettings
from jobserver.resources import find_tagged_processes
from jobserver.runner import (
    JOB_ID_ENV,
    ChildSettings,
    LaunchSpec,
    ProcessHandle,
    Runner,
    allowed_environment,
)
from tests.conftest import SAMPLE_TASKS, TESTS_DIR, Harness, needs, skip_for_want_of, write_config
from tests.test_e2e import alive, job_row, submit, wait_until

pytestmark = pytest.mark.anyio

FORK_TASKS = {
    **SAMPLE_TASKS,
    "whoami": {"function": "fork_tasks:whoami", "cpus": 0.1, "memory": "16MiB"},
    "speak": {"function": "fork_tasks:speak", "cpus": 0.1, "memory": "16MiB"},
    "fork_escaped": {"function": "fork_tasks:fork_escaped", "cpus": 0.1, "memory": "16MiB"},
    "own_python": {
        "function": "fork_tasks:whoami",
        "python": sys.executable,
        "cpus": 0.1,
        "memory": "16MiB",
    },
    "command_ppid": {
        "command": [sys.executable, "-c", "import os; print(os.getppid())"],
        "cpus": 0.1,
        "memory": "16MiB",
    },
}


async def until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await anyio.sleep(0.02)


def fork_server_of(pid: int) -> int:
    parent = psutil.Process(pid).ppid()
    assert b"forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()
    return parent


# -- the runner alone --------------------------------------------------------------------


def make_runner(
    fork_server: bool = True, extra: dict[str, str] | None = None, **kwargs: Any
) -> Runner:
    environment = {**allowed_environment(os.environ, ServerSettings().env_allow), **(extra or {})}
    kwargs.setdefault("preload", ["fork_tasks", "sample_tasks"])
    return Runner([TESTS_DIR], environment, fork_server=fork_server, **kwargs)


@pytest.fixture(params=["forked", "spawned"])
async def runner(request: Any) -> AsyncIterator[Runner]:
    """A runner as the server makes one, forking (the default) or spawning every job."""
    made = make_runner(fork_server=request.param == "forked")
    made.open()
    assert await made.fork_server_ready() is (request.param == "forked")
    yield made
    await made.close()


@pytest.fixture
def start(runner: Runner, tmp_path: Path) -> Callable[..., Awaitable[ProcessHandle]]:
    """Starts ``function`` with ``args`` as job ``job`` (its files in tmp_path/jobs/JOB)."""

    async def starter(function: str, job: str | None = None, **args: Any) -> ProcessHandle:
        job_id = job or uuid.uuid4().hex
        spec = LaunchSpec(job_id, 1, function, args, tmp_path / "jobs" / job_id)
        return await runner.start(spec)

    return starter


def log_of(job: str, tmp_path: Path) -> str:
    """The job's log; empty until the job has printed something."""
    path = tmp_path / "jobs" / job / "output.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("runner", ["forked"], indirect=True)
async def test_a_forked_job_leads_its_own_session_under_the_fork_server(
    start: Callable[..., Awaitable[ProcessHandle]],
) -> None:
    seen = []
    for _ in range(3):
        outcome = await (await start("fork_tasks:whoami")).wait()
        assert outcome.error is None, outcome.error
        seen.append(outcome.result)
    parents = {me["ppid"] for me in seen}
    assert len(parents) == 1 and os.getpid() not in parents
    (fork_server,) = parents
    assert b"jobserver.forkserver" in Path(f"/proc/{fork_server}/cmdline").read_bytes()
    for me in seen:
        assert me["pid"] == me["sid"] == me["pgid"] != fork_server
        # Imported once, by the fork server, and not again by each job.
        assert me["imported_by"] == fork_server
        assert me["sigint_default"] and me["stdout_fd"] == 1
    assert len({me["job_id"] for me in seen}) == 3


async def test_results_errors_exit_codes_and_signals(
    start: Callable[..., Awaitable[ProcessHandle]],
) -> None:
    assert (await (await start("sample_tasks:add", a=2, b=3)).wait()).result == 5
    failed = await (await start("sample_tasks:fail", message="nope")).wait()
    assert failed.exit_code == 1 and failed.error is not None
    assert (failed.error.type, failed.error.message) == ("ValueError", "nope")
    assert failed.error.traceback is not None and "sample_tasks.py" in failed.error.traceback
    exited = await (await start("sample_tasks:exit_with", code=7)).wait()
    assert exited.exit_code == 7 and exited.error is not None
    assert exited.error.message == "the process exited with code 7 without a result"
    killed = await (await start("sample_tasks:die", signum=signal.SIGTERM)).wait()
    assert killed.signal == signal.SIGTERM and killed.error is not None
    assert killed.error.type == "Killed"
    bad = await (await start("sample_tasks:unserializable")).wait()
    assert bad.error is not None and bad.error.type == "ResultNotSerializable"
    missing = await (await start("no_such_module:task")).wait()
    assert missing.error is not None and missing.error.type == "ModuleNotFoundError"
    # CPython ends an uncaught KeyboardInterrupt by dying of SIGINT.
    assert (await (await start("fork_tasks:interrupted")).wait()).signal == signal.SIGINT


async def test_the_job_directory_and_its_spec(
    runner: Runner, start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    forked = await runner.fork_server_ready()
    small = await start("sample_tasks:add", job="small", a=2, b=3)
    assert (await small.wait()).result == 5
    # A forked job's spec travels in the request, not in a file; either way the job makes
    # its own output directory, its outcome comes back on a pipe, and a job that printed
    # nothing has no log (issue 6: every file created costs).
    names = sorted(os.listdir(tmp_path / "jobs" / "small"))
    assert names == (["artifacts"] if forked else ["artifacts", "spec.json"])
    # The log appears with the first output, headed by the attempt's start.
    await (await start("fork_tasks:speak", job="small", gate=str(tmp_path))).wait()
    assert log_of("small", tmp_path).startswith("--- attempt 1 started ")
    # Args too large for one message go through spec.json, and the job is still forked.
    text = "x" * 200_000
    large = await start("fork_tasks:length_and_parent", job="large", text=text)
    outcome = await large.wait()
    assert outcome.error is None, outcome.error
    assert outcome.result["length"] == len(text)
    assert (outcome.result["ppid"] != os.getpid()) is forked
    assert (tmp_path / "jobs" / "large" / "spec.json").exists()


async def test_a_log_that_cannot_be_written_loses_the_output_not_the_job(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path, caplog: Any
) -> None:
    (tmp_path / "jobs" / "unlogged" / "output.log").mkdir(parents=True)  # not a file
    outcome = await (await start("sample_tasks:chatty", job="unlogged", lines=3)).wait()
    assert outcome.error is None and outcome.result == 3
    assert "cannot write the job log" in caplog.text and "output is discarded" in caplog.text


async def test_the_outcome_comes_back_on_the_result_pipe(
    start: Callable[..., Awaitable[ProcessHandle]],
) -> None:
    # More than a pipe holds (64 KiB): the server reads while the job writes.
    outcome = await (await start("fork_tasks:big_result", size=1_000_000)).wait()
    assert outcome.error is None, outcome.error
    assert outcome.result == {"text": "é" * 1_000_000, "result_fd_inheritable": False}
    # What else reaches the pipe spoils the document: no result, not a forged one.
    forged = '{"ok": true, "result": "forged"}'
    outcome = await (await start("fork_tasks:write_to_result_pipe", data=forged)).wait()
    assert outcome.error is not None and outcome.error.type == "Exited"
    assert "without a result" in outcome.error.message


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "spawned"])
async def test_a_flooded_result_pipe_is_not_kept(tmp_path: Path, fork_server: bool) -> None:
    made = make_runner(fork_server=fork_server, child=ChildSettings(max_result_size=1000))
    made.open()
    try:
        await made.fork_server_ready()
        spec = LaunchSpec(
            "flood",
            1,
            "fork_tasks:write_to_result_pipe",
            {"data": "x" * 4096, "size": 1024},
            tmp_path / "flood",
        )
        outcome = await (await made.start(spec)).wait()
    finally:
        await made.close()
    assert outcome.error is not None and outcome.error.type == "ResultTooLarge"
    assert "max_result_size" in outcome.error.message


async def test_a_forked_job_has_the_environment_a_spawned_one_has(tmp_path: Path) -> None:
    found = {}
    for fork_server in (True, False):
        made = make_runner(fork_server=fork_server, extra={"SOME_SETTING": "x"})
        made.open()
        try:
            assert await made.fork_server_ready() is fork_server
            spec = LaunchSpec(
                "env-job",
                3,
                "sample_tasks:environment",
                {},
                tmp_path / "env-job",
                environment={"CUDA_VISIBLE_DEVICES": "1"},
            )
            found[fork_server] = (await (await made.start(spec)).wait()).result
        finally:
            await made.close()
    assert found[True] == found[False]
    assert found[True]["SOME_SETTING"] == "x" and found[True]["CUDA_VISIBLE_DEVICES"] == "1"
    assert found[True][JOB_ID_ENV] == "env-job" and found[True]["JOBSERVER_ATTEMPT"] == "3"


async def test_a_job_prints_unbuffered_when_a_preloaded_module_replaced_stdout(
    tmp_path: Path,
) -> None:
    made = make_runner(preload=["fork_stdout"])
    made.open()
    try:
        assert await made.fork_server_ready()
        gate = tmp_path / "gate"
        spec = LaunchSpec(
            "buffered",
            1,
            "fork_stdout:print_then_wait",
            {"gate": str(gate)},
            tmp_path / "jobs" / "buffered",
        )
        handle = await made.start(spec)
        # In the log while the job still waits: nothing sat in a buffer.
        await until(lambda: "printed before the gate" in log_of("buffered", tmp_path))
        gate.write_text("open")
        assert (await handle.wait()).result == "done"
    finally:
        await made.close()


async def test_stdout_and_stderr_reach_the_log_while_the_job_runs(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    handle = await start("fork_tasks:speak", job="speak", gate=str(gate))
    await until(lambda: "said on stderr" in log_of("speak", tmp_path))
    assert "said on stdout" in log_of("speak", tmp_path)
    gate.touch()
    assert (await handle.wait()).result == "spoke"


async def test_progress_reports_arrive(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    handle = await start("sample_tasks:report", gate=str(gate), steps=3)
    await until(lambda: handle.progress_seq >= 3)
    assert handle.progress == (1.0, "step 3 of 3")
    gate.touch()
    assert (await handle.wait()).result == "reported"


async def test_the_job_exits_as_an_interpreter_would(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    """Non-daemon threads are joined, atexit handlers run, unflushed output is flushed."""
    handle = await start("fork_tasks:leave_work", job="leave", directory=str(tmp_path))
    assert (await handle.wait()).result == "left"
    assert (tmp_path / "thread-done").exists() and (tmp_path / "atexit-ran").exists()
    assert log_of("leave", tmp_path).endswith("no newline at the end")


async def test_signal_tree_reaches_a_grandchild(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    handle = await start("sample_tasks:spawn_and_sleep", pid_file=str(pid_file))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    handle.signal_tree(signal.SIGTERM)
    assert (await handle.wait()).signal == signal.SIGTERM
    await until(lambda: not alive(grandchild))


async def test_the_job_and_what_it_forks_carry_the_job_id_tag(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    """/proc/PID/environ shows a process's original environment: a forked job writes its
    id there, so a dead server's leftovers are found by it, even a fork that left the
    group with setsid and never ran exec."""
    pid_file = tmp_path / "grandchild.pid"
    handle = await start("fork_tasks:fork_escaped", job="tagged", pid_file=str(pid_file))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    try:
        assert set(find_tagged_processes(JOB_ID_ENV, "tagged")) == {handle.pid, grandchild}
        # Not the fork server's placeholder value (which only the fork server shows).
        assert not {handle.pid, grandchild} & set(find_tagged_processes(JOB_ID_ENV, "-" * 64))
    finally:
        os.kill(grandchild, signal.SIGKILL)
        handle.signal_tree(signal.SIGKILL)
        await handle.wait()


@pytest.mark.parametrize("runner", ["forked"], indirect=True)
async def test_an_exited_job_stays_unreaped_until_released(
    start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    """The fork server kills what the job left in its group at once, but keeps the job's
    zombie (so its pid and group id) until the runner has heard the exit."""
    pid_file = tmp_path / "grandchild.pid"
    gate = tmp_path / "gate"
    handle = await start("fork_tasks:leave_child", pid_file=str(pid_file), gate=str(gate))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    gate.touch()
    await until(lambda: not alive(grandchild))
    await until(lambda: not alive(handle.pid))
    assert Path(f"/proc/{handle.pid}").exists()  # a zombie, not reaped
    handle.signal_tree(signal.SIGKILL)  # harmless: the group id is still the job's
    assert (await handle.wait()).result == "left a child"
    await until(lambda: not Path(f"/proc/{handle.pid}").exists())


@pytest.mark.parametrize("runner", ["forked"], indirect=True)
async def test_a_dead_fork_server_fails_its_jobs_and_a_new_one_takes_over(
    runner: Runner, start: Callable[..., Awaitable[ProcessHandle]], tmp_path: Path
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    handle = await start("sample_tasks:spawn_and_sleep", pid_file=str(pid_file))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    old = fork_server_of(handle.pid)
    os.kill(old, signal.SIGKILL)
    outcome = await handle.wait()
    assert outcome.error is not None and outcome.error.type == "Killed"
    assert f"the fork server (pid {old}) died while the job ran" in outcome.error.message
    assert "SIGKILL" in outcome.error.message
    await until(lambda: not alive(handle.pid) and not alive(grandchild))
    assert await runner.fork_server_ready()
    after = await (await start("fork_tasks:whoami")).wait()
    assert after.error is None and after.result["ppid"] not in (old, os.getpid())
    await until(lambda: not Path(f"/proc/{old}").exists())  # reaped by the runner


async def test_the_spare_process_makes_its_job_directory_ahead(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / ".spare-1").mkdir(parents=True)  # left by a fork server that was killed
    made = make_runner(jobs_dir=jobs)
    made.open()

    async def run(job: str) -> Any:
        spec = LaunchSpec(job, 1, "fork_tasks:whoami", {}, jobs / job)
        outcome = await (await made.start(spec)).wait()
        assert outcome.error is None, outcome.error
        return outcome.result

    def spare_dirs() -> list[str]:
        return sorted(path.name for path in jobs.glob(".spare-*"))

    try:
        assert await made.fork_server_ready()
        await until(lambda: len(spare_dirs()) == 1 and spare_dirs() != [".spare-1"])
        (waiting,) = spare_dirs()
        assert (jobs / waiting / "artifacts").is_dir()
        first = await run("first")
        # The spare's directory became the job's: renamed, not made while it started.
        assert f".spare-{first['pid']}" == waiting
        assert sorted(os.listdir(jobs / "first")) == ["artifacts"]
        await until(lambda: len(spare_dirs()) == 1 and spare_dirs() != [waiting])
        (waiting,) = spare_dirs()
        # A later attempt finds its directory in use: the spare's goes, the job's stays.
        (jobs / "again").mkdir()
        (jobs / "again" / "output.log").write_text("attempt 1\n")
        again = await run("again")
        assert f".spare-{again['pid']}" == waiting and not (jobs / waiting).exists()
        assert sorted(os.listdir(jobs / "again")) == ["artifacts", "output.log"]
    finally:
        await made.close()
    assert spare_dirs() == []  # the last spare removed its own when the runner closed


async def test_jobs_are_spawned_until_the_fork_server_has_imported_the_tasks(
    tmp_path: Path,
) -> None:
    """A slow (or hanging) import in a task module never holds a start up."""
    gate = tmp_path / "gate"
    made = make_runner(preload=["fork_slow", "fork_tasks"], extra={"FORK_SLOW_GATE": str(gate)})
    made.open()
    try:
        spec = LaunchSpec("early", 1, "fork_tasks:whoami", {}, tmp_path / "early")
        early = (await (await made.start(spec)).wait()).result
        assert early["ppid"] == os.getpid()  # spawned
        state = made.fork_server_state()
        assert state is not None and state["ready"] is False
        gate.touch()
        assert await made.fork_server_ready()
        spec = LaunchSpec("late", 1, "fork_tasks:whoami", {}, tmp_path / "late")
        late = (await (await made.start(spec)).wait()).result
        assert late["ppid"] == state["pid"]
    finally:
        await made.close()


async def test_a_module_that_fails_to_preload_is_reported_and_skipped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    made = make_runner(preload=["no_such_task_module", "fork_tasks"])
    made.open()
    try:
        assert await made.fork_server_ready()
        spec = LaunchSpec("a", 1, "no_such_task_module:run", {}, tmp_path / "a")
        missing = await (await made.start(spec)).wait()
        assert missing.error is not None and missing.error.type == "ModuleNotFoundError"
        spec = LaunchSpec("b", 1, "fork_tasks:whoami", {}, tmp_path / "b")
        me = (await (await made.start(spec)).wait()).result
        assert me["imported_by"] == me["ppid"] != os.getpid()  # the others were preloaded
    finally:
        await made.close()
    assert "could not preload no_such_task_module: ModuleNotFoundError" in capfd.readouterr().err


async def test_a_fork_server_that_does_not_answer_is_replaced(tmp_path: Path) -> None:
    made = make_runner(fork_reply_timeout=0.5)
    made.open()
    try:
        assert await made.fork_server_ready()
        state = made.fork_server_state()
        assert state is not None
        stuck = state["pid"]
        os.kill(stuck, signal.SIGSTOP)
        spec = LaunchSpec("a", 1, "fork_tasks:whoami", {}, tmp_path / "a")
        with pytest.raises(OSError, match=r"did not answer in 0\.5 s; it was killed"):
            await made.start(spec)
        await until(lambda: not Path(f"/proc/{stuck}").exists())
        assert await made.fork_server_ready()
        spec = LaunchSpec("b", 1, "fork_tasks:whoami", {}, tmp_path / "b")
        assert (await (await made.start(spec)).wait()).result["ppid"] not in (stuck, os.getpid())
    finally:
        await made.close()


@pytest.mark.parametrize("runner", ["forked"], indirect=True)
async def test_close_stops_the_fork_server(runner: Runner, tmp_path: Path) -> None:
    spec = LaunchSpec("x", 1, "fork_tasks:whoami", {}, tmp_path / "x")
    fork_server = (await (await runner.start(spec)).wait()).result["ppid"]
    waiting = psutil.Process(fork_server).children()  # its spare process, if forking
    await runner.close()
    assert not Path(f"/proc/{fork_server}").exists()
    assert not any(Path(f"/proc/{process.pid}").exists() for process in waiting)


@pytest.mark.parametrize("runner", ["forked"], indirect=True)
async def test_a_spare_process_waits_for_the_next_job(
    start: Callable[..., Awaitable[ProcessHandle]],
) -> None:
    fork_server = (await (await start("fork_tasks:whoami")).wait()).result["ppid"]

    def spares() -> list[int]:  # no job runs: the fork server's only child is its spare
        return [process.pid for process in psutil.Process(fork_server).children()]

    await until(lambda: len(spares()) == 1)
    (spare,) = spares()
    assert os.getsid(spare) == spare  # it has left the fork server's session already
    second = await (await start("fork_tasks:whoami", job="second")).wait()
    assert second.result["pid"] == spare and second.result["job_id"] == "second"
    assert second.result["sid"] == second.result["pgid"] == spare
    # A spare that dies while it waits is replaced, and jobs go on.
    await until(lambda: len(spares()) == 1 and spares() != [spare])
    (killed,) = spares()
    os.kill(killed, signal.SIGKILL)
    await until(lambda: len(spares()) == 1 and spares() != [killed])
    (replacement,) = spares()
    third = await (await start("fork_tasks:whoami")).wait()
    assert third.result["pid"] == replacement and third.result["ppid"] == fork_server


# -- in the server -------------------------------------------------------------------------


async def forking(h: Harness) -> None:
    assert h.application.runner is not None
    assert await h.application.runner.fork_server_ready()


async def run(h: Harness, task: str, **args: Any) -> dict[str, Any]:
    response = await h.client.post("/api/v1/jobs", json={"task": task, "args": args})
    assert response.status_code == 202, response.text
    return await h.wait_for_state(response.json()["id"], "succeeded", "failed")


async def running_pid(h: Harness, job_id: str) -> int:
    database = h.settings.server.database
    await until(lambda: job_row(database, job_id)["pid"] is not None)
    return int(job_row(database, job_id)["pid"])


async def test_the_server_forks_python_tasks_and_spawns_the_others(make_harness: Any) -> None:
    async with make_harness(tasks=FORK_TASKS) as h:
        await forking(h)
        system = (await h.client.get("/api/v1/system")).json()
        forked = (await run(h, "whoami"))["result"]
        assert system["fork_server"] == {"pid": forked["ppid"], "ready": True}
        assert forked["ppid"] != os.getpid() and forked["imported_by"] == forked["ppid"]
        # A task with its own interpreter, and a command, are spawned by the server.
        own = (await run(h, "own_python"))["result"]
        assert own["ppid"] == os.getpid() and own["imported_by"] == own["pid"]
        assert (await run(h, "command_ppid"))["result"] == os.getpid()
        argv = await run(h, "argv", src="a", n=2)
        assert argv["state"] == "succeeded", argv


async def test_fork_server_off_spawns_every_job(make_harness: Any) -> None:
    async with make_harness(tasks=FORK_TASKS, server={"fork_server": False}) as h:
        assert (await h.client.get("/api/v1/system")).json()["fork_server"] is None
        spawned = (await run(h, "whoami"))["result"]
        assert spawned["ppid"] == os.getpid()
        assert spawned["imported_by"] == spawned["pid"]


async def test_rlimits_and_the_cgroup_apply_to_forked_jobs(make_harness: Any) -> None:
    from jobserver.cgroups import JobCgroups

    cgroups = JobCgroups.detect()
    tasks = {**FORK_TASKS, "limited": {**FORK_TASKS["whoami"], "memory_limit": "256MiB"}}
    async with make_harness(tasks=tasks, server={"rlimit_nofile": 64}) as h:
        await forking(h)
        done = await run(h, "limited")
        me = done["result"]
        assert me["ppid"] != os.getpid()  # forked
        assert me["nofile"] == 64
        if cgroups is None:
            skip_for_want_of("cgroup", "no writable memory cgroup here: the join is not checked")
        # cgroup v1: the memory controller's line; v2: the unified line.
        lines = me["cgroup"].splitlines()
        joined = [line for line in lines if ":memory:" in line or line.startswith("0::")]
        assert any(line.endswith("/" + done["id"]) for line in joined), me["cgroup"]


async def test_cancel_and_timeout_kill_a_forked_tree(make_harness: Any, tmp_path: Path) -> None:
    tasks = {
        **FORK_TASKS,
        "short": {**SAMPLE_TASKS["spawn_and_sleep"], "timeout": "1s"},
    }
    async with make_harness(tasks=tasks) as h:
        await forking(h)
        for task, end in (("spawn_and_sleep", "cancelled"), ("short", "failed")):
            pid_file = tmp_path / f"{task}.pid"
            response = await h.client.post(
                "/api/v1/jobs", json={"task": task, "args": {"pid_file": str(pid_file)}}
            )
            job_id = response.json()["id"]
            await until(lambda: pid_file.exists() and pid_file.read_text() != "")  # noqa: B023
            grandchild = int(pid_file.read_text())
            leader = await running_pid(h, job_id)
            assert psutil.Process(leader).ppid() != os.getpid()  # forked
            if end == "cancelled":
                await h.client.post(f"/api/v1/jobs/{job_id}/cancel")
            done = await h.wait_for_state(job_id, end)
            if end == "failed":
                assert done["error"]["type"] == "Timeout"
            await until(lambda: not alive(grandchild) and not alive(leader))  # noqa: B023


async def test_a_killed_fork_server_fails_the_running_job_clearly(
    make_harness: Any, tmp_path: Path
) -> None:
    async with make_harness(tasks=FORK_TASKS) as h:
        await forking(h)
        response = await h.client.post(
            "/api/v1/jobs",
            json={"task": "wait_for_file", "args": {"path": str(tmp_path / "never")}},
        )
        job_id = response.json()["id"]
        leader = await running_pid(h, job_id)
        fork_server = fork_server_of(leader)
        os.kill(fork_server, signal.SIGKILL)
        done = await h.wait_for_state(job_id, "failed")
        assert done["error"]["type"] == "Killed"
        assert "fork server" in done["error"]["message"]
        await until(lambda: not alive(leader))
        await forking(h)
        after = (await run(h, "whoami"))["result"]
        assert after["ppid"] not in (fork_server, os.getpid())


async def test_reload_starts_a_new_fork_server_and_the_old_one_finishes_its_jobs(
    make_harness: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    async with make_harness(tasks=FORK_TASKS) as h:
        await forking(h)
        response = await h.client.post(
            "/api/v1/jobs", json={"task": "wait_for_file", "args": {"path": str(gate)}}
        )
        job_id = response.json()["id"]
        old = fork_server_of(await running_pid(h, job_id))
        assert h.application.runtime is not None
        h.application.runtime.reload()  # what SIGHUP does
        await forking(h)
        after = (await run(h, "whoami"))["result"]
        # The new fork server imported the task modules afresh.
        assert after["ppid"] not in (old, os.getpid()) and after["imported_by"] == after["ppid"]
        assert alive(old)  # still holding the job that started before the reload
        gate.write_text("opened")
        assert (await h.wait_for_state(job_id, "succeeded"))["result"] == "opened"
        await until(lambda: not Path(f"/proc/{old}").exists())


@needs("root", os.geteuid() != 0, "needs root to make fork() fail in a pids cgroup")
@needs(
    "cgroup",
    not Path("/sys/fs/cgroup/pids/cgroup.procs").exists(),
    "needs the cgroup v1 pids controller to make fork() fail",
)
async def test_a_failed_fork_fails_the_job_as_spawn_failed(make_harness: Any) -> None:
    group = Path(f"/sys/fs/cgroup/pids/jobserver-test-{uuid.uuid4().hex[:8]}")
    group.mkdir()
    try:
        async with make_harness(tasks=FORK_TASKS) as h:
            await forking(h)
            fork_server = (await run(h, "whoami"))["result"]["ppid"]
            (group / "pids.max").write_text("1")  # the fork server alone: no fork succeeds
            (group / "cgroup.procs").write_text(str(fork_server))
            try:
                # The spare process, forked before the limit, takes the first job; the
                # next one needs a fork.
                first = await run(h, "whoami")
                done = await run(h, "whoami")
            finally:
                Path("/sys/fs/cgroup/pids/cgroup.procs").write_text(str(fork_server))
            assert first["state"] == "succeeded"
            assert done["state"] == "failed"
            assert done["error"]["type"] == "SpawnFailed"
            assert "Resource temporarily unavailable" in done["error"]["message"]
            assert (await run(h, "whoami"))["result"]["ppid"] == fork_server
    finally:
        group.rmdir()


# -- the whole server killed ---------------------------------------------------------------


def fork_server_ready(url: str) -> bool:
    state = httpx.get(f"{url}/api/v1/system", timeout=5).json()["fork_server"]
    return bool(state and state["ready"])


def test_a_killed_server_takes_the_fork_server_and_its_jobs_along(
    tmp_path: Path, server_factory: Any
) -> None:
    server = server_factory(write_config(tmp_path))
    wait_until(lambda: fork_server_ready(server.url))
    database = tmp_path / "data" / "jobserver.db"
    job = submit(server.url, "wait_for_file", path=str(tmp_path / "never"))
    wait_until(lambda: job_row(database, job["id"])["pid"] is not None)
    leader = int(job_row(database, job["id"])["pid"])
    fork_server = fork_server_of(leader)
    assert psutil.Process(fork_server).ppid() == server.process.pid
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_until(lambda: not alive(fork_server) and not alive(leader))


def test_a_forked_grandchild_that_left_the_group_dies_on_restart(
    tmp_path: Path, server_factory: Any
) -> None:
    config_path = write_config(tmp_path, tasks=FORK_TASKS)
    database = tmp_path / "data" / "jobserver.db"
    pid_file = tmp_path / "grandchild.pid"
    server = server_factory(config_path)
    wait_until(lambda: fork_server_ready(server.url))
    job = submit(server.url, "fork_escaped", pid_file=str(pid_file))
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    # The pid is recorded once the start is answered: the job may have run ahead of it.
    wait_until(lambda: job_row(database, job["id"])["pid"] is not None)
    leader = int(job_row(database, job["id"])["pid"])
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_until(lambda: not alive(leader))
    assert alive(grandchild)  # escaped: only the rescuer's tag scan finds it
    server_factory(config_path)
    wait_until(lambda: not alive(grandchild))
