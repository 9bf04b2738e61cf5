"""The manager's shared record: the task table, the queue, the running set and the
change events, under one lock.

Two roles use it, each from its own side: the :class:`~supervisor.manager.Manager`
facade (callers' threads: create, cancel, read) and the
:class:`~supervisor.dispatcher.Dispatcher` (the loop thread: start, report,
finish, purge). Every state change goes through :meth:`Ledger.change` under
:attr:`Ledger.lock`, which publishes its event in the same critical section,
so subscribers (and the journal) see changes in the order they happened.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from supervisor.errors import ManagerTerminated
from supervisor.table import TaskTable
from supervisor.wire import ChangeEvent

if TYPE_CHECKING:
    from collections.abc import Callable

    from supervisor.backend import Registration
    from supervisor.events import EventHub
    from supervisor.outcome import Outcome, Usage
    from supervisor.states import TaskState
    from supervisor.task import Task
    from supervisor.wire import TaskSnapshot


class Ledger:
    """Tasks and their bookkeeping; every attribute is read and changed under :attr:`lock`."""

    def __init__(self, events: EventHub) -> None:
        self.lock = threading.Lock()
        self.table = TaskTable()
        self.events = events
        self.animators: dict[str, Registration] = {}
        self.queue: deque[str] = deque()  #: ids of NEW tasks waiting for a slot, in order
        self.running: set[str] = set()  #: ids of the tasks a backend took
        self.terminating = False
        #: why the backend cannot run tasks now (None: it can); kept by the dispatcher
        self.unavailable: str | None = None
        #: bytes captured and lines dropped, by (operation, stream), since the start
        self.log_totals: dict[tuple[str, str], list[int]] = {}
        #: called with each new version (under the lock), e.g. to journal it
        self.on_version: Callable[[str, TaskSnapshot], None] | None = None

    def check_open(self) -> None:
        """Raise unless new work is accepted (caller holds the lock).

        Raises:
            ManagerTerminated: the manager is terminating or terminated.
        """
        if self.terminating:
            raise ManagerTerminated("the manager is terminating or terminated")

    def publish(self, method: str, task: Task) -> None:
        """Queue the change event of the task's current version (caller holds the lock,
        so that order is change order)."""
        snapshot = task.snapshot()
        if self.on_version is not None:
            self.on_version(method, snapshot)
        if not self.events.active:
            return
        uri = "/tasks" if method == "POST" else f"/tasks/{task.id}"
        scope: dict[str, Any] = {"operation": task.operation, "state": task.state.value}
        if method == "POST":
            scope = {"meta.id": task.id, **scope}
        # NOTE: one immutable snapshot, shared by every subscriber: nothing is copied here.
        self.events.publish(ChangeEvent(method, uri, scope, snapshot))

    def change(self, task: Task, state: TaskState, *notes: str,
               outcome: Outcome | None = None, usage: Usage | None = None) -> None:
        """Move a task to ``state`` and publish the change (caller holds the lock)."""
        self.table.transition(task, state, *notes, outcome=outcome, usage=usage)
        self.publish("PATCH", task)

    def touch(self, task: Task) -> None:
        """Record a change of a task's fields other than its state, and publish it."""
        task.touch()
        self.publish("PATCH", task)
