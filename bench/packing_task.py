"""The benchmark's jobs: really allocate and hold memory for a while, or burn CPU."""

from __future__ import annotations

import time


def hold(mib: int, seconds: float) -> int:
    block = bytearray(mib * 1024 * 1024)
    # Touch one byte per page (in C, via a strided slice): resident at once, not just mapped.
    pages = len(block) // 4096
    memoryview(block)[::4096] = b"\x01" * pages
    time.sleep(seconds)
    return pages


def spin(cpu_seconds: float, mib: int = 0) -> int:
    """Hold ``mib`` and use ``cpu_seconds`` of CPU time (however long that takes on a busy
    machine)."""
    block = bytearray(mib * 1024 * 1024)
    memoryview(block)[::4096] = b"\x01" * (len(block) // 4096)
    end = time.process_time() + cpu_seconds
    rounds = 0
    while time.process_time() < end:
        sum(range(10_000))
        rounds += 1
    return rounds
