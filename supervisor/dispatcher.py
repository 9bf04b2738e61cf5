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
import time
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
    check_timestamp,
    clean_text,
)
from supervisor.sandbox import Sandbox
from supervisor.states import TaskState
from supervisor.table import TaskTable
from supervisor.task import Task
from supervisor.tasklog import STREAMS, TaskLog
from supervisor.wire import ChangeEvent

log = logging.getLogger("housekeeping.supervisor")


class _ReportGate:
    """The reports of one task waiting for its coalescing window to end."""

    __slots__ = ("applied", "pending", "timer", "timestamp", "values")

    def __init__(self) -> None:
        self.values: dict[str, int] = {}  #: progress, merged
        self.timestamp = 0.0
        #: notes, in order; the oldest drop out as the task's messages would
        self.pending: deque[str] = deque(maxlen=CONSTS.max_messages)
        self.applied = -1e9  #: loop time of the last version applied
        self.timer: asyncio.TimerHandle | None = None

    @property
    def empty(self) -> bool:
        return not (self.values or self.pending)


class Supervision:
    """The manager's state and everything its loop thread does with it."""

    max_workers: int
    purge_delay: float
    cancel_grace: float
    sandbox: Sandbox
    _lock: threading.Lock
    _table: TaskTable
    _events: EventHub
    _animators: dict[str, Registration]
    _queue: deque[str]
    _running: set[str]
    _terminating: bool
    _backend: Backend
    _report_gates: dict[str, _ReportGate]
    log_limit: int
    #: the logs of started tasks whose output has not ended, by task id (loop thread)
    _open_logs: dict[str, tuple[TaskLog, str]]
    #: bytes captured and lines dropped, by (operation, stream), since the start
    _log_totals: dict[tuple[str, str], list[int]]

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
                if not (self._queue and len(self._running) < self.max_workers):
                    return
                head = self._table.get(self._queue[0])
                assert head is not None
                if not self._backend.can_start(head.registration):
                    return
                # NOTE: claimed (out of the queue, in _running) before the lock is
                # released: a cancel meanwhile takes the running path and reaches
                # the process once it started.
                task_id = self._queue.popleft()
                task = self._table.get(task_id)
                assert task is not None and task.state is TaskState.NEW
                self._running.add(task_id)
                snapshot, registration = task.snapshot(), task.registration
            # NOTE: the hand-over (decoding the task, pickling, writing to a
            # pipe or a scheduler) happens outside the lock, so that no reader
            # waits on a child.
            broken = None
            try:
                started = self._backend.start(Launch(task_id, snapshot.json(), registration))
            except Exception as exc:  # NOTE: a backend's bug fails this task, not the loop
                log.exception("task %s could not be started", task_id)
                started, broken = False, f"could not be started: {type(exc).__name__}: {exc}"
            with self._lock:
                if started:
                    task.started = True
                    if task.log is None:
                        task.log = self._new_log()
                    self._open_logs[task_id] = (task.log, task.operation)
                    if self._backend.starts_running:
                        self._table.transition(task, TaskState.ACTIVE)
                        self._publish("PATCH", task)
                    continue
                self._running.discard(task_id)
                if broken is None and not task.cancel_requested:
                    self._queue.appendleft(task_id)  # the backend could not take it: retry
                    continue
                if broken is not None:
                    self._table.transition(task, TaskState.FAILED, broken[:300])
                else:
                    self._table.transition(task, TaskState.CANCELED, "canceled while queued")
                self._publish("PATCH", task)
            self._schedule_purge(task_id)

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

    def _new_log(self) -> TaskLog:
        return TaskLog(self.log_limit, CONSTS.subscriber_backlog,
                       CONSTS.subscriber_backlog_bytes)

    # -- the Host side of the backend seam ----------------------------------

    def task_output(self, task_id: str, stream: str, data: bytes,
                    when: float | None = None) -> None:
        """Take bytes a started task wrote on ``stream`` (``"stdout"``/``"stderr"``)."""
        found = self._open_logs.get(task_id)
        if found is None or not data:
            return
        task_log, operation = found
        index = STREAMS.index(stream)
        dropped = task_log.feed(index, data, time.time() if when is None else when)
        self._count_output(operation, stream, len(data), dropped)

    def task_output_lines(self, task_id: str, stream: str, texts: list[str],
                          when: float) -> None:
        """Take lines a started task wrote, already split (by a remote worker)."""
        found = self._open_logs.get(task_id)
        if found is None or not texts:
            return
        task_log, operation = found
        dropped = task_log.append_lines(STREAMS.index(stream), texts, when)
        self._count_output(operation, stream, sum(len(t) + 1 for t in texts), dropped)

    def _count_output(self, operation: str, stream: str, size: int, dropped: int) -> None:
        totals = self._log_totals.get((operation, stream))
        if totals is None:
            with self._lock:  # NOTE: a new key, while log_totals() may be iterating
                totals = self._log_totals.setdefault((operation, stream), [0, 0])
        totals[0] += size
        totals[1] += dropped

    def task_output_closed(self, task_id: str) -> None:
        """A started task's output ended (every pipe closed, or given up on)."""
        found = self._open_logs.pop(task_id, None)
        if found is None:
            return
        task_log, operation = found
        now = time.time()
        for index, stream in enumerate(STREAMS):
            self._count_output(operation, stream, 0, task_log.flush(index, now))
        with self._lock:
            task = self._table.get(task_id)
            task_log.close(terminal=task is not None and task.terminal)

    def backend_changed(self) -> None:
        """Capacity or availability changed."""
        self._dispatch()

    def task_running(self, task_id: str) -> None:
        """A started task's process runs now (for a backend that does not start
        tasks running at once): NEW becomes ACTIVE."""
        with self._lock:
            self._run(task_id)

    def _run(self, task_id: str) -> None:
        """NEW ⇒ ACTIVE for a started task (caller holds the lock)."""
        task = self._table.get(task_id)
        if task is not None and task.state is TaskState.NEW and task_id in self._running:
            self._table.transition(task, TaskState.ACTIVE)
            self._publish("PATCH", task)

    def task_message(self, task_id: str, message: Report) -> str | None:
        """Take one report of a running task (ignored once it is terminal).

        Progress and notes are coalesced here, whatever the child does: they
        make at most one version per ``Consts.progress_interval``. The first
        after a quiet window applies at once; the others of the window wait
        for its end and apply together as one version (notes in order,
        progress merged), so a flood of frames cannot flood the table. A state
        change is a change of its own: what is pending applies first, then it.
        """
        if task_id not in self._running:
            return None  # NOTE: it ended; a late report must not leave a gate behind
        gate = self._report_gates.get(task_id)
        if gate is None:
            gate = self._report_gates[task_id] = _ReportGate()
        if isinstance(message, Progress):
            try:
                values = check_progress(dict(message.values))
                timestamp = check_timestamp(message.timestamp)
            except (TypeError, ValueError, ProtocolError) as exc:
                return f"bad progress: {exc}"
            gate.values.update(values)
            gate.timestamp = timestamp
        elif isinstance(message, StateChanged):
            if message.state not in (TaskState.ACTIVE.value, TaskState.WAITING.value):
                return f"bad state {message.state!r}"[:200]
            self._flush_reports(task_id)
            with self._lock:
                self._run(task_id)  # NOTE: a report says it runs
                task = self._table.get(task_id)
                new = TaskState(message.state)
                if task is not None and not task.terminal and new is not task.state:
                    self._table.transition(task, new)
                    self._publish("PATCH", task)
            return None
        elif isinstance(message, Note):
            gate.pending.append(clean_text(message.text))
        else:
            return f"unexpected {type(message).__name__}"
        if gate.timer is None:
            loop = asyncio.get_running_loop()
            wait = gate.applied + CONSTS.progress_interval - loop.time()
            if wait <= 0:
                self._flush_reports(task_id)
            else:
                gate.timer = loop.call_later(wait, self._flush_reports, task_id)
        return None

    def _flush_reports(self, task_id: str) -> None:
        """Apply the reports pending for a task, if any, as one change event."""
        gate = self._report_gates.get(task_id)
        if gate is None or gate.empty:
            return
        if gate.timer is not None:
            gate.timer.cancel()
            gate.timer = None
        gate.applied = asyncio.get_running_loop().time()
        pending, values = list(gate.pending), gate.values
        gate.pending.clear()
        gate.values = {}
        with self._lock:
            self._run(task_id)  # NOTE: a report says it runs
            task = self._table.get(task_id)
            if task is None or task.terminal:
                return
            for text in pending:
                task.note(text)
            if values:
                task.set_progress(values, gate.timestamp)  # NOTE: the one version bump
            else:
                task.touch()
            self._publish("PATCH", task)

    def task_finished(self, task_id: str, outcome: Outcome) -> None:
        """Record the task's one terminal state and free its slot."""
        self._flush_reports(task_id)  # NOTE: the last reports are never lost
        self._report_gates.pop(task_id, None)
        with self._lock:
            self._running.discard(task_id)
            task = self._table.get(task_id)
            if outcome.state is TaskState.SUCCEEDED:
                self._run(task_id)  # NOTE: it ran, though no report said so in time
            if task is not None and not task.terminal:
                if outcome.result_json is not None and outcome.state is TaskState.SUCCEEDED:
                    task.result_json = outcome.result_json.encode("ascii")
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
            if task.log is not None:
                task.log.end("purged")

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
