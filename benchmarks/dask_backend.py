"""8. The Dask backend: housekeeping on a Dask cluster, next to its local backend.

Both backends run the same trivial tasks with ``max_workers=2``, alternately,
round after round, in one run:

* local: ``Manager()``'s default backend, a process forked ahead of need on
  this machine for each task;
* Dask: ``Manager(backend=DaskBackend(cluster))`` on a ``LocalCluster`` of 2
  worker processes of 1 thread each on loopback, started once per run and
  closed at its end (its scheduler runs in this process). Each task is a Dask
  task whose body hands it to a Manager in the worker process, which runs it
  in a process of its own.

Start latency: the figure is ``run_task`` until a subscriber sees the
child's first message (the animator sends one at
once); the same tasks also give ``run_task`` until ``execute`` begins (the
child's CLOCK_MONOTONIC: the cluster is on this machine) and until SUCCEEDED
(one trivial task end to end, one at a time).

Isolated throughput: a batch of trivial tasks submitted at once, 2 at a time;
the sample is the batch's rate, from the first ``run_task`` to the last
SUCCEEDED. Bare Dask tasks that each fork one process give two floors: all
submitted at once, and 2 in flight at a time as the Managers run them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from benchmarks import animators
from benchmarks.common import (
    _HELPERS,
    Approach,
    Options,
    Section,
    Series,
    Table,
    alternate,
    wait_until,
)
from benchmarks.recording import Recorder, recorded_manager, wait_warm
from benchmarks.throughput import ManagerBatch, descendants_cpu

TITLE = "8. Dask backend"
WORKERS = 2
#: Tasks run and thrown away after each set-up (imports, first fork, first Dask task).
WARMUP = 3
#: Sleep before each start sample, the same for both backends, so that each starts idle.
PAUSE = 0.05
#: Seconds the cluster's processes get to end after ``close()``.
CLOSE_GRACE = 5.0

LOCAL = "housekeeping, local backend"
DASK = f"housekeeping, Dask backend (LocalCluster {WORKERS}×1)"
BARE = "bare Dask: client.submit(noop).result()"
BARE_FORK = "bare Dask: each task forks one process on the worker"
BARE_FORK_WINDOW = f"bare Dask: each task forks one process, {WORKERS} at a time"

#: A backend factory: None means the Manager's default (local) backend.
BackendFactory = Callable[[], Any]


def _manager(factory: BackendFactory, recorder: Recorder, operation: str,
             animator: Any) -> Any:
    """A recorded Manager(max_workers=2) on the factory's backend, warmed up."""
    backend = factory()
    try:
        return recorded_manager(
            lambda m: m.register_animator(operation, animator), recorder,
            warmup=operation, max_workers=WORKERS, purge_delay=600, backend=backend,
        )
    except BaseException:
        if backend is not None:
            backend.kill_everything()  # idempotent; the manager may never have had it
        raise


class StartLatency(Approach):
    """run_task → the child's first message seen; → execute() begins; → SUCCEEDED seen."""

    pause = PAUSE

    def __init__(self, name: str, factory: BackendFactory, quiet: Callable[[], None],
                 began: Table, ended: Table) -> None:
        self.name = name
        self.factory = factory
        self.quiet = quiet
        self.began = began
        self.ended = ended

    def __enter__(self) -> StartLatency:
        self.announced: dict[str, float] = {}
        self.recorder = Recorder(watch=self._watch)
        self.manager = _manager(self.factory, self.recorder, "ANNOUNCE", animators.Announce())
        return self

    def __exit__(self, *exc: object) -> None:
        _quiet_and_terminate(self.manager, self.quiet, exc[0] is None)

    def _watch(self, task: dict[str, Any], now: float) -> None:
        """Note when the child's message is first seen (under the recorder's lock)."""
        task_id = task["meta"]["id"]
        if task_id not in self.announced and any(
                line["message"] == animators.ANNOUNCED for line in task["messages"]):
            self.announced[task_id] = now

    def sample(self) -> float:
        wait_warm(self.manager)  # local: its warm processes are ready again
        start = time.monotonic()
        task_id = self.manager.run_task({"operation": "ANNOUNCE"})
        if self.recorder.wait_end(task_id) != "SUCCEEDED":
            raise RuntimeError(f"{self.name}: trivial task {task_id} did not succeed: "
                               f"{self.manager.get_task(task_id)['messages'][-3:]}")
        self.recorder.wait_for(lambda: task_id in self.announced,
                               f"the message of {task_id}")
        began = float(self.manager.get_task(task_id)["result"])
        self.began.row(self.name).samples.append(began - start)
        self.ended.row(self.name).samples.append(
            (self.recorder.when(task_id, "SUCCEEDED") or 0.0) - start)
        return self.announced[task_id] - start


def _noop() -> None:
    """A Dask task (and a forked process's target) that does nothing."""


def _fork_one() -> int:
    """A Dask task that runs one process on its worker: the floor of an isolated task.

    NOTE: os.fork, not multiprocessing: a LocalCluster's worker is a daemonic
    process, which multiprocessing does not let have children.
    """
    import os

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _all_cpu() -> float:
    """CPU seconds of this process (the scheduler's thread too) and of every live
    descendant (the cluster's workers, starters and inits) and what they reaped
    (the task processes)."""
    return time.process_time() + descendants_cpu()


class EveryProcessCpu:
    """Records, per sample, the CPU per task of every process into ``every`` and
    of this one into ``own``."""

    name: str
    tasks: int
    every: Table | None = None
    own: Table | None = None

    def measured(self, run: Callable[[], float]) -> float:
        before, mine = _all_cpu(), time.process_time()
        rate = run()
        if self.own is not None:
            self.own.row(self.name).samples.append((time.process_time() - mine) / self.tasks)
        if self.every is not None:
            self.every.row(self.name).samples.append((_all_cpu() - before) / self.tasks)
        return rate


class BareRoundTrip(Approach):
    """One Dask task at a time, straight on the cluster: submit, result."""

    pause = PAUSE

    def __init__(self, name: str, cluster: Any, function: Callable[[], Any]) -> None:
        self.name = name
        self.cluster = cluster
        self.function = function

    def __enter__(self) -> BareRoundTrip:
        import distributed

        self.client = distributed.Client(self.cluster)
        for _ in range(WARMUP):
            self.client.submit(self.function, pure=False).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def sample(self) -> float:
        start = time.monotonic()
        self.client.submit(self.function, pure=False).result()
        return time.monotonic() - start


class BareForkBatch(BareRoundTrip, EveryProcessCpu):
    """A batch of Dask tasks that each fork one process, all submitted at once."""

    pause = 0.0

    def __init__(self, name: str, cluster: Any, tasks: int, every: Table | None = None,
                 own: Table | None = None) -> None:
        super().__init__(name, cluster, _fork_one)
        self.tasks = tasks
        self.every, self.own = every, own

    def sample(self) -> float:
        return self.measured(self.run_batch)

    def run_batch(self) -> float:
        """Submit the batch at once; its rate."""
        start = time.monotonic()
        futures = [self.client.submit(_fork_one, pure=False) for _ in range(self.tasks)]
        if any(code != 0 for code in self.client.gather(futures)):
            raise RuntimeError(f"{self.name}: a forked process failed")
        return self.tasks / (time.monotonic() - start)


class BareForkWindow(BareForkBatch):
    """The same tasks, at most ``WORKERS`` in flight: a new one submitted as one
    ends, as a Manager with ``max_workers=WORKERS`` hands them to Dask."""

    def run_batch(self) -> float:
        """Keep ``WORKERS`` in flight; the batch's rate."""
        import distributed

        start = time.monotonic()
        submitted = min(WORKERS, self.tasks)
        window = distributed.as_completed(
            [self.client.submit(_fork_one, pure=False) for _ in range(submitted)])
        for future in window:
            if future.result() != 0:
                raise RuntimeError(f"{self.name}: a forked process failed")
            if submitted < self.tasks:
                window.add(self.client.submit(_fork_one, pure=False))
                submitted += 1
        return self.tasks / (time.monotonic() - start)


class BackendBatch(ManagerBatch, EveryProcessCpu):
    """Manager(max_workers=2) on a given backend: a batch of trivial tasks at once."""

    def __init__(self, name: str, factory: BackendFactory, quiet: Callable[[], None],
                 tasks: int, cpu: Table, every: Table | None = None) -> None:
        super().__init__(name, tasks, cpu)
        self.factory = factory
        self.quiet = quiet
        self.every = every

    def sample(self) -> float:
        return self.measured(super().sample)

    def __enter__(self) -> BackendBatch:
        self.recorder = Recorder()
        self.manager = _manager(self.factory, self.recorder, "NOOP", animators.Noop())
        return self

    def __exit__(self, *exc: object) -> None:
        _quiet_and_terminate(self.manager, self.quiet, exc[0] is None)


def _quiet_and_terminate(manager: Any, quiet: Callable[[], None], ok: bool) -> None:
    """Wait for ``quiet`` (not on error), then terminate the manager, always."""
    try:
        if ok:
            quiet()
    finally:
        manager.terminate()


def _no_tasks_left(cluster: Any) -> None:
    """Wait until the scheduler holds no task: every future of the round released.

    NOTE: keeps one round's leftovers out of the next round's figures (the
    scheduler runs in this process). Reads the in-process scheduler's task table.
    """
    wait_until(lambda: not cluster.scheduler.tasks, "the scheduler's tasks to go",
               step=0.01)


def _table(title: str, unit: str, *bare: str, **options: Any) -> Table:
    """A table of the two backends, local first, with the ratio Dask ÷ local (and
    Dask ÷ each ``bare`` row: Dask itself, without housekeeping)."""
    return Table(title, unit, [Series(name) for name in (LOCAL, DASK, *bare)],
                 pairs=[(DASK, LOCAL), *((DASK, name) for name in bare)],
                 ratio_title="ratio Dask backend ÷ peer", **options)


def _descendants() -> list[psutil.Process]:
    """Every live process below this one, but the interpreter's helpers."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any(h in " ".join(child.cmdline()) for h in _HELPERS):
                found.append(child)
    return found


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep distributed's INFO chatter (cluster start and stop) out of the report."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def run(options: Options) -> Section:
    """Measure both backends' start latency and isolated throughput, alternately."""
    # NOTE: imported here: distributed is optional (housekeeping-supervisor[dask]); without
    # it this benchmark fails alone and the others still run.
    import distributed

    from supervisor.backends.dask import DaskBackend

    rounds = options.pick(2, 5)
    per_round = options.pick(12, 40)
    batch_rounds = options.pick(2, 4)
    tasks = options.pick(200, 1000) // batch_rounds

    first = _table("start: run_task → the child's first message seen by a subscriber",
                   "ms", scale=1000, digits=3)
    began = _table("start: run_task → execute() begins in the child", "ms",
                   scale=1000, digits=3)
    ended = _table("one trivial task end to end: run_task → SUCCEEDED seen", "ms",
                   BARE, BARE_FORK, scale=1000, digits=3)
    rates = _table(f"isolated throughput: tasks per second ({tasks} per sample, "
                   f"{WORKERS} at a time)", "tasks/s", BARE_FORK, BARE_FORK_WINDOW,
                   higher_is_better=True, digits=0)
    cpu = _table("CPU time of this process per task (Dask: with the LocalCluster's "
                 "scheduler)", "ms", BARE_FORK, scale=1000, digits=3)
    every = _table("CPU time of every process per task: this one (with the scheduler), "
                   "the cluster's workers, starters, inits and task processes", "ms",
                   BARE_FORK, scale=1000, digits=3)
    section = Section(TITLE, [first, began, ended, rates, cpu, every])

    with _quiet_distributed():
        before = {p.pid for p in _descendants()}
        started = time.monotonic()
        cluster = distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True,
            host="127.0.0.1", dashboard_address=None,
        )
        cluster_up = time.monotonic() - started
        try:
            def local() -> None:
                return None

            def dask() -> Any:
                return DaskBackend(cluster)

            def dask_quiet() -> None:
                _no_tasks_left(cluster)

            alternate([StartLatency(LOCAL, local, local, began, ended),
                       StartLatency(DASK, dask, dask_quiet, began, ended)],
                      rounds, per_round, first)
            alternate([BareRoundTrip(BARE, cluster, _noop),
                       BareRoundTrip(BARE_FORK, cluster, _fork_one)],
                      rounds, per_round, ended)
            alternate([BackendBatch(LOCAL, local, local, tasks, cpu, every),
                       BackendBatch(DASK, dask, dask_quiet, tasks, cpu, every),
                       BareForkBatch(BARE_FORK, cluster, tasks, every, cpu),
                       BareForkWindow(BARE_FORK_WINDOW, cluster, tasks)],
                      batch_rounds, 1, rates)
        finally:
            mine = [p for p in _descendants() if p.pid not in before]
            try:
                cluster.close(timeout=30)
            finally:
                _, alive = psutil.wait_procs(mine, timeout=CLOSE_GRACE)
                left = []
                for process in alive:
                    with contextlib.suppress(psutil.Error):
                        left.append(f"{process.pid} {' '.join(process.cmdline())[:60]}")
                        process.kill()
                section.facts["processes of the cluster alive after close()"] = (
                    f"{len(left)} of {len(mine)} (killed): {'; '.join(left)}" if left
                    else f"none of {len(mine)}")

    section.facts["distributed"] = importlib.metadata.version("distributed")
    section.facts["LocalCluster start"] = f"{cluster_up:.2f} s"
    section.facts["start samples per backend"] = rounds * per_round
    section.facts["tasks per backend (throughput)"] = tasks * batch_rounds
    section.notes += [
        f"Dask: LocalCluster(n_workers={WORKERS}, threads_per_worker=1, processes=True) "
        "on 127.0.0.1, started once and shared by every round; each round makes a new "
        "Manager(backend=DaskBackend(cluster), max_workers=2); the local rows use "
        "Manager(max_workers=2), measured while the idle cluster is up",
        "start: run_task until a subscriber sees the child's first message (sent at "
        "once); execute() begins is "
        "the child's clock; SUCCEEDED is the same task end to end; one task at a time, "
        f"after {WARMUP} warm-up tasks per set-up and a {PAUSE * 1000:g} ms pause "
        "(local: and its warm processes ready again)",
        "throughput: every task in a fresh process on both backends; from the first "
        "run_task to the last SUCCEEDED event",
        "bare Dask: the same LocalCluster with a Client of its own, no housekeeping: "
        "submit(noop).result() one at a time (the engine's round trip), and tasks that "
        "each fork one process on the worker (one at a time for the round trip; for the "
        f"rate a batch submitted at once, and the same tasks {WORKERS} at a time, as the "
        "backends get them): the floors of the Dask backend",
        "a Dask manager terminates once the scheduler holds none of its tasks "
        "(not measured)",
        "CPU: time.process_time() of the benchmark process, which also runs the "
        "LocalCluster's scheduler (bare Dask: its client and the scheduler); the worker "
        "processes and the task processes are not counted",
        "CPU of every process: this process and every live descendant with what it "
        "reaped (psutil), before and after the batch; a process that ended unreaped by "
        "a live one meanwhile (a retired init) is missed. With both cores busy, tasks per "
        "second cannot exceed 2 ÷ this figure",
    ]
    return section
