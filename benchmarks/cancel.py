"""3. Cancel latency: from asking a running task to stop to its processes being gone.

housekeeping (``cancel_grace=0.2``), until a subscriber sees CANCELED (which
the manager records only once the task's whole tree is reaped):

* cooperative: the animator polls ``is_canceled()`` every 10 ms and honours it;
* forced: the child ignores SIGTERM and the cancel; the figure is the time
  beyond the 0.2 s grace;
* tree: the task process has 3 descendants and ignores the cancel (it and
  they die of SIGTERM); time beyond the grace.

Peers: pebble ``future.cancel()`` on a running job, until the worker is
reaped (and whether the job's descendants survive); a bare process in its own
process group, one ``os.killpg(SIGKILL)`` until it is reaped (with 3
descendants: until all 4 are reaped, this process acting as their subreaper);
and the naive psutil way (kill each, ``psutil.wait_procs``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from typing import Any

import psutil

from benchmarks import animators
from benchmarks.common import (
    TIMEOUT,
    Approach,
    Options,
    Section,
    Table,
    alternate,
    wait_until,
)
from benchmarks.recording import Recorder, recorded_manager, wait_warm
from benchmarks.start import POOL_PAUSE
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl

TITLE = "3. Cancel latency"
GRACE = 0.2


class ManagerCancel(Approach):
    """housekeeping: cancel_task → CANCELED, one kind of task."""

    pause = 0.01

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.operation = {"cooperative": "HOLD", "forced": "STUBBORN", "tree": "TREE"}[kind]
        self.name = {
            "cooperative": "housekeeping cooperative",
            "forced": "housekeeping forced (− grace)",
            "tree": "housekeeping tree of 4 (− grace)",
        }[kind]
        self.survivors = 0

    def __enter__(self) -> ManagerCancel:
        self.running: dict[str, tuple[float, str]] = {}

        def watch(task: dict[str, Any], now: float) -> None:
            if task["meta"]["id"] in self.running:
                return
            for entry in task["messages"]:
                if entry["message"].startswith("running"):
                    self.running[task["meta"]["id"]] = (now, entry["message"])

        self.recorder = Recorder(watch)
        self.manager = recorded_manager(
            animators.register, self.recorder,
            max_workers=2, purge_delay=600, cancel_grace=GRACE,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.terminate()

    def sample(self) -> float:
        wait_warm(self.manager)
        task_id = self.manager.run_task({"operation": self.operation})
        self.recorder.wait_for(lambda: task_id in self.running, f"{task_id} to run")
        start = time.monotonic()
        self.manager.cancel_task(task_id)
        state = self.recorder.wait_end(task_id)
        if state != "CANCELED":
            raise RuntimeError(f"housekeeping: {self.kind} task ended {state}, not CANCELED")
        elapsed = (self.recorder.when(task_id, "CANCELED") or 0.0) - start
        if self.kind == "tree":
            pids = [int(p) for p in self.running[task_id][1].split()[1:]]
            self.survivors += sum(_alive(pid) for pid in pids)
        return elapsed - (GRACE if self.kind != "cooperative" else 0.0)


class PebbleCancel(Approach):
    """pebble ProcessPool: future.cancel() of a running job → worker reaped."""

    pause = POOL_PAUSE

    def __init__(self, tree: bool) -> None:
        self.tree = tree
        self.name = "pebble cancel()" + (", tree of 4" if tree else "")
        self.survivors = 0
        self.orphans: list[int] = []

    def __enter__(self) -> PebbleCancel:
        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=1)
        self.folder = tempfile.TemporaryDirectory(prefix="bench-cancel-")
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.stop()
        self.pool.join(TIMEOUT)
        for pid in self.orphans:  # NOTE: pebble leaves them; they would sleep on
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.folder.cleanup()

    def sample(self) -> float:
        path = os.path.join(self.folder.name, f"job-{time.monotonic_ns()}")
        job = animators.tree_job if self.tree else animators.sleep_job
        future = self.pool.schedule(job, args=(path,))
        wait_until(lambda: os.path.exists(path), "the pebble job to start")
        with open(path, encoding="ascii") as announced:
            pids = [int(p) for p in announced.read().split()]
        start = time.monotonic()
        future.cancel()
        wait_until(lambda: not os.path.exists(f"/proc/{pids[0]}"), "the pebble worker reaped",
                   step=0.0002)
        elapsed = time.monotonic() - start
        alive = [pid for pid in pids[1:] if _alive(pid)]
        self.survivors += len(alive)
        self.orphans += alive
        return elapsed


class BareKill(Approach):
    """A bare process (and descendants) in its own process group: killpg → reaped."""

    pause = 0.01

    def __init__(self, tree: bool, naive: bool = False) -> None:
        self.tree = tree
        self.naive = naive
        if naive:
            self.name = "naive psutil kill + wait_procs, tree of 4"
        else:
            self.name = "bare killpg + waitpid" + (", tree of 4" if tree else "")

    def __enter__(self) -> BareKill:
        # NOTE: orphaned descendants must come back to this process to be
        # reaped at once (else PID 1 reaps them, late); only while measuring.
        # The naive way is measured as it is usually run: without that.
        if not self.naive:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.naive:
            prctl(PR_SET_CHILD_SUBREAPER, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def _start(self) -> list[int]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the task process
            try:
                os.close(read)
                os.setpgid(0, 0)
                pids = animators.spawn_descendants() if self.tree else []
                os.write(write, " ".join(map(str, pids)).encode() + b"\n")
                time.sleep(animators.CHILD_LIFETIME)
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            line = pipe.readline()
        return [pid, *map(int, line.split())]

    def sample(self) -> float:
        pids = self._start()
        start = time.monotonic()
        if self.naive:
            procs = [psutil.Process(pid) for pid in pids]
            for proc in procs:
                proc.kill()
            psutil.wait_procs(procs, timeout=TIMEOUT)
        else:
            os.killpg(pids[0], signal.SIGKILL)
            pending = set(pids)
            while pending:
                pending.discard(os.waitpid(-1, 0)[0])
        return time.monotonic() - start


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run(options: Options) -> Section:
    """Measure cancel latency of every approach, alternately."""
    rounds = options.pick(2, 4)
    per_round = options.pick(2, 6)
    table = Table("cancel → stopped and reaped", "ms", [], scale=1000, digits=2, pairs=[])
    hk = {kind: ManagerCancel(kind) for kind in ("cooperative", "forced", "tree")}
    pebble = PebbleCancel(tree=False)
    pebble_tree = PebbleCancel(tree=True)
    bare = BareKill(tree=False)
    bare_tree = BareKill(tree=True)
    naive = BareKill(tree=True, naive=True)
    approaches: list[Approach] = [*hk.values(), pebble, pebble_tree, bare, bare_tree, naive]

    def count(approach: Approach, index: int) -> int:
        if approach in (naive, pebble_tree):  # seconds per sample: a few will do
            return 0 if options.quick and index else max(1, per_round // 3)
        return per_round

    alternate(approaches, rounds, count, table)
    table.pairs = [
        (hk["cooperative"].name, pebble.name),
        (hk["cooperative"].name, bare.name),
        (hk["forced"].name, pebble.name),
        (hk["forced"].name, bare.name),
        (hk["tree"].name, pebble_tree.name),
        (hk["tree"].name, bare_tree.name),
        (hk["tree"].name, naive.name),
    ]
    section = Section(TITLE, [table])
    section.facts["descendants alive after housekeeping's CANCELED (tree)"] = (
        f"{hk['tree'].survivors} of {3 * len(table.row(hk['tree'].name).samples)}")
    section.facts["descendants alive after pebble's worker was reaped (tree)"] = (
        f"{pebble_tree.survivors} of {3 * len(table.row(pebble_tree.name).samples)} "
        "(killed by the benchmark afterwards)")
    section.notes += [
        f"housekeeping: cancel_grace={GRACE:g} s; the forced and tree figures are the time "
        "beyond it (SIGTERM at the grace, SIGKILL later if the tree still lives)",
        "pebble: future.cancel() until the worker's /proc entry is gone (reaped); "
        "the future itself reports cancelled at once",
        "bare: the benchmark process acts as child subreaper while measuring, so "
        "orphaned descendants are reaped by it, not by PID 1; the naive psutil row "
        "(kill each, psutil.wait_procs) runs without that, as such code usually does",
    ]
    return section
