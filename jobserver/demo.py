"""Demo tasks: the tutorial's ``run_long_analysis`` and two tiny ones for tests and smoke runs.

Imported inside job processes, so it stays stdlib-only.
"""

from __future__ import annotations

import time
from typing import Any


def run_long_analysis(dataset_id: str, complexity: int) -> dict[str, Any]:
    """The tutorial's slow task: works ``complexity * 5`` seconds, then returns a result."""
    print(f"[task start] analysing dataset {dataset_id}, complexity {complexity}...", flush=True)
    duration = complexity * 5
    time.sleep(duration)
    result = {
        "status": "success",
        "dataset_id": dataset_id,
        "analysis_time_sec": duration,
        "result_url": f"http://example.com/results/{dataset_id}.zip",
    }
    print(f"[task done] dataset {dataset_id} analysed.", flush=True)
    return result


def noop() -> None:
    """Does nothing and succeeds at once."""


def fail(message: str = "demo failure") -> None:
    """Always fails, with ``message``."""
    raise RuntimeError(message)
