"""11. Task output: how fast a task can write through the capture, and what it costs.

A task writes 100-byte lines to its stdout as fast as it can, in 64 KiB
``os.write()`` chunks (and, separately, one ``print()`` per line, which is
line-buffered in a task), for a fixed time.
housekeeping: the task process's fd 1 is the pipe the manager's loop reads
into the task's log (the default ``log_limit`` of 1 MiB: nearly every line is
dropped, and counted). The floor: a process forked from this one writes the
same bytes the same way into a pipe of the capture's size that a bare loop
here drains (``os.read`` of the capture's read size, discarded).

Per run: the write rate (bytes ÷ the writer's own time around its write
loop, so the start of a process is not in it), the wall time from its last
write to the whole output read (``get_log(...)["complete"]`` / EOF), and the
CPU time of this process -- the supervisor: the manager's
loop and the threads around it, or the bare reader -- per MiB written.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing
import os
import time
from typing import Any

from benchmarks import animators
from benchmarks.common import TIMEOUT, Approach, Options, Section, Table, alternate, wait_until
from benchmarks.recording import Recorder, recorded_manager
from supervisor.backends.local.capture import READ_BYTES

TITLE = "11. Task output"
CHUNKED = "64 KiB os.write()"
PER_LINE = "print() per line"
FLOOR = "bare reader"
GOAL = 0.5  #: the capture's rate ÷ the floor's, at least (64 KiB writes)
#: A cap on what one run writes (MiB) that the time limit reaches first.
MAX_MIB = 64 * 1024
#: An ``after`` beyond any log: get_log answers no lines, only whether it is complete.
PAST_THE_END = 2**62


class Figures:
    """The tables every approach appends to."""

    def __init__(self) -> None:
        self.rate = Table("write rate, 100-byte lines", "MiB/s", [], higher_is_better=True,
                          digits=0, pairs=_pairs())
        self.lag = Table("writer's last write → whole output read (get_log complete / EOF)",
                         "ms", [], scale=1000, digits=1, pairs=_pairs())
        self.cpu = Table("supervisor CPU time per MiB (this process)", "ms", [],
                         scale=1000, digits=3, pairs=_pairs())

    def tables(self) -> list[Table]:
        """In print order."""
        return [self.rate, self.lag, self.cpu]

    def add(self, name: str, result: dict[str, float], done: float, cpu: float) -> None:
        """Record one run from the writer's figures, when reading ended, and the CPU time."""
        mib = result["bytes"] / 2**20
        self.rate.row(name).samples.append(mib / result["seconds"])
        self.lag.row(name).samples.append(done - result["ended"])
        self.cpu.row(name).samples.append(cpu / mib)


def _pairs() -> list[tuple[str, str]]:
    return [(f"housekeeping {case}", f"{FLOOR} {case}") for case in (CHUNKED, PER_LINE)]


class _Writing(Approach):
    """What both sides write: 100-byte lines for ``seconds``."""

    def __init__(self, side: str, seconds: float, per_line: bool, figures: Figures) -> None:
        self.mib = MAX_MIB
        self.seconds = seconds
        self.per_line = per_line
        self.figures = figures
        self.name = f"{side} {PER_LINE if per_line else CHUNKED}"


class ManagerOutput(_Writing):
    """housekeeping: an OUTPUT task, its stdout captured into its log."""

    def __init__(self, seconds: float, per_line: bool, figures: Figures) -> None:
        super().__init__("housekeeping", seconds, per_line, figures)

    def __enter__(self) -> ManagerOutput:
        self.recorder = Recorder()
        self.manager = recorded_manager(
            lambda m: m.register_animator("OUTPUT", animators.Output()), self.recorder,
            warmup="OUTPUT", max_workers=2, purge_delay=600,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.terminate()

    def sample(self) -> float:
        args = {"mib": self.mib, "seconds": self.seconds, "per_line": self.per_line}
        cpu = time.process_time()
        task_id = self.manager.run_task({"operation": "OUTPUT", "args": args})
        state = self.recorder.wait_end(task_id)
        wait_until(lambda: self.manager.get_log(task_id, after=PAST_THE_END)["complete"],
                   f"the log of {task_id} to complete")
        done = time.monotonic()
        parent = time.process_time() - cpu
        task = self.manager.get_task(task_id)
        if state != "SUCCEEDED":
            raise RuntimeError(f"housekeeping: the output task ended {state}: "
                               f"{task['messages']}")
        result = task["result"]
        # NOTE: a chunked write may end inside a line: it is flushed as one.
        lines = math.ceil(result["bytes"] / animators.OUTPUT_LINE_BYTES)
        log = self.manager.get_log(task_id)
        if log["next"] != lines or log["dropped"] + len(log["lines"]) != lines:
            raise RuntimeError(f"housekeeping: {lines} lines written, the log has "
                               f"next={log['next']}, dropped={log['dropped']}, "
                               f"{len(log['lines'])} kept")
        self.figures.add(self.name, result, done, parent)
        return parent


class PipeOutput(_Writing):
    """The floor: a bare fork child writing into a pipe this process drains."""

    def __init__(self, seconds: float, per_line: bool, figures: Figures) -> None:
        super().__init__(FLOOR, seconds, per_line, figures)

    def __enter__(self) -> PipeOutput:
        self.ctx = multiprocessing.get_context("fork")
        return self

    def sample(self) -> float:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # NOTE: as the capture sizes its pipes
            fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, READ_BYTES)
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=animators.output_process,
            args=(writer, write_end, self.mib, self.per_line, self.seconds))
        try:
            process.start()
        finally:
            os.close(write_end)  # NOTE: the child's copy is the only one: EOF when it ends
            writer.close()
        try:
            cpu = time.process_time()
            size = 0
            while chunk := os.read(read_end, READ_BYTES):
                size += len(chunk)
            done = time.monotonic()
            parent = time.process_time() - cpu
            if not reader.poll(TIMEOUT):
                raise TimeoutError(f"{self.name}: the child sent no figures")
            result: dict[str, Any] = reader.recv()
            if size != result["bytes"]:
                raise RuntimeError(f"{self.name}: {result['bytes']} bytes written, "
                                   f"{size} read")
            self.figures.add(self.name, result, done, parent)
            return parent
        finally:
            os.close(read_end)
            reader.close()
            process.join(TIMEOUT)
            if process.exitcode is None:
                process.kill()
                process.join()


def run(options: Options) -> Section:
    """Write from each approach, alternately."""
    rounds = options.pick(2, 3)
    per_round = options.pick(2, 3)
    seconds = options.pick(0.5, 1.0)
    figures = Figures()
    approaches: list[Approach] = [
        ManagerOutput(seconds, False, figures),
        PipeOutput(seconds, False, figures),
        ManagerOutput(seconds, True, figures),
        PipeOutput(seconds, True, figures),
    ]
    alternate(approaches, rounds, per_round, Table("unused", "s", []))
    section = Section(TITLE, figures.tables())
    mine = figures.rate.row(f"housekeeping {CHUNKED}").median
    floor = figures.rate.row(f"{FLOOR} {CHUNKED}").median
    if mine is not None and floor:
        verdict = "met" if mine / floor >= GOAL else "not met"
        section.facts[f"capture ÷ floor, {CHUNKED} (goal ≥ {GOAL:g})"] = (
            f"{mine / floor:.2f}: {verdict}")
    section.notes += [
        f"every run writes 100-byte lines (\\n included) for {seconds:g} s as fast as it "
        f"can: {CHUNKED}, 64 KiB per call; {PER_LINE}, one print() of a 99-character "
        "text per line, line-buffered",
        "write rate: bytes ÷ the writer's own time.perf_counter() around its write loop",
        "housekeeping: Manager(max_workers=2), default log_limit (1 MiB: the newest lines "
        "are kept, the rest dropped and counted); each run checks that every line reached "
        "the log (kept + dropped)",
        f"{FLOOR}: a fork child writes the same bytes the same way into a pipe of "
        f"{READ_BYTES // 1024} KiB (the capture's size) that this process drains with "
        f"os.read({READ_BYTES // 1024} KiB), discarding them",
        "supervisor CPU: time.process_time() of this process (every thread: the manager's "
        "loop, the subscriber's delivery) from run_task to get_log complete, or of the "
        "bare reader from its first read to EOF",
    ]
    return section
