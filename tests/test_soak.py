"""Soak: thousands of mixed tasks through one Manager, with no zombies and no leaks.

The mix (one cycle of 20): quick, raising, ``os._exit``, SIGKILL-self,
canceled while queued, canceled while running (honoured), and canceled but
stubborn (killed after the grace period). Every task process reports its pid
and start time first; when the task's terminal event arrives, that process
must be gone. Every ``SAMPLE_EVERY`` tasks (with tasks in flight) the test
samples its own open descriptors, threads and RSS, and checks its process
tree: no zombie may last, and no more processes live than the manager's
bounds allow. After the last task is purged, descriptors, threads and RSS
must be back near the baseline taken after a warm-up batch.

Size: ``HOUSEKEEPING_SOAK_TASKS`` (default 1000; ``tox -e soak`` runs 5000).
Figures are printed (``pytest -s``) and written to ``test-artifacts/soak.json``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import TERMINAL, describe, message_texts, wait_for
from load_animators import SOAK_FAILURE, parse_pid_note, proc_stat, register_soak

from supervisor import TaskNotFound
from supervisor.consts import CONSTS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

TASKS = int(os.environ.get("HOUSEKEEPING_SOAK_TASKS", "1000"))
WARMUP = 100
SAMPLE_EVERY = 200
#: Tasks submitted and not yet ended, at most.
WINDOW = 32
MAX_WORKERS = 4
#: A cooperative task polls every 5 ms; on a busy 2-core machine it may wait
#: hundreds of ms for a CPU, and must still be seen honouring the cancel.
CANCEL_GRACE = 0.5
PURGE_DELAY = 0.2
#: How long a zombie (or one process too many) may last before it counts.
ZOMBIE_GRACE = 3.0
#: Leak bounds at the end, against the baseline.
FD_SLACK = 10
THREAD_SLACK = 0
RSS_SLACK = 20 * 1024 * 1024

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass(frozen=True)
class Kind:
    """One kind of task in the mix: its operation, when it is canceled, how it must end."""

    name: str
    operation: str
    cancel: str | None  # None, "at once" (likely still queued) or "on pid" (running)
    state: str
    says: str  # a fragment of its last messages (``{pid}`` is the reported pid)


QUICK = Kind("quick", "SQUICK", None, "SUCCEEDED", "")
RAISES = Kind("raises", "SFAIL", None, "FAILED", f"RuntimeError: {SOAK_FAILURE}")
EXITS = Kind("exits", "SEXIT", None, "FAILED", "task process {pid} exited with code 3")
KILLED = Kind("sigkill", "SKILL", None, "FAILED", "task process {pid} was killed by SIGKILL")
CANCEL_QUEUED = Kind("cancel-queued", "SCANCEL", "at once", "CANCELED", "")
CANCEL_RUNNING = Kind("cancel-running", "SCANCEL", "on pid", "CANCELED",
                      "the animator honoured the cancel")
STUBBORN = Kind("cancel-stubborn", "SSTUBBORN", "on pid", "CANCELED",
                "killed after cancel grace period")

MIX: list[Kind] = [
    QUICK, RAISES, QUICK, EXITS, CANCEL_RUNNING,
    QUICK, KILLED, CANCEL_QUEUED, QUICK, RAISES,
    QUICK, CANCEL_RUNNING, EXITS, QUICK, KILLED,
    RAISES, QUICK, CANCEL_QUEUED, STUBBORN, CANCEL_RUNNING,
]


class Record:
    """What the events said about one task."""

    __slots__ = ("alive", "deletes", "note", "pid", "posts", "start", "state", "terminals",
                 "zombie")

    def __init__(self) -> None:
        self.posts = self.terminals = self.deletes = 0
        self.state = ""
        self.note = ""
        self.pid: int | None = None
        self.start = 0
        self.alive = self.zombie = False


class Tracker:
    """A subscriber that keeps a small record per task and checks ended processes.

    It tells the driver (``notices``) when a task first reported its pid and when
    a task ended. Records are compact: the soak measures this process's RSS.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.records: dict[str, Record] = {}
        self.notices: deque[tuple[str, str]] = deque()
        self.ended = 0
        self.deleted = 0
        self.dropped = False
        self.foreign: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        task = event.get("task")
        if event.get("method") == "DROPPED" or not isinstance(task, dict):
            with self.cond:
                self.dropped = True
                self.cond.notify_all()
            return
        task_id = task["meta"]["id"]
        with self.cond:
            record = self.records.get(task_id)
            if record is None:
                record = self.records[task_id] = Record()
            method = event["method"]
            if method == "POST":
                record.posts += 1
            elif method == "DELETE":
                record.deletes += 1
                self.deleted += 1
            elif method == "PATCH":
                self._patch(task_id, task, record)
            else:
                self.foreign.append(f"{method} {task_id}")
            self.cond.notify_all()

    def _patch(self, task_id: str, task: dict[str, Any], record: Record) -> None:
        if record.pid is None:
            found = parse_pid_note(task)
            if found is not None:
                record.pid, record.start = found
                self.notices.append(("pid", task_id))
        if task["state"] in TERMINAL:
            record.terminals += 1
            record.state = task["state"]
            record.note = " | ".join(message_texts(task)[-3:])[:300]
            if record.pid is not None:
                # The terminal event comes after the state changed: the
                # process (same pid *and* start time) must not run any more.
                stat = proc_stat(record.pid)
                if stat is not None and stat[1] == record.start:
                    record.zombie = stat[0] == "Z"
                    record.alive = not record.zombie
            self.ended += 1
            self.notices.append(("end", task_id))

    def take_notices(self, timeout: float) -> list[tuple[str, str]]:
        """Wait up to ``timeout`` for notices; return and clear them."""
        with self.cond:
            if not self.notices:
                self.cond.wait(timeout)
            taken = list(self.notices)
            self.notices.clear()
            return taken


class LogCounter(logging.Handler):
    """Count the supervisor's WARNING+ records; keep the first unexpected ones."""

    EXPECTED = re.compile(rf"task \S+ failed: RuntimeError: {SOAK_FAILURE}")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.expected = 0
        self.unexpected: list[str] = []
        self.unexpected_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if self.EXPECTED.match(text):
            self.expected += 1
            return
        self.unexpected_count += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"{record.name} {record.levelname}: {text[:500]}")


@pytest.fixture
def supervisor_log() -> Iterator[LogCounter]:
    """Route the supervisor's log to a counter (not to pytest's in-memory capture)."""
    logger = logging.getLogger("housekeeping")
    counter = LogCounter()
    old_propagate = logger.propagate
    logger.addHandler(counter)
    logger.propagate = False
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.propagate = old_propagate


# -- this process and its tree -----------------------------------------------------


def measure() -> dict[str, int]:
    """This process's open descriptors, OS threads and RSS."""
    me = psutil.Process()
    return {"fds": me.num_fds(), "threads": me.num_threads(), "rss": me.memory_info().rss}


def describe_zombie(proc: psutil.Process) -> str:
    """One line about a zombie (its command line is gone, its name and parent are not)."""
    try:
        return f"pid={proc.pid} ppid={proc.ppid()} name={proc.name()!r} status=zombie"
    except psutil.Error as exc:
        return f"pid={proc.pid} ({type(exc).__name__})"


def tree() -> tuple[dict[tuple[int, float], str], int]:
    """Zombies in this process's tree (by pid and start time), and the live process count."""
    zombies: dict[tuple[int, float], str] = {}
    alive = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                zombies[(proc.pid, proc.create_time())] = describe_zombie(proc)
            else:
                alive += 1
        except psutil.NoSuchProcess:
            continue
    return zombies, alive


class Sampler:
    """Samples taken during the run, and the tree checks done with each."""

    def __init__(self, max_alive: int) -> None:
        self.max_alive = max_alive
        self.samples: list[dict[str, Any]] = []
        self.transient_zombies = 0
        self.peak_alive = 0

    def __call__(self, done: int, counts: dict[str, int]) -> None:
        zombies, alive = tree()
        if zombies:
            # A process that just exited is a zombie until its parent (the
            # starter, or us for the starter) reaps it: only a lasting one counts.
            self.transient_zombies += len(zombies)
            wait_for(lambda: not (zombies.keys() & tree()[0].keys()), timeout=ZOMBIE_GRACE,
                     message=lambda: f"zombies that lasted {ZOMBIE_GRACE} s: "
                     f"{[zombies[k] for k in zombies.keys() & tree()[0].keys()]}")
        self.peak_alive = max(self.peak_alive, alive)
        if alive > self.max_alive:
            wait_for(lambda: tree()[1] <= self.max_alive, timeout=ZOMBIE_GRACE,
                     message=lambda: f"more than {self.max_alive} live processes below the "
                     f"test: {[describe(p) for p in psutil.Process().children(recursive=True)]}")
        self.samples.append({"tasks": done, **measure(), "alive": alive,
                             "zombies": len(zombies), "table": counts["total"]})


# -- the driver -----------------------------------------------------------------------


def drive(manager: Any, tracker: Tracker, kinds: dict[str, Kind], count: int,
          sample: Callable[[int, dict[str, int]], None] | None) -> list[str]:
    """Run ``count`` tasks of the mix, at most ``WINDOW`` at a time; return their ids."""
    ids: list[str] = []
    outstanding: set[str] = set()
    cancel_errors: list[str] = []
    offset = len(kinds)
    deadline = time.monotonic() + 60 + count * 0.2
    while len(ids) < count or outstanding:
        while len(ids) < count and len(outstanding) < WINDOW:
            kind = MIX[(offset + len(ids)) % len(MIX)]
            task_id = manager.run_task({"operation": kind.operation,
                                        "objectId": f"soak-{offset + len(ids)}"})
            kinds[task_id] = kind
            ids.append(task_id)
            outstanding.add(task_id)
            if kind.cancel == "at once":
                manager.cancel_task(task_id)
            if sample is not None and len(ids) % SAMPLE_EVERY == 0:
                sample(len(ids), manager.counts())
        for what, task_id in tracker.take_notices(0.05):
            if what == "end":
                outstanding.discard(task_id)
            elif kinds[task_id].cancel == "on pid":
                try:
                    manager.cancel_task(task_id)
                except TaskNotFound as exc:
                    cancel_errors.append(f"{task_id}: {exc}")
        assert not tracker.dropped, "the manager dropped the tracking subscriber"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(outstanding)} tasks did not end in time: "
                f"{[manager.get_task(t) for t in sorted(outstanding)[:3]]}")
    assert not cancel_errors, cancel_errors[:10]
    return ids


def wait_purged(manager: Any, tracker: Tracker, total: int) -> None:
    """Wait until every task was purged and its DELETE event arrived."""
    wait_for(lambda: manager.counts()["total"] == 0 and tracker.deleted >= total,
             timeout=30, message=lambda: f"table {manager.counts()}, "
             f"{tracker.deleted}/{total} DELETE events")


def settled(baseline: dict[str, int]) -> dict[str, int]:
    """Collect garbage and measure; poll briefly for fds and threads to come back."""
    last: dict[str, int] = {}

    def back() -> bool:
        gc.collect()
        last.update(measure())
        return (last["fds"] - baseline["fds"] <= FD_SLACK
                and last["threads"] - baseline["threads"] <= THREAD_SLACK
                and last["rss"] - baseline["rss"] <= RSS_SLACK)

    deadline = time.monotonic() + 5
    while not back() and time.monotonic() < deadline:
        time.sleep(0.1)
    return last


def bookkeeping_bytes(tracker: Tracker, kinds: dict[str, Kind], ids: list[str]) -> int:
    """Roughly what the test's own per-task records take (part of the RSS growth)."""
    size = sys.getsizeof(tracker.records) + sys.getsizeof(kinds) + sys.getsizeof(ids)
    for task_id, record in tracker.records.items():
        size += sys.getsizeof(task_id) + sys.getsizeof(record) + sys.getsizeof(record.note)
    return size + sum(sys.getsizeof(task_id) for task_id in kinds)


def check_records(tracker: Tracker, kinds: dict[str, Kind], ids: list[str]) -> Counter[str]:
    """Every task: one POST, one terminal PATCH, one DELETE, the right end; process gone."""
    problems: list[str] = []
    states: Counter[str] = Counter()
    with tracker.cond:
        records = dict(tracker.records)
        foreign = [*tracker.foreign, *sorted(set(records) - set(kinds))]
    for task_id in ids:
        kind = kinds[task_id]
        record = records.get(task_id)
        if record is None:
            problems.append(f"{task_id} ({kind.name}): no event at all")
            continue
        states[f"{kind.name} {record.state}"] += 1
        says = kind.says.format(pid=record.pid)
        wants_pid = kind.cancel != "at once"
        if (record.posts, record.terminals, record.deletes) != (1, 1, 1):
            problems.append(f"{task_id} ({kind.name}): {record.posts} POST, "
                            f"{record.terminals} terminal PATCH, {record.deletes} DELETE events")
        if record.state != kind.state or says not in record.note:
            problems.append(f"{task_id} ({kind.name}): ended {record.state} "
                            f"({record.note!r}), expected {kind.state} ({says!r})")
        if wants_pid and record.pid is None:
            problems.append(f"{task_id} ({kind.name}): never reported its pid ({record.note!r})")
        if record.alive:
            problems.append(f"{task_id} ({kind.name}): process {record.pid} still ran "
                            f"when the task ended {record.state}")
    zombies_at_end = sum(r.zombie for r in records.values())
    assert not foreign, f"events of tasks nobody created: {foreign[:10]}"
    assert not problems, f"{len(problems)} problems, the first: " + "\n".join(problems[:15])
    states["(process a zombie at its terminal event)"] = zombies_at_end
    return states


def test_soak(manager: Any, supervisor_log: LogCounter) -> None:
    m = manager(max_workers=MAX_WORKERS, cancel_grace=CANCEL_GRACE, purge_delay=PURGE_DELAY)
    register_soak(m)
    tracker = Tracker()
    m.subscribe(tracker)
    kinds: dict[str, Kind] = {}

    warm_ids = drive(m, tracker, kinds, WARMUP, None)
    wait_purged(m, tracker, WARMUP)
    gc.collect()
    baseline = measure()

    # NOTE: in a PID namespace, each task (and warm) process has an init in front of it
    per_slot = 2 if m.sandbox.private_pids else 1
    sampler = Sampler(max_alive=1 + per_slot * (MAX_WORKERS + min(MAX_WORKERS,
                                                                  CONSTS.warm_processes)))
    started = time.perf_counter()
    ids = drive(m, tracker, kinds, TASKS, sampler)
    elapsed = time.perf_counter() - started
    wait_purged(m, tracker, WARMUP + TASKS)
    final = settled(baseline)
    final_tree = tree()

    states = check_records(tracker, kinds, warm_ids + ids)
    own = bookkeeping_bytes(tracker, kinds, warm_ids + ids)
    per_1000 = (sampler.samples[-1]["rss"] - sampler.samples[0]["rss"]) / max(
        1, sampler.samples[-1]["tasks"] - sampler.samples[0]["tasks"]) * 1000
    figures = {
        "tasks": TASKS, "warmup": WARMUP, "seconds": round(elapsed, 2),
        "tasks_per_second": round(TASKS / elapsed, 1), "max_workers": MAX_WORKERS,
        "baseline": baseline, "final": final,
        "delta": {key: final[key] - baseline[key] for key in baseline},
        "peak": {key: max(s[key] for s in sampler.samples) for key in ("fds", "threads", "rss")},
        "rss_growth_per_1000_tasks": round(per_1000),
        "test_bookkeeping_bytes": own,
        "peak_alive_processes": sampler.peak_alive,
        "transient_zombies_seen": sampler.transient_zombies,
        "outcomes": dict(sorted(states.items())),
        "expected_error_logs": supervisor_log.expected,
        "unexpected_logs": supervisor_log.unexpected_count,
        "samples": sampler.samples,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nsoak: {TASKS} tasks in {elapsed:.1f} s ({TASKS / elapsed:.0f}/s), "
          f"max_workers={MAX_WORKERS}")
    for key, unit in (("fds", 1), ("threads", 1), ("rss", 1024 * 1024)):
        print(f"  {key:8} baseline {baseline[key] / unit:9.1f}  peak "
              f"{figures['peak'][key] / unit:9.1f}  final {final[key] / unit:9.1f}  "
              f"delta {(final[key] - baseline[key]) / unit:+8.1f}" + ("  MiB" if unit > 1 else ""))
    print(f"  RSS growth between the first and last sample: {per_1000 / 1024:.0f} KiB per 1000 "
          f"tasks; the test's own per-task records: "
          f"{own / (WARMUP + TASKS) * 1000 / 1024:.0f} KiB per 1000 tasks")
    print(f"  samples {len(sampler.samples)}, peak live processes {sampler.peak_alive}, "
          f"transient zombies seen {sampler.transient_zombies}")
    print(f"  outcomes, the {WARMUP} warm-up tasks included:")
    for outcome, number in sorted(states.items()):
        print(f"    {outcome:40} {number}")

    assert supervisor_log.unexpected_count == 0, supervisor_log.unexpected
    assert not final_tree[0], f"zombies at the end: {list(final_tree[0].values())}"
    assert final["fds"] - baseline["fds"] <= FD_SLACK, (baseline, final)
    assert final["threads"] - baseline["threads"] <= THREAD_SLACK, (
        baseline, final, [t.name for t in threading.enumerate()])
    assert final["rss"] - baseline["rss"] <= RSS_SLACK, (baseline, final)
