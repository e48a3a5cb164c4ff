"""The tutorial's ``tasks.py`` (FastAPI + Celery + Redis), for ``python -m bench``: its
Celery app with Redis as broker and result backend, and as its tasks the very functions
jobserver runs in the bench: the tutorial's ``run_long_analysis`` (jobserver/demo.py, the
tutorial's body) and the bench's ``noop`` and ``stamp`` (bench/tasks.py).

The bench points the app at its own Redis databases through BENCH_CELERY_BROKER and
BENCH_CELERY_BACKEND; without them, the tutorial's ``redis://localhost:6379/0`` and ``/1``.
"""

from __future__ import annotations

import os

from celery import Celery

from bench import tasks
from jobserver import demo

celery_app = Celery(
    "tasks",
    broker=os.environ.get("BENCH_CELERY_BROKER", "redis://localhost:6379/0"),
    backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://localhost:6379/1"),
)

run_long_analysis = celery_app.task(demo.run_long_analysis)
noop = celery_app.task(tasks.noop)
stamp = celery_app.task(tasks.stamp)
