"""Start one job's process, wait for it, signal its whole tree.

Each attempt is a fresh process in a session (and process group) of its own, so one
``killpg`` reaches everything the task started, grandchildren included.  Its stdout and
stderr go to pipes that the server drains (``loop.add_reader``) into the job's log file,
so the per-job log cap holds while the job writes; a command task's stdout is also read
line by line for progress reports and its result.  A Python task also gets a progress
pipe (``reporting``).  The runner never touches the database and never decides which job
runs; callers get a ``ProcessHandle`` and, at the end, an ``Outcome``, whatever way the
process was started.

A Python task run by the server's own interpreter is forked by the fork server
(forkserver.py, started once, with the task modules imported) instead of spawned as
``python -m jobserver.child``: same process layout, without an interpreter start per job.
The job is then the fork server's child, so its exit status comes from the fork server,
which keeps the exited process unreaped until this side says it will not signal its group
again.  Commands, tasks with their own ``python`` and ``fork_server = false`` spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import jobserver.forkserver as forkserver
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
RESULT_SLACK = 1 << 20  # bytes of result pipe kept beyond max_result_size (see _result_limit)
MAX_LINE = 64 * 1024  # a command's stdout line longer than this is not parsed


class _Log:
    """The job's log file, written by the server with a size cap: once the cap is hit, one
    line says so and further output is read (so the job never blocks) and discarded.

    The file (and the job's directory) is created at the attempt's first output, headed by
    ``header``: an attempt that prints nothing creates nothing (each file created costs
    ~0.4 ms of kernel CPU on some disks, more than the rest of a short job's start)."""

    def __init__(self, path: Path, limit: int | None, header: bytes) -> None:
        self._path = path
        self._limit = limit
        self._header = header
        self._file: BinaryIO | None = None
        self._written = 0
        self.truncated = False

    def write(self, data: bytes) -> None:
        if self.truncated or not data:
            return
        file = self._file
        if file is None:
            file = self._file = self._open()
            if file is None or self.truncated:
                return
            data = self._header + data
        if self._limit is not None and self._written + len(data) > self._limit:
            file.write(data[: max(0, self._limit - self._written)])
            file.write(
                f"\n--- log truncated: max_log_size ({self._limit} bytes) reached; "
                "further output discarded\n".encode()
            )
            self.truncated = True
            return
        file.write(data)
        self._written += len(data)

    def _open(self) -> BinaryIO | None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            file = self._path.open("ab", buffering=0)
        except OSError as exc:
            log.warning("cannot write the job log %s: %s; its output is discarded", self._path, exc)
            self.truncated = True
            return None
        self._written = file.tell()
        self.truncated = self._limit is not None and self._written >= self._limit
        return file

    def close(self) -> None:
        if self._file is not None:
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

    def __init__(self, pid: int, forked_by: _ForkServer | None = None) -> None:
        self.pid = pid
        self._result: bytearray | None = bytearray()  # None: more than _result_limit came
        self._result_limit: int | None = None
        self._reaped = False
        self._forked_by = forked_by  # None: our own child, spawned
        self.progress: tuple[float | None, str] | None = None
        self.progress_seq = 0
        self._pipes: list[_Pipe] = []
        self._log: _Log | None = None
        self._command = False
        self._last_stdout_line: str | None = None

    def watch(self, log: _Log, output: int, progress: int, result: int, limit: int | None) -> None:
        """Read a Python job's pipes (read ends) from now on: output into ``log``,
        progress reports, and up to ``limit`` bytes of result."""
        self._log = log
        self._result_limit = limit
        self._pipes = [
            _Pipe(output, log.write),
            _Pipe(progress, None, self._report),
            _Pipe(result, self._take_result),
        ]

    def watch_command(self, log: _Log, stdout: int, stderr: int) -> None:
        """Read a program's stdout and stderr (read ends) into ``log``; its last stdout
        line is its result, and stdout lines may report progress."""
        self._log = log
        self._command = True
        self._pipes = [_Pipe(stdout, log.write, self._stdout_line), _Pipe(stderr, log.write)]

    def _take_result(self, data: bytes) -> None:
        if self._result is None:
            return
        self._result += data
        if self._result_limit is not None and len(self._result) > self._result_limit:
            self._result = None

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
        if self._forked_by is not None:
            self._forked_by.signal_group(self.pid, signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def wait(self) -> Outcome:
        try:
            if self._forked_by is None:
                exit_code = os.waitstatus_to_exitcode(await _wait_for_exit(self.pid, self._on_exit))
            else:
                # The fork server killed what the job left in its group, as _on_exit does.
                answer = await self._forked_by.exit_code(self.pid)
        finally:
            self._reaped = True
            if self._forked_by is not None:
                self._forked_by.release(self.pid)
            # Whatever is left in the pipes was written before the exit: read it, then
            # close (a grandchild that escaped the group must not hold the log open).
            for pipe in self._pipes:
                pipe.read()
                pipe.close()
            if self._log is not None:
                self._log.close()
        if self._forked_by is not None:
            if isinstance(answer, str):
                return Outcome(error=JobError("Killed", answer))
            exit_code = answer
        if self._command:
            return _command_outcome(exit_code, self._last_stdout_line)
        return _outcome(exit_code, self._result)

    def _on_exit(self) -> None:
        # The leader is a zombie now, not yet reaped: anything it left in its group
        # (daemons, stray children) is killed before the group id can be recycled.
        self.signal_tree(signal.SIGKILL)


class _ForkServer:
    """Our end of one fork server (forkserver.py): asks it for job processes and hears
    their exits.  Use it from the event-loop thread, which also spawns it (the fork
    server's parent-death signal is tied to the spawning thread)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], reply_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._reply_timeout = reply_timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = theirs.fileno()
        if fd == forkserver.SOCKET_FD:
            # dup2 onto itself would keep close-on-exec: move it out of the way first.
            fd = os.dup(fd)
        file_actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, fd, forkserver.SOCKET_FD),
        ]
        try:
            self.pid = os.posix_spawn(argv[0], argv, env, file_actions=file_actions, setsid=True)
        except BaseException:
            ours.close()
            raise
        finally:
            if fd != theirs.fileno():
                os.close(fd)
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.alive = True  # False once it died or was closed: no more requests
        # True once it has imported the task modules: until then jobs are spawned, so that
        # a slow (or hanging) import in a task module never holds the scheduler up.
        self.ready = False
        self._became_ready = asyncio.Event()
        self._retired = False  # True: no more requests; closed once its jobs are released
        self._requests = 0
        self._starts: dict[int, asyncio.Future[int]] = {}
        # Per job pid, until released: its exit code, or (str) why it will never come.
        self._exits: dict[int, asyncio.Future[int | str]] = {}
        self._abandoned: set[int] = set()  # started for a start() that was cancelled
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self._why = ""  # "died" or "was stopped", once not alive
        self._buried: asyncio.Task[None] | None = None  # reaps it, once not alive
        self._closing: asyncio.Task[None] | None = None  # close() once retired and idle
        self._loop.add_reader(ours.fileno(), self._read)

    async def fork(self, message: dict[str, Any], fds: list[int]) -> int:
        """The pid of a new job process.  ``fds`` (its output and progress pipes) are
        ours from now on and closed once sent.  OSError if it could not be started."""
        if not self.alive:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPIPE, "the fork server is gone")
        self._requests += 1
        started: asyncio.Future[int] = self._loop.create_future()
        self._starts[self._requests] = started
        self._send({**message, "op": forkserver.START, "id": self._requests}, fds)
        try:
            # Cancelled, it stays done: _answer then kills the job nobody waits for.
            async with asyncio.timeout(self._reply_timeout):
                return await started
        except TimeoutError:
            # A fork takes milliseconds: this one is stuck (stopped?).  Our child,
            # unreaped: killing it is safe; its jobs die with it, and the next start
            # launches a new one.
            os.kill(self.pid, signal.SIGKILL)
            raise OSError(
                errno.ETIMEDOUT,
                f"the fork server (pid {self.pid}) did not answer in "
                f"{self._reply_timeout:g} s; it was killed",
            ) from None

    async def wait_ready(self) -> None:
        await self._became_ready.wait()

    @property
    def gone(self) -> bool:
        """Closed or dead, and reaped."""
        return self._buried is not None and self._buried.done()

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is one of its job processes, not yet reaped: only then may its
        group be signalled (the id cannot have been recycled)."""
        return self.alive and pid in self._exits

    def signal_group(self, pid: int, signum: int) -> None:
        if not self.holds(pid):
            return
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            # Not yet its own group leader (setsid is its first step after the fork): it
            # has started nothing yet, so the process alone is the whole tree.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def exit_code(self, pid: int) -> int | str:
        return await self._exits[pid]

    def release(self, pid: int) -> None:
        """We will never signal ``pid``'s group again: the fork server may reap it."""
        self._exits.pop(pid, None)
        self._abandoned.discard(pid)
        if self.alive:
            self._send({"op": forkserver.RELEASE, "pid": pid})
            self._close_if_idle()

    def retire(self) -> None:
        """Start no more jobs here; close once the running ones are released (SIGHUP)."""
        self._retired = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._retired and self.alive and not self._exits and not self._starts:
            self._closing = self._loop.create_task(self.close())

    async def close(self, timeout: float = 10) -> None:
        """Close the socket: the fork server kills what still runs, reaps it and exits."""
        if self.alive:
            self._disconnect("was stopped")
            self._buried = self._loop.create_task(self._bury(expected=True))
        if self._buried is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._buried), timeout)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)  # our child, not yet reaped
                await self._buried

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        self._outbox.append((forkserver.encode(message), list(fds)))
        self._flush()

    def _flush(self) -> None:
        while self._outbox and self.alive:
            data, fds = self._outbox[0]
            try:
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._sock.send(data)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(self._sock.fileno(), self._flush)
                    self._writing = True
                return
            except OSError:
                self._died()
                return
            self._outbox.popleft()
            for fd in fds:
                os.close(fd)
        if self._writing and not self._outbox:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False

    def _read(self) -> None:
        while self.alive:
            try:
                data = self._sock.recv(forkserver.MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died()
                return
            self._answer(forkserver.decode(data))

    def _answer(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == forkserver.READY:
            self.ready = True
            self._became_ready.set()
            log.info(
                "fork server (pid %d) ready: imported %d task module(s) in %.2f s",
                self.pid,
                len(message["preloaded"]),
                message["seconds"],
            )
        elif op == forkserver.STARTED:
            pid = int(message["pid"])
            started = self._starts.pop(message["id"])
            self._exits[pid] = self._loop.create_future()
            if started.done():  # its start() was cancelled: nobody will wait for it
                self._abandoned.add(pid)
                self.signal_group(pid, signal.SIGKILL)
            else:
                started.set_result(pid)
        elif op == forkserver.FAILED:
            started = self._starts.pop(message["id"])
            if not started.done():
                started.set_exception(OSError(message["errno"] or None, message["error"]))
        elif op == forkserver.EXITED:
            pid = int(message["pid"])
            exited = self._exits.get(pid)
            if exited is not None and not exited.done():
                exited.set_result(int(message["code"]))
            if pid in self._abandoned:
                self.release(pid)

    def _died(self) -> None:
        """The socket ended without our asking: the fork server died, and its jobs with it
        (their parent-death signal).  What they left in their groups is killed now (the
        fork server did it for those whose exit it reported): a group id stays taken
        while anything is in the group, so it can only have been recycled if the group
        emptied and the pid numbers wrapped around since, in the instant since the fork
        server died."""
        if not self.alive:
            return
        for pid, exited in self._exits.items():
            if not exited.done():
                kill_group(pid)
        self._disconnect("died")
        # It may only have closed the socket: make sure it is gone (our child, unreaped).
        os.kill(self.pid, signal.SIGKILL)
        self._buried = self._loop.create_task(self._bury(expected=False))

    def _disconnect(self, why: str) -> None:
        self.alive = False
        self.ready = False
        self._why = why
        self._loop.remove_reader(self._sock.fileno())
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False
        for _data, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()
        self._sock.close()
        for started in self._starts.values():
            if not started.done():
                message = f"the fork server {why} before the job started"
                started.set_exception(OSError(errno.EPIPE, message))
        self._starts.clear()

    async def _bury(self, expected: bool) -> None:
        """Reap the fork server; then every job it still had ends with an error saying so."""
        status = await _wait_for_exit(self.pid, lambda: None)
        how = _describe_exit(os.waitstatus_to_exitcode(status))
        waiting = [exited for exited in self._exits.values() if not exited.done()]
        for exited in waiting:
            exited.set_result(
                f"the fork server (pid {self.pid}) {self._why} while the job ran ({how}); "
                "the job's processes were killed with it"
            )
        if not expected:
            log.error(
                "the fork server (pid %d) died (%s); %d running job(s) failed with it; "
                "the next job starts a new one",
                self.pid,
                how,
                len(waiting),
            )


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code} ({signal_name(-code)})"
    return f"exit code {code}"


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
        self._fork_server: _ForkServer | None = None
        self._old_fork_servers: list[_ForkServer] = []  # retired or dead, not yet closed

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

    def _current_fork_server(self) -> _ForkServer:
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
            server = _ForkServer(argv, env, self._fork_reply_timeout)
            self._fork_server = server
        return server

    async def start(self, spec: LaunchSpec) -> ProcessHandle:
        """Start the attempt; call from the event-loop thread (the parent-death signal is
        tied to the thread that spawned the child, and the pipes are read by its loop).
        Other coroutines run while the fork server forks."""
        # Creating files costs ~0.4 ms of kernel time each on this kind of disk (issue 6),
        # so a forked job's start creates none here: its spec travels in the request, its
        # outcome comes back on a pipe, it makes its own output directory (child.run_job)
        # and its log is created at its first output (_Log).
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
                if not _fits(request):  # large args: the fork server reads them from a file
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
        handle = ProcessHandle(pid)
        if spec.command is None:
            output, progress, result = reads
            handle.watch(job_log, output, progress, result, self._result_limit())
        else:
            out_read, err_read = reads
            handle.watch_command(job_log, out_read, err_read)
        return handle

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
        handle = ProcessHandle(pid, forked_by=server)
        (output, _), (progress, _), (result, _) = pipes
        handle.watch(job_log, output, progress, result, self._result_limit())
        return handle

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


def _fits(request: dict[str, Any]) -> bool:
    """Whether a fork request fits in one datagram to the fork server."""
    return len(forkserver.encode(request)) < forkserver.MAX_MESSAGE - 1024


def _frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def forkserver_command() -> list[str]:
    """How to run the fork server under the server's own Python (see ``child_command``)."""
    if _frozen():
        return [sys.executable, "_forkserver"]
    return [sys.executable, "-m", "jobserver.forkserver"]


@cache
def fork_server_supported() -> bool:
    """The fork server watches its children through pidfds (Linux 5.3+)."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


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


def _start_log(spec: LaunchSpec) -> _Log:
    header = f"--- attempt {spec.attempt} started {format_timestamp(utcnow())}\n"
    return _Log(spec.workdir / LOG_NAME, spec.log_limit, header.encode())


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


def _outcome(exit_code: int, result: bytearray | None) -> Outcome:
    """A Python job's outcome from its exit code and what its result pipe brought (None:
    more than a result can be)."""
    try:
        document = json.loads(result) if result else None
    except ValueError:
        document = None
    if exit_code < 0:
        name = signal_name(-exit_code)
        return Outcome(
            signal=-exit_code,
            error=JobError("Killed", f"killed by signal {-exit_code} ({name})"),
        )
    if result is None:
        return Outcome(
            exit_code=exit_code,
            error=JobError(
                "ResultTooLarge",
                "the process wrote more to its result pipe than max_result_size allows",
            ),
        )
    if not isinstance(document, dict):
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
