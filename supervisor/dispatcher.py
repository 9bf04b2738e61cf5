"""The loop side of the manager: the queue, the backend's host, outcomes, purge, shutdown.

A :class:`Dispatcher` lives on the manager's loop thread and owns everything
that happens there: it hands queued tasks to the backend, takes the backend's
reports (it is the backend's :class:`~supervisor.backend.Host`), records
outcomes, purges finished tasks, and runs the shutdown from its first step to
its last. It shares the :class:`~supervisor.ledger.Ledger` with the
:class:`~supervisor.manager.Manager` facade, whose methods only take the
lock, check, record and hand over to it.

::

    Manager (any thread)      Dispatcher (loop thread)              Backend
    ────────────────────      ────────────────────────              ───────
    run_task ─▶ ledger ─call─▶ dispatch() ─ start(Launch) ────────▶ runs it
    cancel_task ───────call──▶ cancel_running() ─ cancel(id) ─────▶ tell, grace, kill
    kill_task ─────────call──▶ kill_running() ─── kill(id, why) ──▶ kill now
                               task_message / task_running ◀────── reports
                               task_finished(Ending) ◀──────────── exactly once
    terminate ─────────run───▶ shutdown(): 2. cancel, 3. kill, 4. stop (all here)

No backend call runs under the ledger's lock: what is decided under it is
carried out after it is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from supervisor.backend import Launch, Report
from supervisor.consts import CONSTS
from supervisor.outcome import Ending, Outcome, OutcomeKind
from supervisor.protocol import (
    Note,
    Progress,
    ProtocolError,
    StateChanged,
    check_progress,
    check_timestamp,
    clean_text,
)
from supervisor.states import TaskState
from supervisor.tasklog import STREAMS, TaskLog

if TYPE_CHECKING:
    from supervisor.backend import Backend
    from supervisor.ledger import Ledger
    from supervisor.sandbox import Sandbox

log = logging.getLogger("housekeeping.supervisor")

#: Outcomes of a running task that a terminate turns into ``canceled-terminate``.
_CANCELED_RUNNING = frozenset({OutcomeKind.CANCELED_HONOURED, OutcomeKind.CANCELED_KILLED})


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


class Dispatcher:
    """The manager's loop-thread role, and the :class:`~supervisor.backend.Host` of its
    backend. Every method runs on the loop thread."""

    def __init__(self, ledger: Ledger, backend: Backend, *, max_workers: int,
                 cancel_grace: float, purge_delay: float, sandbox: Sandbox,
                 log_limit: int) -> None:
        self._ledger = ledger
        self._backend = backend
        self.max_workers = max_workers  #: Host: tasks in flight at most
        self.cancel_grace = cancel_grace  #: Host: seconds a canceled task may live on
        self.sandbox = sandbox  #: Host: the default of every operation, as in effect here
        self.purge_delay = purge_delay
        self.log_limit = log_limit
        #: leave queued tasks NEW at shutdown (a journal keeps them for the next run)
        self.keep_queued = False
        self._report_gates: dict[str, _ReportGate] = {}
        #: the logs of started tasks whose output has not ended, by task id
        self._open_logs: dict[str, tuple[TaskLog, str]] = {}

    async def open(self) -> None:
        """Open the backend (step 0 of the manager's life)."""
        await self._backend.open(self)
        self._note_availability()

    def _note_availability(self) -> str | None:
        """Copy the backend's availability into the ledger, where callers read it."""
        reason = self._backend.unavailable()
        with self._ledger.lock:
            self._ledger.unavailable = reason
        return reason

    def new_log(self) -> TaskLog:
        """A task log with the manager's limits."""
        return TaskLog(self.log_limit, CONSTS.subscriber_backlog,
                       CONSTS.subscriber_backlog_bytes)

    # -- handing tasks over ----------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued tasks, oldest first, to the backend while slots are free."""
        ledger = self._ledger
        if ledger.terminating:
            return
        # NOTE: read as it is here; the ledger's copy (what callers' threads
        # read) changes only when the backend says so (backend_changed)
        reason = self._backend.unavailable()
        if reason is not None:
            self._fail_queued(reason)
            return
        while True:
            with ledger.lock:
                if not (ledger.queue and len(ledger.running) < self.max_workers):
                    return
                head = ledger.table.get(ledger.queue[0])
                assert head is not None
                if not self._backend.can_start(head.registration):
                    return
                # NOTE: claimed (out of the queue, in running) before the lock is
                # released: a cancel meanwhile takes the running path and reaches
                # the process once it started.
                task_id = ledger.queue.popleft()
                task = ledger.table.get(task_id)
                assert task is not None and task.state is TaskState.NEW
                ledger.running.add(task_id)
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
            with ledger.lock:
                if started:
                    task.started = True
                    if task.log is None:
                        task.log = self.new_log()
                    self._open_logs[task_id] = (task.log, task.operation)
                    if self._backend.starts_running:
                        ledger.change(task, TaskState.ACTIVE)
                    continue
                ledger.running.discard(task_id)
                if broken is None and not task.cancel_requested:
                    ledger.queue.appendleft(task_id)  # the backend could not take it: retry
                    continue
                if broken is not None:
                    outcome = Outcome(OutcomeKind.LOST, broken[:300])
                else:
                    outcome = Outcome(OutcomeKind.CANCELED_QUEUED, "canceled while queued")
                ledger.change(task, outcome.state, outcome=outcome)
            self.schedule_purge(task_id)

    def _fail_queued(self, reason: str) -> None:
        """The backend cannot run tasks now: every queued task is LOST."""
        ledger = self._ledger
        with ledger.lock:
            failed = list(ledger.queue)
            ledger.queue.clear()
            for task_id in failed:
                task = ledger.table.get(task_id)
                if task is not None:
                    ledger.change(task, TaskState.FAILED,
                                  outcome=Outcome(OutcomeKind.LOST, reason))
        for task_id in failed:
            self.schedule_purge(task_id)

    def cancel_running(self, task_id: str) -> None:
        """Tell a started task's backend to cancel it (the facade marked it)."""
        if task_id in self._ledger.running:
            self._backend.cancel(task_id)

    def kill_running(self, task_id: str, reason: str) -> None:
        """Kill a started task's tree now, without a cancel grace."""
        if task_id in self._ledger.running:
            self._backend.kill(task_id, reason)

    # -- the Host side of the backend seam ---------------------------------------

    def backend_changed(self) -> None:
        """Capacity or availability changed."""
        self._note_availability()
        self.dispatch()

    def task_running(self, task_id: str) -> None:
        """A started task's process runs now (for a backend that does not start
        tasks running at once): NEW becomes ACTIVE."""
        with self._ledger.lock:
            self._run(task_id)

    def _run(self, task_id: str) -> None:
        """NEW ⇒ ACTIVE for a started task (caller holds the lock)."""
        ledger = self._ledger
        task = ledger.table.get(task_id)
        if task is not None and task.state is TaskState.NEW and task_id in ledger.running:
            ledger.change(task, TaskState.ACTIVE)

    def task_message(self, task_id: str, message: Report) -> str | None:
        """Take one report of a running task (ignored once it is terminal).

        Progress and notes are coalesced here, whatever the child does: they
        make at most one version per ``Consts.progress_interval``. The first
        after a quiet window applies at once; the others of the window wait
        for its end and apply together as one version (notes in order,
        progress merged), so a flood of frames cannot flood the table. A state
        change is a change of its own: what is pending applies first, then it.

        Returns:
            What was wrong with the report (the backend ends the task as a
            protocol error), or None.
        """
        if task_id not in self._ledger.running:
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
            ledger = self._ledger
            with ledger.lock:
                self._run(task_id)  # NOTE: a report says it runs
                task = ledger.table.get(task_id)
                new = TaskState(message.state)
                if task is not None and not task.terminal and new is not task.state:
                    ledger.change(task, new)
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
        ledger = self._ledger
        with ledger.lock:
            self._run(task_id)  # NOTE: a report says it runs
            task = ledger.table.get(task_id)
            if task is None or task.terminal:
                return
            for text in pending:
                task.note(text)
            if values:
                task.set_progress(values, gate.timestamp)  # NOTE: the one version bump
                ledger.publish("PATCH", task)
            else:
                ledger.touch(task)

    def task_finished(self, task_id: str, ending: Ending) -> None:
        """Record the task's one terminal state and free its slot."""
        self._flush_reports(task_id)  # NOTE: the last reports are never lost
        self._report_gates.pop(task_id, None)
        ledger = self._ledger
        outcome = ending.outcome
        if ledger.terminating and outcome.kind in _CANCELED_RUNNING:
            outcome = Outcome(OutcomeKind.CANCELED_TERMINATE, outcome.message,
                              outcome.exit_code, outcome.signal, outcome.error_type,
                              outcome.killed)
        with ledger.lock:
            if outcome.state is TaskState.SUCCEEDED:
                self._run(task_id)  # NOTE: it ran, though no report said so in time
            ledger.running.discard(task_id)  # NOTE: after: _run wants it running
            task = ledger.table.get(task_id)
            if task is not None and not task.terminal:
                if ending.result_json is not None and outcome.state is TaskState.SUCCEEDED:
                    task.result_json = ending.result_json.encode("ascii")
                ledger.change(task, outcome.state, *ending.notes, outcome=outcome,
                              usage=ending.usage)
        if ending.traceback:
            log.error("task %s failed: %s\n%s", task_id, outcome.message, ending.traceback)
        log.info("task %s ended %s (%s)%s", task_id, outcome.state.value, outcome.kind.value,
                 f": {outcome.message}" if outcome.message else "")
        self.schedule_purge(task_id)
        self.dispatch()

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
        totals = self._ledger.log_totals.get((operation, stream))
        if totals is None:
            with self._ledger.lock:  # NOTE: a new key, while log_totals() may be iterating
                totals = self._ledger.log_totals.setdefault((operation, stream), [0, 0])
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
        with self._ledger.lock:
            task = self._ledger.table.get(task_id)
            task_log.close(terminal=task is not None and task.terminal)

    # -- purge and shutdown -------------------------------------------------------

    def schedule_purge(self, task_id: str) -> None:
        """Purge a finished task ``purge_delay`` seconds from now (at once for 0)."""
        if self._ledger.terminating:
            return
        if self.purge_delay == 0:
            self._purge(task_id)
        else:
            asyncio.get_running_loop().call_later(self.purge_delay, self._purge, task_id)

    def _purge(self, task_id: str) -> None:
        ledger = self._ledger
        with ledger.lock:
            task = ledger.table.get(task_id)
            if task is None or not task.terminal:
                return
            ledger.table.remove(task_id)
            ledger.publish("DELETE", task)
            if task.log is not None:
                task.log.end("purged")

    async def shutdown(self, deadline: float) -> None:
        """Steps 2-4 of terminate(), all on this thread; step 1 (refusing new work)
        was taken under the lock by the caller.

        NOTE: the last resort (kill every process by force) runs here too, when
        the backend's orderly shutdown raises or outlives ``deadline`` seconds:
        one thread owns the whole shutdown, so nothing closes a descriptor
        twice or races the backend's own steps.
        """
        # 2. cancel queued tasks (they never ran); mark running ones; the backend
        # tells them, waits cancel_grace, kills what is left (3) and stops (4).
        ledger = self._ledger
        with ledger.lock:
            for task_id in ledger.queue:
                task = ledger.table.get(task_id)
                if task is not None and not self.keep_queued:
                    task.cancel_requested = True
                    ledger.change(task, TaskState.CANCELED, outcome=Outcome(
                        OutcomeKind.CANCELED_QUEUED, "canceled: the manager is terminating"))
            ledger.queue.clear()  # NOTE: with keep_queued they stay NEW, in the journal too
            for task_id in ledger.running:
                task = ledger.table.get(task_id)
                if task is not None and not task.cancel_requested:
                    task.cancel_requested = True
                    ledger.touch(task)
        log.debug("terminate: queued tasks canceled; the backend ends the running ones")
        try:
            await asyncio.wait_for(self._backend.shutdown(), deadline)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("terminate: the orderly shutdown failed; killing every process")
            self._backend.kill_everything()
