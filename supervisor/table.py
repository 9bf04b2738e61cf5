"""The task table: ids, creation order, lookup, filtering, and counts kept as it changes."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from supervisor.states import TaskState
from supervisor.task import Task

if TYPE_CHECKING:
    from supervisor.outcome import Outcome, Usage

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class TaskTable:
    """Tasks by id, in creation order (dicts keep insertion order).

    The number of tasks by (operation, state) is kept up to date by
    :meth:`add`, :meth:`transition` and :meth:`remove`, so counting costs
    O(operations × states) however big the table is. Every state change
    goes through :meth:`transition` for that reason.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._counter = 0
        self._counts: Counter[tuple[str, TaskState]] = Counter()

    def new_id(self, operation: str) -> tuple[str, int]:
        """Make an id unique for the life of the table, URL-safe, like ``HASH000003``.

        Returns:
            The id and its creation number (one more than the last one handed out).
        """
        self._counter += 1
        prefix = _UNSAFE.sub("", operation)[:64] or "TASK"
        return f"{prefix}{self._counter:06d}", self._counter

    def continue_after(self, number: int) -> None:
        """Hand out numbers above ``number`` from now on (ids of an earlier run stay unused)."""
        self._counter = max(self._counter, number)

    @property
    def last_number(self) -> int:
        """The last creation number handed out."""
        return self._counter

    def add(self, task: Task) -> None:
        """Insert a new task (it sorts after every existing one)."""
        self._tasks[task.id] = task
        self._counts[(task.operation, task.state)] += 1

    def transition(self, task: Task, new: TaskState, *notes: str,
                   outcome: Outcome | None = None, usage: Usage | None = None) -> None:
        """Move ``task`` to ``new`` (see :meth:`Task.transition`), keeping the counts."""
        old = task.state
        task.transition(new, *notes, outcome=outcome, usage=usage)
        if task.id in self._tasks:
            self._counts[(task.operation, old)] -= 1
            self._counts[(task.operation, new)] += 1

    def get(self, task_id: str) -> Task | None:
        """The task with this id, or None."""
        return self._tasks.get(task_id)

    def remove(self, task_id: str) -> Task | None:
        """Drop a task (purge); return it, or None if it was not there."""
        task = self._tasks.pop(task_id, None)
        if task is not None:
            key = (task.operation, task.state)
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]
        return task

    def counts(self) -> dict[tuple[str, TaskState], int]:
        """The number of tasks by (operation, state), without the zeros."""
        return {key: count for key, count in self._counts.items() if count}

    def select(self, operation: str | None = None) -> Iterator[Task]:
        """Tasks in creation order, optionally only those of one operation."""
        for task in self._tasks.values():
            if not operation or task.operation == operation:
                yield task

    def __len__(self) -> int:
        return len(self._tasks)
