"""What happens to jobs, told once: the transition log line, the change notifier, the recorder.

    Events                    the one entry point: ``transition()`` when a job changes state,
    │                         ``changed()`` when it changes otherwise (cancel requested,
    │                         progress); both wake the long-polling readers of that job
    ├── Wakeups               the other nodes sharing the database: what changed here is
    │                         told to them, what they tell wakes readers and the scheduler
    ├── Transition            one state change: job id, task, from, to, reason, duration
    ├── Recorder (Protocol)   what the scheduler and the API report for metrics; the
    │                         ``metrics`` module implements it, ``NullRecorder`` ignores it
    └── JsonFormatter         ``log_format = "json"``: every log record as one JSON object

Every job transition is logged here and nowhere else: one line with job id, task, from,
to, reason and duration, human-readable by default and JSON with ``log_format = "json"``.

Waiting readers (``GET /api/v1/jobs/{id}?wait=N``, Server-Sent Events) subscribe to one
job's changes: a future per reader, resolved by the next ``transition``/``changed`` of that
job, so a waiting request costs no database reads until something happens.  Whoever
changes a job's stored row (the scheduler, the API, the rescuer, a progress writer) calls
one of the two methods right after the write commits.

On a shared database (PostgreSQL, several nodes) another node changes jobs too.
``Wakeups`` tells the other nodes, by NOTIFY, which jobs changed here and whether their
schedulers have work (a submit, a requeue, a finished job, a settings change); a notice
from another node wakes the readers of those jobs and, if told, the scheduler.  A notice
only wakes: the woken re-read the database.  Notices are folded: the first goes at once,
later ones at most every ``NOTIFY_INTERVAL`` each carrying all that changed meanwhile.
Readers also re-read every ``recheck`` seconds, so a lost notice (or no LISTEN at all)
costs time, never a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from jobserver.jobs import Job, JobState

log = logging.getLogger("jobserver.jobs")


@dataclass(frozen=True)
class Transition:
    """One job state change; ``source`` is None for a submission (nothing -> queued).

    ``duration`` is the seconds spent in ``source`` when the caller knows it (a finished
    attempt's running time, a claimed job's wait in the queue), else None."""

    job_id: str
    task: str
    source: JobState | None
    target: JobState
    reason: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies every field, and this runs once per
        # submitted job (issue 6 profile).
        return {
            "job_id": self.job_id,
            "task": self.task,
            "source": None if self.source is None else self.source.value,
            "target": self.target.value,
            "reason": self.reason,
            "duration": self.duration,
        }

    def describe(self) -> str:
        """The human-readable line: ``job ID (task): running -> failed after 1.200 s: why``."""
        source = "submitted" if self.source is None else self.source.value
        text = f"job {self.job_id} ({self.task}): {source} -> {self.target.value}"
        if self.duration is not None:
            text += f" after {self.duration:.3f} s"
        if self.reason:
            text += f": {self.reason}"
        return text


class Recorder(Protocol):
    """What the server reports for metrics.  Label values must come from small fixed sets
    (task names from the config, states, reason *kinds*), never from free text."""

    def transition(self, transition: Transition) -> None: ...

    def admission(self, task: str) -> None: ...

    def hold(self, kind: str) -> None: ...

    def pressure_event(self, resource: str) -> None: ...


class NullRecorder:
    def transition(self, transition: Transition) -> None:
        pass

    def admission(self, task: str) -> None:
        pass

    def hold(self, kind: str) -> None:
        pass

    def pressure_event(self, resource: str) -> None:
        pass


class Events:
    """Logs transitions, feeds the recorder and wakes readers waiting on a job."""

    def __init__(self, recorder: Recorder | None = None) -> None:
        self.recorder: Recorder = recorder or NullRecorder()
        self.closing = False  # the server is stopping: readers answer now, none waits
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # A shared database: the other nodes to tell, and how often a waiting reader
        # re-reads its job all the same (changes made elsewhere); None: never (SQLite,
        # where every change is made here).
        self.wakeups: Wakeups | None = None
        self.recheck: float | None = None

    def patience(self, seconds: float) -> float:
        """How long a reader may wait for a change before it reads its job again."""
        return seconds if self.recheck is None else min(seconds, self.recheck)

    def transition(
        self,
        job: Job,
        source: JobState | None,
        *,
        reason: str | None = None,
        duration: float | None = None,
        target: JobState | None = None,
    ) -> Transition:
        """Record that ``job`` (as stored after the change) moved from ``source``."""
        event = Transition(job.id, job.task, source, target or job.state, reason, duration)
        level = logging.WARNING if event.target is JobState.FAILED else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, event.describe(), extra={"transition": event.to_dict()})
        self.recorder.transition(event)
        self.wake_readers(job.id)
        if self.wakeups is not None:
            # A submission is nobody's wait yet: only the schedulers need to know.  A
            # requeue or an end may let another node start something.
            self.wakeups.tell(
                None if source is None else job.id,
                queue=event.target is JobState.QUEUED or event.target.terminal,
            )
        return event

    def changed(self, job_id: str) -> None:
        """Wake every reader waiting on ``job_id`` (state, progress or flags changed)."""
        self.wake_readers(job_id)
        if self.wakeups is not None:
            self.wakeups.tell(job_id)

    def settings_changed(self) -> None:
        """This node's settings changed: the other nodes' schedulers look again."""
        if self.wakeups is not None:
            self.wakeups.tell(queue=True)

    def wake_readers(self, job_id: str) -> None:
        """Wake the readers waiting here on ``job_id`` (and tell no other node)."""
        for waiter in self._waiters.pop(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.contextmanager
    def subscription(self, job_id: str) -> Iterator[asyncio.Future[None]]:
        """A future resolved by the job's next change.  Subscribe *before* reading the job,
        so that a change between the read and the wait is not missed."""
        self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]
            waiter.cancel()

    def close(self) -> None:
        """The server is stopping: wake every waiting reader now (they answer with the job
        as it is) and let none wait from now on.  Safe in a signal handler."""
        self.closing = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for job_id in list(self._waiters):
            self.wake_readers(job_id)

    def wake_all_readers(self) -> None:
        """Every waiting reader reads its job again (notices may have been lost)."""
        self._wake_all()


NOTIFY_INTERVAL = 0.05  # seconds: at most 20 notices a second from one node
NOTICE_JOBS = 200  # job ids one notice names at most (a payload stays under 8,000 bytes)


class Wakeups:
    """The other nodes sharing the database: tell them what changed here, be woken by
    what they tell (see the module docstring).

    ``send(payload)`` sends a notice (the store's NOTIFY).  A received notice calls
    ``wake_readers(job_id)`` per job it names (``"*"``: ``wake_all()``), ``job_changed(job_id)``
    for the same jobs (the scheduler checks whether one runs here: then it is a cancel
    request), and ``wake_scheduler()`` when the queue may have work.  A node's own
    notices come back to it and are ignored (each process signs its notices)."""

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        *,
        wake_readers: Callable[[str], None],
        wake_all: Callable[[], None],
        wake_scheduler: Callable[[], None],
        job_changed: Callable[[str], None],
        interval: float = NOTIFY_INTERVAL,
    ) -> None:
        self._send = send
        self._wake_readers = wake_readers
        self._wake_all = wake_all
        self._wake_scheduler = wake_scheduler
        self._job_changed = job_changed
        self._interval = interval
        self._me = secrets.token_hex(8)
        self._jobs: set[str] = set()
        self._queue = False
        self._sender: asyncio.Task[None] | None = None
        self.sent = 0  # notices sent (tests and metrics read it)

    # -- telling the others ------------------------------------------------------------

    def tell(self, job_id: str | None = None, *, queue: bool = False) -> None:
        """``job_id`` changed here (None: no job to name); ``queue``: the schedulers may
        have work (a job queued or ended, settings changed)."""
        if job_id is not None:
            self._jobs.add(job_id)
        self._queue = self._queue or queue
        if job_id is None and not queue:
            return
        if self._sender is None or self._sender.done():
            try:
                self._sender = asyncio.get_running_loop().create_task(self._send_pending())
            except RuntimeError:  # no loop (a script's store call): nothing to wake
                self._jobs.clear()
                self._queue = False

    async def drain(self) -> None:
        """Send what is pending now (the server stops)."""
        if self._sender is not None and not self._sender.done():
            await asyncio.wait([self._sender])

    async def _send_pending(self) -> None:
        while self._jobs or self._queue:
            jobs, self._jobs = self._jobs, set()
            queue, self._queue = self._queue, False
            notice: dict[str, Any] = {"from": self._me}
            if queue:
                notice["queue"] = True
            if jobs:
                notice["jobs"] = "*" if len(jobs) > NOTICE_JOBS else sorted(jobs)
            try:
                await self._send(json.dumps(notice, separators=(",", ":")))
                self.sent += 1
            except Exception as exc:
                # Polling is the fallback: the others see the change at their next read.
                log.debug("could not notify the other nodes: %s", exc)
            await asyncio.sleep(self._interval)

    # -- being told --------------------------------------------------------------------

    def received(self, payload: str) -> None:
        """A notice from a node (perhaps this one, or another release: unknown keys and
        payloads that are not notices are ignored)."""
        try:
            notice = json.loads(payload)
        except ValueError:
            return
        if not isinstance(notice, dict) or notice.get("from") == self._me:
            return
        jobs = notice.get("jobs")
        if jobs == "*":
            self._wake_all()
            self._job_changed("*")
        elif isinstance(jobs, list):
            for job_id in jobs:
                if isinstance(job_id, str):
                    self._wake_readers(job_id)
                    self._job_changed(job_id)
        if notice.get("queue"):
            self._wake_scheduler()

    def reconnected(self) -> None:
        """Listening (again): what was sent meanwhile is lost, so everything wakes."""
        self._wake_all()
        self._job_changed("*")
        self._wake_scheduler()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and for a job transition
    its fields (``job_id``, ``task``, ``source``, ``target``, ``reason``, ``duration``)."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message_of(record),
        }
        transition = getattr(record, "transition", None)
        if isinstance(transition, dict):
            document["event"] = "transition"
            document.update(transition)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


_PHRASES: dict[int, str] = {
    status.value: f"{status.value} {status.phrase}" for status in http.HTTPStatus
}
ACCESS_LOGGER = "uvicorn.access"


def message_of(record: logging.LogRecord) -> str:
    """The record's message; for uvicorn's access records, the text its own access
    formatter writes after the level (``127.0.0.1:5555 - "GET /path HTTP/1.1" 200 OK``),
    formatted from the record's arguments directly: uvicorn's formatter copies every
    record and looks the phrase up in an enum, a tenth of each request's time with the
    logging calls around it (issue 6 profiles)."""
    if record.name != ACCESS_LOGGER or not isinstance(record.args, tuple):
        return record.getMessage()
    client, method, path, version, status = cast(tuple[str, str, str, str, int], record.args)
    answer = _PHRASES.get(status) or f"{status} "
    return f'{client} - "{method} {path} HTTP/{version}" {answer}'


class PassStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines logged during one pass of the event loop
    together, in one write as soon as the pass is over, instead of one write and flush
    per line: under load a pass serves many requests, each with its access line (and a
    submit with its transition line), and those system calls were the largest single
    cost of logging left (issue 6 profiles).  A line waits at most for the rest of its
    pass.  Lines logged where no loop runs (another thread, start-up, shutdown) are
    written at once, after anything pending; ``logging.shutdown`` at exit writes what is
    left.  What a SIGKILL can lose is the current pass's lines."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)
        self._scheduled = True

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                try:
                    self.stream.write(text)
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": text}))
            super().flush()


class TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s`` for every logger, uvicorn's
    included (its access lines with ``message_of``), the date and time part formatted
    once a second rather than for every line (strftime was 1.3% of a submit's time under
    load: issue 6 profile)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")  # replaced whole: safe across threads

    def format(self, record: logging.LogRecord) -> str:
        if record.name != ACCESS_LOGGER:
            return super().format(record)
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {message_of(record)}"
        return line if not record.exc_info else f"{line}\n{self.formatException(record.exc_info)}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # as logging.Formatter's default_msec_format


QUIET_LIBRARIES = ("alembic",)
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", ACCESS_LOGGER)


def _uvicorn_name(record: logging.LogRecord) -> bool:
    """uvicorn logs its start and stop lines as ``uvicorn.error``: shown as ``uvicorn``,
    since they are no errors."""
    if record.name == "uvicorn.error":
        record.name = "uvicorn"
    return True


def configure_logging(level: str, log_format: str) -> None:
    """The root handler for ``jobserver serve``: plain lines, or JSON objects."""
    handler = PassStreamHandler()
    # On uvicorn.error's logger, not the handler: an access line never passes through it.
    logging.getLogger("uvicorn.error").addFilter(_uvicorn_name)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's records reach our handler (uvicorn is given no logging config of its own;
    # this undoes one applied before, e.g. by an embedding program).
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Libraries' own info lines (alembic's plugin set-up and every migration step) say
    # nothing an operator needs: jobserver logs what was migrated.  Shown at debug.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
        )
    # Every request logs a line (the access log) and every submit another (its transition):
    # skip what no format of ours shows, the caller's frame, thread and process (the
    # logging HOWTO's "Optimization" section; issue 6 profile: a tenth of a submit's time
    # was spent logging).
    logging._srcfile = None  # no sys._getframe() walk for each record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
