"""The task table: ids, creation order, lookup, filtering, and counts kept as it changes."""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from supervisor.states import TaskState
from supervisor.task import Task

if TYPE_CHECKING:
    from supervisor.listing import TaskQuery
    from supervisor.outcome import Outcome, Usage

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class TaskTable:
    """Tasks by id, in creation order (dicts keep insertion order).

    The number of tasks by (operation, state) is kept up to date by
    :meth:`add`, :meth:`transition` and :meth:`remove`, so counting costs
    O(operations × states) however big the table is. Every state change
    goes through :meth:`transition` for that reason.

    A page of a list (:meth:`select_page`) starts by bisecting the creation
    numbers, so reading page after page of a big table costs the pages, not
    the table each time.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._counter = 0
        self._counts: Counter[tuple[str, TaskState]] = Counter()
        #: tasks by creation number, and their numbers; removed ones stay until compacted
        self._order: list[Task] = []
        self._numbers: list[int] = []
        self._removed = 0  #: removed tasks still in _order
        self._prefixes: set[str] = set()  #: id prefixes handed out (see number_of)

    def new_id(self, operation: str) -> tuple[str, int]:
        """Make an id unique for the life of the table, URL-safe, like ``HASH000003``.

        Returns:
            The id and its creation number (one more than the last one handed out).
        """
        self._counter += 1
        prefix = _UNSAFE.sub("", operation)[:64] or "TASK"
        self._prefixes.add(prefix)
        return f"{prefix}{self._counter:06d}", self._counter

    def continue_after(self, number: int) -> None:
        """Hand out numbers above ``number`` from now on (ids of an earlier run stay unused)."""
        self._counter = max(self._counter, number)

    @property
    def last_number(self) -> int:
        """The last creation number handed out."""
        return self._counter

    def add(self, task: Task) -> None:
        """Insert a task; it takes its place in creation order (by its number)."""
        self._tasks[task.id] = task
        self._counts[(task.operation, task.state)] += 1
        if not self._numbers or task.number > self._numbers[-1]:
            self._order.append(task)
            self._numbers.append(task.number)
            return
        # NOTE: an older task (queued again after a restart): rare, so the dict is
        # rebuilt in creation order rather than kept sorted on every insert.
        index = bisect_left(self._numbers, task.number)
        self._order.insert(index, task)
        self._numbers.insert(index, task.number)
        self._tasks = dict(sorted(self._tasks.items(), key=lambda item: item[1].number))

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
            self._removed += 1
            if self._removed > 64 and 2 * self._removed > len(self._order):
                # NOTE: amortized O(1) per removal: half the list is gone each time
                self._order = [t for t in self._order if self._tasks.get(t.id) is t]
                self._numbers = [t.number for t in self._order]
                self._removed = 0
        return task

    def counts(self) -> dict[tuple[str, TaskState], int]:
        """The number of tasks by (operation, state), without the zeros."""
        return {key: count for key, count in self._counts.items() if count}

    def select(self, operation: str | None = None) -> Iterator[Task]:
        """Tasks in creation order, optionally only those of one operation."""
        for task in self._tasks.values():
            if not operation or task.operation == operation:
                yield task

    def select_page(self, query: TaskQuery, after: int = 0,
                    limit: int | None = None) -> list[Task]:
        """Tasks that match ``query``, numbered above ``after``, in creation order;
        at most ``limit`` of them."""
        found: list[Task] = []
        order, tasks = self._order, self._tasks
        for index in range(bisect_right(self._numbers, after), len(order)):
            task = order[index]
            if tasks.get(task.id) is task and query.matches(task, task.state.value):
                found.append(task)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def number_of(self, task_id: str) -> int | None:
        """The creation number of a task in the table, or of an id this table made
        (``HASH000042`` is 42, also once purged); None if neither."""
        task = self._tasks.get(task_id)
        if task is not None:
            return task.number
        found = None
        for prefix in self._prefixes:
            digits = task_id[len(prefix):]
            if (task_id.startswith(prefix) and digits.isdigit() and digits.isascii()
                    and (len(digits) == 6 or (len(digits) > 6 and digits[0] != "0"))
                    and (found is None or len(prefix) > found[0])):
                found = (len(prefix), int(digits))
        return None if found is None else found[1]

    def __len__(self) -> int:
        return len(self._tasks)
