"""Start one job's process, wait for it, signal its whole tree.

Each attempt is a fresh process in a session (and process group) of its own, so one
``killpg`` reaches everything the task started, grandchildren included.  Its stdout and
stderr go to pipes that the server drains (``loop.add_reader``) into the job's log file,
so the per-job log cap holds while the job writes; a command task's stdout is also read
line by line for progress reports and its result.  A Python task also gets a progress
pipe (``reporting``).  The runner never touches the database and never decides which job
runs; callers get a ``ProcessHandle`` and, at the end, an ``Outcome``, whatever way the
process was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jobserver.errors import ConfigError
from jobserver.jobs import (
    ARTIFACTS_DIR_NAME,
    JOB_LOG_NAME,
    Artifact,
    JobError,
    Outcome,
    format_timestamp,
    signal_name,
    utcnow,
)
from jobserver.reporting import FD_ENV, OUTPUT_DIR_ENV, parse_line

LOG_NAME = JOB_LOG_NAME
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
    # --- lifecycle (issue 4) ---
    command: tuple[str, ...] | None = None  # argv of a command task, placeholders filled
    log_limit: int | None = None  # bytes kept in the job's log, all attempts together
    python: Path | None = None  # the task's own interpreter; None: the server's
    cgroup_procs: Path | None = None  # the child joins this cgroup before running the task
    environment: Mapping[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES


# The child's end of the progress pipe: a fixed fd number, named in $JOBSERVER_PROGRESS_FD.
PROGRESS_FD = 3
MAX_LINE = 64 * 1024  # a command's stdout line longer than this is not parsed


class _Log:
    """The job's log file, written by the server with a size cap: once the cap is hit, one
    line says so and further output is read (so the job never blocks) and discarded."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self._file = path.open("ab", buffering=0)
        self._written = self._file.tell()
        self._limit = limit
        self.truncated = limit is not None and self._written >= limit

    def write(self, data: bytes) -> None:
        if self.truncated or not data:
            return
        if self._limit is not None and self._written + len(data) > self._limit:
            data = data[: max(0, self._limit - self._written)]
            self._file.write(data)
            self._file.write(
                f"\n--- log truncated: max_log_size ({self._limit} bytes) reached; "
                "further output discarded\n".encode()
            )
            self.truncated = True
            return
        self._file.write(data)
        self._written += len(data)

    def close(self) -> None:
        self._file.close()


class _Pipe:
    """Drains one pipe on the event loop: every chunk to ``sink``, and complete lines to
    ``on_line`` when given."""

    def __init__(
        self,
        fd: int,
        sink: Callable[[bytes], None] | None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._sink = sink
        self._on_line = on_line
        self._partial = b""
        self.closed = False
        asyncio.get_running_loop().add_reader(fd, self.read)

    def read(self) -> None:
        while not self.closed:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            if self._sink is not None:
                self._sink(data)
            if self._on_line is not None:
                self._lines(data)

    def _lines(self, data: bytes) -> None:
        assert self._on_line is not None
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            self._on_line(line.decode(errors="replace"))
        if len(self._partial) > MAX_LINE:
            self._partial = b""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        if self._on_line is not None and self._partial:
            self._on_line(self._partial.decode(errors="replace"))
            self._partial = b""


class ProcessHandle:
    """One running attempt.  ``wait`` reaps it; until then its pid (and so its process
    group id) cannot be reused, which makes ``signal_tree`` safe.

    ``progress`` is the latest report (fraction, message) and ``progress_seq`` counts
    reports, so the scheduler can tell a new one from the one it stored."""

    def __init__(self, pid: int, result_path: Path) -> None:
        self.pid = pid
        self._result_path = result_path
        self._reaped = False
        self.progress: tuple[float | None, str] | None = None
        self.progress_seq = 0
        self._pipes: list[_Pipe] = []
        self._log: _Log | None = None
        self._command = False
        self._last_stdout_line: str | None = None

    def _report(self, line: str) -> None:
        report = parse_line(line)
        if report is not None:
            self.progress = report
            self.progress_seq += 1

    def _stdout_line(self, line: str) -> None:
        if line.strip():
            self._last_stdout_line = line
        self._report(line)

    def signal_tree(self, signum: int) -> None:
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def wait(self) -> Outcome:
        try:
            status = await _wait_for_exit(self.pid, self._on_exit)
        finally:
            self._reaped = True
            # Whatever is left in the pipes was written before the exit: read it, then
            # close (a grandchild that escaped the group must not hold the log open).
            for pipe in self._pipes:
                pipe.read()
                pipe.close()
            if self._log is not None:
                self._log.close()
        exit_code = os.waitstatus_to_exitcode(status)
        if self._command:
            return _command_outcome(exit_code, self._last_stdout_line)
        return _outcome(exit_code, self._result_path)

    def _on_exit(self) -> None:
        # The leader is a zombie now, not yet reaped: anything it left in its group
        # (daemons, stray children) is killed before the group id can be recycled.
        self.signal_tree(signal.SIGKILL)


@dataclass(frozen=True)
class ChildSettings:
    """What the job process applies to itself before importing the task (see child.py):
    resource limits, the user to run as, and the largest result it may hand back."""

    run_as: str | None = None
    rlimits: Mapping[str, int] = field(default_factory=dict)  # "nofile" | "nproc" | "core"
    max_result_size: int | None = None


class Runner:
    def __init__(
        self,
        python_path: Sequence[Path],
        environment: Mapping[str, str],
        child: ChildSettings | None = None,
    ) -> None:
        self._python_path = [str(path) for path in python_path]
        self._environment = dict(environment)
        # A program cannot ask for a parent-death signal itself: setpriv does it, then
        # execs the program (FIELD-NOTES).  Without it the startup rescuer cleans up.
        self._setpriv = shutil.which("setpriv")
        self._child = child or ChildSettings()
        self._owner: tuple[int, int] | None = None
        if self._child.run_as is not None:
            import pwd

            entry = pwd.getpwnam(self._child.run_as)  # KeyError: checked by the caller
            self._owner = (entry.pw_uid, entry.pw_gid)

    def start(self, spec: LaunchSpec) -> ProcessHandle:
        """Spawn the attempt; call from the event-loop thread (the parent-death signal is
        tied to the thread that spawned the child, and the pipes are read by its loop)."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        (spec.workdir / ARTIFACTS_DIR_NAME).mkdir(exist_ok=True)
        if self._owner is not None:
            # The job writes its result and its artifacts here.
            os.chown(spec.workdir, *self._owner)
            os.chown(spec.workdir / ARTIFACTS_DIR_NAME, *self._owner)
        result_path = spec.workdir / RESULT_NAME
        result_path.unlink(missing_ok=True)
        env = self._child_environment(spec)
        if spec.command is None:
            spec_path = spec.workdir / SPEC_NAME
            spec_path.write_text(
                json.dumps(
                    {
                        "function": spec.function,
                        "args": spec.args,
                        "result_path": str(result_path),
                        "run_as": self._child.run_as,
                        "rlimits": dict(self._child.rlimits),
                        "max_result_size": self._child.max_result_size,
                    }
                )
            )
            if spec.python is not None:
                # The child module alone, run by path: the task's interpreter has no jobserver.
                script = spec.workdir / CHILD_NAME
                script.write_text(child_source())
                argv = [str(spec.python), str(script), str(spec_path)]
                env = host_environment(env)
            else:
                argv = [*child_command(), str(spec_path)]
            program = argv[0]
        else:
            # A program of the machine's: not the single-file binary's bundled libraries.
            env = host_environment(env)
            found = shutil.which(spec.command[0])
            if found is None:
                raise FileNotFoundError(f"program {spec.command[0]!r} not found on PATH")
            argv = [*self._command_wrappers(), found, *spec.command[1:]]
            program = argv[0]
        log = _Log(spec.workdir / LOG_NAME, spec.log_limit)
        log.write(f"--- attempt {spec.attempt} started {format_timestamp(utcnow())}\n".encode())
        # Pipes are created close-on-exec; dup2 into the child's 1, 2 and 3 clears the flag
        # on those copies only, so nothing else leaks into the job.
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        fds = [out_read, out_write]
        file_actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_write, 1),
        ]
        if spec.command is None:
            file_actions.append((os.POSIX_SPAWN_DUP2, out_write, 2))
            progress_read, progress_write = os.pipe2(os.O_CLOEXEC)
            if progress_write == PROGRESS_FD:
                # dup2 onto itself would keep close-on-exec: move it out of the way first.
                moved = os.dup(progress_write)
                os.close(progress_write)
                progress_write = moved
            fds += [progress_read, progress_write]
            file_actions.append((os.POSIX_SPAWN_DUP2, progress_write, PROGRESS_FD))
            env[FD_ENV] = str(PROGRESS_FD)
        else:
            err_read, err_write = os.pipe2(os.O_CLOEXEC)
            fds += [err_read, err_write]
            file_actions.append((os.POSIX_SPAWN_DUP2, err_write, 2))
        try:
            pid = os.posix_spawn(program, argv, env, file_actions=file_actions, setsid=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            log.close()
            raise
        if spec.command is not None and spec.cgroup_procs is not None:
            # A program cannot join a cgroup itself (child.py does it for Python tasks):
            # move it in now; only what it starts in its first instant could escape.
            try:
                spec.cgroup_procs.write_text(str(pid))
            except OSError as exc:
                log.write(f"--- could not put the job in its cgroup: {exc}\n".encode())
        handle = ProcessHandle(pid, result_path)
        handle._log = log
        # The server keeps only the read ends.
        os.close(out_write)
        if spec.command is None:
            os.close(progress_write)
            handle._pipes = [
                _Pipe(out_read, log.write),
                _Pipe(progress_read, None, handle._report),
            ]
        else:
            os.close(err_write)
            handle._command = True
            handle._pipes = [
                _Pipe(out_read, log.write, handle._stdout_line),
                _Pipe(err_read, log.write),
            ]
        return handle

    def _command_wrappers(self) -> list[str]:
        """What a command task's program runs under: the configured resource limits
        (prlimit), the ``run_as`` user and the parent-death signal (setpriv) -- what
        child.py does for Python tasks, which a program cannot do for itself."""
        wrappers: list[str] = []
        if self._child.rlimits:
            prlimit = shutil.which("prlimit")
            if prlimit is None:
                raise FileNotFoundError("rlimits are configured but prlimit is not installed")
            limits = [f"--{name}={value}:{value}" for name, value in self._child.rlimits.items()]
            wrappers += [prlimit, *limits, "--"]
        if self._setpriv is not None:
            wrappers += [self._setpriv, "--pdeathsig", "KILL"]
            if self._owner is not None:
                uid, gid = self._owner
                wrappers += [f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
            wrappers.append("--")
        elif self._owner is not None:
            raise FileNotFoundError("run_as is set but setpriv (util-linux) is not installed")
        return wrappers

    def _child_environment(self, spec: LaunchSpec) -> dict[str, str]:
        # The binary's own loader variables always pass the env_allow filter: the child
        # reuses this process's unpacked files through them (host_environment drops them
        # again for other interpreters and programs).
        env = {**loader_environment(os.environ), **self._environment}
        inherited = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(self._python_path + ([inherited] if inherited else []))
        env["PYTHONUNBUFFERED"] = "1"
        env[JOB_ID_ENV] = spec.job_id
        env["JOBSERVER_ATTEMPT"] = str(spec.attempt)
        env["JOBSERVER_SERVER_PID"] = str(os.getpid())
        env[OUTPUT_DIR_ENV] = str(spec.workdir / ARTIFACTS_DIR_NAME)
        env.pop(FD_ENV, None)
        env.update(spec.environment)
        if spec.cgroup_procs is not None:
            env["JOBSERVER_CGROUP_PROCS"] = str(spec.cgroup_procs)
        else:
            env.pop("JOBSERVER_CGROUP_PROCS", None)
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


def _is_loader_variable(key: str) -> bool:
    return key.startswith("_PYI_") or key in _LOADER_VARIABLES


_LOADER_VARIABLES = frozenset(
    {"_MEIPASS2", "PYINSTALLER_RESET_ENVIRONMENT", "LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG"}
)


def loader_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """What the single-file binary's loader put in ``environment`` (nothing outside it)."""
    if not _frozen():
        return {}
    return {key: value for key, value in environment.items() if _is_loader_variable(key)}


def host_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """``environment`` without what the single-file binary's loader added, so another
    interpreter finds its own shared libraries and does not take itself for a copy of
    the binary.  Outside the binary, a plain copy."""
    env = dict(environment)
    if not _frozen():
        return env
    original = env.get("LD_LIBRARY_PATH_ORIG")
    for key in list(env):
        if _is_loader_variable(key):
            del env[key]
    if original is not None:
        env["LD_LIBRARY_PATH"] = original
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


def _command_outcome(exit_code: int, last_line: str | None) -> Outcome:
    """Exit 0 is success; the result is the last stdout line if it is JSON, else null."""
    if exit_code < 0:
        name = signal_name(-exit_code)
        return Outcome(
            signal=-exit_code,
            error=JobError("Killed", f"killed by signal {-exit_code} ({name})"),
        )
    if exit_code != 0:
        return Outcome(
            exit_code=exit_code,
            error=JobError("Exited", f"the command exited with code {exit_code}"),
        )
    result = None
    if last_line is not None:
        try:
            result = json.loads(last_line, parse_constant=_no_constant)
        except ValueError:
            result = None
    return Outcome(exit_code=0, result=result)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def has_artifacts(workdir: Path) -> bool:
    """Whether the attempt left anything in its output directory (cheap: one directory
    read, no hashing)."""
    try:
        with os.scandir(workdir / ARTIFACTS_DIR_NAME) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False


def list_artifacts(workdir: Path) -> tuple[Artifact, ...]:
    """The regular files an attempt left in its output directory (top level only;
    symlinks and directories are not artifacts), with size and sha256.  Blocking: call
    it in a worker thread."""
    directory = workdir / ARTIFACTS_DIR_NAME
    found: list[Artifact] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except FileNotFoundError:
        return ()
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        digest = hashlib.sha256()
        size = 0
        try:
            with open(entry.path, "rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError:
            continue
        found.append(Artifact(entry.name, size, digest.hexdigest()))
    return tuple(found)


def allowed_environment(environ: Mapping[str, str], patterns: Sequence[str]) -> dict[str, str]:
    """The variables a job inherits: those whose name matches one of ``patterns``
    (fnmatch, case-sensitive: "LC_*", "PYTHON*").  The server's own environment may hold
    secrets (cloud keys, database passwords); a job gets only what the config allows."""
    return {
        name: value
        for name, value in environ.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
