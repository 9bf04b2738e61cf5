"""The loop side of the manager: the queue, dispatch, reports, outcomes, shutdown.

Everything here runs on the manager's loop thread, except ``_check_open``
and ``_publish``, which callers use under the lock. :class:`Manager` (in
manager.py) is the public facade and inherits this; the split keeps the
facade readable and the supervision logic in one place. Where and how a task
runs is the :class:`~supervisor.backend.Backend`'s business; this side is its
:class:`~supervisor.backend.Host`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

from supervisor.backend import Backend, Launch, Outcome, Registration, Report
from supervisor.consts import CONSTS
from supervisor.errors import BackendUnavailable, ManagerTerminated
from supervisor.events import EventHub
from supervisor.protocol import (
    Note,
    Progress,
    ProtocolError,
    StateChanged,
    check_progress,
    check_result_json,
    check_timestamp,
    clean_text,
)
from supervisor.snapshot import ChangeEvent
from supervisor.states import TaskState
from supervisor.table import TaskTable
from supervisor.task import Task

log = logging.getLogger("housekeeping.supervisor")


class _ProgressGate:
    """The progress of one task waiting for its coalescing window to end."""

    __slots__ = ("applied", "timer", "timestamp", "values")

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.timestamp = 0.0
        self.applied = -1e9  #: loop time of the last progress applied
        self.timer: asyncio.TimerHandle | None = None


class Supervision:
    """The manager's state and everything its loop thread does with it."""

    max_workers: int
    purge_delay: float
    cancel_grace: float
    _lock: threading.Lock
    _table: TaskTable
    _events: EventHub
    _animators: dict[str, Registration]
    _queue: deque[str]
    _running: set[str]
    _terminating: bool
    _backend: Backend
    _progress_gates: dict[str, _ProgressGate]

    def _check_open(self) -> None:
        if self._terminating:
            raise ManagerTerminated("the manager is terminating or terminated")

    def _check_available(self) -> None:
        reason = self._backend.unavailable()
        if reason is not None:
            raise BackendUnavailable(reason)

    def _publish(self, method: str, task: Task) -> None:
        """Queue a change event (caller holds the lock, so order is change order)."""
        if not self._events.active:
            return
        uri = "/tasks" if method == "POST" else f"/tasks/{task.id}"
        scope: dict[str, Any] = {"operation": task.operation, "state": task.state.value}
        if method == "POST":
            scope = {"meta.id": task.id, **scope}
        # NOTE: one immutable snapshot, shared by every subscriber: nothing is copied here.
        self._events.publish(ChangeEvent(method, uri, scope, task.snapshot()))

    async def _boot(self) -> None:
        await self._backend.open(self)

    def _dispatch(self) -> None:
        """Hand queued tasks, oldest first, to the backend while slots are free."""
        if self._terminating:
            return
        reason = self._backend.unavailable()
        if reason is not None:
            self._fail_queued(reason)
            return
        while True:
            with self._lock:
                if not (self._queue and len(self._running) < self.max_workers
                        and self._backend.can_start()):
                    return
                task_id = self._queue[0]
                task = self._table.get(task_id)
                assert task is not None and task.state is TaskState.NEW
                snapshot, registration = task.snapshot(), task.registration
            # NOTE: the hand-over (decoding the task, pickling, writing to a
            # pipe or a scheduler) happens outside the lock, so that no reader
            # waits on a child. Only this loop thread dispatches, so the task
            # stays at the head of the queue unless it is canceled meanwhile.
            launch = Launch(task_id, snapshot.json(), registration)
            started = self._backend.start(launch)
            with self._lock:
                if not started:
                    continue
                self._running.add(task_id)
                if self._queue and self._queue[0] == task_id:
                    self._queue.popleft()
                    self._table.transition(task, TaskState.ACTIVE)
                    self._publish("PATCH", task)
                    continue
            # canceled while it was being handed over: stop what was started
            self._backend.cancel(task_id)

    def _fail_queued(self, reason: str) -> None:
        with self._lock:
            failed = list(self._queue)
            self._queue.clear()
            for task_id in failed:
                task = self._table.get(task_id)
                if task is not None:
                    self._table.transition(task, TaskState.FAILED, reason)
                    self._publish("PATCH", task)
        for task_id in failed:
            self._schedule_purge(task_id)

    # -- the Host side of the backend seam ----------------------------------

    def backend_changed(self) -> None:
        """Capacity or availability changed."""
        self._dispatch()

    def task_message(self, task_id: str, message: Report) -> str | None:
        """Apply one report of a running task (ignored once it is terminal).

        Progress is coalesced here too, whatever the child does: at most one
        progress version per ``Consts.progress_interval`` per task, the latest
        value applied at the end of the window. Any other report first applies
        the progress pending before it, so the order of changes is kept.
        """
        if isinstance(message, Progress):
            try:
                values = check_progress(dict(message.values))
                timestamp = check_timestamp(message.timestamp)
            except (TypeError, ValueError, ProtocolError) as exc:
                return f"bad progress: {exc}"
            self._gate_progress(task_id, values, timestamp)
            return None
        self._flush_progress(task_id)
        with self._lock:
            task = self._table.get(task_id)
            if task is None or task.terminal:
                return None
            if isinstance(message, StateChanged):
                if message.state not in (TaskState.ACTIVE.value, TaskState.WAITING.value):
                    return f"bad state {message.state!r}"[:200]
                new = TaskState(message.state)
                if new is task.state:
                    return None
                self._table.transition(task, new)
            elif isinstance(message, Note):
                task.note(clean_text(message.text))
                task.touch()
            else:
                return f"unexpected {type(message).__name__}"
            self._publish("PATCH", task)
        return None

    def _gate_progress(self, task_id: str, values: dict[str, int], timestamp: float) -> None:
        """Apply progress now, or merge it into the window's pending value."""
        loop = asyncio.get_running_loop()
        gate = self._progress_gates.get(task_id)
        if gate is None:
            gate = self._progress_gates[task_id] = _ProgressGate()
        gate.values.update(values)
        gate.timestamp = timestamp
        if gate.timer is not None:
            return
        wait = gate.applied + CONSTS.progress_interval - loop.time()
        if wait <= 0:
            self._flush_progress(task_id)
        else:
            gate.timer = loop.call_later(wait, self._flush_progress, task_id)

    def _flush_progress(self, task_id: str) -> None:
        """Apply the progress pending for a task, if any."""
        gate = self._progress_gates.get(task_id)
        if gate is None or not gate.values:
            return
        if gate.timer is not None:
            gate.timer.cancel()
            gate.timer = None
        values, gate.values = gate.values, {}
        gate.applied = asyncio.get_running_loop().time()
        with self._lock:
            task = self._table.get(task_id)
            if task is None or task.terminal:
                return
            task.set_progress(values, gate.timestamp)
            self._publish("PATCH", task)

    def task_finished(self, task_id: str, outcome: Outcome) -> None:
        """Record the task's one terminal state and free its slot."""
        self._flush_progress(task_id)  # NOTE: the last progress is never lost
        self._progress_gates.pop(task_id, None)
        result_bytes = None
        if outcome.result_json is not None and outcome.state is TaskState.SUCCEEDED:
            # NOTE: whatever the backend, the table holds strict JSON only.
            try:
                result_bytes = check_result_json(outcome.result_json).encode("ascii")
            except ProtocolError as exc:
                outcome = Outcome(TaskState.FAILED, (f"protocol error: {exc}",))
        with self._lock:
            self._running.discard(task_id)
            task = self._table.get(task_id)
            if task is not None and not task.terminal:
                if outcome.result_json is not None and outcome.state is TaskState.SUCCEEDED:
                    task.result_json = result_bytes
                self._table.transition(task, outcome.state, *outcome.notes)
                self._publish("PATCH", task)
        first = outcome.notes[0] if outcome.notes else ""
        if outcome.traceback:
            log.error("task %s failed: %s\n%s", task_id, first, outcome.traceback)
        log.info("task %s ended %s%s", task_id, outcome.state.value,
                 f": {first}" if first else "")
        self._schedule_purge(task_id)
        self._dispatch()

    # -- purge, cancel, shutdown --------------------------------------------

    def _schedule_purge(self, task_id: str) -> None:
        if self._terminating:
            return
        if self.purge_delay == 0:
            self._purge(task_id)
        else:
            asyncio.get_running_loop().call_later(self.purge_delay, self._purge, task_id)

    def _purge(self, task_id: str) -> None:
        with self._lock:
            task = self._table.get(task_id)
            if task is None or not task.terminal:
                return
            self._table.remove(task_id)
            self._publish("DELETE", task)

    def _cancel_running(self, task_id: str) -> None:
        if task_id in self._running:
            self._backend.cancel(task_id)

    async def _shutdown(self) -> None:
        """Steps 2-4 of terminate(), on the loop."""
        # 2. cancel queued tasks; mark running ones; the backend tells, waits, kills.
        with self._lock:
            for task_id in self._queue:
                task = self._table.get(task_id)
                if task is not None:
                    task.cancel_requested = True
                    self._table.transition(task, TaskState.CANCELED,
                                           "canceled: the manager is terminating")
                    self._publish("PATCH", task)
            self._queue.clear()
            for task_id in self._running:
                task = self._table.get(task_id)
                if task is not None and not task.cancel_requested:
                    task.cancel_requested = True
                    task.touch()
                    self._publish("PATCH", task)
        await self._backend.shutdown()
