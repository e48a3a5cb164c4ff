"""schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A submit that leaves its job queued for long (``delay``, ``run_at``) would hold every
later stream on that job open (the SSE events, ``logs?follow=1``, ``?wait=``) until the
run's time is spent, so the fuzz keeps submits that run now.  ``run_at`` is also refused
more than 366 days ahead, a bound relative to now that a schema cannot state (the
description says it in words).  Both are tested by tests/test_lifecycle.py.

``depends_on`` takes ids of jobs that exist: a well-formed id made up by the generator
names none, and the server rightly answers 422 (tests/test_lifecycle.py), which
positive_data_acceptance would count as a failure.  Whether an id names a job is state,
not schema, so the fuzz leaves out submits whose ``depends_on`` holds only well-formed
ids; malformed ones (the negative cases) are still sent.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

from jobserver.openapi import JOB_ID_PATTERN

# seconds: a delayed job starts within the run, and a cancel can still find it waiting
QUICK_DELAY = 3.0


@schemathesis.hook
def filter_body(context: Any, body: Any) -> bool:
    if not isinstance(body, dict):
        return True
    delay = body.get("delay")
    if "run_at" in body:
        return False
    depends_on = body.get("depends_on")
    if not isinstance(depends_on, list):
        depends_on = []
    made_up = [i for i in depends_on if isinstance(i, str) and re.fullmatch(JOB_ID_PATTERN, i)]
    if depends_on and len(made_up) == len(depends_on):
        return False
    return not (
        isinstance(delay, (int, float)) and not isinstance(delay, bool) and delay > QUICK_DELAY
    )
