"""What a job's process gives back, read on the event loop without a thread per job: its
output (into the job's log, with a size cap), its progress reports, its result, and its
exit status (a pidfd).  The outcome of an attempt is built here from what was read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from jobserver.jobs import JobError, Outcome, signal_name
from jobserver.reporting import parse_line

log = logging.getLogger("jobserver")

MAX_LINE = 64 * 1024  # a command's stdout line longer than this is not parsed


class JobLog:
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


class Pipe:
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


class Capture:
    """What one attempt's pipes bring: output into the job's log, progress reports, and
    its result (a Python job's result pipe, or a program's last stdout line).

    ``progress`` is the latest report (fraction, message) and ``progress_seq`` counts
    reports, so the scheduler can tell a new one from the one it stored."""

    def __init__(self) -> None:
        self._result: bytearray | None = bytearray()  # None: more than _result_limit came
        self._result_limit: int | None = None
        self.progress: tuple[float | None, str] | None = None
        self.progress_seq = 0
        self._pipes: list[Pipe] = []
        self._log: JobLog | None = None
        self._command = False
        self._last_stdout_line: str | None = None

    def watch(
        self, log: JobLog, output: int, progress: int, result: int, limit: int | None
    ) -> None:
        """Read a Python job's pipes (read ends) from now on: output into ``log``,
        progress reports, and up to ``limit`` bytes of result."""
        self._log = log
        self._result_limit = limit
        self._pipes = [
            Pipe(output, log.write),
            Pipe(progress, None, self._report),
            Pipe(result, self._take_result),
        ]

    def watch_command(self, log: JobLog, stdout: int, stderr: int) -> None:
        """Read a program's stdout and stderr (read ends) into ``log``; its last stdout
        line is its result, and stdout lines may report progress."""
        self._log = log
        self._command = True
        self._pipes = [Pipe(stdout, log.write, self._stdout_line), Pipe(stderr, log.write)]

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

    def close(self) -> None:
        """The process has exited: whatever is left in the pipes was written before, so
        read it, then close (a grandchild that escaped the group must not hold the log
        open)."""
        for pipe in self._pipes:
            pipe.read()
            pipe.close()
        if self._log is not None:
            self._log.close()

    def outcome(self, exit_code: int) -> Outcome:
        """The attempt's outcome from its exit code and what was read (call after close)."""
        if self._command:
            return _command_outcome(exit_code, self._last_stdout_line)
        return _outcome(exit_code, self._result)


@dataclass(frozen=True)
class ExitUsage:
    """What the kernel counted for a reaped process (``wait4``'s rusage): exact however
    short the process lived, where sampling its tree may never have seen it."""

    # Bytes: the largest resident set of the process *or of any one* of its reaped
    # descendants (the kernel keeps a maximum, not a sum, across processes).
    max_rss: int
    # User + system CPU seconds of the process and all its reaped descendants.
    cpu_seconds: float


def exit_usage(usage: resource.struct_rusage, inherited: int = 0) -> ExitUsage:
    """``usage`` as an ``ExitUsage``, less ``inherited`` bytes of resident set that the
    process had from its parent at the fork (Linux counts ``ru_maxrss`` in KiB)."""
    return ExitUsage(
        max_rss=max(0, usage.ru_maxrss * 1024 - inherited),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )


async def wait_for_exit(pid: int, on_exit: Any) -> tuple[int, ExitUsage]:
    """The raw wait status of our own child ``pid`` and what the kernel counted for it,
    without a thread per child: a pidfd becomes readable when the process exits (Linux
    5.3+); elsewhere, a thread blocks in wait4."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _, status, usage = await loop.run_in_executor(None, os.wait4, pid, 0)
        return status, exit_usage(usage)
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
    _, status, usage = os.wait4(pid, 0)
    return status, exit_usage(usage)


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
