"""6. Memory: the supervising process and each running task's process.

Every figure comes from a fresh interpreter (``python -m benchmarks.memory
KIND`` prints it as JSON), so that what one approach imported does not count
against another; probes of each kind alternate, round after round.

* housekeeping: this process with an idle ``Manager(max_workers=2)`` (after a
  few trivial tasks); again with 10,000 finished tasks retained in the table
  (canceled while queued: records like any short task's, two messages each);
  the starter and warm processes; and each of 2 running task processes.
* peers: ``ProcessPoolExecutor(max_workers=2)`` (fork), pebble ``ProcessPool``
  and loky's reusable executor: the parent after a few jobs, and each of 2
  workers while running a job.

RSS counts pages shared with the parent after fork; USS (psutil) counts only
the pages a process has to itself: what one more task really costs.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from benchmarks import animators
from benchmarks.common import TIMEOUT, Options, Section, Table, wait_until
from benchmarks.http_load import ROOT
from benchmarks.recording import Recorder

TITLE = "6. Memory"
RETAINED = 10_000
KINDS = ("housekeeping", "ppe", "pebble", "loky")
MIB = 1 / 2**20


def _sizes(pid: int) -> tuple[int, int]:
    info = psutil.Process(pid).memory_full_info()
    return int(info.rss), int(info.uss)


def probe_housekeeping() -> dict[str, Any]:
    """Measure a Manager in this (fresh) process."""
    from benchmarks.recording import fill_table, wait_warm
    from supervisor import Manager

    figures: dict[str, Any] = {}
    me = os.getpid()
    with Manager(max_workers=2, purge_delay=3600) as manager:
        animators.register(manager)
        recorder = Recorder()
        manager.subscribe(recorder)
        for _ in range(3):
            recorder.wait_end(manager.run_task({"operation": "NOOP"}))
        wait_warm(manager)
        gc.collect()
        figures["parent_idle"] = _sizes(me)
        helpers = psutil.Process(me).children(recursive=True)
        figures["helpers"] = [_sizes(p.pid) for p in helpers]
        started = time.monotonic()
        fill_table(manager, RETAINED)
        figures["fill_seconds"] = time.monotonic() - started
        gc.collect()
        figures["parent_retained"] = _sizes(me)
        pids: dict[str, int] = {}

        def running(task: dict[str, Any], now: float) -> None:
            for entry in task["messages"]:
                if entry["message"].startswith("running "):
                    pids[task["meta"]["id"]] = int(entry["message"].split()[1])

        recorder = Recorder(running)
        manager.subscribe(recorder)
        ids = [manager.run_task({"operation": "HOLD"}) for _ in range(2)]
        recorder.wait_for(lambda: all(t in pids for t in ids), "the HOLD tasks to run")
        figures["workers"] = [_sizes(pids[t]) for t in ids]
        for task_id in ids:
            manager.cancel_task(task_id)
    return figures


def probe_pool(kind: str) -> dict[str, Any]:
    """Measure a pool of two workers in this (fresh) process."""
    from benchmarks.start import close_pool, make_pool, submit

    figures: dict[str, Any] = {}
    pool = make_pool(kind, 2)
    try:
        for future in [submit(pool, animators.noop) for _ in range(4)]:
            future.result(TIMEOUT)
        gc.collect()
        figures["parent_idle"] = _sizes(os.getpid())
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
            paths = [os.path.join(folder, str(i)) for i in range(2)]
            jobs = [submit(pool, animators.sleep_job, path) for path in paths]
            wait_until(lambda: all(os.path.exists(p) for p in paths), "the jobs to run")
            workers = []
            for path in paths:
                with open(path, encoding="ascii") as announced:
                    workers.append(_sizes(int(announced.read())))
            figures["workers"] = workers
            for job in jobs:
                job.cancel()
    finally:
        if kind == "ppe":
            # NOTE: a running job cannot be canceled; end the workers instead.
            for child in psutil.Process().children():
                child.kill()
        close_pool(pool)
    return figures


def _probe(kind: str) -> dict[str, Any]:
    """Run one probe in a fresh interpreter; return its figures."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", kind], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=TIMEOUT * 2)
    if done.returncode:
        raise RuntimeError(f"memory probe {kind} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(options: Options) -> Section:
    """Probe each kind in turn, round after round."""
    rounds = options.pick(1, 3)
    parent = Table("supervising process RSS", "MiB", [], scale=MIB, digits=1)
    rss = Table("per running task process: RSS", "MiB", [], scale=MIB, digits=1)
    uss = Table("per running task process: USS (unshared)", "MiB", [], scale=MIB, digits=2)
    helpers = Table("housekeeping helper processes (starter, 2 warm processes, their inits), total",
                    "MiB", [],
                    scale=MIB, digits=1)
    names = {"housekeeping": "housekeeping", "ppe": "ProcessPoolExecutor (fork)",
             "pebble": "pebble ProcessPool", "loky": "loky executor"}
    fill = []
    for index in range(rounds):
        shift = index % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            figures = _probe(kind)
            name = names[kind]
            if kind == "housekeeping":
                parent.row("housekeeping Manager, idle").samples.append(
                    figures["parent_idle"][0])
                parent.row(f"housekeeping Manager, {RETAINED:,} finished tasks").samples.append(
                    figures["parent_retained"][0])
                helpers.row("housekeeping RSS").samples.append(
                    sum(r for r, _ in figures["helpers"]))
                helpers.row("housekeeping USS").samples.append(
                    sum(u for _, u in figures["helpers"]))
                fill.append(figures["fill_seconds"])
                per_task = (figures["parent_retained"][0] - figures["parent_idle"][0]) / RETAINED
                helpers.row("per retained task (bytes ÷ 2^20)").samples.append(per_task)
            else:
                parent.row(f"{name} parent, idle").samples.append(figures["parent_idle"][0])
            for size, unshared in figures["workers"]:
                rss.row(name).samples.append(size)
                uss.row(name).samples.append(unshared)
    peers = [f"{names[k]} parent, idle" for k in KINDS[1:]]
    parent.pairs = [("housekeeping Manager, idle", p) for p in peers]
    helpers.pairs = []
    section = Section(TITLE, [parent, rss, uss, helpers])
    per_task = helpers.row("per retained task (bytes ÷ 2^20)").median
    helpers.rows = [r for r in helpers.rows if not r.name.startswith("per retained")]
    if per_task is not None:
        section.facts["supervisor memory per retained finished task"] = f"{per_task:,.0f} bytes"
    if fill:
        section.facts[f"time to put {RETAINED:,} finished tasks in the table"] = (
            f"{min(fill):.1f} s")
    section.notes += [
        "each probe is a fresh interpreter; each pool has 2 workers, each measured while "
        "running a job that sleeps",
        "housekeeping's parent has the manager's loop thread, a subscriber thread and "
        "uvloop loaded; the starter and warm processes are listed apart",
    ]
    return section


if __name__ == "__main__":
    what = sys.argv[1]
    result = probe_housekeeping() if what == "housekeeping" else probe_pool(what)
    print(json.dumps(result))
