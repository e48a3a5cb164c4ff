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
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jobserver.errors import ConfigError
from jobserver.jobs import JobError, Outcome, format_timestamp, signal_name, utcnow

LOG_NAME = "output.log"
SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"
CHILD_NAME = "child.py"  # a copy of jobserver/child.py, for tasks with their own interpreter
# Every process of a job inherits this variable: a dead server's leftovers are found by it.
JOB_ID_ENV = "JOBSERVER_JOB_ID"


@dataclass(frozen=True)
class LaunchSpec:
    job_id: str
    attempt: int
    function: str
    args: Mapping[str, Any]
    workdir: Path
    python: Path | None = None  # the task's own interpreter; None: the server's


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
        environment = self._child_environment(spec)
        if spec.python is not None:
            # The child module alone, run by path: the task's interpreter has no jobserver.
            script = spec.workdir / CHILD_NAME
            script.write_text(child_source())
            argv = [str(spec.python), str(script), str(spec_path)]
            environment = host_environment(environment)
        else:
            argv = [*child_command(), str(spec_path)]
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                environment,
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
        return env

    def describe(self, python: Path, function: str) -> dict[str, Any]:
        """The parameters of ``function`` as ``python`` sees it (``child.py --describe``):
        the server cannot import a module that needs packages only that interpreter has."""
        env = host_environment(self._environment)
        inherited = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(self._python_path + ([inherited] if inherited else []))
        command = [str(python), "-c", child_source(), "--describe", function]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot run {python}: {exc}", {"python": str(python)}) from None
        try:
            document: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (done.stderr or done.stdout).strip()[-500:]
            raise ConfigError(
                f"{python} could not describe {function!r} (exit code {done.returncode}): {tail}",
                {"python": str(python), "function": function},
            ) from None
        return document


def _frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def child_command() -> list[str]:
    """How to run the child module under the server's own Python: ``python -m`` in a normal
    install; the single-file binary runs its hidden ``_child`` command (see __main__.py)."""
    if _frozen():
        return [sys.executable, "_child"]
    return [sys.executable, "-m", "jobserver.child"]


@cache
def child_source() -> str:
    # Shipped as package data in the binary, where modules are not files of their own.
    return resources.files("jobserver").joinpath("child.py").read_text(encoding="utf-8")


def host_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """``environment`` without what the single-file binary's loader added, so another
    interpreter finds its own shared libraries and does not take itself for a copy of
    the binary.  Outside the binary, a plain copy."""
    env = dict(environment)
    if not _frozen():
        return env
    for key in list(env):
        if key.startswith("_PYI_") or key in ("_MEIPASS2", "PYINSTALLER_RESET_ENVIRONMENT"):
            del env[key]
    original = env.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        env["LD_LIBRARY_PATH"] = original
    else:
        env.pop("LD_LIBRARY_PATH", None)
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
