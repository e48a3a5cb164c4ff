"""The server's side of the fork server (forkserver.py): the socket protocol that asks it
for job processes and hears their exits, and the fork server's own life: started once
with the task modules imported, retired on SIGHUP, reaped when it dies.

A forked job is the fork server's child, so its exit status comes from the fork server,
which keeps the exited process unreaped until this side says it will not signal its group
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import jobserver.forkserver as forkserver
from jobserver.capture import ExitUsage, wait_for_exit
from jobserver.jobs import signal_name

log = logging.getLogger("jobserver")


class ForkClient:
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
        # Per job pid, until reaped: what the kernel counted for it (None: nobody knows).
        self._usages: dict[int, asyncio.Future[ExitUsage | None]] = {}
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

    def release(self, pid: int) -> asyncio.Future[ExitUsage | None]:
        """We will never signal ``pid``'s group again: the fork server may reap it.  The
        answer: what the kernel counted for the job process, once the fork server has
        reaped it (None if it cannot tell: it died, or this job was not its own)."""
        self._exits.pop(pid, None)
        self._abandoned.discard(pid)
        usage = self._usages.get(pid)
        if usage is None:
            usage = self._loop.create_future()
            usage.set_result(None)
        if self.alive:
            self._send({"op": forkserver.RELEASE, "pid": pid})
            self._close_if_idle()
        return usage

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
            self._usages[pid] = self._loop.create_future()
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
        elif op == forkserver.REAPED:
            reaped = self._usages.pop(int(message["pid"]), None)
            if reaped is not None and not reaped.done():
                usage = ExitUsage(int(message["max_rss"]), float(message["cpu_seconds"]))
                reaped.set_result(usage)

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
                forkserver.kill_group(pid)
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
        for usage in self._usages.values():  # never reaped by it now: no figures
            if not usage.done():
                usage.set_result(None)
        self._usages.clear()
        for started in self._starts.values():
            if not started.done():
                message = f"the fork server {why} before the job started"
                started.set_exception(OSError(errno.EPIPE, message))
        self._starts.clear()

    async def _bury(self, expected: bool) -> None:
        """Reap the fork server; then every job it still had ends with an error saying so."""
        status, _ = await wait_for_exit(self.pid, lambda: None)
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


def fits(request: dict[str, Any]) -> bool:
    """Whether a fork request fits in one datagram to the fork server."""
    return len(forkserver.encode(request)) < forkserver.MAX_MESSAGE - 1024


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
