"""The measurements behind ``python -m benchmarks.start_latency``, and its report.

They live apart from the script because forkserver children re-run the main
module: the script stays a few lines, and this module is preloaded.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

from benchmarks.animators import noop, report

#: Deadlock guard of every wait; never reached on a working setup.
TIMEOUT = 120.0
#: Tasks run and thrown away before measuring (process start-up, imports).
WARMUP = 5
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELED"}
NOTES = """
start: housekeeping = run_task until a subscriber sees the ACTIVE event (the task
       handed to a pre-started process); bare processes = start() until the
       child's first pipe message (the process is created on demand).
trip:  one task alone, from asking to the end: housekeeping = run_task until the
       terminal event (its process tree reaped); bare = start() until join();
       ProcessPoolExecutor = submit() until result().
tasks/s: trivial tasks with 2 running at a time, each in a fresh process; for
       housekeeping from the first run_task to the last terminal event."""


@dataclass
class Row:
    """One approach's figures (seconds; tasks per second)."""

    name: str
    latencies: list[float] = field(default_factory=list)  #: start → running
    round_trips: list[float] = field(default_factory=list)  #: start → ended, one at a time
    throughput: float | None = None

    @property
    def trip_p50(self) -> float | None:
        """Median round trip of one task, from asking to its process being gone."""
        return statistics.median(self.round_trips) if self.round_trips else None

    @property
    def p50(self) -> float | None:
        """Median start latency."""
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def p95(self) -> float | None:
        """95th percentile start latency (nearest rank)."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[math.ceil(0.95 * len(ordered)) - 1]


# -- bare multiprocessing ------------------------------------------------------


def _context(method: str) -> Any:
    """Return a multiprocessing context; forkserver preloads the benchmark modules."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # NOTE: on 3.11 every forkserver child re-runs the main module; with
        # this module and the script's imports preloaded, that costs little.
        ctx.set_forkserver_preload(["argparse", __name__, "benchmarks.animators"])
    return ctx


def _start_one(ctx: Any) -> tuple[Any, connection.Connection]:
    """Start a process running ``report``; return it and the reading end."""
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=report, args=(writer,))
    process.start()
    writer.close()  # NOTE: else EOF never comes if the child dies
    return process, reader


def bench_process(method: str, samples: int, tasks: int) -> Row:
    """Measure bare ``multiprocessing.Process`` per task with the ``method`` context."""
    ctx = _context(method)
    row = Row(f"multiprocessing {method}" + (" preloaded" if method == "forkserver" else ""))
    for i in range(WARMUP + samples):
        start = time.perf_counter()
        process, reader = _start_one(ctx)
        if not reader.poll(TIMEOUT):
            raise RuntimeError(f"{method}: no message from the child in {TIMEOUT} s")
        reader.recv_bytes()
        reported = time.perf_counter()
        process.join(TIMEOUT)
        reader.close()
        if i >= WARMUP:
            row.latencies.append(reported - start)
            row.round_trips.append(time.perf_counter() - start)

    running: dict[connection.Connection, Any] = {}
    started = done = 0
    start = time.perf_counter()
    while done < tasks:
        while len(running) < 2 and started < tasks:
            process, reader = _start_one(ctx)
            running[reader] = process
            started += 1
        ready = connection.wait(list(running), TIMEOUT)
        if not ready:
            raise RuntimeError(f"{method}: no child finished in {TIMEOUT} s")
        for finished in ready:
            assert isinstance(finished, connection.Connection)
            finished.recv_bytes()
            running.pop(finished).join(TIMEOUT)
            finished.close()
            done += 1
    row.throughput = tasks / (time.perf_counter() - start)
    return row


def bench_pool(samples: int, tasks: int) -> Row:
    """Measure ``ProcessPoolExecutor(max_workers=2, max_tasks_per_child=1)`` throughput."""
    row = Row("ProcessPoolExecutor max_tasks_per_child=1")
    with ProcessPoolExecutor(2, mp_context=_context("forkserver"),
                             max_tasks_per_child=1) as pool:
        for i in range(WARMUP + samples):
            start = time.perf_counter()
            pool.submit(noop).result(TIMEOUT)
            if i >= WARMUP:
                row.round_trips.append(time.perf_counter() - start)
        start = time.perf_counter()
        futures = [pool.submit(noop) for _ in range(tasks)]
        _, pending = wait(futures, TIMEOUT)
        if pending:
            raise RuntimeError(f"ProcessPoolExecutor: {len(pending)} jobs stuck")
        row.throughput = tasks / (time.perf_counter() - start)
    return row


# -- housekeeping --------------------------------------------------------------


class _Recorder:
    """A subscriber noting when each task was first seen in each state."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self.ended = 0
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        task = event["task"]
        with self._cond:
            states = self.seen.setdefault(task["meta"]["id"], {})
            if task["state"] not in states:
                states[task["state"]] = now
                self.ended += task["state"] in TERMINAL
                self._cond.notify_all()

    def wait_for(self, what: str, predicate: Any) -> None:
        """Block until ``predicate()`` holds; fail loudly on a deadlock."""
        with self._cond:
            if not self._cond.wait_for(predicate, TIMEOUT):
                raise RuntimeError(f"housekeeping: timed out waiting for {what}")

    def outcome(self, task_id: str) -> str | None:
        """Return the task's terminal state, if it has one yet."""
        return next((s for s in self.seen.get(task_id, {}) if s in TERMINAL), None)


def bench_manager(samples: int, tasks: int) -> Row:
    """Measure the Manager: run_task → ACTIVE latency, then throughput."""
    # NOTE: imported here so that merely importing this module stays light.
    from benchmarks.animators import Noop
    from supervisor import Manager

    row = Row("housekeeping Manager")
    failed = 0
    with Manager(max_workers=2, purge_delay=600) as manager:
        manager.register_animator("NOOP", Noop())
        recorder = _Recorder()
        manager.subscribe(recorder)
        for i in range(WARMUP + samples):
            start = time.perf_counter()
            task_id = manager.run_task({"operation": "NOOP"})
            recorder.wait_for(f"{task_id} to end",
                              lambda tid=task_id: recorder.outcome(tid) is not None)
            failed += recorder.outcome(task_id) != "SUCCEEDED"
            if i >= WARMUP:
                seen = recorder.seen[task_id]
                row.latencies.append(seen["ACTIVE"] - start)
                row.round_trips.append(seen[recorder.outcome(task_id) or ""] - start)

        before = recorder.ended
        start = time.perf_counter()
        ids = [manager.run_task({"operation": "NOOP"}) for _ in range(tasks)]
        recorder.wait_for(f"{tasks} tasks to end", lambda: recorder.ended - before >= tasks)
        last = max(min(t for s, t in recorder.seen[tid].items() if s in TERMINAL) for tid in ids)
        failed += sum(recorder.outcome(tid) != "SUCCEEDED" for tid in ids)
        row.throughput = tasks / (last - start)
    if failed:
        raise RuntimeError(f"housekeeping: {failed} trivial tasks did not succeed")
    return row


# -- report --------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.2f} ms"


def _ratio(mine: float | None, theirs: float | None) -> str:
    return "—" if mine is None or not theirs else f"{mine / theirs:.2f}"


def print_report(rows: list[Row], samples: int, tasks: int) -> None:
    """Print the machine, the figures, and each approach's ratio to every other."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores ({usable} usable), "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"start latency: {samples} tasks one at a time; throughput: {tasks} trivial "
          f"tasks, 2 at a time\n")
    width = max(len(r.name) for r in rows)
    print(f"{'approach':<{width}}  {'start p50':>10}  {'start p95':>10}  {'trip p50':>10}"
          f"  {'tasks/s':>8}")
    for r in rows:
        rate = "—" if r.throughput is None else f"{r.throughput:.0f}"
        print(f"{r.name:<{width}}  {_ms(r.p50):>10}  {_ms(r.p95):>10}  {_ms(r.trip_p50):>10}"
              f"  {rate:>8}")
    print(NOTES)

    labels = [chr(ord("A") + i) for i in range(len(rows))]
    print("\nratios, row ÷ column, where")
    for label, r in zip(labels, rows, strict=True):
        print(f"  {label} = {r.name}")
    for title, metric in (("start p50 (lower is better)", "p50"),
                          ("start p95 (lower is better)", "p95"),
                          ("trip p50 (lower is better)", "trip_p50"),
                          ("tasks/s (higher is better)", "throughput")):
        print(f"\n{title}")
        print(" " * 3 + "".join(f"{label:>8}" for label in labels))
        for label, r in zip(labels, rows, strict=True):
            cells = [_ratio(getattr(r, metric), getattr(other, metric)) for other in rows]
            print(f"{label:<3}" + "".join(f"{c:>8}" for c in cells))
