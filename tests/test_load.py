"""Load: many keep-alive HTTP clients against a real ``python -m rest serve``.

``CLIENTS`` threads, each on one keep-alive ``http.client`` connection, mix
create / fetch / cancel / list / health requests for ``HOUSEKEEPING_LOAD_SECONDS``
(default 10; ``tox -e soak`` runs 60) against a server with a quick, a slow
cancellable and a failing operation (``tests/load_animators.py``). Two more
threads open and close event streams all the time, and two streams stay open
for the whole run to account for every task.

Afterwards, once every task ended: every created task is listed in exactly one
terminal state that fits its operation (purge delay one hour, so none is
purged), each got exactly one POST and exactly one terminal PATCH event on the
open streams, no request got a 5xx or a connection error, 429 (``--max-queued``)
is counted apart, and the server's descriptors and threads are back at their
baseline. Latency p50/p95/p99 per request kind is printed (``pytest -s``) and
written to ``test-artifacts/load.json``; it is measured in the client threads,
so it includes their own share of the two cores.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import TERMINAL, TIMEOUT, wait_for
from load_animators import LOAD_FAILURE
from rest_support import LiveServer

SECONDS = float(os.environ.get("HOUSEKEEPING_LOAD_SECONDS", "10"))
CLIENTS = 32
#: Threads that keep opening and closing event streams.
CHURNERS = 2
#: How long a churning stream stays open.
CHURN_HOLD = 0.5
#: The accounting streams (all tasks, and LSLOW only) plus the churners with room
#: for streams whose client hung up but whose slot the server has not freed yet.
MAX_STREAMS = 2 + CHURNERS * 5
THREADS = 16 + MAX_STREAMS
MAX_WORKERS = 4
MAX_QUEUED = 64
#: Server-side leak bounds after the run, against the baseline taken before it.
FD_SLACK = 10

OPERATIONS = ("LQUICK", "LSLOW", "LFAIL")
EVENTS = "/api/v1/task-events"
TASKS = "/api/v1/tasks"
TESTS = Path(__file__).resolve().parent
ARTIFACTS = TESTS.parent / "test-artifacts"

#: The statuses each request kind may get; anything else fails the test.
EXPECTED = {
    "create": {201, 429},
    "fetch": {200},
    "cancel": {200, 404},
    "list": {200},
    "health": {200},
    "stream": {200},
}


@pytest.fixture
def server() -> Iterator[LiveServer]:
    live = LiveServer(
        "--animators", "load_animators:register", "--no-demo",
        "--threads", str(THREADS), "--max-streams", str(MAX_STREAMS),
        "--max-workers", str(MAX_WORKERS), "--max-queued", str(MAX_QUEUED),
        "--purge-delay", "3600", "--log-level", "WARNING",
        cwd=TESTS,
    )
    live.start()
    try:
        yield live
    finally:
        live.close()


class Stats:
    """One thread's request outcomes (merged after the run)."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self.unexpected: list[str] = []
        self.connects = 0
        self.created: dict[str, str] = {}  # id -> operation
        self.cancel_ok: set[str] = set()

    def merge(self, other: Stats) -> None:
        for kind, values in other.latency.items():
            self.latency[kind].extend(values)
        self.statuses.update(other.statuses)
        self.errors.extend(other.errors)
        self.unexpected.extend(other.unexpected)
        self.connects += other.connects
        self.created.update(other.created)
        self.cancel_ok |= other.cancel_ok


class Client:
    """One keep-alive connection; records latency, status and errors by request kind."""

    def __init__(self, host: str, port: int, stats: Stats) -> None:
        self.host, self.port = host, port
        self.stats = stats
        self.conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)

    def call(self, kind: str, method: str, path: str,
             body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Send one request; return ``(status, parsed JSON)``, or ``(0, None)`` on an error."""
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.conn.sock is None:
            self.stats.connects += 1
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.stats.errors.append(f"{kind} {method} {path}: {type(exc).__name__}: {exc}")
            self.conn.close()
            return 0, None
        status = response.status
        self.stats.latency[kind if status != 429 else f"{kind} 429"].append(
            time.perf_counter() - started)
        self.stats.statuses[(kind, status)] += 1
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status not in EXPECTED[kind] or data is None:
            self.stats.unexpected.append(f"{kind} {method} {path} -> {status} {raw[:300]!r}")
        elif status == 429 and not response.getheader("Retry-After"):
            self.stats.unexpected.append(f"{kind} {method} {path} -> 429 without Retry-After")
        return status, data

    def close(self) -> None:
        self.conn.close()


def run_client(index: int, host: str, port: int, deadline: float, stats: Stats) -> None:
    """Mix requests until ``deadline``.

    Create 40 %, fetch 32 %, cancel 15 %, health 8 %, list 5 %.
    """
    rng = random.Random(index)
    client = Client(host, port, stats)
    own: list[str] = []
    slow: list[str] = []
    serial = 0
    try:
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.40 or not own:
                operation = rng.choices(OPERATIONS, weights=(50, 25, 25))[0]
                body: dict[str, Any] = {"operation": operation, "objectId": f"c{index}-{serial}"}
                if operation == "LSLOW":
                    body["args"] = {"seconds": round(rng.uniform(0.2, 1.0), 3)}
                serial += 1
                status, task = client.call("create", "POST", TASKS, body)
                if status == 201:
                    task_id = task["meta"]["id"]
                    stats.created[task_id] = operation
                    own.append(task_id)
                    if operation == "LSLOW":
                        slow.append(task_id)
            elif roll < 0.72:
                task_id = rng.choice(own)
                status, task = client.call("fetch", "GET", f"{TASKS}/{task_id}")
                if status == 200 and task["meta"]["id"] != task_id:
                    stats.unexpected.append(f"fetch {task_id} answered {task['meta']['id']}")
            elif roll < 0.87:
                # NOTE: mostly the newest slow tasks (still running), sometimes any.
                pool = slow[-8:] if slow and rng.random() < 0.8 else own
                task_id = rng.choice(pool)
                status, task = client.call("cancel", "POST", f"{TASKS}/{task_id}/cancel")
                if status == 200:
                    stats.cancel_ok.add(task_id)
                    if task["meta"]["id"] != task_id or task["cancelRequested"] is not True:
                        stats.unexpected.append(f"cancel {task_id} answered {task}")
            elif roll < 0.95:
                client.call("health", "GET", "/healthz")
            else:
                operation = rng.choice(OPERATIONS)
                status, tasks = client.call("list", "GET", f"{TASKS}?operation={operation}")
                if status == 200 and any(t["operation"] != operation for t in tasks):
                    stats.unexpected.append(f"list ?operation={operation} has other operations")
    except Exception as exc:  # a malformed answer: count it, do not lose the thread silently
        stats.errors.append(f"client {index} stopped: {type(exc).__name__}: {exc}")
    finally:
        client.close()


class Tap(threading.Thread):
    """An event stream read on its own connection: opening latency, and per-task accounting."""

    def __init__(self, host: str, port: int, query: str = "", stats: Stats | None = None) -> None:
        super().__init__(daemon=True, name=f"tap{query}")
        self.host, self.port, self.query = host, port, query
        self.stats = stats or Stats()
        self.lock = threading.Lock()
        self.posts: Counter[str] = Counter()
        self.terminals: Counter[str] = Counter()
        self.final: dict[str, str] = {}
        self.operations: Counter[str] = Counter()
        self.events = 0
        self.dropped = False
        self.error = ""
        self.opened = threading.Event()
        self.sock: socket.socket | None = None
        self.stop_at: float | None = None  # set when we hang up

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            started = time.perf_counter()
            conn.request("GET", EVENTS + self.query)
            # NOTE: taken before getresponse(), which hands the socket of a
            # "Connection: close" answer over to the response (conn.sock = None).
            self.sock = conn.sock
            response = conn.getresponse()
            self.stats.statuses[("stream", response.status)] += 1
            if response.status != 200:
                self.stats.unexpected.append(f"stream -> {response.status} {response.read()!r}")
                return
            first = response.read1(65536)
            self.stats.latency["stream"].append(time.perf_counter() - started)
            self.opened.set()
            self._read(response, first)
        except Exception as exc:  # a hang-up of ours, or a real failure
            if not self._closing():
                self.error = f"{type(exc).__name__}: {exc}"
                self.stats.errors.append(f"stream{self.query}: {self.error}")
        finally:
            self.opened.set()
            conn.close()

    def _closing(self) -> bool:
        return self.stop_at is not None

    def _read(self, response: http.client.HTTPResponse, buffer: bytes) -> None:
        while True:
            *messages, buffer = buffer.split(b"\n\n")
            for message in messages:
                self._message(message)
            if self._closing():
                return
            chunk = response.read1(65536)
            if not chunk:
                if not self._closing():
                    self.error = "the server ended the stream"
                    self.stats.errors.append(f"stream{self.query}: {self.error}")
                return
            buffer += chunk

    def _message(self, message: bytes) -> None:
        fields = dict(
            line.split(b": ", 1) for line in message.split(b"\n")
            if line and not line.startswith(b":") and b": " in line
        )
        if b"event" not in fields:
            return
        event = json.loads(fields[b"data"])
        task = event.get("task")
        with self.lock:
            self.events += 1
            if event["method"] == "DROPPED" or task is None:
                self.dropped = True
                return
            task_id = task["meta"]["id"]
            self.operations[task["operation"]] += 1
            if event["method"] == "POST":
                self.posts[task_id] += 1
            elif event["method"] == "PATCH" and task["state"] in TERMINAL:
                self.terminals[task_id] += 1
                self.final[task_id] = task["state"]

    def seen_terminal(self, ids: set[str]) -> bool:
        with self.lock:
            return ids <= self.terminals.keys()

    def close(self) -> None:
        """Hang up (the reader sees EOF and ends)."""
        self.stop_at = time.monotonic()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join(TIMEOUT)


def run_churner(host: str, port: int, deadline: float, stats: Stats) -> None:
    """Open a stream, read it for ``CHURN_HOLD`` seconds, hang up; again until ``deadline``."""
    while time.monotonic() < deadline:
        tap = Tap(host, port, stats=stats)
        tap.start()
        tap.opened.wait(TIMEOUT)
        tap.join(CHURN_HOLD)  # the stream's life: it reads until we hang up
        tap.close()
        if tap.error:
            return


def percentiles(values: list[float]) -> dict[str, float]:
    """count, p50, p95, p99 and max in milliseconds."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else (
        ordered * 99)
    return {"count": len(ordered), "p50": round(cuts[49] * 1000, 2),
            "p95": round(cuts[94] * 1000, 2), "p99": round(cuts[98] * 1000, 2),
            "max": round(ordered[-1] * 1000, 2)}


def all_ended(health: dict[str, Any]) -> bool:
    """Tell from ``/healthz`` counts whether no task is queued or running."""
    return health["NEW"] + health["ACTIVE"] + health["WAITING"] == 0


def server_resources(live: LiveServer) -> dict[str, int]:
    assert live.proc is not None
    proc = psutil.Process(live.proc.pid)
    return {"fds": proc.num_fds(), "threads": proc.num_threads(), "rss": proc.memory_info().rss}


def test_load(server: LiveServer) -> None:
    parts = urlsplit(server.url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None
    # warm up: every operation once, and a stream opened and closed
    for operation in OPERATIONS:
        assert server.post(TASKS, json={"operation": operation}).status_code == 201
    wait_for(lambda: all_ended(server.get("/healthz").json()),
             message="the warm-up tasks did not end")
    warm_ids = {task["meta"]["id"] for task in server.get(TASKS).json()}
    server.session.close()
    warm_tap = Tap(host, port)
    warm_tap.start()
    assert warm_tap.opened.wait(TIMEOUT)
    warm_tap.close()
    wait_for(lambda: server.get("/healthz").json()["eventStreams"] == 0)
    server.session.close()
    baseline = server_resources(server)

    stream_stats = Stats()
    everything = Tap(host, port, stats=stream_stats)
    slow_only = Tap(host, port, "?operation=LSLOW", stats=stream_stats)
    for tap in (everything, slow_only):
        tap.start()
        assert tap.opened.wait(TIMEOUT) and not tap.error, tap.error

    deadline = time.monotonic() + SECONDS
    client_stats = [Stats() for _ in range(CLIENTS)]
    churn_stats = [Stats() for _ in range(CHURNERS)]
    threads = [
        threading.Thread(target=run_client, args=(i, host, port, deadline, client_stats[i]),
                         name=f"client-{i}")
        for i in range(CLIENTS)
    ] + [
        threading.Thread(target=run_churner, args=(host, port, deadline, churn_stats[i]),
                         name=f"churner-{i}")
        for i in range(CHURNERS)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 2 * TIMEOUT)
        assert not thread.is_alive(), f"{thread.name} is stuck"
    elapsed = time.perf_counter() - started

    total = Stats()
    for stats in (*client_stats, *churn_stats, stream_stats):
        total.merge(stats)
    created = total.created

    # every task ends (the queue is bounded by --max-queued, the slow ones by args.seconds)
    health: dict[str, Any] = {}

    def drained() -> bool:
        health.update(server.get("/healthz").json())
        return all_ended(health)

    wait_for(drained, timeout=60, message=lambda: f"healthz {health}")
    drain_seconds = time.perf_counter() - started - elapsed
    ids = set(created)
    slow_ids = {task_id for task_id, op in created.items() if op == "LSLOW"}
    wait_for(lambda: everything.seen_terminal(ids) and slow_only.seen_terminal(slow_ids),
             timeout=TIMEOUT, message=lambda: f"tap errors {everything.error!r} "
             f"{slow_only.error!r}, dropped {everything.dropped} {slow_only.dropped}, "
             f"missing {len(ids - everything.terminals.keys())} "
             f"and {len(slow_ids - slow_only.terminals.keys())}")
    listed = server.get(TASKS).json()
    sample = random.Random(0).sample(sorted(ids), min(100, len(ids)))
    fetched = {task_id: server.get(f"{TASKS}/{task_id}").json() for task_id in sample}
    server.session.close()
    for tap in (everything, slow_only):
        tap.close()
    wait_for(lambda: server.get("/healthz").json()["eventStreams"] == 0,
             message="event streams stay open on the server")
    server.session.close()

    after: dict[str, int] = {}

    def back() -> bool:
        after.update(server_resources(server))
        return (after["fds"] - baseline["fds"] <= FD_SLACK
                and after["threads"] <= baseline["threads"])

    try:
        wait_for(back, timeout=15)
    except AssertionError:
        pass  # reported below, with the figures

    requests_done = sum(len(v) for k, v in total.latency.items() if k != "stream")
    figures: dict[str, Any] = {
        "seconds": SECONDS, "elapsed": round(elapsed, 2), "drain_seconds": round(drain_seconds, 2),
        "clients": CLIENTS, "churners": CHURNERS, "threads": THREADS,
        "max_streams": MAX_STREAMS, "max_workers": MAX_WORKERS, "max_queued": MAX_QUEUED,
        "requests": requests_done, "requests_per_second": round(requests_done / elapsed, 1),
        "tasks_created": len(created),
        "created_by_operation": dict(Counter(created.values())),
        "rejected_429": total.statuses[("create", 429)],
        "cancel_200": total.statuses[("cancel", 200)],
        "cancel_404": total.statuses[("cancel", 404)],
        "status_5xx": sum(n for (_, status), n in total.statuses.items() if status >= 500),
        "connection_errors": len(total.errors),
        "connections_opened": total.connects,
        "stream_events": {"all": everything.events, "LSLOW": slow_only.events},
        "latency_ms": {kind: percentiles(total.latency[kind]) for kind in sorted(total.latency)},
        "server": {"baseline": baseline, "after": after},
        "final_states": dict(Counter(
            f"{task['operation']} {task['state']}" for task in listed
            if task["meta"]["id"] in ids)),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nload: {CLIENTS} clients + {CHURNERS} stream churners + 2 open streams for "
          f"{elapsed:.1f} s: {requests_done} requests ({requests_done / elapsed:.0f}/s), "
          f"{len(created)} tasks, {figures['rejected_429']} x 429, drained in "
          f"{drain_seconds:.1f} s")
    print(f"  {'kind':11} {'count':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, row in figures["latency_ms"].items():
        print(f"  {kind:11} {row['count']:7} " + " ".join(
            f"{row.get(key, float('nan')):8.1f}" for key in ("p50", "p95", "p99", "max")))
    print(f"  5xx {figures['status_5xx']}, connection errors {figures['connection_errors']}, "
          f"connections {total.connects}, cancel 200/404 {figures['cancel_200']}/"
          f"{figures['cancel_404']}")
    print(f"  server fds {baseline['fds']} -> {after['fds']}, threads {baseline['threads']} -> "
          f"{after['threads']}, rss {baseline['rss'] / 2**20:.1f} -> "
          f"{after['rss'] / 2**20:.1f} MiB")
    print(f"  final states {figures['final_states']}")

    # -- the verdict -------------------------------------------------------------------
    assert figures["status_5xx"] == 0, [u for u in total.unexpected if " -> 5" in u][:10]
    assert not total.errors, total.errors[:10]
    assert not total.unexpected, total.unexpected[:10]
    assert total.connects == CLIENTS, "a client connection was not kept alive"
    assert len(created) > 0 and total.statuses[("cancel", 200)] > 0

    # GET: every created task is listed once, in one terminal state that fits
    by_id: dict[str, dict[str, Any]] = {}
    for task in listed:
        assert task["meta"]["id"] not in by_id, f"listed twice: {task['meta']['id']}"
        by_id[task["meta"]["id"]] = task
    assert by_id.keys() == ids | warm_ids, (
        f"missing {sorted(ids - by_id.keys())[:5]}, "
        f"not created by us {sorted(by_id.keys() - ids - warm_ids)[:5]}")
    wrong = []
    for task_id, operation in created.items():
        task = by_id[task_id]
        state = task["state"]
        messages = " | ".join(m["message"] for m in task["messages"])
        # Any task may have been canceled (while queued, or running); a cancel
        # that comes as the task returns may still see it end as it would have.
        canceled = state == "CANCELED" and task["cancelRequested"] and task_id in total.cancel_ok
        fits = canceled or {
            "LQUICK": state == "SUCCEEDED",
            "LFAIL": state == "FAILED" and f"RuntimeError: {LOAD_FAILURE}" in messages,
            "LSLOW": state == "SUCCEEDED",
        }[operation]
        if task["operation"] != operation or not fits:
            wrong.append(f"{task_id} {operation}: {state} {messages[:200]}")
        if task_id in fetched:
            got = fetched[task_id]
            if (got["state"], got["meta"]["version"]) != (state, task["meta"]["version"]):
                wrong.append(f"{task_id}: GET says {got['state']} v{got['meta']['version']}, "
                             f"the list {state} v{task['meta']['version']}")
    assert not wrong, f"{len(wrong)} tasks ended wrong: {wrong[:10]}"

    # events: one POST and exactly one terminal PATCH per task, on both streams
    for tap, expected_ids in ((everything, ids), (slow_only, slow_ids)):
        assert not tap.dropped and not tap.error, (tap.query, tap.dropped, tap.error)
        posts_wrong = {i: tap.posts[i] for i in expected_ids if tap.posts[i] != 1}
        terminal_wrong = {i: tap.terminals[i] for i in expected_ids if tap.terminals[i] != 1}
        assert not posts_wrong, (
            f"{tap.query or 'all'}: POST events {list(posts_wrong.items())[:10]}")
        assert not terminal_wrong, (
            f"{tap.query or 'all'}: terminal PATCH events {list(terminal_wrong.items())[:10]}")
        mismatched = [i for i in expected_ids if tap.final[i] != by_id[i]["state"]]
        assert not mismatched, f"stream and GET disagree: {mismatched[:10]}"
        foreign = set(tap.posts) - expected_ids
        assert not foreign, f"{tap.query or 'all'}: events of other tasks {sorted(foreign)[:5]}"
    assert set(slow_only.operations) <= {"LSLOW"}, slow_only.operations

    # the server gave back what the run took
    assert after["fds"] - baseline["fds"] <= FD_SLACK, (baseline, after)
    assert after["threads"] <= baseline["threads"], (baseline, after)
    assert server.stop() == 0, server.log()[-3000:]
