"""The Manager: the facade callers use — create, cancel, read, follow, terminate.

It validates on the caller's thread, records under the ledger's lock and hands
over; everything that runs tasks happens on the loop thread, in the
:class:`~supervisor.dispatcher.Dispatcher` and the backend it hosts.

::

    callers (any thread)           loop thread                        where tasks run
    ────────────────────           ───────────                        ───────────────
    run_task ─ check ─ lock ─▶ Ledger ◀─ Dispatcher ─ start(Launch) ─▶ Backend
    cancel_task / kill_task ─ call ────▶ (the Host)  ◀─ reports, Ending ─ (local: a
    get/list_tasks ─ lock ─▶ snapshots                                   process per task)
    subscribe ─▶ EventHub ◀─ every change, published under the lock
    terminate ─ flag ─ run ────────────▶ Dispatcher.shutdown(): cancel, kill, stop

Every state change happens under the ledger's lock and is published in the
same critical section, so subscribers see changes in order. No backend call
runs under that lock, and no caller's thread ever calls a backend.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from supervisor.backend import Backend, Registration
from supervisor.backends.local import LocalBackend
from supervisor.consts import CONSTS
from supervisor.dispatcher import Dispatcher
from supervisor.errors import (
    BackendUnavailable,
    HousekeepingError,
    InvalidArguments,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.events import Callback, EventHub, RawCallback
from supervisor.idempotency import Created, KeyRecord, KeyStore, body_digest, check_key
from supervisor.journal import DEFAULT_RETENTION, DEFAULT_RETENTION_TASKS, Journal
from supervisor.ledger import Ledger
from supervisor.listing import check_limit, make_query, merge
from supervisor.loop import LoopThread
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.restart import take_back
from supervisor.sandbox import DEFAULT_UID_RANGE, Sandbox, check_uid_range, containment
from supervisor.states import TaskState
from supervisor.task import Task, check_create
from supervisor.tasklog import LineCallback
from supervisor.wire import TaskSnapshot

DEFAULT_LOG_LIMIT = 1024 * 1024  #: bytes of output kept per task

log = logging.getLogger("housekeeping.supervisor")

_manager_numbers = itertools.count(1)
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Manager:
    """Supervise in-memory tasks, each running in a child process of its own.

    Args:
        purge_delay: seconds a finished task stays in the table (0 keeps none).
        max_workers: task processes running at once (default: CPU count).
        max_queued: NEW tasks allowed to wait for a slot (default: unbounded).
        cancel_grace: seconds a canceled task's tree may live before it is killed.
        subreaper: make this process a child subreaper, so that even a daemon
            whose task process and starter were both killed from outside is
            re-parented here and killed. Off by default: it changes the host.
            (For the default local backend only.)
        backend: where tasks run. Default: a :class:`~supervisor.backends.local.LocalBackend`
            (a process per task on this machine). A
            ``supervisor.backends.dask.DaskBackend`` runs them on a Dask cluster.
        sandbox: how the kernel confines the task processes of every operation
            (``register_animator(sandbox=)`` overrides it per operation). The
            default puts each task in a PID namespace of its own where the
            kernel permits it.
        uid_range: the uids ``Sandbox(user="dynamic")`` hands out, first and
            last (default 61184-65519, systemd's DynamicUser range). For the
            default local backend.
        log_limit: bytes of output kept per task (its newest lines; 1 MiB).
        journal: an SQLite file (made if absent) that records every task, so that
            records survive a restart: see the README, "Records that survive a
            restart". Without it everything lives in memory.
        retention: seconds a finished task's record is kept in the journal.
        retention_tasks: records the journal keeps at most (the oldest finished go).

    Raises:
        ValueError: a limit is out of range.
        InvalidAnimator: ``sandbox`` asks for what this machine cannot give.
        JournalError: the journal cannot be opened or read, or another process has it.
    """

    def __init__(
        self,
        purge_delay: float = 60.0,
        max_workers: int | None = None,
        max_queued: int | None = None,
        cancel_grace: float = 5.0,
        *,
        subreaper: bool = False,
        backend: Backend | None = None,
        sandbox: Sandbox | None = None,
        uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
        log_limit: int = DEFAULT_LOG_LIMIT,
        journal: str | os.PathLike[str] | None = None,
        retention: float = DEFAULT_RETENTION,
        retention_tasks: int = DEFAULT_RETENTION_TASKS,
    ) -> None:
        child = sys.modules.get("workers.child")
        if child is not None and getattr(child, "importing_for_tasks", False):
            raise RuntimeError(
                "a Manager was being made while animator code was imported for tasks "
                "(in the starter or a task process): make it under "
                "'if __name__ == \"__main__\":' or in a function, not at import time")
        if not _is_number(purge_delay) or purge_delay < 0:
            raise ValueError("purge_delay must be a number >= 0")
        if backend is not None and not isinstance(backend, Backend):
            raise TypeError(f"backend must be a supervisor.backend.Backend, not {backend!r}")
        if backend is not None and subreaper:
            raise ValueError("subreaper applies to the local backend only")
        if max_workers is None:
            max_workers = (backend and backend.default_max_workers()) or os.cpu_count() or 1
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError("max_workers must be an integer >= 1")
        if max_queued is not None and (
            not isinstance(max_queued, int) or isinstance(max_queued, bool) or max_queued < 0
        ):
            raise ValueError("max_queued must be an integer >= 0 or None")
        if not _is_number(cancel_grace) or cancel_grace < 0:
            raise ValueError("cancel_grace must be a number >= 0")
        if sandbox is not None and not isinstance(sandbox, Sandbox):
            raise TypeError(f"sandbox must be a supervisor.Sandbox, not {sandbox!r}")
        uid_range = check_uid_range(uid_range)
        if not isinstance(log_limit, int) or isinstance(log_limit, bool) or log_limit < 1:
            raise ValueError("log_limit must be an integer >= 1 (bytes)")
        if not _is_number(retention) or retention <= 0:
            raise ValueError("retention must be a number of seconds > 0")
        _check_count("retention_tasks", retention_tasks, 1)
        self._requested_sandbox = sandbox or Sandbox()
        self.sandbox = self._requested_sandbox.effective()
        if self.sandbox.private_pids is False and (sandbox is None
                                                   or sandbox.private_pids is None):
            log.warning("tasks run without a PID namespace (this process may not make "
                        "one); task trees are held by a child subreaper")
        self.purge_delay = float(purge_delay)
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.cancel_grace = float(cancel_grace)
        self.subreaper = subreaper
        self.log_limit = log_limit

        self._events = EventHub(CONSTS.subscriber_backlog, CONSTS.subscriber_backlog_bytes)
        self._ledger = Ledger(self._events)
        self._keys = KeyStore()  #: idempotency keys (under the ledger's lock)
        #: NEW records of the last run, by operation, until it is registered
        self._held: dict[str, list[TaskSnapshot]] = {}
        self._journal: Journal | None = None
        self._backend = backend or LocalBackend(subreaper=subreaper, uid_range=uid_range)
        self._dispatcher = Dispatcher(
            self._ledger, self._backend, max_workers=max_workers,
            cancel_grace=self.cancel_grace, purge_delay=self.purge_delay,
            sandbox=self.sandbox, log_limit=log_limit)
        self._terminate_lock = threading.Lock()
        self._terminated = False
        if journal is not None:
            self._open_journal(journal, retention, retention_tasks)
            # NOTE: a graceful stop then leaves queued tasks NEW: they run after the restart
            self._dispatcher.keep_queued = True

        self._loop_thread = LoopThread(f"housekeeping-manager-{next(_manager_numbers)}")
        self._loop_thread.start()
        try:
            self._loop_thread.run(self._dispatcher.open())
        except BaseException:
            self._loop_thread.stop()
            if self._journal is not None:
                self._journal.close()
            raise

    def _open_journal(self, path: str | os.PathLike[str], retention: float,
                      retention_tasks: int) -> None:
        """Open the journal, continue after its ids, take its keys and hold its queued
        tasks until their operation is registered."""
        journal = self._journal = Journal.open(path, retention=retention,
                                               retention_tasks=retention_tasks)
        restored = journal.restored
        self._ledger.table.continue_after(restored.last_number)
        for key, key_record in restored.keys:
            self._keys.remember(key, key_record)
        for snapshot in restored.queued:
            self._held.setdefault(snapshot.operation, []).append(snapshot)
        self._ledger.on_version = journal.recorder(self._ledger.table)

    # -- public API ---------------------------------------------------------

    def register_animator(
        self,
        operation: str,
        animator: Any,
        timeout: float | None = None,
        max_memory: int | None = None,
        *,
        sandbox: Sandbox | None = None,
        requeue: bool = True,
    ) -> None:
        """Declare support for ``operation`` (replacing an earlier registration).

        Args:
            operation: the operation name tasks ask for, e.g. ``"HASH"``.
            animator: an object with ``validate(create)`` and ``execute(ops)``,
                picklable by reference (defined at module level).
            timeout: wall-clock seconds a task may run before it is killed (FAILED).
            max_memory: address-space limit of the task process, in bytes.
            sandbox: how the kernel confines its task processes (default: the
                manager's ``sandbox``).
            requeue: with a journal, what becomes of this operation's tasks that
                were still queued when the last run stopped: queued again (in
                their order, with their ids) or, if False, CANCELED
                (``canceled-queued``) without running.

        Raises:
            TypeError: ``animator`` is not an animator or cannot be sent to a child.
            ValueError: ``operation`` is empty or a limit is out of range.
            InvalidAnimator: ``sandbox`` asks for what this machine cannot give
                (the message names why).
        """
        if not isinstance(operation, str) or not operation:
            raise ValueError("operation must be a non-empty string")
        if isinstance(animator, type):
            raise TypeError(f"register an instance of {animator.__name__}, not the class")
        for method in ("validate", "execute"):
            if not callable(getattr(animator, method, None)):
                raise TypeError(f"an animator needs a callable {method}(); got {animator!r}")
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            raise ValueError("timeout must be a positive number or None")
        if max_memory is not None and (
            not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0
        ):
            raise ValueError("max_memory must be a positive integer (bytes) or None")
        if sandbox is not None and not isinstance(sandbox, Sandbox):
            raise TypeError(f"sandbox must be a supervisor.Sandbox, not {sandbox!r}")
        effective = self.sandbox if sandbox is None else sandbox.effective()
        try:
            pickled = pickle.dumps(animator, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(pickled)
        except Exception as exc:
            raise TypeError(
                f"animator {animator!r} cannot be sent to a child process "
                f"(define its class at module level; keep its attributes picklable): {exc}"
            ) from exc
        module = type(animator).__module__
        main_path = None
        if module == "__main__":
            main_path = getattr(sys.modules["__main__"], "__file__", None)
        registration = Registration(animator, pickled, main_path, timeout, max_memory,
                                    effective, None if module == "__main__" else module,
                                    sandbox or self._requested_sandbox)
        with self._ledger.lock:
            self._ledger.check_open()
            self._ledger.animators[operation] = registration
            held = self._held.pop(operation, [])
        self._loop_thread.call(self._backend.prepare, registration)
        if held:
            for task_id in take_back(self._ledger, held, registration, requeue):
                self._loop_thread.call(self._dispatcher.schedule_purge, task_id)
            self._loop_thread.call(self._dispatcher.dispatch)

    def registered_operations(self) -> list[str]:
        """The operations with an animator, sorted."""
        with self._ledger.lock:
            return sorted(self._ledger.animators)

    def operations(self) -> list[dict[str, Any]]:
        """Each registered operation with its limits as in effect, sorted by name.

        Returns:
            ``[{"operation", "timeout", "maxMemory", "sandbox": {"privatePids",
            "privateNetwork", "user", "maxProcesses", "maxCpuSeconds",
            "maxOpenFiles"}}, ...]`` (the form of ``GET /api/v1/operations``).
        """
        with self._ledger.lock:
            registered = sorted(self._ledger.animators.items())
        return [{"operation": name, "timeout": reg.timeout, "maxMemory": reg.max_memory,
                 "sandbox": reg.sandbox.to_wire()} for name, reg in registered]

    @property
    def journal_status(self) -> str | None:
        """``"ok"`` or what is wrong with the journal (a failing disk); None without one."""
        return self._journal.status if self._journal is not None else None

    @property
    def containment(self) -> str:
        """How the default sandbox holds task trees: ``"pid-namespace"`` or ``"subreaper"``."""
        return containment(self.sandbox)

    def run_task(self, create: dict[str, Any], idempotency_key: str | None = None) -> str:
        """Validate and queue a task; return its id at once.

        Args:
            create: ``{"operation", "objectId"?, "serviceStates"?, "args"?}``.
            idempotency_key: 1-128 of ``[A-Za-z0-9_.-]``: the same key with the
                same ``create`` within 24 h returns the first task's id and
                creates nothing (see :meth:`create_task`).

        Raises:
            IdempotencyConflict: ``idempotency_key`` came before with another ``create``.
            InvalidArguments: ``create`` is malformed (the message names the field).
            UnsupportedOperation: no animator is registered for the operation.
            QueueFull: too many tasks would wait for a slot (``max_queued``).
            ManagerTerminated: the manager is terminating or terminated.
            BackendUnavailable: the backend cannot run tasks now (e.g. the
                Dask scheduler is unreachable).
            InvalidAnimator: the animator does not handle this operation.
            InvalidArguments: also for any other exception from ``validate``
                (chained as its ``__cause__``).
        """
        return self._create(create, None, None, idempotency_key).task_id

    def create_task(self, create: dict[str, Any], *,
                    idempotency_key: str | None = None) -> Created:
        """:meth:`run_task`, also telling whether the key replayed an earlier create.

        With an ``idempotency_key``, concurrent and repeated calls with the
        same key and the same ``create`` make one task: the first creates it,
        every other returns it with ``replayed=True``. Keys are kept 24 h (at
        most 100,000, the oldest forgotten first) and, with a journal, across
        a restart.

        Returns:
            ``Created(task_id, replayed)``.

        Raises:
            (everything :meth:`run_task` raises)
        """
        return self._create(create, None, None, idempotency_key)

    def run_task_as(self, task_id: str, create: dict[str, Any], *,
                    follow_log: LineCallback | None = None) -> str:
        """:meth:`run_task` with an id the caller chose: what a backend's remote half
        uses, so that an animator sees the same task id wherever it runs.

        Args:
            task_id: the id to give the task (1-128 of ``[A-Za-z0-9_-]``).
            follow_log: receives the task's log lines from its very first (as
                :meth:`subscribe_log` would), so that none is missed even when
                the task is purged at once.

        Raises:
            ValueError: ``task_id`` is malformed or already in the table.
            (and everything :meth:`run_task` raises)
        """
        if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
            raise ValueError("task_id must be 1-128 of [A-Za-z0-9_-]")
        return self._create(create, task_id, follow_log).task_id

    def _create(self, create: dict[str, Any], task_id: str | None,
                follow_log: LineCallback | None, key: str | None = None) -> Created:
        encoded = check_create(create)  # NOTE: encodes args once, outside the lock
        ledger = self._ledger
        digest = None
        if key is not None:
            check_key(key)
            digest = body_digest(create)
            with ledger.lock:
                first = self._keys.find(key, digest)
            if first is not None:
                return Created(first, True)
        with ledger.lock:
            ledger.check_open()
            if ledger.unavailable is not None:
                raise BackendUnavailable(ledger.unavailable)
            registration = ledger.animators.get(create["operation"])
        if registration is None:
            raise UnsupportedOperation(f"unsupported operation {create['operation']!r}")
        try:
            registration.animator.validate(dict(create))  # outside the lock: user code
        except HousekeepingError:
            raise
        except Exception as exc:
            # NOTE: any other exception from validate is still a refusal of
            # the arguments (REST: 400); the original stays as __cause__.
            raise InvalidArguments(str(exc) or type(exc).__name__) from exc
        with ledger.lock:
            if key is not None and digest is not None:
                # NOTE: again: a concurrent create with this key may have won meanwhile
                first = self._keys.find(key, digest)
                if first is not None:
                    return Created(first, True)
            ledger.check_open()
            if self.max_queued is not None:
                free = max(0, self.max_workers - len(ledger.running))
                would_wait = max(0, len(ledger.queue) + 1 - free)
                if would_wait > self.max_queued:
                    raise QueueFull(f"queue full: {len(ledger.queue)} tasks already wait")
            if task_id is None:
                task_id, number = ledger.table.new_id(create["operation"])
            elif ledger.table.get(task_id) is not None:
                raise ValueError(f"task id {task_id!r} is taken")
            else:
                number = ledger.table.new_id(create["operation"])[1]
            task = Task(task_id, create, encoded, number)
            task.registration = registration
            if follow_log is not None:
                task.log = self._dispatcher.new_log()
                task.log.follow(follow_log, 0)
            # NOTE: the loop is woken only when a slot is free: with every slot
            # taken, the end of a task dispatches the queue, in order.
            wake = len(ledger.running) < self.max_workers
            ledger.table.add(task)
            ledger.queue.append(task.id)
            ledger.publish("POST", task)
            if key is not None and digest is not None:
                record = KeyRecord(digest, task.id, task.created_at)
                self._keys.remember(key, record)
                if self._journal is not None:
                    self._journal.record_key(key, record)
        log.info("task %s created (%s)", task.id, task.operation)
        if wake:
            self._loop_thread.call(self._dispatcher.dispatch)
        return Created(task.id, False)

    def get_task(self, task_id: str) -> dict[str, Any]:
        """Return the wire dict of a task (a fresh one, the caller's to keep).

        With a journal, a task purged from the table is answered from its record.

        Raises:
            TaskNotFound: the id is unknown or was purged (and, with a journal,
                its record is gone too).
        """
        return self.get_snapshot(task_id).to_dict()

    def list_tasks(self, operation: str | None = None, *,
                   state: str | Iterable[str] | None = None, object_id: str | None = None,
                   after: str | None = None, limit: int | None = None,
                   history: bool = False) -> list[dict[str, Any]]:
        """Return the wire dicts of the tasks, in creation order (see :meth:`list_snapshots`
        for the filters)."""
        return [snapshot.to_dict() for snapshot in self.list_snapshots(
            operation, state=state, object_id=object_id, after=after, limit=limit,
            history=history)]

    def get_snapshot(self, task_id: str) -> TaskSnapshot:
        """Return the immutable snapshot of a task's current version.

        Cheaper than :meth:`get_task` for a caller that serves the task as
        JSON (``snapshot.json()``): nothing is decoded or copied.

        Raises:
            TaskNotFound: the id is unknown or was purged.
        """
        with self._ledger.lock:
            task = self._ledger.table.get(task_id)
            if task is not None:
                return task.snapshot()
        recorded = self._journal.get(task_id) if self._journal is not None else None
        if recorded is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return recorded

    def list_snapshots(self, operation: str | None = None, *,
                       state: str | Iterable[str] | None = None, object_id: str | None = None,
                       after: str | None = None, limit: int | None = None,
                       history: bool = False) -> list[TaskSnapshot]:
        """Return the snapshots of the tasks in the table, in creation order.

        Args:
            operation: only this operation (None or "": all).
            state: only tasks in this state, or in any of these states.
            object_id: only tasks with this ``objectId``.
            after: only tasks created after the task with this id (the last of
                the previous page).
            limit: at most this many (None: all).
            history: with a journal, also the recorded tasks no longer in the table.

        Raises:
            ValueError: a filter is malformed, or ``after`` names no task known
                to the table or the journal.
        """
        query = make_query(operation, state, object_id)
        check_limit(limit)
        number = 0
        if after is not None:
            number = self._number_of(after)
        with self._ledger.lock:
            listed = [task.snapshot()
                      for task in self._ledger.table.select_page(query, number, limit)]
        if history and self._journal is not None:
            listed = merge(listed, self._journal.select(query, number, limit), limit)
        return listed

    def _number_of(self, task_id: object) -> int:
        """The creation number of a task (for ``after``).

        Raises:
            ValueError: no task with this id is known.
        """
        if not isinstance(task_id, str):
            raise ValueError("after must be a task id")
        with self._ledger.lock:
            number = self._ledger.table.number_of(task_id)
        if number is None and self._journal is not None:
            number = self._journal.number_of(task_id)
        if number is None:
            shown = task_id if len(task_id) <= 64 else task_id[:64] + "…"
            raise ValueError(f"after: no task {shown!r} is known")
        return number

    def counts(self) -> dict[str, int]:
        """Count tasks by state, plus ``queued`` and ``running`` (for health checks).

        Kept as the table changes: O(operations × states), whatever its size.
        """
        with self._ledger.lock:
            counts = {state.value: 0 for state in TaskState}
            for (_, state), count in self._ledger.table.counts().items():
                counts[state.value] += count
            counts["queued"] = len(self._ledger.queue)
            counts["running"] = len(self._ledger.running)
            counts["total"] = len(self._ledger.table)
            return counts

    def counts_by_operation(self) -> dict[str, dict[str, int]]:
        """Count tasks by operation and state: every registered operation, every state."""
        with self._ledger.lock:
            found = self._ledger.table.counts()
            operations = set(self._ledger.animators) | {operation for operation, _ in found}
        return {operation: {state.value: found.get((operation, state), 0)
                            for state in TaskState}
                for operation in sorted(operations)}

    def cancel_task(self, task_id: str) -> None:
        """Cancel a task: at once if queued, else tell its child, kill after the grace.

        Raises:
            TaskNotFound: the id is unknown, purged or the task already finished.
        """
        with self._ledger.lock:
            task = self._unfinished(task_id)
            if task.cancel_requested:
                return
            queued = self._request_cancel(task)
        if queued:
            self._loop_thread.call(self._dispatcher.schedule_purge, task_id)
        else:
            self._loop_thread.call(self._dispatcher.cancel_running, task_id)
        log.info("task %s cancel requested", task_id)

    def kill_task(self, task_id: str, reason: str) -> None:
        """End a task now, without a cancel grace: its tree is killed at once
        (``canceled-killed``, with ``reason``), or it is canceled if still queued.

        For a caller that must not wait, e.g. a remote half whose supervisor is
        gone. A task that already reported its outcome keeps it.

        Raises:
            TaskNotFound: the id is unknown, purged or the task already finished.
        """
        with self._ledger.lock:
            task = self._unfinished(task_id)
            queued = not task.cancel_requested and self._request_cancel(task)
        if queued:
            self._loop_thread.call(self._dispatcher.schedule_purge, task_id)
        else:
            self._loop_thread.call(self._dispatcher.kill_running, task_id, str(reason)[:300])

    def _unfinished(self, task_id: str) -> Task:
        """The task, unless unknown, purged or finished (caller holds the lock).

        Raises:
            TaskNotFound: it is not there, or already finished.
        """
        task = self._ledger.table.get(task_id)
        if task is None or task.terminal:
            raise TaskNotFound(f"task {task_id!r} not found or already finished")
        return task

    def _request_cancel(self, task: Task) -> bool:
        """Mark the cancel (caller holds the lock); end the task now if it is still
        queued (True), else publish the mark (a running task is told on the loop)."""
        task.cancel_requested = True
        if self._cancel_queued(task):
            return True
        self._ledger.touch(task)  # running, or being handed over (told once started)
        return False

    def _cancel_queued(self, task: Task) -> bool:
        """End a queued task CANCELED (caller holds the lock); False if it was handed over."""
        ledger = self._ledger
        if task.state is not TaskState.NEW or task.id in ledger.running:
            return False
        ledger.queue.remove(task.id)
        ledger.change(task, TaskState.CANCELED,
                      outcome=Outcome(OutcomeKind.CANCELED_QUEUED, "canceled while queued"))
        return True

    def get_log(self, task_id: str, after: int = 0, limit: int | None = None,
                ) -> dict[str, Any]:
        """A task's captured output (stdout, stderr and logging of its processes).

        Args:
            after: return the lines with a larger ``seq`` (they count from 1).
            limit: at most this many lines (None: all that are kept).

        Returns:
            ``{"lines": [{"seq", "time", "stream", "text"}, ...], "next": int,
            "dropped": int, "complete": bool}``: ``next`` is the ``after`` to
            pass next time (``after`` itself when there is nothing new),
            ``dropped`` the lines discarded so far to keep the newest
            ``log_limit`` bytes, ``complete`` true once the task is terminal and
            its output has ended.

        Raises:
            TaskNotFound: the id is unknown or was purged.
            ValueError: ``after`` or ``limit`` is out of range.
        """
        _check_count("after", after, 0)
        if limit is not None:
            _check_count("limit", limit, 1)
        with self._ledger.lock:
            task = self._ledger.table.get(task_id)
            if task is not None:
                task_log, terminal = task.log, task.terminal
        if task is None:
            page = self._journal.log_page(task_id, after, limit) if self._journal else None
            if page is None:
                raise TaskNotFound(f"task {task_id!r} not found")
            return page
        if task_log is None:
            return {"lines": [], "next": after, "dropped": 0, "complete": terminal}
        # NOTE: closed is read before the lines: a log read complete has them all.
        complete = terminal and task_log.closed
        lines, after = task_log.read(after, limit)
        return {"lines": lines, "next": after, "dropped": task_log.dropped,
                "complete": complete and after >= task_log.next_seq - 1}

    def subscribe_log(self, task_id: str, callback: LineCallback, *,
                      after: int | None = None) -> Callable[[], None]:
        """Deliver a task's log lines to ``callback`` as they come, in order, one line
        dict per call (as in :meth:`get_log`), on a thread of its own.

        With ``after``, the kept lines with a larger ``seq`` come first, so that
        a reader misses nothing. The last call gets ``{"end": why, "next": N}``:
        ``"complete"`` (the task is terminal and its output ended),
        ``"purged"``, or ``"behind"`` (it fell more lines or bytes behind than
        an event subscriber may; ``get_log(after=N)`` picks up where it was).

        Returns:
            A function that unsubscribes ``callback``.

        Raises:
            TaskNotFound: the id is unknown or was purged.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        if after is not None:
            _check_count("after", after, 0)
        with self._ledger.lock:
            task = self._ledger.table.get(task_id)
            if task is None:
                raise TaskNotFound(f"task {task_id!r} not found")
            if task.log is None:
                task.log = self._dispatcher.new_log()
            task_log = task.log
            unsubscribe = task_log.follow(callback, after)
            if task.terminal and (task_log.closed or not task.started):
                task_log.close(terminal=True)
        return unsubscribe

    def log_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Bytes of output captured and lines dropped, by (operation, stream), so far."""
        with self._ledger.lock:
            return {key: (totals[0], totals[1]) for key, totals in self._ledger.log_totals.items()}

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Deliver every change event to ``callback``, in order, on a thread of its own.

        Returns:
            A function that unsubscribes ``callback``.
        """
        return self._events.subscribe(callback)

    def subscribe_changes(self, callback: RawCallback) -> Callable[[], None]:
        """Like :meth:`subscribe`, but deliver the shared, immutable
        :class:`~supervisor.wire.ChangeEvent` itself (``event.json()``,
        ``event.task.state``, ...) instead of a fresh dict per event: what a
        server that forwards events as JSON wants.

        Returns:
            A function that unsubscribes ``callback``.
        """
        return self._events.subscribe(callback, raw=True)

    def terminate(self) -> None:
        """Cancel everything, kill and reap every process of the manager; idempotent.

        Blocks until no process of any task tree and no helper process of this
        manager is alive. The whole shutdown runs on the loop thread
        (:meth:`~supervisor.dispatcher.Dispatcher.shutdown`), its last resort too.
        """
        if self._loop_thread.in_loop():
            raise RuntimeError("terminate() cannot be called from the manager's loop")
        with self._terminate_lock:
            if self._terminated:
                return
            # 1. refuse new work (the flag is set under the lock).
            with self._ledger.lock:
                self._ledger.terminating = True
            log.debug("terminate: refusing new tasks")
            deadline = self.cancel_grace + CONSTS.terminate_slack
            try:
                self._loop_thread.run(self._dispatcher.shutdown(deadline),
                                      timeout=deadline + CONSTS.terminate_slack)
            except BaseException:
                log.exception("terminate: the loop did not finish the shutdown")
            finally:
                # 5. stop the loop thread and the subscribers' threads; write and
                # close the journal.
                self._loop_thread.stop(CONSTS.loop_stop_timeout)
                self._events.close(timeout=CONSTS.subscribers_stop_timeout)
                if self._journal is not None:
                    with self._ledger.lock:
                        last_number = self._ledger.table.last_number
                    self._journal.close(last_number)
                self._terminated = True
            log.debug("terminate: done")

    def close(self) -> None:
        """The same as :meth:`terminate`."""
        self.terminate()

    def __enter__(self) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()


def _check_count(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
