"""What a running task tells the server while it runs: progress.

Inside a task, ``from jobserver import progress; progress(0.4, "resizing frames")``.
The runner gives the job's process a pipe whose fd number is in $JOBSERVER_PROGRESS_FD;
each report is one JSON line written without blocking: when the server reads slowly and
the pipe is full, the report is dropped (a task never waits for the server).  Reports
are also rate-limited here (at most one per ``MIN_INTERVAL``; the last report before a
pause is kept only if it got through), and the server stores at most one per job per
``[jobs] progress_interval``.  Outside a job (no fd), ``progress`` does nothing.

Command tasks report with stdout lines ``JOBSERVER_PROGRESS <fraction> [message]``;
``parse_line`` reads both forms for the server.

Imported by every child process through ``jobserver/__init__.py``: stdlib only.
"""

from __future__ import annotations

import json
import math
import os
import time

FD_ENV = "JOBSERVER_PROGRESS_FD"
OUTPUT_DIR_ENV = "JOBSERVER_OUTPUT_DIR"
COMMAND_PREFIX = "JOBSERVER_PROGRESS"
MIN_INTERVAL = 0.05  # seconds between two reports written to the pipe
MAX_MESSAGE = 500  # characters of a message kept

_last_sent = -math.inf
_fd: int | None = None
_fd_checked = False


def progress(fraction: float | None, message: str = "") -> bool:
    """Report how far the task is (``fraction`` from 0 to 1, or None when unknown) and what
    it is doing.  Returns True if the report was sent, False if it was dropped (too soon
    after the previous one, pipe full, or not running under jobserver).  Never blocks."""
    global _last_sent
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError("progress fraction must be a number from 0 to 1, or None")
        if not (math.isfinite(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"progress fraction must be from 0 to 1, got {fraction!r}")
    fd = _progress_fd()
    now = time.monotonic()
    if fd is None or now - _last_sent < MIN_INTERVAL:
        return False
    line = json.dumps({"fraction": fraction, "message": str(message)[:MAX_MESSAGE]}) + "\n"
    try:
        # One write of < PIPE_BUF bytes is atomic: the server never sees half a line.
        os.write(fd, line.encode()[:4000])
    except (BlockingIOError, BrokenPipeError, OSError):
        return False
    _last_sent = now
    return True


def _progress_fd() -> int | None:
    global _fd, _fd_checked
    if not _fd_checked:
        _fd_checked = True
        text = os.environ.get(FD_ENV)
        if text is not None and text.isdigit():
            fd = int(text)
            try:
                os.set_blocking(fd, False)
                _fd = fd
            except OSError:
                _fd = None
    return _fd


def parse_line(line: str) -> tuple[float | None, str] | None:
    """A progress report from one line (the pipe's JSON or a command's
    ``JOBSERVER_PROGRESS 0.4 message``); None when the line is not one."""
    line = line.strip()
    if line.startswith(COMMAND_PREFIX):
        rest = line[len(COMMAND_PREFIX) :]
        if rest and not rest[0].isspace():
            return None
        number, _, message = rest.strip().partition(" ")
        try:
            fraction = float(number)
        except ValueError:
            return None
        if not (math.isfinite(fraction) and 0 <= fraction <= 1):
            return None
        return fraction, message.strip()[:MAX_MESSAGE]
    try:
        report = json.loads(line)
    except ValueError:
        return None
    if not isinstance(report, dict):
        return None
    raw, message = report.get("fraction"), report.get("message", "")
    if raw is not None and (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not (math.isfinite(raw) and 0 <= raw <= 1)
    ):
        return None
    return (None if raw is None else float(raw)), str(message)[:MAX_MESSAGE]
