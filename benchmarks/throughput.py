"""2. Isolated throughput: trivial tasks, two at a time, each in a fresh process.

Each round runs a batch of trivial tasks through every approach in turn; the
sample is the batch's rate, from the first submission to the last task done.
The reused-worker pools do not isolate tasks; they are the reference for what
a fresh process per task costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from multiprocessing import connection
from pathlib import Path
from typing import Any

import psutil

from benchmarks import animators
from benchmarks.common import TIMEOUT, Approach, Options, Section, Table, alternate
from benchmarks.recording import Recorder, recorded_manager
from benchmarks.start import close_pool, context, make_pool, submit

TITLE = "2. Isolated throughput"
WORKERS = 2


class Batch(Approach):
    """An approach whose sample runs ``tasks`` tasks and returns tasks per second."""

    def __init__(self, name: str, tasks: int, cpu: Table, sandbox: Any = None) -> None:
        self.name = name
        self.tasks = tasks
        self.cpu = cpu
        self.sandbox = sandbox  #: a Manager's default sandbox (None: the library's)

    def sample(self) -> float:
        cpu = time.process_time()
        seconds = self.run_batch()
        self.cpu.row(self.name).samples.append((time.process_time() - cpu) / self.tasks)
        return self.tasks / seconds

    def run_batch(self) -> float:
        """Run the batch; return its wall time."""
        raise NotImplementedError


class ManagerBatch(Batch):
    """housekeeping Manager(max_workers=2).

    With ``split``, also where each task's CPU time goes: the task process (its
    ``usage``, the kernel's wait4 accounting), the starter and the inits (every
    other descendant of this process), per task.
    """

    split: Table | None = None

    def __enter__(self) -> ManagerBatch:
        self.recorder = Recorder()
        self.manager = recorded_manager(
            lambda m: m.register_animator("NOOP", animators.Noop()), self.recorder,
            warmup="NOOP", max_workers=WORKERS, purge_delay=600, sandbox=self.sandbox,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.terminate()

    def run_batch(self) -> float:
        before = self.recorder.ended
        helpers = descendants_cpu()
        start = time.monotonic()
        ids = [self.manager.run_task({"operation": "NOOP"}) for _ in range(self.tasks)]
        self.recorder.wait_for(lambda: self.recorder.ended - before >= self.tasks,
                               f"{self.tasks} tasks to end")
        bad = [t for t in ids if self.recorder.outcome(t) != "SUCCEEDED"]
        if bad:
            raise RuntimeError(f"housekeeping: {len(bad)} trivial tasks did not succeed")
        last = max(self.recorder.when(t, "SUCCEEDED") or 0.0 for t in ids)
        if self.split is not None:
            usage = [self.manager.get_task(t)["usage"] for t in ids]
            tasks_cpu = sum(u["cpuUserSeconds"] + u["cpuSystemSeconds"] for u in usage)
            helpers = descendants_cpu() - helpers - tasks_cpu
            self.split.row("housekeeping: each task process (its usage)").samples.append(
                tasks_cpu / self.tasks)
            self.split.row("housekeeping: the starter and the inits").samples.append(
                helpers / self.tasks)
        return last - start


def descendants_cpu() -> float:
    """CPU seconds of every live descendant of this process and of what they reaped."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # NOTE: it ended between the listing and the read
        total += times.user + times.system + times.children_user + times.children_system
    return total


class ProcessBatch(Batch):
    """A bare multiprocessing.Process per task, two at a time."""

    def __init__(self, method: str, tasks: int, cpu: Table) -> None:
        super().__init__(f"multiprocessing {method} per task", tasks, cpu)
        self.method = method

    def __enter__(self) -> ProcessBatch:
        self.ctx = context(self.method)
        return self

    def _start(self) -> tuple[connection.Connection, Any]:
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=animators.report, args=(writer,))
        process.start()
        writer.close()
        return reader, process

    def run_batch(self) -> float:
        running: dict[Any, Any] = {}
        started = done = 0
        start = time.monotonic()
        try:
            while done < self.tasks:
                while len(running) < WORKERS and started < self.tasks:
                    reader, process = self._start()
                    running[reader] = process
                    started += 1
                ready = connection.wait(list(running), TIMEOUT)
                if not ready:
                    raise TimeoutError(f"{self.name}: no child finished")
                for reader in ready:
                    assert isinstance(reader, connection.Connection)
                    reader.recv_bytes()
                    running.pop(reader).join(TIMEOUT)
                    reader.close()
                    done += 1
            return time.monotonic() - start
        finally:
            for reader, process in running.items():
                process.kill()
                process.join()
                reader.close()


#: The bare loop of :class:`ProcessBatch`, run by a fresh interpreter that imports
#: nothing else: the floor a light service would see (a fork costs more the
#: more its parent has mapped).
_LIGHT_LOOP = """
import multiprocessing as mp, os, sys, time
from multiprocessing import connection
def report(writer):
    writer.send_bytes(b"done")
    writer.close()
if __name__ == "__main__":
    ctx, tasks, workers = mp.get_context("fork"), int(sys.argv[1]), int(sys.argv[2])
    running, started, done = {}, 0, 0
    cpu, start = time.process_time(), time.monotonic()
    while done < tasks:
        while len(running) < workers and started < tasks:
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=report, args=(writer,))
            process.start()
            writer.close()
            running[reader] = process
            started += 1
        for reader in connection.wait(list(running), 60):
            reader.recv_bytes()
            running.pop(reader).join()
            reader.close()
            done += 1
    children = os.times()
    print(time.monotonic() - start, time.process_time() - cpu,
          children.children_user + children.children_system)
"""


class LightProcessBatch(Batch):
    """The bare fork-per-task loop in a parent that imported nothing else."""

    split: Table | None = None  #: where its child's CPU time is recorded, if anywhere

    def __init__(self, tasks: int, cpu: Table) -> None:
        super().__init__("multiprocessing fork per task, light parent", tasks, cpu)

    def __enter__(self) -> LightProcessBatch:
        return self

    def sample(self) -> float:
        answer = subprocess.run(
            [sys.executable, "-c", _LIGHT_LOOP, str(self.tasks), str(WORKERS)],
            capture_output=True, text=True, timeout=TIMEOUT, check=True)
        seconds, cpu, children = (float(x) for x in answer.stdout.split())
        self.cpu.row(self.name).samples.append(cpu / self.tasks)
        if self.split is not None:
            self.split.row("bare, light parent: each child process").samples.append(
                children / self.tasks)
        return self.tasks / seconds


#: housekeeping in a fresh interpreter of its own, as a service's main script:
#: Manager(max_workers=2), a trivial animator defined in this script ("main")
#: or imported from a module beside it ("module"); prints the batch's seconds,
#: from the first run_task to the last task ended, after a warm-up.
_SCRIPT = """
import sys, threading, time
from supervisor import Animator, Manager


class Noop(Animator):
    def execute(self, ops):
        return None


def batch(manager, tasks):
    ended, last, lock, done = set(), [0.0], threading.Lock(), threading.Event()

    def on_event(event):
        task = event.get("task")
        if task and task["state"] in ("SUCCEEDED", "FAILED", "CANCELED"):
            with lock:
                ended.add(task["meta"]["id"])
                last[0] = time.monotonic()
                if len(ended) >= tasks:
                    done.set()

    manager.subscribe(on_event)
    start = time.monotonic()
    ids = [manager.run_task({"operation": "NOOP"}) for _ in range(tasks)]
    if not done.wait(120) or any(manager.get_task(i)["state"] != "SUCCEEDED" for i in ids):
        raise SystemExit("the batch did not succeed")
    return last[0] - start


if __name__ == "__main__":
    tasks, where = int(sys.argv[1]), sys.argv[2]
    if where == "module":
        from noop_module import Noop
    manager = Manager(max_workers=2, purge_delay=600)
    try:
        manager.register_animator("NOOP", Noop())
        batch(manager, 4)
        print(batch(manager, tasks))
    finally:
        manager.terminate()
"""


class ScriptBatch(Batch):
    """housekeeping in a main script of its own (:data:`_SCRIPT`)."""

    def __init__(self, where: str, tasks: int, cpu: Table) -> None:
        label = {"main": "animator in the main script",
                 "module": "animator in a module"}[where]
        super().__init__(f"housekeeping in a script of its own, {label}", tasks, cpu)
        self.where = where

    def __enter__(self) -> ScriptBatch:
        self.folder = Path(tempfile.mkdtemp(prefix="housekeeping-bench-"))
        (self.folder / "main_script.py").write_text(_SCRIPT)
        (self.folder / "noop_module.py").write_text(
            _SCRIPT.split("\n\n\ndef batch")[0])
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def sample(self) -> float:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        answer = subprocess.run(
            [sys.executable, "main_script.py", str(self.tasks), self.where],
            cwd=self.folder, capture_output=True, text=True, timeout=TIMEOUT + self.tasks,
            check=True, env={**os.environ, "PYTHONPATH": path})
        return self.tasks / float(answer.stdout.split()[-1])


class PoolBatch(Batch):
    """A pool of two workers, all tasks submitted at once."""

    def __init__(self, kind: str, tasks: int, cpu: Table) -> None:
        names = {
            "pebble": "pebble ProcessPool(max_tasks=1)",
            "ppe1": "ProcessPoolExecutor(max_tasks_per_child=1)",
            "ppe": "ProcessPoolExecutor (no isolation)",
            "pebble1": "pebble ProcessPool (no isolation)",
            "loky": "loky reusable executor (no isolation)",
        }
        super().__init__(names[kind], tasks, cpu)
        self.kind = kind

    def __enter__(self) -> PoolBatch:
        self.pool = make_pool(self.kind, WORKERS)
        try:
            for future in [submit(self.pool, animators.noop) for _ in range(2 * WORKERS)]:
                future.result(TIMEOUT)
        except BaseException:
            close_pool(self.pool)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        close_pool(self.pool)

    def run_batch(self) -> float:
        start = time.monotonic()
        futures = [submit(self.pool, animators.noop) for _ in range(self.tasks)]
        _, pending = wait(futures, TIMEOUT + self.tasks)
        if pending:
            raise TimeoutError(f"{self.name}: {len(pending)} jobs did not finish")
        for future in futures:
            future.result()
        return time.monotonic() - start


def run(options: Options) -> Section:
    """Measure the rate of isolated trivial tasks of every approach, alternately."""
    rounds = options.pick(2, 4)
    total = options.pick(200, 2000)
    tasks = total // rounds
    rates = Table(f"tasks per second ({tasks} per sample, {WORKERS} at a time)", "tasks/s", [],
                  higher_is_better=True, digits=0)
    cpu = Table("CPU time of this (parent) process per task", "ms", [], scale=1000, digits=3)
    split = Table("where the CPU time of a task goes, besides the parent's (above)", "ms",
                  [], scale=1000, digits=3)
    manager = ManagerBatch("housekeeping Manager(max_workers=2)", tasks, cpu)
    light = LightProcessBatch(tasks, cpu)
    manager.split = light.split = split
    split.pairs = [("housekeeping: each task process (its usage)",
                    "bare, light parent: each child process")]
    approaches: list[Approach] = [
        manager,
        ProcessBatch("fork", tasks, cpu),
        light,
        ScriptBatch("main", tasks, cpu),
        ScriptBatch("module", tasks, cpu),
        ProcessBatch("forkserver", tasks, cpu),
        PoolBatch("pebble", tasks, cpu),
        PoolBatch("ppe1", tasks, cpu),
        PoolBatch("ppe", tasks, cpu),
        PoolBatch("pebble1", tasks, cpu),
        PoolBatch("loky", tasks, cpu),
    ]
    in_scripts = [a.name for a in approaches if isinstance(a, ScriptBatch)]
    peers = [a.name for a in approaches if a is not manager and a.name not in in_scripts]
    rates.pairs = [(manager.name, peer) for peer in peers] + [
        (name, light.name) for name in in_scripts] + [(in_scripts[0], in_scripts[1])]
    alternate(approaches, rounds, 1, rates)
    section = Section(TITLE, [rates, cpu, split])
    section.facts["tasks per approach"] = tasks * rounds
    section.notes += [
        "housekeeping: from the first run_task to the last SUCCEEDED event; every task "
        "in a fresh process; table and subscriber kept as in a service",
        "multiprocessing: start, read the child's message, join; 2 at a time; 'light "
        "parent': the same loop in a fresh interpreter that imports nothing else (a fork "
        "costs more the more its parent has mapped; this process has every peer loaded)",
        "'in a script of its own': the same Manager in a fresh interpreter running a "
        "main script, its animator defined in that script (the starter imports the "
        "script once) or in a module beside it; its CPU is not counted here",
        "pools: all tasks submitted at once, until the last future is done",
        "where the CPU goes: a task process's usage is the kernel's (wait4, its exit "
        "included); the starter and the inits are every other descendant; the bare "
        "child's is the light loop's RUSAGE_CHILDREN",
        "CPU: time.process_time() of the benchmark process (the housekeeping loop and "
        "subscriber threads, or the pool's threads); helper processes not counted",
    ]
    return section
