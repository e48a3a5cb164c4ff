"""The domain's pure parts: the transition table, ids, timestamps."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from jobserver.jobs import (
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
    can_transition,
    format_timestamp,
    new_job_id,
    parse_timestamp,
)

states = st.sampled_from(list(JobState))


@given(states, states)
def test_terminal_states_are_never_left(source: JobState, target: JobState) -> None:
    if source.terminal:
        assert not can_transition(source, target)


@given(states)
def test_no_state_transitions_to_itself(state: JobState) -> None:
    assert not can_transition(state, state)


def test_every_non_terminal_state_can_end() -> None:
    for state in JobState:
        if not state.terminal:
            assert TRANSITIONS[state] & TERMINAL_STATES


def test_only_the_scheduler_path_leaves_queued() -> None:
    assert TRANSITIONS[JobState.QUEUED] == {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}
    assert not can_transition(JobState.QUEUED, JobState.SUCCEEDED)


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_job_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 and i.isalnum() and i.isupper() for i in ids)


def test_ids_are_ulids_of_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    text = new_job_id()
    after = time.time_ns() // 1_000_000
    value = 0
    for char in text:  # Crockford base32, 5 bits a character, 2 leading zero bits
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert value < 2**128 and before <= value >> 80 <= after


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    )
)
def test_timestamps_roundtrip_to_the_millisecond(moment: datetime) -> None:
    text = format_timestamp(moment)
    assert text.endswith("Z") and len(text) == 24
    back = parse_timestamp(text)
    assert abs((back - moment).total_seconds()) < 0.001
