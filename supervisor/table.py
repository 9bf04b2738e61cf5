"""The task table: ids, creation order, lookup and filtering by operation."""

from __future__ import annotations

import re
from collections.abc import Iterator

from supervisor.task import Task

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class TaskTable:
    """Tasks by id, in creation order (dicts keep insertion order)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._counter = 0

    def new_id(self, operation: str) -> str:
        """Make an id unique for the life of the table, URL-safe, like ``HASH000003``."""
        self._counter += 1
        prefix = _UNSAFE.sub("", operation)[:64] or "TASK"
        return f"{prefix}{self._counter:06d}"

    def add(self, task: Task) -> None:
        """Insert a new task (it sorts after every existing one)."""
        self._tasks[task.id] = task

    def get(self, task_id: str) -> Task | None:
        """The task with this id, or None."""
        return self._tasks.get(task_id)

    def remove(self, task_id: str) -> Task | None:
        """Drop a task (purge); return it, or None if it was not there."""
        return self._tasks.pop(task_id, None)

    def select(self, operation: str | None = None) -> Iterator[Task]:
        """Tasks in creation order, optionally only those of one operation."""
        for task in self._tasks.values():
            if not operation or task.operation == operation:
                yield task

    def __len__(self) -> int:
        return len(self._tasks)
