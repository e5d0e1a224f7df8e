"""The transition table: the only moves a task's status may make."""

from __future__ import annotations

import itertools

import pytest

from remoterun.state import FINAL, TRANSITIONS, InvalidTransition, TaskStatus, check_transition

ALLOWED = {("pending", "running"), ("pending", "cancelled"), ("running", "pending"),
           ("running", "success"), ("running", "failed"), ("running", "timeout"),
           ("running", "cancelled")}


@pytest.mark.parametrize(("old", "new"), itertools.product(TaskStatus, TaskStatus))
def test_every_pair_is_allowed_or_refused_as_the_protocol_says(old, new):
    """Each of the 36 pairs: exactly the seven moves of PROTOCOL.md's state machine pass."""
    if (old.value, new.value) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition, match=f"{old} -> {new}"):
            check_transition(old, new)


def test_a_final_state_is_never_left():
    """No transition leaves success, failed, timeout or cancelled."""
    assert FINAL == {TaskStatus(s) for s in ("success", "failed", "timeout", "cancelled")}
    assert all(TRANSITIONS[status] == frozenset() for status in FINAL)
