"""10. Sandbox: what each containment setting costs at start and in isolated throughput.

The same two measurements as sections 1 and 2 (``run_task`` → ACTIVE on an
idle manager; trivial tasks two at a time, each in a fresh process), for a
Manager whose default ``Sandbox`` is, in turn: none (``private_pids=False``),
a PID namespace per task (the default as root), that plus a private network,
and that plus ``user="dynamic"``. A bare ``fork`` per task is the floor.
Where this machine may not make namespaces or change users, those rows are
left out and the section says so.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import Approach, Options, Section, Table, alternate
from benchmarks.start import ManagerStart
from benchmarks.throughput import WORKERS, ManagerBatch, ProcessBatch

TITLE = "10. Sandbox"


def _sandboxes() -> tuple[list[tuple[str, Any]], list[str]]:
    """(label, Sandbox) of every setting this machine permits, and the ones it does not."""
    from supervisor import Sandbox
    from supervisor.sandbox import pid_namespaces_permitted

    settings: list[tuple[str, Any]] = [("no sandbox", Sandbox(private_pids=False))]
    missing = []
    if pid_namespaces_permitted():
        settings += [("private_pids", Sandbox(private_pids=True)),
                     ("private_pids + private_network",
                      Sandbox(private_pids=True, private_network=True))]
    else:
        missing.append("private_pids and private_network: no PID namespaces here")
    if os.geteuid() == 0:
        settings.append(("private_pids + user=dynamic" if pid_namespaces_permitted()
                         else "user=dynamic", Sandbox(user="dynamic")))
    else:
        missing.append("user=dynamic: not root")
    return settings, missing


def run(options: Options) -> Section:
    """Measure start latency and isolated throughput under each sandbox, alternately."""
    settings, missing = _sandboxes()
    rounds = options.pick(2, 4)
    start = Table("start → running (run_task → ACTIVE)", "ms", [], scale=1000, digits=3)
    starts: list[Approach] = [ManagerStart(sandbox, label) for label, sandbox in settings]
    alternate(starts, rounds, options.pick(10, 30), start)
    start.rows = [row for row in start.rows if "execute() begins" not in row.name]
    tasks = options.pick(200, 2000) // rounds
    rates = Table(f"isolated throughput ({tasks} per sample, {WORKERS} at a time)", "tasks/s",
                  [], higher_is_better=True, digits=0)
    cpu = Table("CPU time of this (parent) process per task", "ms", [], scale=1000, digits=3)
    batches: list[Approach] = [
        ManagerBatch(f"housekeeping ({label})", tasks, cpu, sandbox)
        for label, sandbox in settings]
    batches.append(ProcessBatch("fork", tasks, cpu))
    alternate(batches, rounds, 1, rates)
    section = Section(TITLE, [start, rates])
    section.facts["tasks per approach"] = tasks * rounds
    section.notes += [
        "private_pids: the warm process is forked into a new PID namespace behind an init "
        "(made ahead of need, off the start path); the task's rlimits and user are set "
        "after Start, in the task process",
        "fork: a bare multiprocessing fork per task, 2 at a time (the floor)",
        *(f"left out: {why}" for why in missing),
    ]
    return section
