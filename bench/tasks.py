"""Tasks the benchmark's jobserver runs (stdlib only: they run inside job processes)."""

from __future__ import annotations

import time


def noop() -> None:
    """Does nothing: the end-to-end figure measures jobserver, not the task."""


def stamp() -> float:
    """The moment the task body started, as its result (dispatch latency)."""
    return time.time()


def sleep(seconds: float) -> None:
    """Stays running (the monitoring-overhead figure)."""
    time.sleep(seconds)
