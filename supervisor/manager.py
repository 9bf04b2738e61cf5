"""The Manager: the task table, its limits, and the supervision of every child.

::

    callers (any thread)            loop thread (uvloop)                 processes
    ────────────────────            ────────────────────                 ─────────
    run_task ── lock ─▶ table ◀──── dispatch: warm process ─ Start ───▶ task process
    cancel_task ────────┤           on frames: Progress, Note, ... ◀─── (one per task)
    get/list_tasks ─────┤           on pidfd: process exited
    subscribe ─▶ EventHub ◀─ events on Exited: tree gone ─▶ final state ◀─ starter
    terminate ─▶ run(_shutdown) on the loop, then stop it                (forks, reaps)

Every state change happens under ``self._lock`` and is published to the
EventHub in the same critical section, so subscribers see changes in order.
The loop never blocks on a child: frames are read without blocking, exits
come from pidfds and from the starter's ``Exited`` reports, and every delay
(cancel grace, timeout, SIGTERM→SIGKILL, purge) is a loop timer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pickle
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from supervisor import reaper
from supervisor.children import DATA, EOF, ChildProcess, StarterProcess
from supervisor.consts import CONSTS
from supervisor.errors import (
    HousekeepingError,
    InvalidArguments,
    ManagerTerminated,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
    describe_exit,
)
from supervisor.events import Callback, EventHub
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl
from supervisor.loop import LoopThread
from supervisor.protocol import (
    Cancel,
    Finished,
    Note,
    Progress,
    ProtocolError,
    Ready,
    Start,
    StateChanged,
    check_progress,
)
from supervisor.states import TaskState
from supervisor.table import TaskTable
from supervisor.task import Task

log = logging.getLogger("housekeeping.supervisor")

_CREATE_FIELDS = {"operation": str, "objectId": str, "serviceStates": dict, "args": dict}
_MAX_OBJECT_ID = 128
_manager_numbers = itertools.count(1)


@dataclass(frozen=True)
class _Registration:
    """An operation's animator and limits."""

    animator: Any
    pickled: bytes
    main_path: str | None
    timeout: float | None
    max_memory: int | None


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

    Raises:
        ValueError: a limit is out of range.
    """

    def __init__(
        self,
        purge_delay: float = 60.0,
        max_workers: int | None = None,
        max_queued: int | None = None,
        cancel_grace: float = 5.0,
        *,
        subreaper: bool = False,
    ) -> None:
        if not _is_number(purge_delay) or purge_delay < 0:
            raise ValueError("purge_delay must be a number >= 0")
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError("max_workers must be an integer >= 1")
        if max_queued is not None and (
            not isinstance(max_queued, int) or isinstance(max_queued, bool) or max_queued < 0
        ):
            raise ValueError("max_queued must be an integer >= 0 or None")
        if not _is_number(cancel_grace) or cancel_grace < 0:
            raise ValueError("cancel_grace must be a number >= 0")
        self.purge_delay = float(purge_delay)
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.cancel_grace = float(cancel_grace)
        self.subreaper = subreaper

        self._lock = threading.Lock()
        self._table = TaskTable()
        self._events = EventHub(CONSTS.subscriber_backlog)
        self._animators: dict[str, _Registration] = {}
        self._preloaded: set[str] = set()  # animator modules the starter imported
        self._queue: deque[str] = deque()
        self._running: dict[str, ChildProcess] = {}  # by task id
        self._by_pid: dict[int, ChildProcess] = {}  # every child with a known pid
        self._warm: deque[ChildProcess] = deque()
        self._spawning: set[ChildProcess] = set()
        self._warm_target = min(self.max_workers, CONSTS.warm_processes)
        self._terminating = False
        self._terminate_lock = threading.Lock()
        self._terminated = False
        self._idle: asyncio.Event | None = None
        self._starter = StarterProcess()
        self._starter_started = 0.0
        self._starter_failures = 0

        if subreaper:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._loop_thread = LoopThread(f"housekeeping-manager-{next(_manager_numbers)}")
        self._loop_thread.start()
        try:
            self._loop_thread.run(self._boot())
        except BaseException:
            self._loop_thread.stop()
            raise

    # -- public API ---------------------------------------------------------

    def register_animator(
        self,
        operation: str,
        animator: Any,
        timeout: float | None = None,
        max_memory: int | None = None,
    ) -> None:
        """Declare support for ``operation`` (replacing an earlier registration).

        Args:
            operation: the operation name tasks ask for, e.g. ``"HASH"``.
            animator: an object with ``validate(create)`` and ``execute(ops)``,
                picklable by reference (defined at module level).
            timeout: wall-clock seconds a task may run before it is killed (FAILED).
            max_memory: address-space limit of the task process, in bytes.

        Raises:
            TypeError: ``animator`` is not an animator or cannot be sent to a child.
            ValueError: ``operation`` is empty or a limit is out of range.
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
        registration = _Registration(animator, pickled, main_path, timeout, max_memory)
        with self._lock:
            self._check_open()
            self._animators[operation] = registration
        if module != "__main__" and module not in self._preloaded:
            self._preloaded.add(module)
            self._loop_thread.call(self._preload, (module,))

    def registered_operations(self) -> list[str]:
        """The operations with an animator, sorted."""
        with self._lock:
            return sorted(self._animators)

    def run_task(self, create: dict[str, Any]) -> str:
        """Validate and queue a task; return its id at once.

        Args:
            create: ``{"operation", "objectId"?, "serviceStates"?, "args"?}``.

        Raises:
            InvalidArguments: ``create`` is malformed (the message names the field).
            UnsupportedOperation: no animator is registered for the operation.
            QueueFull: too many tasks would wait for a slot (``max_queued``).
            ManagerTerminated: the manager is terminating or terminated.
            InvalidAnimator: the animator does not handle this operation.
            InvalidArguments: also for any other exception from ``validate``
                (chained as its ``__cause__``).
        """
        _check_create(create)
        with self._lock:
            self._check_open()
            registration = self._animators.get(create["operation"])
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
        with self._lock:
            self._check_open()
            if self.max_queued is not None:
                free = max(0, self.max_workers - len(self._running))
                would_wait = max(0, len(self._queue) + 1 - free)
                if would_wait > self.max_queued:
                    raise QueueFull(f"queue full: {len(self._queue)} tasks already wait")
            task = Task(self._table.new_id(create["operation"]), create)
            self._table.add(task)
            self._queue.append(task.id)
            self._publish("POST", task)
        log.info("task %s created (%s)", task.id, task.operation)
        self._loop_thread.call(self._dispatch)
        return task.id

    def get_task(self, task_id: str) -> dict[str, Any]:
        """Return the wire dict of a task.

        Raises:
            TaskNotFound: the id is unknown or was purged.
        """
        with self._lock:
            task = self._table.get(task_id)
            if task is None:
                raise TaskNotFound(f"task {task_id!r} not found")
            return task.to_wire()

    def list_tasks(self, operation: str | None = None) -> list[dict[str, Any]]:
        """Return the wire dicts of all tasks (of one operation), in creation order."""
        with self._lock:
            return [task.to_wire() for task in self._table.select(operation)]

    def counts(self) -> dict[str, int]:
        """Count tasks by state, plus ``queued`` and ``running`` (for health checks)."""
        with self._lock:
            counts = {state.value: 0 for state in TaskState}
            for task in self._table.select():
                counts[task.state.value] += 1
            counts["queued"] = len(self._queue)
            counts["running"] = len(self._running)
            counts["total"] = len(self._table)
            return counts

    def cancel_task(self, task_id: str) -> None:
        """Cancel a task: at once if queued, else tell its child, kill after the grace.

        Raises:
            TaskNotFound: the id is unknown, purged or the task already finished.
        """
        with self._lock:
            task = self._table.get(task_id)
            if task is None or task.terminal:
                raise TaskNotFound(f"task {task_id!r} not found or already finished")
            if task.cancel_requested:
                return
            task.cancel_requested = True
            if task.state is TaskState.NEW:
                self._queue.remove(task_id)
                task.transition(TaskState.CANCELED, "canceled while queued")
                self._publish("PATCH", task)
                self._loop_thread.call(self._schedule_purge, task_id)
            else:
                task.touch()
                self._publish("PATCH", task)
                self._loop_thread.call(self._cancel_running, task_id)
        log.info("task %s cancel requested", task_id)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Deliver every change event to ``callback``, in order, on a thread of its own.

        Returns:
            A function that unsubscribes ``callback``.
        """
        return self._events.subscribe(callback)

    def terminate(self) -> None:
        """Cancel everything, kill and reap every process of the manager; idempotent.

        Blocks until no process of any task tree and no helper process of this
        manager is alive.
        """
        if self._loop_thread.in_loop():
            raise RuntimeError("terminate() cannot be called from the manager's loop")
        with self._terminate_lock:
            if self._terminated:
                return
            # 1. refuse new work (the flag is set under the lock).
            with self._lock:
                self._terminating = True
            log.debug("terminate: refusing new tasks")
            try:
                self._loop_thread.run(
                    self._shutdown(), timeout=self.cancel_grace + CONSTS.terminate_slack + 10
                )
            finally:
                # 4. (end) stop the loop thread and the subscribers' threads.
                self._loop_thread.stop()
                self._events.close(timeout=2.0)
                self._terminated = True
            log.debug("terminate: done")

    def __enter__(self) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()

    # -- internals: everything below runs on the loop thread ------------------

    def _check_open(self) -> None:
        if self._terminating:
            raise ManagerTerminated("the manager is terminating or terminated")

    def _publish(self, method: str, task: Task) -> None:
        """Queue a change event (caller holds the lock, so order is change order)."""
        if not self._events.active:
            return
        uri = "/tasks" if method == "POST" else f"/tasks/{task.id}"
        scope: dict[str, Any] = {"operation": task.operation, "state": task.state.value}
        if method == "POST":
            scope = {"meta.id": task.id, **scope}
        self._events.publish(
            {"method": method, "uri": uri, "scope": scope, "task": task.to_wire()}
        )

    async def _boot(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        self._start_starter()

    def _start_starter(self) -> None:
        loop = asyncio.get_running_loop()
        self._starter = StarterProcess()
        self._starter.start()
        self._starter_started = loop.time()
        assert self._starter.sock is not None and self._starter.pidfd is not None
        loop.add_reader(self._starter.sock.fileno(), self._on_starter_readable)
        loop.add_reader(self._starter.pidfd, self._on_starter_died)
        if self._preloaded:
            self._starter.preload(tuple(sorted(self._preloaded)))
        self._replenish()

    def _preload(self, modules: tuple[str, ...]) -> None:
        try:
            self._starter.preload(modules)
        except OSError:
            return  # the starter died; its successor preloads every module
        # NOTE: processes forked before the Preload would import the module
        # at their first task (tens of ms); trade them for fresh ones now.
        for child in list(self._warm) + list(self._spawning):
            self._discard(child, replenish=False)
        self._replenish()

    def _replenish(self) -> None:
        """Keep ``_warm_target`` processes forked ahead of need."""
        if self._terminating or self._starter.sock is None:
            return  # no starter: _on_starter_died starts another, then replenishes
        loop = asyncio.get_running_loop()
        while len(self._warm) + len(self._spawning) < self._warm_target:
            try:
                sock = self._starter.spawn()
            except OSError:
                return  # the starter is gone; _on_starter_died restarts it
            child = ChildProcess(sock)
            self._spawning.add(child)
            loop.add_reader(sock.fileno(), self._on_child_readable, child)

    def _dispatch(self) -> None:
        """Hand queued tasks, oldest first, to warm processes while slots are free."""
        loop = asyncio.get_running_loop()
        with self._lock:
            while self._queue and self._warm and len(self._running) < self.max_workers:
                child = self._warm.popleft()
                task_id = self._queue[0]
                task = self._table.get(task_id)
                assert task is not None and task.state is TaskState.NEW
                registration = self._animators[task.operation]
                start = Start(
                    task=task.to_wire(),
                    animator=registration.pickled,
                    sys_path=tuple(sys.path),
                    main_path=registration.main_path,
                    max_memory=registration.max_memory,
                )
                try:
                    child.send(start)
                except OSError:
                    self._discard(child)
                    continue
                self._queue.popleft()
                child.task_id = task_id
                child.max_memory = registration.max_memory
                self._running[task_id] = child
                assert self._idle is not None
                self._idle.clear()
                task.transition(TaskState.ACTIVE)
                self._publish("PATCH", task)
                if registration.timeout is not None:
                    child.timers.append(loop.call_later(
                        registration.timeout, self._kill, child, TaskState.FAILED,
                        f"timed out after {registration.timeout:g} s",
                    ))
                log.info("task %s started in process %s", task_id, child.pid)
        self._replenish()

    def _read(self, child: ChildProcess) -> str:
        """Read one chunk of a task pipe, handle its messages; return what the read saw."""
        messages, seen, error = child.read_frames()
        for message in messages:
            self._handle(child, message)
        if error is not None:
            self._protocol_violation(child, str(error))
            return EOF
        return seen

    def _on_child_readable(self, child: ChildProcess) -> None:
        if self._read(child) == EOF:
            self._stop_reading(child)

    def _stop_reading(self, child: ChildProcess) -> None:
        if not child.reading:
            return
        child.reading = False
        try:
            asyncio.get_running_loop().remove_reader(child.sock.fileno())
        except (ValueError, OSError):
            pass
        if child.pid is None:  # died before it said Ready
            self._discard(child)

    def _handle(self, child: ChildProcess, message: object) -> None:
        """Dispatch one message of a task process by its type."""
        if isinstance(message, Ready):
            self._on_ready(child, message)
            return
        task = self._table.get(child.task_id) if child.task_id else None
        if task is None:
            self._protocol_violation(child, f"{type(message).__name__} before Start")
            return
        with self._lock:
            if task.terminal:
                return
            if isinstance(message, Progress):
                try:
                    values = check_progress(dict(message.values))
                    timestamp = float(message.timestamp)
                except (TypeError, ValueError) as exc:
                    self._protocol_violation(child, f"bad progress: {exc}")
                    return
                task.set_progress(values, timestamp)
            elif isinstance(message, StateChanged):
                if message.state not in (TaskState.ACTIVE.value, TaskState.WAITING.value):
                    self._protocol_violation(child, f"bad state {message.state!r}")
                    return
                new = TaskState(message.state)
                if new is task.state:
                    return
                task.transition(new)
            elif isinstance(message, Note):
                task.note(str(message.text)[:4096])
                task.touch()
            elif isinstance(message, Finished):
                if child.final is None and not child.killing:
                    child.final = message
                return
            else:
                self._protocol_violation(child, f"unexpected {type(message).__name__}")
                return
            self._publish("PATCH", task)

    def _on_ready(self, child: ChildProcess, ready: Ready) -> None:
        if child.pid is not None or not isinstance(ready.pid, int):
            self._protocol_violation(child, "a second Ready")
            return
        child.pid = ready.pid
        self._spawning.discard(child)
        try:
            child.pidfd = os.pidfd_open(ready.pid)
        except OSError:
            self._discard(child)
            return
        self._by_pid[ready.pid] = child
        asyncio.get_running_loop().add_reader(child.pidfd, self._on_child_exited, child)
        self._warm.append(child)
        self._dispatch()

    def _on_child_exited(self, child: ChildProcess) -> None:
        """The pidfd fired: read what the child wrote last, then await the starter."""
        loop = asyncio.get_running_loop()
        assert child.pidfd is not None
        loop.remove_reader(child.pidfd)
        child.exited = True
        while child.reading and self._read(child) == DATA:
            pass
        self._stop_reading(child)
        self._maybe_finish(child)

    def _on_starter_readable(self) -> None:
        try:
            exited = self._starter.read()
        except ProtocolError as exc:
            log.error("starter: %s", exc)
            return
        if exited is None:
            loop = asyncio.get_running_loop()
            if self._starter.sock is not None:
                loop.remove_reader(self._starter.sock.fileno())
            return
        child = self._by_pid.get(exited.pid)
        if child is not None:
            child.reaped = True
            child.exitcode = exited.exitcode
            self._maybe_finish(child)

    def _maybe_finish(self, child: ChildProcess) -> None:
        """Finish once the process is gone (pidfd) and its tree is gone (starter)."""
        if not (child.exited and child.reaped):
            return
        if child.pid is not None:
            self._by_pid.pop(child.pid, None)
        if child.task_id is None:
            self._discard(child)
            return
        self._finish(child)

    def _finish(self, child: ChildProcess) -> None:
        """Record the task's one terminal state and free its slot."""
        assert child.task_id is not None and child.pid is not None
        state, notes, trace = self._outcome(child)
        with self._lock:
            self._running.pop(child.task_id, None)
            task = self._table.get(child.task_id)
            if task is not None and not task.terminal:
                if state is TaskState.SUCCEEDED and child.final and child.final.result_json:
                    task.result = json.loads(child.final.result_json)
                task.transition(state, *notes)
                self._publish("PATCH", task)
            if not self._running:
                assert self._idle is not None
                self._idle.set()
        child.close()
        if trace:
            log.error("task %s failed: %s\n%s", child.task_id, notes[0] if notes else "", trace)
        log.info("task %s ended %s%s", child.task_id, state.value,
                 f": {notes[0]}" if notes else "")
        self._schedule_purge(child.task_id)
        self._dispatch()

    def _outcome(self, child: ChildProcess) -> tuple[TaskState, list[str], str | None]:
        """Decide the terminal state: a report before any kill wins, then the kill."""
        final = child.final
        if final is not None:
            try:
                state = TaskState(final.state)
            except ValueError:
                state = TaskState.FAILED
            if state in (TaskState.NEW, TaskState.ACTIVE, TaskState.WAITING):
                return TaskState.FAILED, [f"bad final state {final.state!r}"], None
            notes = [final.reason] if final.reason else []
            if final.error_type == "MemoryError" and child.max_memory:
                notes = [f"memory limit exceeded (max_memory={child.max_memory} bytes): "
                         f"{final.reason}"]
            return state, notes, final.traceback
        if child.forced is not None:
            return child.forced[0], [child.forced[1]], None
        hint = ""
        if child.max_memory and child.exitcode is not None and child.exitcode < 0:
            hint = f"possibly the max_memory limit of {child.max_memory} bytes"
        return TaskState.FAILED, [describe_exit(child.pid or 0, child.exitcode, hint)], None

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
        child = self._running.get(task_id)
        if child is None:
            return
        try:
            child.send(Cancel())
        except OSError:
            pass  # it is exiting; the pidfd tells
        child.timers.append(asyncio.get_running_loop().call_later(
            self.cancel_grace, self._kill, child, TaskState.CANCELED,
            f"killed after cancel grace period ({self.cancel_grace:g} s)",
        ))

    def _kill(self, child: ChildProcess, state: TaskState, reason: str) -> None:
        """Decide the outcome and kill the tree: SIGTERM now, SIGKILL a little later."""
        if child.killing or child.exited or child.final is not None or child.pid is None:
            return
        child.forced = (state, reason)
        log.info("task %s: %s; killing process tree %d", child.task_id, reason, child.pid)
        reaper.signal_tree(child.pid, signal.SIGTERM, child.pidfd)
        child.timers.append(asyncio.get_running_loop().call_later(
            CONSTS.term_grace, self._kill_hard, child,
        ))

    def _kill_hard(self, child: ChildProcess) -> None:
        if not child.exited and child.pid is not None:
            reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)

    def _protocol_violation(self, child: ChildProcess, what: str) -> None:
        log.error("task process %s broke the protocol: %s", child.pid, what)
        self._stop_reading(child)
        if child.task_id is None:
            if child.pid is not None and not child.exited:
                reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)
            return
        if not child.killing and not child.exited and child.pid is not None:
            child.forced = (TaskState.FAILED, f"protocol error: {what}")
            child.final = None
            reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)

    def _discard(self, child: ChildProcess, replenish: bool = True) -> None:
        """Forget a process that never took (or can no longer take) a task."""
        loop = asyncio.get_running_loop()
        self._spawning.discard(child)
        if child in self._warm:
            self._warm.remove(child)
        if child.pidfd is not None:
            try:
                loop.remove_reader(child.pidfd)
            except (ValueError, OSError):
                pass
            if not child.exited:
                try:
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                except OSError:
                    pass
        try:
            loop.remove_reader(child.sock.fileno())
        except (ValueError, OSError):
            pass
        if child.pid is not None:
            self._by_pid.pop(child.pid, None)
        child.close()
        if replenish:
            self._replenish()

    def _unwatch_starter(self) -> StarterProcess:
        """Stop watching the starter's socket and pidfd; return it."""
        loop = asyncio.get_running_loop()
        starter = self._starter
        for fd in (starter.pidfd, starter.sock.fileno() if starter.sock else None):
            if fd is not None:
                try:
                    loop.remove_reader(fd)
                except (ValueError, OSError):
                    pass
        return starter

    def _on_starter_died(self) -> None:
        """The starter is gone: kill what it can no longer clean, start another."""
        loop = asyncio.get_running_loop()
        starter = self._unwatch_starter()
        code = starter.close()
        if self._terminating:
            return
        log.error("the starter process died (exit code %s); restarting it", code)
        for child in list(self._warm) + list(self._spawning):
            self._discard(child, replenish=False)
        reason = f"the starter process died (exit code {code}); task process tree killed"
        for child in list(self._running.values()):
            if child.final is None and not child.killing:
                child.forced = (TaskState.FAILED, reason)
            child.reaped = True  # nobody else will report it
            if child.pid is not None and not child.exited:
                reaper.kill_tree(child.pid, timeout=1.0)
        if self.subreaper:
            reaper.kill_adopted(exclude=set())
        # NOTE: a starter that cannot even come up (say, workers fails to
        # import) must not turn into a fork loop: back off, up to 5 s.
        lived = loop.time() - self._starter_started
        self._starter_failures = 0 if lived > 10 else self._starter_failures + 1
        delay = min(5.0, 0.1 * (2 ** self._starter_failures)) if self._starter_failures > 1 else 0
        loop.call_later(delay, self._restart_starter)
        for child in list(self._running.values()):
            self._maybe_finish(child)

    def _restart_starter(self) -> None:
        if not self._terminating:
            self._start_starter()

    async def _shutdown(self) -> None:
        """Steps 2-4 of terminate(), on the loop."""
        loop = asyncio.get_running_loop()
        assert self._idle is not None
        # 2. cancel queued tasks, send Cancel to children, wait cancel_grace.
        with self._lock:
            for task_id in self._queue:
                task = self._table.get(task_id)
                if task is not None:
                    task.cancel_requested = True
                    task.transition(TaskState.CANCELED, "canceled: the manager is terminating")
                    self._publish("PATCH", task)
            self._queue.clear()
            running = list(self._running.values())
            for child in running:
                task = self._table.get(child.task_id or "")
                if task is not None and not task.cancel_requested:
                    task.cancel_requested = True
                    task.touch()
                    self._publish("PATCH", task)
        log.debug("terminate: canceled queued tasks, telling %d children", len(running))
        for child in running:
            try:
                child.send(Cancel())
            except OSError:
                pass
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), self.cancel_grace)
            except TimeoutError:
                pass
        # 3. SIGTERM each remaining tree, SIGKILL survivors (descendants first).
        log.debug("terminate: killing %d remaining trees", len(self._running))
        for child in list(self._running.values()):
            self._kill(child, TaskState.CANCELED, "killed: the manager is terminating")
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), CONSTS.terminate_slack)
            except TimeoutError:
                log.error("terminate: %d task trees did not end; killing by force",
                          len(self._running))
                for child in list(self._running.values()):
                    if child.pid is not None:
                        reaper.kill_tree(child.pid, timeout=1.0)
                    child.exited = child.reaped = True
                    self._finish(child)
        # 4. stop the starter (it kills warm processes), close pipes.
        log.debug("terminate: stopping the starter")
        starter = self._unwatch_starter()
        starter.request_stop()
        if starter.pidfd is not None:
            exited = asyncio.Event()
            loop.add_reader(starter.pidfd, exited.set)
            try:
                await asyncio.wait_for(exited.wait(), CONSTS.starter_stop_timeout)
            except TimeoutError:
                log.error("terminate: the starter did not stop; killing its tree")
                if starter.pid is not None:
                    reaper.kill_tree(starter.pid)
            loop.remove_reader(starter.pidfd)
        starter.close()
        for child in list(self._warm) + list(self._spawning) + list(self._by_pid.values()):
            for fd in (child.pidfd, child.sock.fileno()):
                if fd is not None and fd >= 0:
                    try:
                        loop.remove_reader(fd)
                    except (ValueError, OSError):
                        pass
            child.close()
        self._warm.clear()
        self._spawning.clear()
        self._by_pid.clear()
        if self.subreaper:
            reaper.kill_adopted(exclude=set())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_create(create: object) -> None:
    """Check the shape of a create dict; raise InvalidArguments naming the field."""
    if not isinstance(create, dict):
        raise InvalidArguments(f"the task must be a JSON object, not {type(create).__name__}")
    for name in create:
        if name not in _CREATE_FIELDS:
            raise InvalidArguments(f"unknown or read-only field {name!r}")
    if "operation" not in create:
        raise InvalidArguments("operation is required")
    for name, kind in _CREATE_FIELDS.items():
        if name in create and not isinstance(create[name], kind):
            if name != "operation" and create[name] is None:
                continue
            raise InvalidArguments(f"{name} must be {'a string' if kind is str else 'an object'}")
    if not create["operation"]:
        raise InvalidArguments("operation must not be empty")
    object_id = create.get("objectId")
    if isinstance(object_id, str) and len(object_id) > _MAX_OBJECT_ID:
        raise InvalidArguments(f"objectId must be at most {_MAX_OBJECT_ID} characters")
    for name in ("serviceStates", "args"):
        try:
            json.dumps(create.get(name), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArguments(f"{name} must be JSON: {exc}") from None
