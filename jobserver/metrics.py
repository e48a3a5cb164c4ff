"""Prometheus metrics: the counters and histograms fed by job events, and ``GET /metrics``.

Every name starts with ``jobserver_`` and follows the Prometheus conventions (``_total``
for counters, base units ``_seconds`` and ``_bytes``).  Labels come only from small fixed
sets: task names (from the config), job states, hold reason kinds and resource names, so
the number of series stays bounded whatever jobs do.

No ``_created`` series (see ``disable_created_metrics`` below).

Counters and histograms are fed through the ``events.Recorder`` interface, which
``Metrics`` implements; gauges (jobs by state, capacity, free, reserved, used) are set
from the store's counts and the scheduler's view when the endpoint is scraped.  Each
``Metrics`` has its own registry, so two servers in one test process never share series.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from jobserver.events import Transition
from jobserver.jobs import TERMINAL_STATES, JobState
from jobserver.scheduler import SystemView

__all__ = ["CONTENT_TYPE", "HOLD_KINDS", "Metrics"]

# Every counter and histogram would also export a ``_created`` series (its creation time,
# a gauge that never changes): a series per label set that no query of ours uses.  The
# library's switch is process-wide; this process exports only these metrics.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Why a queued job was not admitted, as the scheduler classifies its reasons.
HOLD_KINDS = ("memory", "cpu", "max_jobs", "never_fits")

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("jobserver_jobs", "Jobs stored, by state.", ["state"], registry=r)
        self.submitted = Counter(
            "jobserver_jobs_submitted_total", "Jobs submitted, by task.", ["task"], registry=r
        )
        self.finished = Counter(
            "jobserver_jobs_finished_total",
            "Jobs that reached a final state (succeeded, failed, cancelled), by task.",
            ["task", "state"],
            registry=r,
        )
        self.failed = Counter(
            "jobserver_jobs_failed_total",
            "Jobs that ended failed (after their retries), by task.",
            ["task"],
            registry=r,
        )
        self.requeued = Counter(
            "jobserver_jobs_requeued_total",
            "Running jobs put back in the queue (a retry after a failure, a shutdown, "
            "a rescue, memory pressure), by task.",
            ["task"],
            registry=r,
        )
        self.duration = Histogram(
            "jobserver_job_duration_seconds",
            "Running time of each attempt that ended, by task.",
            ["task"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "jobserver_job_queue_wait_seconds",
            "Time from being queued (or due, for a retry) to starting, by task.",
            ["task"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.admissions = Counter(
            "jobserver_admissions_total",
            "Jobs the scheduler started, by task.",
            ["task"],
            registry=r,
        )
        self.holds = Counter(
            "jobserver_holds_total",
            "Times a queued job started waiting for a reason (memory, cpu, max_jobs, "
            "never_fits), counted when its reason kind changes.",
            ["reason"],
            registry=r,
        )
        self.pressure = Counter(
            "jobserver_pressure_events_total",
            "Times the machine entered resource pressure (PSI some avg10 at or above the "
            "threshold), by resource.",
            ["resource"],
            registry=r,
        )
        # One gauge per resource and unit (not a "resource" label): units stay in names.
        self.gauges: dict[tuple[str, str], Gauge] = {}
        for section, help_text in (
            ("capacity", "Resources jobs may use (the machine, capped by max_cpus/max_memory)"),
            ("free", "Free for new jobs after running jobs' claims and the reserve (may be < 0)"),
            ("reserved", "Kept free for the system (reserve_cpus/reserve_memory)"),
            ("used", "Measured in use by running jobs"),
        ):
            for resource, unit in (("cpus", "CPUs"), ("memory", "bytes")):
                name = f"jobserver_{section}_{'cpus' if resource == 'cpus' else 'memory_bytes'}"
                self.gauges[section, resource] = Gauge(name, f"{help_text}, {unit}.", registry=r)
        self.machine_pressure = Gauge(
            "jobserver_pressure_ratio",
            "PSI some avg10 as a ratio (0-1), by resource; absent where PSI is not available.",
            ["resource"],
            registry=r,
        )
        self.running = Gauge(
            "jobserver_running_jobs", "Jobs this server is running now.", registry=r
        )
        # Which node (and which start of it) serves these series: the machine's and the
        # running jobs' are this node's, the stored jobs' are the whole database's.
        self.node = Gauge(
            "jobserver_node_info",
            "1 for the node answering, labelled with its name and incarnation.",
            ["node", "incarnation"],
            registry=r,
        )
        self._node: tuple[str, str] | None = None
        for state in JobState:
            self.jobs.labels(state.value)
        for kind in HOLD_KINDS:
            self.holds.labels(kind)

    # -- events.Recorder ----------------------------------------------------------

    def transition(self, transition: Transition) -> None:
        task = transition.task
        if transition.source is None:
            self.submitted.labels(task).inc()
        started = transition.source is JobState.QUEUED and transition.target is JobState.RUNNING
        if started and transition.duration is not None:
            self.queue_wait.labels(task).observe(max(0.0, transition.duration))
        if transition.source is JobState.RUNNING and transition.duration is not None:
            self.duration.labels(task).observe(max(0.0, transition.duration))
        if transition.source is JobState.RUNNING and transition.target is JobState.QUEUED:
            self.requeued.labels(task).inc()
        if transition.target in TERMINAL_STATES:
            self.finished.labels(task, transition.target.value).inc()
        if transition.target is JobState.FAILED:
            self.failed.labels(task).inc()

    def admission(self, task: str) -> None:
        self.admissions.labels(task).inc()

    def hold(self, kind: str) -> None:
        self.holds.labels(kind if kind in HOLD_KINDS else "other").inc()

    def pressure_event(self, resource: str) -> None:
        self.pressure.labels(resource).inc()

    # -- the endpoint -------------------------------------------------------------

    def render(
        self, view: SystemView, counts: Mapping[str, int], node: tuple[str, str] | None = None
    ) -> bytes:
        """The exposition text, after setting gauges from the scheduler's ``view``, the
        store's job counts by state and ``node`` (name, incarnation)."""
        if node is not None and node != self._node:
            if self._node is not None:
                self.node.remove(*self._node)  # a new incarnation replaces the old
            self.node.labels(*node).set(1)
            self._node = node
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state.value, 0))
        for section, amounts in (
            ("capacity", view.capacity),
            ("free", view.free),
            ("reserved", view.reserved),
        ):
            self.gauges[section, "cpus"].set(amounts.cpus)
            self.gauges[section, "memory"].set(amounts.memory)
        self.gauges["used", "cpus"].set(sum(job.cpus_used for job in view.running))
        self.gauges["used", "memory"].set(sum(job.memory_used for job in view.running))
        self.running.set(len(view.running))
        for resource, value in (
            ("memory", view.machine.memory_pressure),
            ("cpu", view.machine.cpu_pressure),
        ):
            if value is not None:
                self.machine_pressure.labels(resource).set(value / 100)
        return generate_latest(self.registry)
