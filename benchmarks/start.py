"""1. Start latency: from asking for a task to the task running, on an idle system.

* housekeeping: ``run_task`` until a ``subscribe`` callback sees the task
  ACTIVE (handed to a process forked ahead of need); before each sample the
  previous task has ended and the warm processes are ready again. A second
  row, from the same tasks, is ``run_task`` until ``execute`` begins in the
  child (the CLOCK_MONOTONIC time it returns), the pools' definition.
* ``multiprocessing.Process`` (fork, forkserver preloaded, spawn): ``start()``
  until the child's first pipe message; the process is created on demand.
* pebble ``ProcessPool(max_tasks=1)``: ``schedule()`` until the job starts in
  the worker (the job returns its CLOCK_MONOTONIC start time).
* ``ProcessPoolExecutor`` (reused workers; and ``max_tasks_per_child=1``) and
  loky's reusable executor: ``submit()`` until the job starts.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks import animators
from benchmarks.common import (
    TIMEOUT,
    Approach,
    Options,
    Section,
    Table,
    alternate,
)
from benchmarks.recording import Recorder, recorded_manager, wait_warm

TITLE = "1. Start latency"
#: Jobs run and thrown away after each set-up (imports, first fork).
WARMUP = 3
#: Pause of the pools that replace a used worker on a timer (pebble ticks every 0.1 s).
POOL_PAUSE = 0.12
#: How long the thread sleeps before the cold run of the wake-up probe.
IDLE = 0.01
#: Samples of the wake-up probe.
WAKE_SAMPLES = 100


def context(method: str) -> Any:
    """A multiprocessing context; forkserver preloads the benchmark modules."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["benchmarks.animators"])
    return ctx


class ManagerStart(Approach):
    """housekeeping: run_task → ACTIVE seen by a subscriber."""

    name = "housekeeping run_task → ACTIVE"
    executing = "housekeeping run_task → execute() begins"
    pause = 0.01
    sandbox: Any = None  #: the manager's default sandbox (None: the library's)

    def __init__(self, sandbox: Any = None, label: str = "") -> None:
        self.sandbox = sandbox
        if label:
            self.name, self.executing = f"{self.name} ({label})", f"{self.executing} ({label})"

    def __enter__(self) -> ManagerStart:
        self.recorder = Recorder()
        self.manager = recorded_manager(
            lambda m: m.register_animator("STARTED", animators.Started()), self.recorder,
            max_workers=2, purge_delay=600, sandbox=self.sandbox,
        )
        try:
            for _ in range(WARMUP):
                self.recorder.wait_end(self.manager.run_task({"operation": "STARTED"}))
        except BaseException:
            self.manager.terminate()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.terminate()

    def sample(self) -> dict[str, float]:
        wait_warm(self.manager)
        start = time.monotonic()
        task_id = self.manager.run_task({"operation": "STARTED"})
        self.recorder.wait_for(lambda: self.recorder.when(task_id, "ACTIVE") is not None,
                               f"{task_id} to start")
        active = self.recorder.when(task_id, "ACTIVE") or 0.0
        if self.recorder.wait_end(task_id) != "SUCCEEDED":
            raise RuntimeError(f"housekeeping: trivial task {task_id} did not succeed")
        began = float(self.manager.get_task(task_id)["result"])
        return {self.name: active - start, self.executing: began - start}


class ProcessStart(Approach):
    """A bare multiprocessing.Process: start() → first pipe message."""

    pause = 0.01

    def __init__(self, method: str) -> None:
        self.method = method
        self.name = f"multiprocessing {method}" + (" (preloaded)" if method == "forkserver"
                                                   else "")

    def __enter__(self) -> ProcessStart:
        self.ctx = context(self.method)
        for _ in range(WARMUP):
            self.sample()
        return self

    def sample(self) -> float:
        reader, writer = self.ctx.Pipe(duplex=False)
        start = time.monotonic()
        process = self.ctx.Process(target=animators.report, args=(writer,))
        process.start()
        writer.close()  # NOTE: else EOF never comes if the child dies
        try:
            if not reader.poll(TIMEOUT):
                raise TimeoutError(f"{self.name}: no message from the child")
            reader.recv_bytes()
            return time.monotonic() - start
        finally:
            reader.close()
            process.join(TIMEOUT)
            if process.exitcode is None:
                process.kill()
                process.join()


class PoolStart(Approach):
    """A pool: submit/schedule → the job starts in a worker."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = {
            "pebble": "pebble ProcessPool(max_tasks=1)",
            "ppe1": "ProcessPoolExecutor(max_tasks_per_child=1)",
            "ppe": "ProcessPoolExecutor (reused workers)",
            "loky": "loky reusable executor (reused workers)",
        }[kind]
        self.pause = POOL_PAUSE if kind in ("pebble", "ppe1") else 0.01

    def __enter__(self) -> PoolStart:
        self.pool = make_pool(self.kind, 2)
        try:
            for _ in range(WARMUP):
                self.sample()
                time.sleep(self.pause)
        except BaseException:
            close_pool(self.pool)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        close_pool(self.pool)

    def sample(self) -> float:
        start = time.monotonic()
        begun = float(submit(self.pool, animators.started).result(TIMEOUT))
        return begun - start


def make_pool(kind: str, workers: int) -> Any:
    """Make a pool of ``workers`` processes; kinds ``pebble[1]``, ``ppe[1]``, ``loky``.

    A trailing ``1`` means one job per process. ``ProcessPoolExecutor`` with
    ``max_tasks_per_child`` runs on forkserver (3.11 refuses fork there).
    """
    if kind in ("pebble", "pebble1"):
        from pebble import ProcessPool

        return ProcessPool(max_workers=workers, max_tasks=1 if kind == "pebble" else 0)
    if kind == "ppe1":
        return ProcessPoolExecutor(workers, mp_context=context("forkserver"),
                                   max_tasks_per_child=1)
    if kind == "ppe":
        return ProcessPoolExecutor(workers)
    if kind == "loky":
        from loky import get_reusable_executor

        return get_reusable_executor(max_workers=workers, reuse=False)
    raise ValueError(kind)


def submit(pool: Any, function: Any, *args: Any) -> Any:
    """Submit a job to any of the pools; return its future."""
    if hasattr(pool, "schedule"):
        return pool.schedule(function, args=args)
    return pool.submit(function, *args)


def close_pool(pool: Any) -> None:
    """Shut a pool down and join its processes (pending jobs are dropped)."""
    if hasattr(pool, "schedule"):  # pebble
        pool.stop()
        pool.join(TIMEOUT)
    elif type(pool).__module__.startswith("loky"):
        pool.shutdown(wait=True, kill_workers=True)
    else:
        pool.shutdown(wait=True, cancel_futures=True)


def _work() -> None:
    """A few tens of microseconds of ordinary Python: JSON out and back, thrice."""
    record = {"meta": {"id": "T0", "version": 2}, "args": {"n": list(range(20))}}
    for _ in range(3):
        json.loads(json.dumps(record))


def wake_up_cost() -> tuple[float, float]:
    """The same work right after itself, and after the thread slept ``IDLE``: p50 s.

    Every hop of a start (the caller's thread, the loop thread, the task
    process) wakes a thread that was asleep; on a VM whose idle vCPUs halt,
    the first work after a wake-up runs slower than the same work warm.
    """
    warm, cold = [], []
    for _ in range(WAKE_SAMPLES):
        time.sleep(IDLE)
        began = time.perf_counter()
        _work()
        middle = time.perf_counter()
        _work()
        cold.append(middle - began)
        warm.append(time.perf_counter() - middle)
    return statistics.median(warm), statistics.median(cold)


def run(options: Options) -> Section:
    """Measure start latency of every approach, alternately."""
    rounds = options.pick(2, 5)
    per_round = options.pick(12, 40)
    table = Table("start → running", "ms", [], scale=1000, digits=3)
    approaches: list[Approach] = [
        ManagerStart(),
        ProcessStart("fork"),
        ProcessStart("forkserver"),
        ProcessStart("spawn"),
        PoolStart("pebble"),
        PoolStart("ppe1"),
        PoolStart("ppe"),
        PoolStart("loky"),
    ]

    def count(approach: Approach, index: int) -> int:
        slow = isinstance(approach, ProcessStart) and approach.method == "spawn"
        return max(3, per_round // 5) if slow else per_round

    alternate(approaches, rounds, count, table)
    section = Section(TITLE, [table])
    warm, cold = wake_up_cost()
    section.facts["the same Python work warm; after the thread slept "
                  f"{IDLE * 1000:g} ms (p50 of {WAKE_SAMPLES})"] = (
        f"{warm * 1e6:.0f} µs; {cold * 1e6:.0f} µs ({cold / warm:.1f}×)")
    section.notes += [
        "housekeeping: run_task until a subscriber sees ACTIVE, idle manager, "
        "max_workers=2, warm processes ready; and until execute() begins in the child",
        "multiprocessing: Process.start() until the child's first pipe message "
        "(process created on demand)",
        "pools: submit/schedule until the job starts in a worker "
        f"(pebble and max_tasks_per_child=1 pause {POOL_PAUSE:g} s between samples "
        "so a fresh worker is ready)",
        "reused-worker pools do not isolate tasks: shown as the floor of a queue hop",
    ]
    return section
