"""The fork server: a warm process that forks one fresh job process per request.

Starting ``python -m jobserver.child`` costs an interpreter start and the imports, tens of
milliseconds of CPU per job.  The runner instead starts this module once (``python -m
jobserver.forkserver MODULE...``; in the single-file binary ``jobserver _forkserver
MODULE...``) in a session of its own, with stdin from /dev/null and the server's stdout
and stderr.  It imports ``jobserver.child`` and preloads the task modules named on its
command line (one that fails to import is reported on stderr and skipped: the job
imports it again and fails with the usual error), then serves the runner over a
``SOCK_SEQPACKET`` socket at fd ``SOCKET_FD``.  One datagram is one JSON message:

runner → fork server
    ``{"op": "start", "id": N, "spec": SPEC, "env": {...}, "progress_fd": 3,
    "result_fd": 4}`` (SPEC: the job's spec document, or the path of its file; env: the
    variables the job's environment adds to ours) with the job's output, progress and
    result pipes attached (``SCM_RIGHTS``);
    ``{"op": "release", "pid": P}``: the runner will never signal P's group again.
fork server → runner
    ``{"op": "ready", "preloaded": [...], "seconds": S}`` once, when the task modules are
    imported (until then the runner spawns jobs instead of waiting);
    ``{"op": "started", "id": N, "pid": P}`` or ``{"op": "failed", "id": N, "errno": E,
    "error": TEXT}``; ``{"op": "exited", "pid": P, "code": C}`` (C as
    ``os.waitstatus_to_exitcode`` gives it: negative for a signal);
    ``{"op": "reaped", "pid": P, "max_rss": BYTES, "cpu_seconds": S}`` once P is reaped
    (after its release): what the kernel counted for the job process and its reaped
    descendants (``wait4``), less the resident set it inherited from us at the fork.

Each forked process leaves the fork server's fds and session behind, takes the pipes as
its fds 1 and 2, the progress fd and the result fd, the job's environment and fresh stdio
objects, and then runs ``child.run_job`` like a spawned job process.  One such process is
forked ahead and waits for the next start request (the spare): it has left the fork
server already and, given ``--jobs-dir DIR`` before the modules, made the next job's
directory as ``DIR/.spare-PID``, which it renames to the job's.  When a job process
exits, the fork server kills what it left in its process group and reports the exit, but
keeps the zombie until the runner answers ``release``: until then the pid, and so the
group id, cannot be reused while the server may still signal that group.  The reap is
where the kernel's own figures for the job (peak resident set, CPU time) can be read:
the ``reaped`` message carries them.

The fork server asks for SIGKILL when the server dies, and every job it forks asks for
SIGKILL when the fork server dies.  When the runner closes the socket it kills the groups
of whatever still runs, reaps them and exits.

Stdlib only (and ``jobserver.child``): this is what every forked job process starts from.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import gc
import io
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

from jobserver import child

SOCKET_FD = 3  # where the runner puts the fork server's end of the socket
# The variable a dead server's leftover processes are found by, in /proc/PID/environ
# (runner.JOB_ID_ENV).  That file shows a process's original environment block, not
# os.environ: the runner starts the fork server with this placeholder value, which each
# job process overwrites in place with its own id (and what it forks inherits).
JOB_ID_ENV = "JOBSERVER_JOB_ID"
JOB_ID_ROOM = "-" * 64
MAX_MESSAGE = 128 * 1024  # bytes in one datagram; larger args go in the spec's file
READY, STARTED, FAILED, EXITED, REAPED = "ready", "started", "failed", "exited", "reaped"
SPARE = "spare"  # what the selector holds for the spare's pidfd
START, RELEASE = "start", "release"
# Signal dispositions the fork server changes for itself; each job process gets back what
# it had before.  A stray SIGINT would raise KeyboardInterrupt anywhere in the loop
# (between a fork and its reply), so the fork server ignores it.
_SIGNALS_CHANGED = (signal.SIGINT,)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(data)
    return message


def exit_code(info: os.waitid_result) -> int:
    """``os.waitid``'s answer as ``os.waitstatus_to_exitcode`` would give it."""
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


def main(argv: list[str] | None = None) -> None:
    modules = sys.argv[1:] if argv is None else argv
    jobs_dir = None
    if modules[:1] == ["--jobs-dir"]:
        jobs_dir, modules = modules[1], modules[2:]
    _open_standard_fds()
    child.frozen_setup()
    child.die_with_parent(child.server_pid())
    os.set_inheritable(SOCKET_FD, False)  # not into what a preloaded module may start
    job_id_at = _job_id_address()
    os.environ.pop(JOB_ID_ENV, None)  # the placeholder is no job's id
    began = time.monotonic()
    preloaded = preload(modules)
    # A job process then touches (and so copies) fewer of the pages it shares with us:
    # our garbage collector stays off, and each fork freezes what exists (CPython's
    # advice for fork without exec); the job's collector is on, as in any interpreter.
    gc.collect()
    gc.disable()
    server = ForkServer(socket.socket(fileno=SOCKET_FD), job_id_at, jobs_dir)
    server.send({"op": READY, "preloaded": preloaded, "seconds": time.monotonic() - began})
    server.serve()


def _open_standard_fds() -> None:
    """Make sure fds 0-2 are open (a server started with one closed): with them and the
    socket in place, received fds are never 0-3 and dup2 onto those cannot clobber one."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: ``fd``


def preload(modules: list[str]) -> list[str]:
    """Import the task modules once, here, so that no job imports them again; returns
    those that imported."""
    import importlib

    done = []
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except BaseException as exc:  # SystemExit too: a module's problem, not ours
            print(
                f"jobserver fork server: could not preload {name}: "
                f"{type(exc).__name__}: {exc}; its jobs will import it themselves",
                file=sys.stderr,
                flush=True,
            )
    return done


class ForkServer:
    def __init__(self, sock: socket.socket, job_id_at: int | None, jobs_dir: str | None) -> None:
        """``jobs_dir``: where each spare process makes the directory of its coming job
        ahead of time (None: the job makes its own)."""
        self._sock = sock
        self._jobs_dir = jobs_dir
        if jobs_dir is not None:
            _remove_spare_dirs(jobs_dir)  # left by a fork server that was killed
        self._pid = os.getpid()
        self._job_id_at = job_id_at
        self._selector = selectors.EpollSelector()  # Linux only, as pidfds are
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._pidfds: dict[int, int] = {}  # running child -> its pidfd
        self._unreleased: set[int] = set()  # exited, zombie kept until "release"
        self._released_early: set[int] = set()  # released while running: reap at exit
        # Per child: its resident set when it got its job, bytes.  A forked process's
        # ru_maxrss counts the pages it still shares with us; this much is taken off it.
        self._inherited: dict[int, int] = {}
        # A process forked ahead of the next start request, waiting for its job on a
        # socket of its own: a start then costs a send, not a fork (issue 6, dispatch).
        self._spare: _Spare | None = None
        self._spare_wanted = True  # False after a failed fork, until the next request
        self._saved_signals = {signum: signal.getsignal(signum) for signum in _SIGNALS_CHANGED}
        for signum in _SIGNALS_CHANGED:
            signal.signal(signum, signal.SIG_IGN)

    def serve(self) -> None:
        """Answer requests until the runner closes its end of the socket."""
        while True:
            if self._spare is None and self._spare_wanted:
                self._fork_spare()
            for key, _ in self._selector.select():
                if key.data is None:
                    if not self._request():
                        self._shut_down()
                        return
                elif key.data == SPARE:
                    self._drop_spare()  # it died waiting (killed by someone)
                else:
                    self._exited(key.data)

    def _request(self) -> bool:
        try:
            data, fds, _flags, _address = socket.recv_fds(self._sock, MAX_MESSAGE, 3)
        except ConnectionError:
            return False
        if not data:
            return False
        message = decode(data)
        if message["op"] == START:
            self._start(message, fds)
        elif message["op"] == RELEASE:
            self._release(int(message["pid"]))
        return True

    def _start(self, message: dict[str, Any], fds: list[int]) -> None:
        request = message["id"]
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self.send({"op": FAILED, "id": request, "errno": 0, "error": "pipes not received"})
            return
        self._spare_wanted = True
        try:
            pid, pidfd = self._hand_to_spare(message, fds) or self._fork(
                lambda: self._become(lambda: self._run(message, fds))
            )
        except OSError as exc:
            error = exc.strerror or str(exc)
            self.send({"op": FAILED, "id": request, "errno": exc.errno or 0, "error": error})
            return
        finally:
            for fd in fds:  # the job has its copies (a job process never gets here)
                os.close(fd)
        self._pidfds[pid] = pidfd
        self._selector.register(pidfd, selectors.EVENT_READ, pid)
        self.send({"op": STARTED, "id": request, "pid": pid})

    def _fork(self, become: Callable[[], NoReturn]) -> tuple[int, int]:
        """A new child that runs ``become``, and its pidfd."""
        # Nothing buffered here may be copied into the job's log.
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            become()
        # Read at once: the child has copied only page tables so far (a spare is read
        # again when it gets its job).
        self._inherited[pid] = _resident(pid)
        try:
            return pid, os.pidfd_open(pid)
        except OSError:
            # It cannot be watched, so it must not run (it is our child, unreaped).
            os.kill(pid, signal.SIGKILL)
            self._reap(pid)
            raise

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, pidfd = self._fork(lambda: self._become(lambda: self._wait_for_job(theirs, ours)))
        except OSError as exc:
            ours.close()
            self._spare_wanted = False
            print(f"jobserver fork server: no spare process: {exc}", file=sys.stderr, flush=True)
            return
        finally:
            theirs.close()
        self._spare = _Spare(pid, pidfd, ours)
        self._selector.register(pidfd, selectors.EVENT_READ, SPARE)

    def _hand_to_spare(self, message: dict[str, Any], fds: list[int]) -> tuple[int, int] | None:
        """The spare's pid and pidfd once it has the job; None if there is no spare."""
        spare = self._spare
        if spare is None:
            return None
        self._spare = None
        self._selector.unregister(spare.pidfd)
        self._inherited[spare.pid] = _resident(spare.pid)  # it waited: nothing is its own yet
        try:
            socket.send_fds(spare.sock, [encode(message)], fds)
        except OSError:  # it died: fork the job instead
            self._bury_spare(spare)
            return None
        spare.sock.close()
        return spare.pid, spare.pidfd

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            self._selector.unregister(spare.pidfd)
            self._bury_spare(spare)

    def _bury_spare(self, spare: _Spare) -> None:
        spare.sock.close()  # a spare still waiting sees the end of its socket and exits
        with contextlib.suppress(ProcessLookupError):
            os.kill(spare.pid, signal.SIGKILL)
        self._reap(spare.pid)
        os.close(spare.pidfd)
        if self._jobs_dir is not None:
            _remove_dir(_spare_dir(self._jobs_dir, spare.pid))

    def _exited(self, pid: int) -> None:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is None:
            return
        pidfd = self._pidfds.pop(pid)
        self._selector.unregister(pidfd)
        os.close(pidfd)
        # The leader is a zombie now, not yet reaped: anything it left in its group
        # (daemons, stray children) is killed before the group id can be recycled.
        kill_group(pid)
        if pid in self._released_early:
            self._released_early.discard(pid)
            self._reap_and_report(pid)
            return
        self._unreleased.add(pid)
        self.send({"op": EXITED, "pid": pid, "code": exit_code(info)})

    def _release(self, pid: int) -> None:
        if pid in self._unreleased:
            self._unreleased.discard(pid)
            self._reap_and_report(pid)
        elif pid in self._pidfds:
            self._released_early.add(pid)

    def _reap(self, pid: int) -> resource.struct_rusage:
        _, _, usage = os.wait4(pid, 0)
        self._inherited.pop(pid, None)
        return usage

    def _reap_and_report(self, pid: int) -> None:
        inherited = self._inherited.get(pid, 0)
        usage = self._reap(pid)
        self.send(
            {
                "op": REAPED,
                "pid": pid,
                "max_rss": max(0, usage.ru_maxrss * 1024 - inherited),
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        )

    def send(self, message: dict[str, Any]) -> None:
        # Failing, the runner is gone: the next read sees the end of the socket.
        with contextlib.suppress(OSError):
            self._sock.send(encode(message))

    def _shut_down(self) -> None:
        """The runner is done with us: nothing may outlive the fork server unwatched."""
        self._drop_spare()
        for pid in list(self._pidfds):
            kill_group(pid)
            os.kill(pid, signal.SIGKILL)
        for pid in [*self._pidfds, *self._unreleased]:
            os.waitpid(pid, 0)

    # -- in the forked job process --------------------------------------------------

    def _become(self, job: Callable[[], int]) -> NoReturn:
        """Leave the fork server, run ``job`` (it returns the exit code) and end as an
        interpreter would."""
        code = 1
        try:
            self._leave()
            code = job()
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
        _exit(code)

    def _wait_for_job(self, sock: socket.socket, ours: socket.socket) -> int:
        """As the spare: wait for a job (a start request and its pipes) and run it; exit
        when the fork server closes the socket instead."""
        ours.close()
        child.die_with_parent(self._pid)  # not left behind while it waits
        made = _make_spare_dir(self._jobs_dir)
        data, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE, 3)
        sock.close()
        if not data:  # the fork server is done with us (and removes ``made``)
            os._exit(0)
        return self._run(decode(data), fds, made)

    def _leave(self) -> None:
        """What every job process does first, whatever its job: leave our session, fds
        and signal dispositions."""
        os.setsid()
        fds = [self._sock.fileno(), self._selector.fileno(), *self._pidfds.values()]
        if self._spare is not None:
            fds += [self._spare.sock.fileno(), self._spare.pidfd]
        for fd in fds:
            os.close(fd)
        for signum, handler in self._saved_signals.items():
            signal.signal(signum, handler)
        gc.enable()

    def _run(self, message: dict[str, Any], fds: list[int], made: str | None = None) -> int:
        """Run the job of a start request with its pipes (and ``made``, a directory made
        for it ahead of time); its exit code."""
        _place(fds, [(1, 2), (int(message["progress_fd"]),), (int(message["result_fd"]),)])
        # Ours is every job's environment: only the job's own variables are set, as
        # every putenv touches memory shared with the fork server.
        os.environ.update(message["env"])
        if made is not None:
            _use_spare_dir(made, os.environ.get(child.OUTPUT_DIR_ENV))
        _show_job_id(self._job_id_at, os.environ.get(JOB_ID_ENV, ""))
        child.frozen_setup()
        _fresh_stdio()
        spec = message["spec"]  # the document itself, or the path of its file
        sys.argv = [child.__file__] + ([spec] if isinstance(spec, str) else [])
        return child.run_job(spec if isinstance(spec, dict) else child.read_spec(spec), self._pid)


class _Spare(NamedTuple):
    pid: int
    pidfd: int
    sock: socket.socket  # our end; the spare waits for its job on the other


SPARE_DIR_PREFIX = ".spare-"
SPARE_DIR_CHILD = "artifacts"  # runner.ARTIFACTS_DIR_NAME: the job's output directory


def _make_spare_dir(jobs_dir: str | None) -> str | None:
    """A job directory (with its output directory) under a spare's name, made while the
    spare waits: creating a directory costs ~0.35 ms of kernel CPU on some disks, and a
    rename ~0.02 ms (issue 6).  None if there is no ``jobs_dir`` or it failed."""
    if jobs_dir is None:
        return None
    path = _spare_dir(jobs_dir, os.getpid())
    try:
        os.makedirs(os.path.join(path, SPARE_DIR_CHILD))
    except OSError:
        _remove_dir(path)
        return None
    return path


def _spare_dir(jobs_dir: str, pid: int) -> str:
    return os.path.join(jobs_dir, f"{SPARE_DIR_PREFIX}{pid}")


def _use_spare_dir(made: str, output_dir: str | None) -> None:
    """Make ``made`` the directory of the job whose output directory is ``output_dir``,
    unless that exists already (a later attempt): then ``made`` is removed and the job
    makes what it lacks itself (child.run_job)."""
    target = os.path.dirname(output_dir) if output_dir else None
    if (
        target is not None
        and os.path.basename(output_dir or "") == SPARE_DIR_CHILD
        and os.path.dirname(target) == os.path.dirname(made)
    ):
        try:
            os.rename(made, target)  # fails if the job's directory holds anything
            return
        except OSError:
            pass
    _remove_dir(made)


def _remove_dir(path: str | None) -> None:
    """Remove a spare's directory and its empty output directory, if they are there."""
    if path is None:
        return
    for directory in (os.path.join(path, SPARE_DIR_CHILD), path):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _remove_spare_dirs(jobs_dir: str) -> None:
    with contextlib.suppress(OSError), os.scandir(jobs_dir) as entries:
        for entry in entries:
            if entry.name.startswith(SPARE_DIR_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _resident(pid: int) -> int:
    """``pid``'s resident set now, bytes (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid``, if it is still there and ours to kill (the caller
    knows the id is not recycled: the leader is unreaped, its start time was checked, or
    the pids come from a job-id tag scan)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _place(fds: list[int], targets: list[tuple[int, ...]]) -> None:
    """Put each received fd at its target numbers only.  One may sit on another's target,
    so all are first moved above the targets."""
    top = max(number for numbers in targets for number in numbers)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, top + 1) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, numbers in zip(moved, targets, strict=True):
        for number in numbers:
            os.dup2(fd, number)
        os.close(fd)


def _job_id_address() -> int | None:
    """Where the placeholder value of JOB_ID_ENV is in our original environment block
    (the same address in every process we fork); None if it is not there."""
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
    placeholder = f"{JOB_ID_ENV}={JOB_ID_ROOM}".encode()
    at = ctypes.string_at(start, end - start).find(placeholder)
    return None if at < 0 else start + at + len(JOB_ID_ENV) + 1


def _show_job_id(address: int | None, job_id: str) -> None:
    """Write ``job_id`` over the placeholder in our original environment block."""
    value = job_id.encode()
    if address is None or not value or len(value) >= len(JOB_ID_ROOM):
        return
    # The rest of the placeholder becomes an entry without "=", which readers skip.
    ctypes.memmove(address, value + b"\0", len(value) + 1)


def _fresh_stdio() -> None:
    """sys.stdout and sys.stderr over the job's fds 1 and 2, unbuffered as
    PYTHONUNBUFFERED=1 makes them in a spawned job process.  Ours already are (the fork
    server runs with a job's environment) unless a preloaded module replaced them: then
    new ones are made (which touches, and so copies, pages shared with us)."""
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        if _unbuffered_over(old, 1 if name == "stdout" else 2):
            continue
        stream = io.TextIOWrapper(
            io.FileIO(1 if name == "stdout" else 2, "w", closefd=False),
            encoding=getattr(old, "encoding", None) or "utf-8",
            errors=getattr(old, "errors", None) or "backslashreplace",
            write_through=True,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _unbuffered_over(stream: Any, fd: int) -> bool:
    """Whether ``stream`` is the interpreter's own unbuffered text stream over ``fd``."""
    return (
        type(stream) is io.TextIOWrapper
        and stream.write_through
        and type(stream.buffer) is io.FileIO
        and stream.buffer.fileno() == fd
    )


def _exit(code: int) -> NoReturn:
    """End like an interpreter that ran the job as its main program: join the non-daemon
    threads, run the atexit handlers, flush stdio; then ``os._exit``, skipping the module
    teardown that a full finalisation does (measured: ~12 ms of CPU per job, as it
    touches, and so copies, every page shared with the fork server; ~1 ms this way).
    ``-SIGINT``: die of SIGINT, as CPython does after an uncaught KeyboardInterrupt."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        child.libc().fflush(None)  # C-level stdio, which exit() would flush
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
        code = code or 1
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code if code >= 0 else 1)


if __name__ == "__main__":
    main()
