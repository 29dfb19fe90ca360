"""The disk guard's decisions (ADR 0025): pure, no platform."""

from __future__ import annotations

from argon.control.diskguard import (
    MIN_GRACE,
    SizeState,
    grace,
    limit_message,
    reserve_bytes,
    reserve_state,
    size_state,
)

MB = 2**20


def test_writes_are_refused_at_the_limit_and_allowed_under_it() -> None:
    state, action = size_state(SizeState(), 99 * MB, 100 * MB)
    assert (state, action) == (SizeState(), "")
    state, action = size_state(state, 100 * MB, 100 * MB)
    assert action == "refuse" and state == SizeState(True, 100 * MB)
    state, action = size_state(state, 105 * MB, 100 * MB)  # a transaction that was in flight: within the grace
    assert action == "" and state.refused
    state, action = size_state(state, 99 * MB, 100 * MB)
    assert (state, action) == (SizeState(), "allow")


def test_growing_past_the_grace_with_writes_refused_ends_sessions_each_time() -> None:
    state = SizeState(True, 100 * MB)
    state, action = size_state(state, 100 * MB + MIN_GRACE + 1, 100 * MB)
    assert action == "end sessions" and state.refused_at == 100 * MB + MIN_GRACE + 1
    state, action = size_state(state, 100 * MB + MIN_GRACE + 2, 100 * MB)
    assert action == ""  # measured from where it was ended, not from the limit
    assert grace(10 * 2**30) == 2**30  # a tenth of a big limit


def test_no_limit_never_refuses_and_lifting_one_allows() -> None:
    assert size_state(SizeState(), 10**12, 0) == (SizeState(), "")
    assert size_state(SizeState(True, 5 * MB), 10**12, 0) == (SizeState(), "allow")


def test_the_reserve_is_at_most_a_tenth_and_released_with_a_margin() -> None:
    assert reserve_bytes(2 * 2**30, 100 * 2**30) == 2 * 2**30
    assert reserve_bytes(2 * 2**30, 190 * MB) == 19 * MB
    assert reserve_state(False, 20 * MB, 19 * MB) is False
    assert reserve_state(False, 18 * MB, 19 * MB) is True
    assert reserve_state(True, 20 * MB, 19 * MB) is True  # still within the release margin
    assert reserve_state(True, 24 * MB, 19 * MB) is False
    assert reserve_state(False, 0, 0) is False  # ARGON_DISK_RESERVE=0


def test_the_tenant_is_told_in_neons_words() -> None:
    assert limit_message(512 * MB) == "project size limit (512 MB) has been exceeded"
