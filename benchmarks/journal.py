"""12. Journal: what recording every task in SQLite costs a ``housekeeping serve``.

* ``POST /api/v1/tasks`` of a task that only queues (``--max-workers 1`` with
  its slot taken), on two servers alike but for ``--journal``: req/s, p99 and
  server CPU per request (the goal: the journal keeps at least 0.7 of the rate).
* ``GET /api/v1/tasks/{id}`` of a task answered from a journal of 100,000
  finished records (a server started on it, so that every one is only in the
  journal), next to a task in the in-memory table of the same server: p50 at
  rest (one keep-alive connection) of a random record per request (read from
  the file) and of one record asked again and again (a polling client: kept
  after its first read); req/s under load of the latter.
* The journal's bytes per task: the file of those 100,000 records (a task
  that ran: messages, result, outcome, usage), and the file the queued POSTs
  left.

Rounds alternate between the two sides.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks.common import TIMEOUT, Options, Section, Table, wait_until
from benchmarks.http_load import ServerProcess, hk_command, load, load_generator, timed_gets
from supervisor.journal import Journal
from supervisor.outcome import Outcome, OutcomeKind, Usage
from supervisor.states import TaskState
from supervisor.task import Task, check_create

TITLE = "12. Journal"
API = "/api/v1/tasks"
RECORDS = 100_000
_CHUNK = 5_000  #: records filed before waiting for the writer (its backlog is bounded)
WITH, WITHOUT = "housekeeping POST (queued), journal", "housekeeping POST (queued), no journal"
FROM_JOURNAL = "housekeeping GET /tasks/{id} from the journal (100,000 records), random"
POLLED = "housekeeping GET /tasks/{id} from the journal, one record polled"
FROM_TABLE = "housekeeping GET /tasks/{id} from the table"


def finished_task(number: int) -> Task:
    """A task as one that ran leaves it: two state changes, progress, result, usage."""
    create = {"operation": "HASH", "objectId": f"vol-{number % 1000}",
              "args": {"megabytes": 64}}
    task = Task(f"HASH{number:06d}", create, check_create(create), number)
    task.transition(TaskState.ACTIVE)
    task.set_progress({"percent_complete": 100, "total_bytes": 67108864,
                       "offset_bytes": 67108864, "transferred_bytes": 67108864}, time.time())
    task.result_json = b'{"digest":"' + b"a" * 64 + b'","megabytes":64}'
    task.transition(TaskState.SUCCEEDED, outcome=Outcome(OutcomeKind.RETURNED, ""),
                    usage=Usage(0.41, 0.02, 23_068_672, 0.45))
    return task


def count(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
    finally:
        db.close()


def file_bytes(path: Path) -> int:
    """The database and its WAL, as on disk."""
    return sum(os.path.getsize(f"{path}{suffix}") for suffix in ("", "-wal")
               if os.path.exists(f"{path}{suffix}"))


def fill_journal(path: Path) -> float:
    """Write RECORDS finished tasks through the journal; return records per second."""
    started = time.monotonic()
    journal = Journal.open(path, retention_tasks=RECORDS * 2)
    try:
        for first in range(1, RECORDS + 1, _CHUNK):
            last = min(RECORDS, first + _CHUNK - 1)
            for number in range(first, last + 1):
                journal.record("POST", finished_task(number).snapshot())
            wait_until(lambda last=last: count(path) >= last, "the journal's writer",
                       timeout=TIMEOUT, step=0.01)
    finally:
        journal.close(last_number=RECORDS)
    return RECORDS / (time.monotonic() - started)


def fetch_latencies(server: ServerProcess, paths: list[str]) -> list[float]:
    """Time one GET of each path, in turn, on one keep-alive connection."""
    return timed_gets(server.host, server.port, paths)


def run(options: Options) -> Section:
    """The POST rounds, then the fetch rounds, then the sizes."""
    rounds = options.pick(2, 4)
    seconds = options.pick(1, 3)
    fetches = options.pick(500, 2000)
    rates = Table("successful requests per second", "req/s", [], higher_is_better=True,
                  digits=0, pairs=[(WITH, WITHOUT), (POLLED, FROM_TABLE)],
                  ratio_title="ratio")
    p99 = Table("p99 latency under load", "ms", [], scale=1000, digits=1,
                pairs=rates.pairs, ratio_title="ratio")
    cpu = Table("server process CPU time per successful request", "ms", [], scale=1000,
                digits=3, pairs=[(WITH, WITHOUT)], ratio_title="ratio")
    at_rest = Table("GET /tasks/{id} at rest, one connection", "ms", [], scale=1000,
                    digits=3, pairs=[(FROM_JOURNAL, FROM_TABLE), (POLLED, FROM_TABLE)],
                    ratio_title="ratio")
    section = Section(TITLE, [rates, p99, cpu, at_rest])
    section.facts["load generator"] = load_generator()
    errors: dict[str, int] = {}

    with tempfile.TemporaryDirectory(prefix="bench-journal-") as folder:
        # -- POST: queued tasks, with and without the journal -------------------------------
        posted = Path(folder) / "posted.db"
        body = b'{"operation": "NOOP"}'
        queued = ("--purge-delay", "0", "--max-workers", "1", "--max-queued", "10000000")
        with contextlib.ExitStack() as stack:
            journaled = stack.enter_context(ServerProcess(
                hk_command(*queued, "--journal", str(posted))))
            plain = stack.enter_context(ServerProcess(hk_command(*queued)))
            for server in (journaled, plain):
                server.json("POST", API, {"operation": "HOLD"})  # takes the only slot
            created = 0
            for index in range(rounds):
                pair = [(WITH, journaled), (WITHOUT, plain)]
                for name, server in pair[index % 2:] + pair[:index % 2]:
                    before = server.cpu()[0]
                    result = load(server.url + API, seconds, "POST", body)
                    ok = max(1, result.requests - result.errors)
                    rates.row(name).samples.append(result.rate)
                    p99.row(name).samples.append(result.p99)
                    cpu.row(name).samples.append((server.cpu()[0] - before) / ok)
                    if result.errors:
                        errors[name] = errors.get(name, 0) + result.errors
                    if server is journaled:
                        created += ok
        # NOTE: the server stopped cleanly: its WAL is checkpointed into the file
        section.facts["journal bytes per queued task (POST rounds)"] = (
            f"{file_bytes(posted) / max(1, count(posted)):.0f} "
            f"({count(posted):,} records, {file_bytes(posted) / 2**20:.1f} MiB)")

        # -- GET from the journal: 100,000 records ---------------------------------------
        history = Path(folder) / "history.db"
        section.facts["filling the journal through Journal.record (records/s)"] = (
            f"{fill_journal(history):,.0f}")
        size = file_bytes(history)
        section.facts["journal bytes per finished task (100,000 records)"] = (
            f"{size / RECORDS:.0f} ({size / 2**20:.1f} MiB)")
        with ServerProcess(hk_command("--purge-delay", "3600", "--journal", str(history),
                                      "--retention-tasks", str(RECORDS * 2))) as server:
            live = server.json("POST", API, {"operation": "NOOP"})["meta"]["id"]
            wait_until(lambda: server.json("GET", f"{API}/{live}")["state"] == "SUCCEEDED",
                       "the NOOP task", step=0.01)
            picks = random.Random(12)
            polled = f"{API}/HASH{RECORDS // 2:06d}"
            for index in range(rounds):
                randoms = [f"{API}/HASH{picks.randint(1, RECORDS):06d}" for _ in range(fetches)]
                at_rest.row(FROM_JOURNAL).samples.extend(fetch_latencies(server, randoms))
                sides = [(POLLED, polled), (FROM_TABLE, f"{API}/{live}")]
                for name, path in sides[index % 2:] + sides[:index % 2]:
                    at_rest.row(name).samples.extend(fetch_latencies(server, [path] * fetches))
                    result = load(server.url + path, seconds)
                    rates.row(name).samples.append(result.rate)
                    p99.row(name).samples.append(result.p99)
                    if result.errors:
                        errors[name] = errors.get(name, 0) + result.errors

    if errors:
        section.facts["non-2xx answers or socket errors"] = errors
    section.notes += [
        "housekeeping serve --log-level WARNING, 8 waitress threads, no tokens",
        "POST: --max-workers 1 with its slot taken, --purge-delay 0: every task stays "
        "queued (NEW); with --journal each is recorded by the journal's writer thread, "
        "batched every 50 ms",
        "GET from the journal: the server started on a journal of 100,000 finished tasks "
        "(none in its table); 'random' asks for a random one each time (read from the "
        "file), 'one record polled' for the same one (kept after its first read, as for "
        "a client polling its task); the table row is a finished task in the same "
        "server's table",
    ]
    return section
