"""A task module that only imports under the test's own virtual environment: ``onlyhere``
exists there and nowhere else (see test_task_python.py)."""

from __future__ import annotations

import sys
from typing import Literal

import onlyhere  # type: ignore[import-not-found]


def measure(size: int, unit: Literal["cm", "in"] = "cm", tags: list[str] | None = None) -> dict:
    return {
        "answer": onlyhere.scale(size),
        "unit": unit,
        "tags": tags or [],
        "prefix": sys.prefix,
    }
