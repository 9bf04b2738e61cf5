"""Task states and the transitions the supervisor allows between them."""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    """The state of a task; the value is the wire form."""

    #: Accepted, waiting for a worker slot (queued).
    NEW = "NEW"
    #: Running in its child process.
    ACTIVE = "ACTIVE"
    #: The animator waits for an external resource; may go back to ACTIVE.
    WAITING = "WAITING"
    #: Terminal: canceled while queued, honoured the cancel, or killed after the grace.
    CANCELED = "CANCELED"
    #: Terminal: exception, crash, timeout, memory limit, bad or oversized result.
    FAILED = "FAILED"
    #: Terminal: ``execute`` returned normally.
    SUCCEEDED = "SUCCEEDED"


TERMINAL_STATES = frozenset({TaskState.CANCELED, TaskState.FAILED, TaskState.SUCCEEDED})

_ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.NEW: frozenset({TaskState.ACTIVE, TaskState.CANCELED, TaskState.FAILED}),
    TaskState.ACTIVE: frozenset({TaskState.WAITING} | TERMINAL_STATES),
    TaskState.WAITING: frozenset({TaskState.ACTIVE} | TERMINAL_STATES),
    TaskState.CANCELED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.SUCCEEDED: frozenset(),
}


def is_terminal(state: TaskState) -> bool:
    """Tell whether ``state`` is final (it never changes again)."""
    return state in TERMINAL_STATES


def can_transition(old: TaskState, new: TaskState) -> bool:
    """Tell whether a task may move from ``old`` to ``new``."""
    return new in _ALLOWED[old]
