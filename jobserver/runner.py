"""Start one job's process, wait for it, signal its whole tree.

Each attempt is a fresh process in a session (and process group) of its own, so one
``killpg`` reaches everything the task started, grandchildren included.  Its stdout and
stderr go to pipes that the server drains into the job's log file (capture.py), so the
per-job log cap holds while the job writes; a command task's stdout is also read line by
line for progress reports and its result.  A Python task also gets a progress pipe
(``reporting``) and a result pipe.  The runner never touches the database and never
decides which job runs; callers get a ``ProcessHandle`` and, at the end, an ``Outcome``,
whatever way the process was started.

A Python task run by the server's own interpreter is forked by the fork server
(forkclient.py) instead of spawned as ``python -m jobserver.child``.  Commands, tasks with
their own ``python`` and ``fork_server = false`` spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jobserver.forkserver as forkserver
from jobserver.capture import Capture, JobLog, wait_for_exit
from jobserver.capture import ExitUsage as ExitUsage  # the scheduler reads handle.usage
from jobserver.errors import ConfigError
from jobserver.forkclient import ForkClient, fits, fork_server_supported
from jobserver.jobs import (
    ARTIFACTS_DIR_NAME,
    JOB_LOG_NAME,
    Artifact,
    JobError,
    Outcome,
    format_timestamp,
    utcnow,
)
from jobserver.reporting import FD_ENV, OUTPUT_DIR_ENV

log = logging.getLogger("jobserver")

LOG_NAME = JOB_LOG_NAME
SPEC_NAME = "spec.json"
CHILD_NAME = "child.py"  # a copy of jobserver/child.py, for tasks with their own interpreter
# Every process of a job inherits this variable: a dead server's leftovers are found by it.
JOB_ID_ENV = forkserver.JOB_ID_ENV
SERVER_PID_ENV = "JOBSERVER_SERVER_PID"  # child.SERVER_PID_ENV
CGROUP_ENV = "JOBSERVER_CGROUP_PROCS"  # child.CGROUP_ENV


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
# The child's end of the result pipe (the spec's ``result_fd``): child.py writes the outcome
# there.  A pipe, not a file: creating a file costs ~0.4 ms of kernel CPU on some disks.
RESULT_FD = 4
REAP_TIMEOUT = 5.0  # seconds a forked job's outcome waits for its kernel figures
RESULT_SLACK = 1 << 20  # bytes of result pipe kept beyond max_result_size (see _result_limit)


class ProcessHandle:
    """One running attempt.  ``wait`` reaps it; until then its pid (and so its process
    group id) cannot be reused, which makes ``signal_tree`` safe.  Its pipes are read
    by ``capture``.  After ``wait``, ``usage`` holds what the kernel counted for the job
    process and its reaped descendants (None if the fork server could not tell)."""

    def __init__(
        self,
        pid: int,
        capture: Capture,
        forked_by: ForkClient | None = None,
        spawner_peak: int = 0,
    ) -> None:
        self.pid = pid
        # posix_spawn runs the child in our memory until its exec (vfork), and the kernel
        # counts our resident set as the child's peak then: a reaped ru_maxrss not above
        # our own peak at the spawn may be ours, not the job's.
        self._spawner_peak = spawner_peak
        self.capture = capture
        self._reaped = False
        self._forked_by = forked_by  # None: our own child, spawned
        self.usage: ExitUsage | None = None

    @property
    def progress(self) -> tuple[float | None, str] | None:
        """The latest report (fraction, message); ``progress_seq`` counts them."""
        return self.capture.progress

    @property
    def progress_seq(self) -> int:
        return self.capture.progress_seq

    def signal_tree(self, signum: int) -> None:
        if self._reaped:
            return
        if self._forked_by is not None:
            self._forked_by.signal_group(self.pid, signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def wait(self) -> Outcome:
        reaped: asyncio.Future[ExitUsage | None] | None = None
        try:
            if self._forked_by is None:
                status, usage = await wait_for_exit(self.pid, self._on_exit)
                exit_code = os.waitstatus_to_exitcode(status)
                if usage.max_rss <= self._spawner_peak:
                    usage = ExitUsage(0, usage.cpu_seconds)  # unknown, see __init__
                self.usage = usage
            else:
                # The fork server killed what the job left in its group, as _on_exit does.
                answer = await self._forked_by.exit_code(self.pid)
        finally:
            self._reaped = True
            if self._forked_by is not None:
                reaped = self._forked_by.release(self.pid)
            self.capture.close()
        if reaped is not None:
            # The fork server answers a release at once (it has just reported the exit);
            # without an answer the job's figures are the sampled ones.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAP_TIMEOUT):
                    self.usage = await reaped
        if self._forked_by is not None:
            if isinstance(answer, str):
                return Outcome(error=JobError("Killed", answer))
            exit_code = answer
        return self.capture.outcome(exit_code)

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
        *,
        fork_server: bool = False,
        preload: Sequence[str] = (),
        fork_reply_timeout: float = 30.0,
        jobs_dir: Path | None = None,
    ) -> None:
        """``fork_server``: fork Python tasks of our own interpreter from a fork server that
        has imported the modules in ``preload``, instead of spawning each one.  A ready
        fork server that does not answer a start in ``fork_reply_timeout`` seconds (a fork
        takes milliseconds) is killed and the start fails.  ``jobs_dir``: the directory
        that holds the jobs' directories (each job's ``workdir``), where the fork server
        makes the next job's directory ahead of time (not with ``run_as``: the job's user
        owns its directory)."""
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
        self._forking = fork_server and fork_server_supported()
        if fork_server and not self._forking:
            log.warning(
                "server.fork_server is on, but this system has no pidfds (Linux 5.3+): "
                "every job process is spawned"
            )
        self._preload = list(dict.fromkeys(preload))
        self._jobs_dir = jobs_dir if self._owner is None else None
        self._fork_reply_timeout = fork_reply_timeout
        self._fork_server: ForkClient | None = None
        self._old_fork_servers: list[ForkClient] = []  # retired or dead, not yet closed

    def open(self) -> None:
        """Start the fork server now, so the first job does not wait for its imports (call
        from the event-loop thread; otherwise the first start does it)."""
        if not self._forking:
            return
        try:
            self._current_fork_server()
        except OSError as exc:
            log.error("could not start the fork server: %s; the next job tries again", exc)

    def restart_fork_server(self) -> None:
        """A new fork server for the next jobs, importing the task modules afresh (SIGHUP);
        the old one stays until its running jobs have ended."""
        if self._fork_server is not None:
            self._fork_server.retire()
            self._old_fork_servers.append(self._fork_server)
            self._fork_server = None
            self.open()

    async def close(self) -> None:
        """Stop the fork servers (after the scheduler has stopped: no job runs any more)."""
        servers = [*self._old_fork_servers, *filter(None, [self._fork_server])]
        self._fork_server, self._old_fork_servers = None, []
        await asyncio.gather(*(server.close() for server in servers))

    async def fork_server_ready(self, timeout: float = 60) -> bool:
        """Wait until a fork server has imported the task modules (starting one if none
        runs); False if fork_server is off or it was not ready in ``timeout`` seconds."""
        if not self._forking:
            return False
        server = self._current_fork_server()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await server.wait_ready()
        return server.ready

    def fork_server_state(self) -> dict[str, Any] | None:
        """For the system view: None when jobs are always spawned."""
        if not self._forking:
            return None
        server = self._fork_server
        alive = server is not None and server.alive
        return {
            "pid": server.pid if server is not None and alive else None,
            "ready": server is not None and server.ready,
        }

    def _current_fork_server(self) -> ForkClient:
        server = self._fork_server
        if server is None or not server.alive:
            self._old_fork_servers = [old for old in self._old_fork_servers if not old.gone]
            if server is not None:
                self._old_fork_servers.append(server)  # dead: close() awaits its reaping
            env = {**self._job_environment(), JOB_ID_ENV: forkserver.JOB_ID_ROOM}
            argv = [*forkserver_command()]
            if self._jobs_dir is not None:
                argv += ["--jobs-dir", str(self._jobs_dir)]
            argv += self._preload
            server = ForkClient(argv, env, self._fork_reply_timeout)
            self._fork_server = server
        return server

    async def start(self, spec: LaunchSpec) -> ProcessHandle:
        """Start the attempt; call from the event-loop thread (the parent-death signal is
        tied to the thread that spawned the child, and the pipes are read by its loop).
        Other coroutines run while the fork server forks."""
        # Creating files costs ~0.4 ms of kernel time each on this kind of disk (issue 6),
        # so a forked job's start creates none here: its spec travels in the request, its
        # outcome comes back on a pipe, it makes its own output directory (child.run_job)
        # and its log is created at its first output (JobLog).
        if self._owner is not None:
            # Made for the job's user, who creates its output directory in it.
            self._make_workdir(spec)
        own = self._own_environment(spec)
        if spec.command is None:
            document = {
                "function": spec.function,
                "args": spec.args,
                "result_fd": RESULT_FD,
                "run_as": self._child.run_as,
                "rlimits": dict(self._child.rlimits),
                "max_result_size": self._child.max_result_size,
            }
            spec_path = spec.workdir / SPEC_NAME
            if spec.python is None and self._forking and self._current_fork_server().ready:
                request: dict[str, Any] = {
                    "spec": document,
                    "env": own,
                    "progress_fd": PROGRESS_FD,
                    "result_fd": RESULT_FD,
                }
                if not fits(request):  # large args: the fork server reads them from a file
                    self._make_workdir(spec)
                    spec_path.write_text(json.dumps(document))
                    request["spec"] = str(spec_path)
                return await self._fork(spec, request)
            self._make_workdir(spec)
            spec_path.write_text(json.dumps(document))
            env = {**self._job_environment(), **own}
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
            # A program cannot make its output directory itself.
            self._make_workdir(spec)
            (spec.workdir / ARTIFACTS_DIR_NAME).mkdir(exist_ok=True)
            if self._owner is not None:
                os.chown(spec.workdir / ARTIFACTS_DIR_NAME, *self._owner)
            # A program of the machine's: not the single-file binary's bundled libraries.
            env = host_environment({**self._job_environment(), **own})
            found = shutil.which(spec.command[0])
            if found is None:
                raise FileNotFoundError(f"program {spec.command[0]!r} not found on PATH")
            argv = [*self._command_wrappers(), found, *spec.command[1:]]
            program = argv[0]
        job_log = _start_log(spec)
        # Pipes are created close-on-exec; dup2 into the child's fds clears the flag on
        # those copies only, so nothing else leaks into the job.  A Python job gets stdout
        # and stderr on one pipe, then progress and result pipes; a program gets two.
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3 if spec.command is None else 2)]
        reads = [read for read, _ in pipes]
        writes = [_above_child_fds(write) for _, write in pipes]
        targets = [(1, 2), (PROGRESS_FD,), (RESULT_FD,)] if spec.command is None else [(1,), (2,)]
        file_actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        for write, numbers in zip(writes, targets, strict=True):
            file_actions += [(os.POSIX_SPAWN_DUP2, write, number) for number in numbers]
        spawner_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            pid = os.posix_spawn(program, argv, env, file_actions=file_actions, setsid=True)
        except BaseException:
            for fd in reads + writes:
                os.close(fd)
            job_log.close()
            raise
        for fd in writes:  # the server keeps only the read ends
            os.close(fd)
        if spec.command is not None and spec.cgroup_procs is not None:
            # A program cannot join a cgroup itself (child.py does it for Python tasks):
            # move it in now; only what it starts in its first instant could escape.
            try:
                spec.cgroup_procs.write_text(str(pid))
            except OSError as exc:
                job_log.write(f"--- could not put the job in its cgroup: {exc}\n".encode())
        capture = Capture()
        if spec.command is None:
            output, progress, result = reads
            capture.watch(job_log, output, progress, result, self._result_limit())
        else:
            out_read, err_read = reads
            capture.watch_command(job_log, out_read, err_read)
        return ProcessHandle(pid, capture, spawner_peak=spawner_peak)

    async def _fork(self, spec: LaunchSpec, request: dict[str, Any]) -> ProcessHandle:
        server = self._current_fork_server()
        job_log = _start_log(spec)
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # output, progress, result
        try:
            # The write ends go to the fork server, which passes them to the job.
            pid = await server.fork(request, [write for _, write in pipes])
        except BaseException:
            for read, _ in pipes:
                os.close(read)
            job_log.close()
            raise
        capture = Capture()
        (output, _), (progress, _), (result, _) = pipes
        capture.watch(job_log, output, progress, result, self._result_limit())
        return ProcessHandle(pid, capture, forked_by=server)

    def _result_limit(self) -> int | None:
        """Bytes of result pipe kept: a document within max_result_size, with room for an
        error's traceback; more is no document the child sends."""
        limit = self._child.max_result_size
        return None if limit is None else limit + RESULT_SLACK

    def _make_workdir(self, spec: LaunchSpec) -> None:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            os.chown(spec.workdir, *self._owner)

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

    def _job_environment(self) -> dict[str, str]:
        """What every job's environment holds, and nothing about one job: the fork server
        runs with it (plus room for each job's id, see forkserver.JOB_ID_ENV), so that its
        interpreter starts as a job's would."""
        # The binary's own loader variables always pass the env_allow filter: the child
        # reuses this process's unpacked files through them (host_environment drops them
        # again for other interpreters and programs).
        env = {**loader_environment(os.environ), **self._environment}
        inherited = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(self._python_path + ([inherited] if inherited else []))
        env["PYTHONUNBUFFERED"] = "1"
        env[SERVER_PID_ENV] = str(os.getpid())
        for name in (JOB_ID_ENV, "JOBSERVER_ATTEMPT", OUTPUT_DIR_ENV, FD_ENV, CGROUP_ENV):
            env.pop(name, None)
        return env

    def _own_environment(self, spec: LaunchSpec) -> dict[str, str]:
        """What one job's environment adds to ``_job_environment()``: all a forked job
        process changes in the environment it inherits from the fork server."""
        env = {
            JOB_ID_ENV: spec.job_id,
            "JOBSERVER_ATTEMPT": str(spec.attempt),
            OUTPUT_DIR_ENV: str(spec.workdir / ARTIFACTS_DIR_NAME),
            **spec.environment,
        }
        if spec.cgroup_procs is not None:
            env[CGROUP_ENV] = str(spec.cgroup_procs)
        if spec.command is None:
            env[FD_ENV] = str(PROGRESS_FD)
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


def forkserver_command() -> list[str]:
    """How to run the fork server under the server's own Python (see ``child_command``)."""
    if _frozen():
        return [sys.executable, "_forkserver"]
    return [sys.executable, "-m", "jobserver.forkserver"]


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


def _start_log(spec: LaunchSpec) -> JobLog:
    header = f"--- attempt {spec.attempt} started {format_timestamp(utcnow())}\n"
    return JobLog(spec.workdir / LOG_NAME, spec.log_limit, header.encode())


def _above_child_fds(fd: int) -> int:
    """``fd``, moved above the numbers a spawned job's fds are put at (0 to RESULT_FD) if it
    is one of them: a dup2 onto itself would keep close-on-exec, and a dup2 onto it (for
    another pipe) would close it before its own dup2."""
    if fd > RESULT_FD:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, RESULT_FD + 1)
    os.close(fd)
    return moved


kill_group = forkserver.kill_group  # for the start-up rescuer, in the layer above


def kill_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


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
