"""Task states and the transitions between them."""

from __future__ import annotations

import itertools

import pytest

from supervisor import TaskState, is_terminal
from supervisor.states import TERMINAL_STATES, can_transition

ALLOWED = {
    ("NEW", "ACTIVE"), ("NEW", "CANCELED"), ("NEW", "FAILED"),
    ("ACTIVE", "WAITING"), ("ACTIVE", "CANCELED"), ("ACTIVE", "FAILED"),
    ("ACTIVE", "SUCCEEDED"),
    ("WAITING", "ACTIVE"), ("WAITING", "CANCELED"), ("WAITING", "FAILED"),
    ("WAITING", "SUCCEEDED"),
}


def test_wire_values():
    assert [s.value for s in TaskState] == [
        "NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED",
    ]
    for state in TaskState:
        assert str(state) == state.value
        assert state == state.value  # a str enum compares with its wire form
        assert TaskState(state.value) is state


def test_unknown_state_refused():
    with pytest.raises(ValueError):
        TaskState("DONE")


def test_terminal_states():
    assert {s.value for s in TERMINAL_STATES} == {"CANCELED", "FAILED", "SUCCEEDED"}
    for state in TaskState:
        assert is_terminal(state) == (state in TERMINAL_STATES)


@pytest.mark.parametrize(
    ("old", "new"), list(itertools.product(TaskState, TaskState)),
    ids=lambda s: s.value,
)
def test_transition_table(old, new):
    assert can_transition(old, new) == ((old.value, new.value) in ALLOWED)


def test_terminal_states_never_change():
    for old in TERMINAL_STATES:
        assert not any(can_transition(old, new) for new in TaskState)


def test_nothing_goes_back_to_new_or_stays_put():
    for state in TaskState:
        assert not can_transition(state, TaskState.NEW)
        assert not can_transition(state, state)
