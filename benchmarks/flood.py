"""4. Progress flood: a child calls ``set_progress`` in a hot loop.

housekeeping's ``TaskOps.set_progress`` coalesces in the child (at most one
report per 50 ms, the pending value flushed by a timer when the loop goes
quiet). Peers: the naive way, one ``Connection.send`` per call with the parent
reading every message (what a queue-per-update design does), and the same
loop reporting nothing (the floor of the child's time).

Per run: the child's loop time (wall and CPU), the parent's CPU time from
start to end (this whole process: the manager's loop and a subscriber, or
the reading loop), the changes made (housekeeping: task versions; naive:
messages read), and the lag of the last value: from the child's last call
to the parent seeing that value (the housekeeping child then idles, so the
value travels by the timer, not with the final report).
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from benchmarks import animators
from benchmarks.common import TIMEOUT, Approach, Options, Section, Table, alternate
from benchmarks.recording import Recorder, recorded_manager

TITLE = "4. Progress flood"
LINGER = 0.3


class Figures:
    """The tables every approach appends to."""

    def __init__(self, calls: int) -> None:
        self.child = Table(f"child loop of {calls:,} calls, wall time", "s", [], digits=3)
        self.child_cpu = Table("child loop CPU time", "s", [], digits=3)
        self.parent = Table("parent CPU time, start to end", "s", [], digits=3)
        self.changes = Table("changes made in the parent", "count", [], digits=0)
        self.lag = Table("lag of the last value", "ms", [], scale=1000, digits=1)

    def tables(self) -> list[Table]:
        """In print order."""
        return [self.child, self.child_cpu, self.parent, self.changes, self.lag]

    def add(self, name: str, wall: float, cpu: float, parent: float, changes: float,
            lag: float | None) -> None:
        """Record one run."""
        self.child.row(name).samples.append(wall)
        self.child_cpu.row(name).samples.append(cpu)
        self.parent.row(name).samples.append(parent)
        self.changes.row(name).samples.append(changes)
        if lag is not None:
            self.lag.row(name).samples.append(lag)


class ManagerFlood(Approach):
    """housekeeping: a FLOOD task, set_progress in a hot loop."""

    name = "housekeeping set_progress"

    def __init__(self, calls: int, figures: Figures) -> None:
        self.calls = calls
        self.figures = figures

    def __enter__(self) -> ManagerFlood:
        self.last_seen: dict[str, float] = {}
        calls = self.calls

        def watch(task: dict[str, Any], now: float) -> None:
            progress = task.get("progress") or {}
            if progress.get("transferredBytes") == calls:
                self.last_seen.setdefault(task["meta"]["id"], now)

        self.recorder = Recorder(watch)
        self.manager = recorded_manager(
            lambda m: m.register_animator("FLOOD", animators.Flood()), self.recorder,
            max_workers=2, purge_delay=600,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.terminate()

    def sample(self) -> float:
        cpu = time.process_time()
        task_id = self.manager.run_task(
            {"operation": "FLOOD", "args": {"n": self.calls, "linger": LINGER}})
        state = self.recorder.wait_end(task_id, timeout=TIMEOUT * 3)
        parent = time.process_time() - cpu
        task = self.manager.get_task(task_id)
        if state != "SUCCEEDED":
            raise RuntimeError(f"housekeeping: the flood task ended {state}: {task['messages']}")
        result = task["result"]
        seen = self.last_seen.get(task_id)
        lag = None if seen is None else seen - result["last_call"]
        # NOTE: versions: 1 at creation, one for ACTIVE, one for SUCCEEDED; the rest
        # are progress reports.
        self.figures.add(self.name, result["wall"], result["cpu"], parent,
                         task["meta"]["version"] - 3, lag)
        return parent


class PipeFlood(Approach):
    """A bare fork child; either one send per call, or no reporting at all."""

    def __init__(self, calls: int, figures: Figures, naive: bool) -> None:
        self.calls = calls
        self.figures = figures
        self.naive = naive
        self.name = "naive: one Connection.send per call" if naive else "no reporting (floor)"

    def __enter__(self) -> PipeFlood:
        self.ctx = multiprocessing.get_context("fork")
        return self

    def sample(self) -> float:
        reader, writer = self.ctx.Pipe(duplex=False)
        target = animators.flood_pipe if self.naive else animators.flood_nothing
        cpu = time.process_time()
        process = self.ctx.Process(target=target, args=(writer, self.calls))
        process.start()
        writer.close()
        received = 0
        seen = None
        try:
            while True:
                if not reader.poll(TIMEOUT):
                    raise TimeoutError(f"{self.name}: the child went silent")
                message = reader.recv()
                if message[0] == "done":
                    break
                received += 1
                if message[1] == self.calls:
                    seen = time.monotonic()
            parent = time.process_time() - cpu
            _, wall, child_cpu, last = message
            self.figures.add(self.name, wall, child_cpu, parent, received,
                             None if seen is None else seen - last)
            return float(parent)
        finally:
            reader.close()
            process.join(TIMEOUT)
            if process.exitcode is None:
                process.kill()
                process.join()


def run(options: Options) -> Section:
    """Flood from each approach, alternately."""
    rounds = options.pick(2, 3)
    calls = options.pick(250_000, 1_000_000)
    figures = Figures(calls)
    approaches: list[Approach] = [
        ManagerFlood(calls, figures),
        PipeFlood(calls, figures, naive=True),
        PipeFlood(calls, figures, naive=False),
    ]
    alternate(approaches, rounds, 1, Table("unused", "s", []))
    section = Section(TITLE, figures.tables())
    for name in (approaches[0].name, approaches[1].name):
        parent = figures.parent.row(name).median
        child = figures.child_cpu.row(name).median
        if parent is not None and child:
            section.facts[f"parent CPU ÷ child loop CPU, {name}"] = f"{parent / child:.3f}"
    section.notes += [
        f"{calls:,} calls per run; the housekeeping child idles {LINGER:g} s after the "
        "loop so the last value arrives by the coalescing timer",
        "parent CPU is time.process_time() of the benchmark process from run_task "
        "(or start) to the end, the subscriber's thread included",
    ]
    return section
