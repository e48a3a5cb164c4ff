"""Tasks of the old-database fixtures (tests/fixtures/make_old_databases.py,
tests/test_upgrade.py).

The old servers that made the fixtures ran the first group: a job that holds its slot, one
that ignores SIGTERM so its cancel waits, one that fails.  The upgrade test serves the same
task names with the second group: the same parameters, so the stored jobs still validate,
but what kept a job running or made it fail then returns at once now, so that every job's
end can be checked quickly.  Standard library only: every old revision imports it.
"""

from __future__ import annotations

import signal
import time


def quick(n: int) -> int:
    return n


# -- what the old servers ran -------------------------------------------------------------


def hold(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def stubborn(seconds: float) -> float:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return seconds


def broken(n: int) -> int:
    raise ValueError(f"broken {n}")


# -- what the upgraded server runs under the same names -----------------------------------


def hold_no_more(seconds: float) -> float:
    return seconds


def mended(n: int) -> int:
    return n
