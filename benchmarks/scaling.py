"""7. Scaling with the table: 0, 100, 1,000 and 10,000 finished tasks retained.

A single task's cost must not grow with the table: ``run_task`` → ACTIVE
(in process, as in benchmark 1) and ``GET /api/v1/tasks/{id}`` on an idle
``housekeeping serve``. A list must grow linearly: ``GET /api/v1/tasks``.
HTTP latencies are taken one request at a time on a keep-alive connection,
next to the bare Falcon floor answering the same documents.

The tables are filled with tasks canceled while queued (see
``benchmarks.recording.fill_table``); the fetched task is one more, a finished
NOOP task created after the fill.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

from benchmarks.animators import FILL_ENV
from benchmarks.common import Options, Section, Table, alternate, wait_until
from benchmarks.http_load import ServerProcess, bare_command, hk_command, latencies
from benchmarks.recording import fill_table
from benchmarks.start import ManagerStart

TITLE = "7. Scaling with the table"
SIZES = (0, 100, 1_000, 10_000)
API = "/api/v1/tasks"
#: The whole list in one page (a page holds at most 10,000 tasks; 1,000 by default).
LIST = f"{API}?limit=10000"


class FilledStart(ManagerStart):
    """Start latency of a manager whose table holds ``size`` finished tasks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"housekeeping with {size:,} tasks"
        self.executing = ""

    def __enter__(self) -> FilledStart:
        super().__enter__()
        try:
            from benchmarks import animators

            animators.register(self.manager)
            fill_table(self.manager, self.size)
        except BaseException:
            self.manager.terminate()
            raise
        return self

    def sample(self) -> dict[str, float]:  # type: ignore[override]
        return {self.name: super().sample()[self.name]}


def run(options: Options) -> Section:
    """Measure both figures at every size, alternately."""
    rounds = options.pick(2, 3)
    per_round = options.pick(15, 40)
    gets = options.pick(100, 300)
    start = Table("run_task → ACTIVE, in process", "ms", [], scale=1000, digits=3)
    alternate([FilledStart(n) for n in SIZES], rounds, per_round, start)
    base = f"housekeeping with {SIZES[0]:,} tasks"
    start.pairs = [(f"housekeeping with {n:,} tasks", base) for n in SIZES[1:]]

    item = Table("GET /tasks/{id}, idle server, one request at a time", "ms", [],
                 scale=1000, digits=3)
    listing = Table("GET /tasks (all tasks), idle server, one request at a time", "ms", [],
                    scale=1000, digits=1)
    section = Section(TITLE, [start, item, listing])
    with contextlib.ExitStack() as stack:
        servers: dict[int, ServerProcess] = {}
        documents: dict[int, tuple[dict[str, Any], list[Any]]] = {}
        for size in SIZES:
            server = stack.enter_context(ServerProcess(
                hk_command("--purge-delay", "3600", "--max-workers", "2",
                           animators="benchmarks.animators:register_filled"),
                env={FILL_ENV: str(size)}))
            created = server.json("POST", API, {"operation": "NOOP"})
            path = f"{API}/{created['meta']['id']}"
            wait_until(lambda s=server, p=path: s.json("GET", p)["state"] == "SUCCEEDED",
                       "the fetched task to finish", step=0.01)
            servers[size] = server
            documents[size] = (server.json("GET", path), server.json("GET", LIST))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scaling-"))
        fixture = os.path.join(folder, "fixture.json")
        with open(fixture, "w", encoding="utf-8") as out:
            json.dump({"items": {doc["meta"]["id"]: doc for doc, _ in documents.values()},
                       "lists": {str(n): listed for n, (_, listed) in documents.items()}}, out)
        bare = stack.enter_context(ServerProcess(bare_command(fixture)))

        for index in range(rounds):
            order = list(SIZES[index % 2:] + SIZES[:index % 2])
            for size in order:
                server = servers[size]
                doc, listed = documents[size]
                item_path = f"{API}/{doc['meta']['id']}"
                count = max(options.pick(3, 5), gets // max(1, len(listed) // 50))
                for who, target in (("housekeeping", server), ("bare Falcon", bare)):
                    item.row(f"{who} with {size:,} tasks").samples += latencies(
                        target.host, target.port, item_path, gets)
                    listed_path = LIST if who == "housekeeping" else f"{API}?size={size}"
                    listing.row(f"{who} with {size:,} tasks").samples += latencies(
                        target.host, target.port, listed_path, min(gets, count))

    ours = [f"housekeeping with {n:,} tasks" for n in SIZES]
    bares = [f"bare Falcon with {n:,} tasks" for n in SIZES]
    item.pairs = [(name, ours[0]) for name in ours[1:]]
    item.pairs += list(zip(ours, bares, strict=True))
    listing.pairs = list(zip(ours, bares, strict=True))
    for who in ("housekeeping", "bare Falcon"):
        small = listing.row(f"{who} with {SIZES[-2]:,} tasks").median or 0.0
        large = listing.row(f"{who} with {SIZES[-1]:,} tasks").median or 0.0
        slope = (large - small) / (SIZES[-1] - SIZES[-2])
        section.facts[f"GET /tasks cost per listed task, {who}"] = (
            f"{slope * 1e6:.1f} µs (from {SIZES[-2]:,} to {SIZES[-1]:,} tasks); "
            f"{SIZES[-1]:,}/{SIZES[-2]:,} ratio {large / small:.1f}" if small else "—")
    section.notes += [
        "the tables hold N finished tasks (canceled while queued) plus the fetched one; "
        "the list is one page of at most 10,000 (GET /tasks?limit=10000)",
        "HTTP latency includes the Python client's own time (the same for both servers)",
    ]
    return section
