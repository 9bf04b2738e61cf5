"""Which tasks a list shows: filters, a page after a task, and merging the table with
the journal.

A list is in creation order (a task's ``number``). A page starts after a task
(``after``: that task's number) and holds at most ``limit`` tasks; the REST
layer asks for one more than it shows to know whether a next page exists.
The same :class:`TaskQuery` selects in the in-memory table (under the
manager's lock, by bisecting creation numbers) and in the journal (SQL), and
:func:`merge` joins both, the table's current version winning.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from supervisor.states import TaskState
from supervisor.wire import TaskSnapshot

_STATES = frozenset(state.value for state in TaskState)


class Listed(Protocol):
    """What a filter looks at: a task in the table, or a snapshot."""

    @property
    def operation(self) -> str: ...
    @property
    def object_id(self) -> str | None: ...
    @property
    def number(self) -> int: ...


@dataclass(frozen=True)
class TaskQuery:
    """Filters of a list: all given ones must match (states: any of them)."""

    operation: str | None = None
    states: frozenset[str] | None = None
    object_id: str | None = None

    def matches(self, task: Listed, state: str) -> bool:
        """True if ``task`` (in ``state``) passes every filter."""
        return ((not self.operation or task.operation == self.operation)
                and (self.states is None or state in self.states)
                and (self.object_id is None or task.object_id == self.object_id))


def make_query(operation: str | None, state: str | Iterable[str] | None,
               object_id: str | None) -> TaskQuery:
    """Check list filters and make a query of them.

    Args:
        operation: only this operation (None or "": all).
        state: one state or an iterable of states (None: all).
        object_id: only tasks with this ``objectId``.

    Raises:
        ValueError: a state is not one of the task states, or a filter is not a string.
    """
    if operation is not None and not isinstance(operation, str):
        raise ValueError("operation must be a string or None")
    if object_id is not None and not isinstance(object_id, str):
        raise ValueError("object_id must be a string or None")
    states: frozenset[str] | None = None
    if state is not None:
        wanted = [state] if isinstance(state, str) else list(state)
        for value in wanted:
            if not isinstance(value, str) or value not in _STATES:
                raise ValueError(f"state must be one of {', '.join(sorted(_STATES))}, "
                                 f"not {value!r}")
        states = frozenset(str(value) for value in wanted)
    return TaskQuery(operation or None, states, object_id)


def check_limit(limit: object) -> int | None:
    """Return ``limit`` if it is None or an integer >= 1.

    Raises:
        ValueError: it is not.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit < 1):
        raise ValueError("limit must be an integer >= 1 or None")
    return limit


def merge(current: list[TaskSnapshot], recorded: list[TaskSnapshot],
          limit: int | None) -> list[TaskSnapshot]:
    """Join two lists in creation order, each already in that order: a task in both
    is shown as ``current`` has it (the table's version is the newest)."""
    shown = {snapshot.id for snapshot in current}
    older = [snapshot for snapshot in recorded if snapshot.id not in shown]
    joined = list(heapq.merge(current, older, key=lambda snapshot: snapshot.number))
    return joined if limit is None else joined[:limit]
