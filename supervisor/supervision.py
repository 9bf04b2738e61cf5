"""The loop side of the manager: dispatch, child messages, exits, kills, shutdown.

Everything here runs on the manager's loop thread, except ``_check_open``
and ``_publish``, which callers use under the lock. :class:`Manager` (in
manager.py) is the public facade and inherits this; the split keeps the
facade readable and the supervision logic in one place.

A task process is finished only when two things are known: its pidfd fired
(the process is gone) and the starter reported ``Exited`` (it reaped it and
killed every orphan it left). The outcome is then decided by
:meth:`Supervision._outcome`: a final report sent before any kill wins, then
the kill's reason, then the exit code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from supervisor import reaper
from supervisor.children import DATA, EOF, ChildProcess, StarterProcess
from supervisor.consts import CONSTS
from supervisor.errors import ManagerTerminated, describe_exit
from supervisor.events import EventHub
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


@dataclass(frozen=True)
class Registration:
    """An operation's animator and limits."""

    animator: Any
    pickled: bytes
    main_path: str | None
    timeout: float | None
    max_memory: int | None



class Supervision:
    """The manager's state and everything its loop thread does with it."""

    max_workers: int
    purge_delay: float
    cancel_grace: float
    subreaper: bool
    _lock: threading.Lock
    _table: TaskTable
    _events: EventHub
    _animators: dict[str, Registration]
    _preloaded: set[str]
    _queue: deque[str]
    _running: dict[str, ChildProcess]
    _by_pid: dict[int, ChildProcess]
    _warm: deque[ChildProcess]
    _spawning: set[ChildProcess]
    _warm_target: int
    _terminating: bool
    _idle: asyncio.Event | None
    _starter: StarterProcess
    _starter_started: float
    _starter_failures: int

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
            CONSTS.cancel_term_grace,
        ))

    def _kill(
        self, child: ChildProcess, state: TaskState, reason: str,
        term_grace: float = CONSTS.term_grace,
    ) -> None:
        """Decide the outcome and kill the tree: SIGTERM now, SIGKILL ``term_grace`` later."""
        if child.killing or child.exited or child.final is not None or child.pid is None:
            return
        child.forced = (state, reason)
        log.info("task %s: %s; killing process tree %d", child.task_id, reason, child.pid)
        reaper.signal_tree(child.pid, signal.SIGTERM, child.pidfd)
        child.timers.append(asyncio.get_running_loop().call_later(
            term_grace, self._kill_hard, child,
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
        """Steps 2-4 of terminate(), on the loop; step 4 runs whatever happens."""
        try:
            await self._end_tasks()
        finally:
            await self._stop_starter()

    async def _end_tasks(self) -> None:
        """Steps 2 and 3 of terminate()."""
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

    async def _stop_starter(self) -> None:
        """Step 4 of terminate(): stop the starter (it kills warm processes), close pipes."""
        loop = asyncio.get_running_loop()
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
