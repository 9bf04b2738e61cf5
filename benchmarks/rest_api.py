"""5. REST: requests per second and p99 latency of ``housekeeping serve`` under load.

Against the floor: bare Falcon routes on the same waitress settings
(``benchmarks.bare_app``) answering the very same JSON documents, fetched
from the housekeeping server first and checked byte for byte.

* ``GET /api/v1/tasks/{id}``: one finished task, in a table of 1,000;
* ``GET /api/v1/tasks``: the list of those 1,000 tasks;
* ``POST /api/v1/tasks``: create a NOOP task (it runs at once in a process of
  its own, ``--max-workers 2``, ``--purge-delay 0``); after each
  housekeeping round the benchmark waits for the queue to drain, so the next
  round starts idle. Again with the only slot taken, so that tasks only
  queue: the cost of the API without a process per task. The bare route
  parses the body and answers 201 with a stored task.

Server CPU per request (psutil, the server process only) is the figure that
holds best on a busy machine.

Both servers run at once, idle but for the one under load; rounds alternate.
The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time

from benchmarks.animators import FILL_ENV
from benchmarks.common import TIMEOUT, Options, Section, Table, wait_until
from benchmarks.http_load import ServerProcess, bare_command, hk_command, load, load_generator

TITLE = "5. REST"
TASKS = 1000
API = "/api/v1/tasks"
RUNS = "/tasks (task runs)"
QUEUED = "/tasks (queued only)"


def drain(server: ServerProcess) -> None:
    """Wait until the server has no queued or running task."""
    def idle() -> bool:
        counts = server.json("GET", "/healthz")
        return bool(counts["queued"] == 0 and counts["running"] == 0)

    wait_until(idle, "the POSTed tasks to run", timeout=TIMEOUT * 3, step=0.1)


def run(options: Options) -> Section:
    """Load each route of both servers in turn, round after round."""
    rounds = options.pick(2, 3)
    seconds = options.pick(1, 4)
    post_seconds = options.pick(1, 2)
    rates = Table("successful requests per second", "req/s", [], higher_is_better=True,
                  digits=0)
    p99 = Table("p99 latency under load", "ms", [], scale=1000, digits=1)
    cpu = Table("server process CPU time per successful request", "ms", [], scale=1000,
                digits=3)
    section = Section(TITLE, [rates, p99, cpu])
    section.facts["load generator"] = load_generator()
    section.facts["seconds per load run"] = f"{seconds} (POST: {post_seconds})"
    errors: dict[str, int] = {}
    drained: list[float] = []
    helpers: list[float] = []
    created_total = [0]

    def record(name: str, server: ServerProcess, path: str, method: str = "GET",
               body: bytes | None = None, runs: bool = False) -> None:
        # NOTE: every task POSTed to a server that runs them is run; a short load
        # keeps the drain after it short.
        before = server.cpu()
        result = load(server.url + path, post_seconds if method == "POST" else seconds,
                      method, body)
        ok = max(1, result.requests - result.errors)
        if runs:
            start = time.monotonic()
            drain(server)
            drained.append(time.monotonic() - start)
            created_total[0] += ok
        after = server.cpu()
        rates.row(name).samples.append(result.rate)
        p99.row(name).samples.append(result.p99)
        cpu.row(name).samples.append((after[0] - before[0]) / ok)
        if runs:
            helpers.append((after[1] - before[1]) / ok)
        if result.errors:
            errors[name] = errors.get(name, 0) + result.errors

    with tempfile.TemporaryDirectory(prefix="bench-rest-") as folder:
        fixture = os.path.join(folder, "fixture.json")
        # -- GET: one task, and the list of 1,000 ------------------------------------
        hk_cmd = hk_command("--purge-delay", "3600", "--max-workers", "2",
                            animators="benchmarks.animators:register_filled")
        with ServerProcess(hk_cmd, env={FILL_ENV: str(TASKS)}) as hk:
            tasks = hk.json("GET", API)
            if len(tasks) != TASKS:
                raise RuntimeError(f"expected {TASKS} tasks, the server lists {len(tasks)}")
            item = tasks[len(tasks) // 2]
            item_path = f"{API}/{item['meta']['id']}"
            with open(fixture, "w", encoding="utf-8") as out:
                json.dump({"items": {item["meta"]["id"]: item}, "lists": {str(TASKS): tasks},
                           "created": item}, out)
            with ServerProcess(bare_command(fixture)) as bare:
                for path in (item_path, API):
                    if hk.request("GET", path) != bare.request("GET", path):
                        raise RuntimeError(f"GET {path}: the two servers answer differently")
                for index in range(rounds):
                    pair = [("housekeeping", hk), ("bare Falcon", bare)]
                    for who, server in pair[index % 2:] + pair[:index % 2]:
                        record(f"{who} GET /tasks/{{id}}", server, item_path)
                        record(f"{who} GET /tasks ({TASKS} tasks)", server, API)

        # -- POST: create a task that runs at once; and one that only queues ------------
        body = json.dumps({"operation": "NOOP"}).encode()
        with contextlib.ExitStack() as stack:
            runs = stack.enter_context(ServerProcess(
                hk_command("--purge-delay", "0", "--max-workers", "2")))
            queues = stack.enter_context(ServerProcess(
                hk_command("--purge-delay", "0", "--max-workers", "1",
                           "--max-queued", "1000000")))  # NOTE: above the default 10,000
            created = runs.json("POST", API, {"operation": "NOOP"})
            queues.json("POST", API, {"operation": "HOLD"})  # takes the only slot
            drain(runs)
            with open(fixture, "w", encoding="utf-8") as out:
                json.dump({"created": created}, out)
            bare = stack.enter_context(ServerProcess(bare_command(fixture)))
            jobs = [
                (f"housekeeping POST {RUNS}", runs, True),
                (f"housekeeping POST {QUEUED}", queues, False),
                ("bare Falcon POST /tasks", bare, False),
            ]
            for index in range(rounds):
                for name, server, drains in jobs[index % 3:] + jobs[:index % 3]:
                    if drains and options.quick and index:
                        continue  # NOTE: each such round is followed by seconds of drain
                    record(name, server, API, "POST", body, runs=drains)

    pairs = [(f"housekeeping {what}", f"bare Falcon {what}")
             for what in ("GET /tasks/{id}", f"GET /tasks ({TASKS} tasks)")]
    pairs += [(f"housekeeping POST {what}", "bare Falcon POST /tasks") for what in (RUNS, QUEUED)]
    rates.pairs = p99.pairs = cpu.pairs = pairs
    if errors:
        section.facts["non-2xx answers or socket errors"] = errors
    if drained:
        total = post_seconds * len(drained) + sum(drained)
        section.facts["POSTed tasks run to the end, per second (load + drain)"] = (
            f"{created_total[0] / total:.0f} ({created_total[0]} tasks, "
            f"{sum(drained):.1f} s of drain after the load)")
    if helpers:
        section.facts["CPU of the starter and task processes per POSTed task"] = (
            f"{statistics.median(helpers) * 1000:.2f} ms (not in the server figure)")
    section.notes += [
        "housekeeping serve --log-level WARNING (no access log lines), 8 waitress threads, "
        "no tokens; the bare routes use the same rest.server.Server settings",
        f"the GET answers of both servers are byte-identical ({TASKS} finished tasks in "
        "the table: canceled while queued, two messages each)",
        f"POST {RUNS}: each task runs in a process of its own (--max-workers 2); the "
        "server CPU includes supervising it; the figures are taken after the queue drained",
        f"POST {QUEUED}: --max-workers 1 with its slot taken, so tasks only queue: the "
        "cost of the API and the table without a process per task",
    ]
    return section
