"""Start one job's process, wait for it, signal its whole tree.

Each attempt is a fresh process in a session (and process group) of its own, so one
``killpg`` reaches everything the task started, grandchildren included.  Its stdout and
stderr are appended to the job's log file.  The runner never touches the database and
never decides which job runs; callers get a ``ProcessHandle`` and, at the end, an
``Outcome``, whatever way the process was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobserver.jobs import JobError, Outcome, format_timestamp, signal_name, utcnow

LOG_NAME = "output.log"
SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"
# Every process of a job inherits this variable: a dead server's leftovers are found by it.
JOB_ID_ENV = "JOBSERVER_JOB_ID"


@dataclass(frozen=True)
class LaunchSpec:
    job_id: str
    attempt: int
    function: str
    args: Mapping[str, Any]
    workdir: Path
    cgroup_procs: Path | None = None  # the child joins this cgroup before running the task
    environment: Mapping[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES


class ProcessHandle:
    """One running attempt.  ``wait`` reaps it; until then its pid (and so its process
    group id) cannot be reused, which makes ``signal_tree`` safe."""

    def __init__(self, pid: int, result_path: Path) -> None:
        self.pid = pid
        self._result_path = result_path
        self._reaped = False

    def signal_tree(self, signum: int) -> None:
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def wait(self) -> Outcome:
        status = await _wait_for_exit(self.pid, self._on_exit)
        self._reaped = True
        return _outcome(os.waitstatus_to_exitcode(status), self._result_path)

    def _on_exit(self) -> None:
        # The leader is a zombie now, not yet reaped: anything it left in its group
        # (daemons, stray children) is killed before the group id can be recycled.
        self.signal_tree(signal.SIGKILL)


class Runner:
    def __init__(self, python_path: Sequence[Path], environment: Mapping[str, str]) -> None:
        self._python_path = [str(path) for path in python_path]
        self._environment = dict(environment)

    def start(self, spec: LaunchSpec) -> ProcessHandle:
        """Spawn the attempt; call from the event-loop thread (the parent-death signal is
        tied to the thread that spawned the child)."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        result_path = spec.workdir / RESULT_NAME
        result_path.unlink(missing_ok=True)
        spec_path = spec.workdir / SPEC_NAME
        spec_path.write_text(
            json.dumps(
                {"function": spec.function, "args": spec.args, "result_path": str(result_path)}
            )
        )
        log_path = spec.workdir / LOG_NAME
        with log_path.open("ab") as log:
            log.write(f"--- attempt {spec.attempt} started {format_timestamp(utcnow())}\n".encode())
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "jobserver.child", str(spec_path)],
                self._child_environment(spec),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log_fd)
        return ProcessHandle(pid, result_path)

    def _child_environment(self, spec: LaunchSpec) -> dict[str, str]:
        env = dict(self._environment)
        inherited = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(self._python_path + ([inherited] if inherited else []))
        env["PYTHONUNBUFFERED"] = "1"
        env[JOB_ID_ENV] = spec.job_id
        env["JOBSERVER_ATTEMPT"] = str(spec.attempt)
        env["JOBSERVER_SERVER_PID"] = str(os.getpid())
        env.update(spec.environment)
        if spec.cgroup_procs is not None:
            env["JOBSERVER_CGROUP_PROCS"] = str(spec.cgroup_procs)
        else:
            env.pop("JOBSERVER_CGROUP_PROCS", None)
        return env


def kill_group(pid: int) -> None:
    """SIGKILL a process group left by a dead server (the caller has checked the leader's
    start time, or the pids come from a job-id tag scan)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def kill_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


async def _wait_for_exit(pid: int, on_exit: Any) -> int:
    """The raw wait status of our own child ``pid``, without a thread per child: a pidfd
    becomes readable when the process exits (Linux 5.3+); elsewhere, a thread blocks in
    waitpid."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        return status
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    on_exit()
    _, status = os.waitpid(pid, 0)
    return status


def _outcome(exit_code: int, result_path: Path) -> Outcome:
    try:
        document = json.loads(result_path.read_text())
    except (OSError, ValueError):
        document = None
    if exit_code < 0:
        name = signal_name(-exit_code)
        return Outcome(
            signal=-exit_code,
            error=JobError("Killed", f"killed by signal {-exit_code} ({name})"),
        )
    if document is None:
        return Outcome(
            exit_code=exit_code,
            error=JobError("Exited", f"the process exited with code {exit_code} without a result"),
        )
    if document.get("ok") and exit_code == 0:
        return Outcome(exit_code=0, result=document.get("result"))
    error = document.get("error") or {}
    return Outcome(
        exit_code=exit_code,
        error=JobError(
            str(error.get("type", "Error")),
            str(error.get("message", f"exited with code {exit_code}")),
            error.get("traceback"),
        ),
    )
