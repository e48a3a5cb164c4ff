"""The benchmark's job: really allocate and hold memory for a while."""

from __future__ import annotations

import time


def hold(mib: int, seconds: float) -> int:
    block = bytearray(mib * 1024 * 1024)
    # Touch one byte per page (in C, via a strided slice): resident at once, not just mapped.
    pages = len(block) // 4096
    memoryview(block)[::4096] = b"\x01" * pages
    time.sleep(seconds)
    return pages
