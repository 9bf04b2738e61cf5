"""housekeeping's side of the benchmarks: observing a Manager and filling its table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import TERMINAL, TIMEOUT, wait_until


class Recorder:
    """A ``Manager.subscribe`` callback noting when each task was seen in each state.

    Times are ``time.monotonic()`` (CLOCK_MONOTONIC: comparable across the
    processes of one machine) taken in the subscriber's delivery thread, i.e.
    when the change is observed by the embedding code.
    """

    def __init__(self, watch: Callable[[dict[str, Any], float], None] | None = None) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self.ended = 0
        self.events = 0
        self._watch = watch
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        task = event["task"]
        if task is None:
            return
        with self._cond:
            self.events += 1
            if self._watch is not None:
                self._watch(task, now)
            states = self.seen.setdefault(task["meta"]["id"], {})
            if task["state"] not in states:
                states[task["state"]] = now
                self.ended += task["state"] in TERMINAL
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str,
                 timeout: float = TIMEOUT) -> None:
        """Block until ``predicate()`` holds (checked under the recorder's lock)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"housekeeping: timed out waiting for {what}")

    def when(self, task_id: str, state: str) -> float | None:
        """When ``task_id`` was first seen in ``state``."""
        return self.seen.get(task_id, {}).get(state)

    def outcome(self, task_id: str) -> str | None:
        """The task's terminal state, if it has one yet."""
        return next((s for s in self.seen.get(task_id, {}) if s in TERMINAL), None)

    def wait_end(self, task_id: str, timeout: float = TIMEOUT) -> str:
        """Block until ``task_id`` reaches a terminal state; return it."""
        self.wait_for(lambda: self.outcome(task_id) is not None, f"{task_id} to end", timeout)
        return self.outcome(task_id) or ""


def recorded_manager(
    register: Callable[[Any], None],
    recorder: Recorder,
    warmup: str | None = None,
    **options: Any,
) -> Any:
    """Start a Manager, register animators, subscribe ``recorder``; terminate on failure.

    Args:
        register: called with the manager to register its animators.
        recorder: subscribed to every change.
        warmup: an operation to run three times first, if any.
        **options: Manager keyword arguments.
    """
    from supervisor import Manager

    manager = Manager(**options)
    try:
        register(manager)
        manager.subscribe(recorder)
        if warmup is not None:
            for _ in range(3):
                recorder.wait_end(manager.run_task({"operation": warmup}))
    except BaseException:
        manager.terminate()
        raise
    return manager


def wait_warm(manager: Any, timeout: float = TIMEOUT) -> None:
    """Wait until the manager again has its processes forked ahead of need.

    NOTE: reads private state on purpose: "idle, warm processes available" is
    the condition the start-latency figure is defined for, and nothing public
    tells it.
    """
    # NOTE: the warm processes belong to the local backend (a backend without
    # them, e.g. Dask's, has nothing to wait for).
    backend = getattr(manager, "_backend", manager)
    target = getattr(backend, "_warm_target", 0)
    wait_until(lambda: len(getattr(backend, "_warm", ())) >= target,
               "warm processes", timeout)


def fill_table(manager: Any, count: int, operation: str = "NOOP",
               hold_operation: str = "HOLD") -> None:
    """Put ``count`` finished tasks in the manager's table, running only a few.

    Every slot is first taken by a HOLD task (which waits for its cancel), so
    the other tasks queue up; each is then canceled while queued, which
    finishes it at once (CANCELED, two messages, like any short task's record).
    The HOLD tasks, part of the count, are canceled last. The manager's
    ``purge_delay`` must outlast the benchmark.
    """
    if count <= 0:
        return
    recorder = Recorder()
    unsubscribe = manager.subscribe(recorder)
    try:
        holds = [manager.run_task({"operation": hold_operation})
                 for _ in range(min(count, manager.max_workers))]
        for hold in holds:
            recorder.wait_for(lambda h=hold: recorder.when(h, "ACTIVE") is not None,
                              "the HOLD tasks to start")
        for _ in range(count - len(holds)):
            manager.cancel_task(manager.run_task({"operation": operation}))
        for hold in holds:
            manager.cancel_task(hold)
        for hold in holds:
            recorder.wait_end(hold)
    finally:
        unsubscribe()
