"""A task module whose import waits until the file named in $FORK_SLOW_GATE exists: the
fork server that preloads it stays not ready until the test opens the gate."""

from __future__ import annotations

import os
import time
from pathlib import Path

_gate = Path(os.environ["FORK_SLOW_GATE"])
_deadline = time.monotonic() + 60
while not _gate.exists() and time.monotonic() < _deadline:
    time.sleep(0.01)
