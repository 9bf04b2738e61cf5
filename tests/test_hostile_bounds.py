"""Hostile tasks against the supervisor's bounds: memory by bytes, no child I/O under
the lock, counting without copying the table, a bounded queue by default.

Rows 9–11 of the hostile-task table (rows 1–8 are in ``test_hostile.py``). The
latency and memory figures themselves are measured by ``python -m benchmarks
hostile``; these tests show the mechanisms with deadlines and bounds that the
old behaviour could not meet (a full copy of a big task per event, a 5 s
blocking send under the lock, a scrape that copies the whole table).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import animators
import psutil
import pytest
from conftest import TIMEOUT, describe, is_alive, wait_for, wait_terminal
from falcon import testing
from rest_support import LiveServer

from rest import create_app
from rest.app import RestOptions
from rest.cli import DEFAULT_MAX_QUEUED, build_parser
from supervisor import Manager, TaskState
from supervisor.consts import CONSTS

TASKS = "/api/v1/tasks"
MiB = 1024**2


def padded_args(size: int, **args: Any) -> dict[str, Any]:
    """``args`` plus a ``pad`` of zeros that makes their compact JSON about ``size`` bytes."""
    return {**args, "pad": [0] * (size // 2)}


def post_compact(live: LiveServer, body: dict[str, Any]) -> Any:
    """POST ``body`` as compact JSON (a pad of zeros is 2 bytes per zero)."""
    return live.post(TASKS, data=json.dumps(body, separators=(",", ":")),
                     headers={"Content-Type": "application/json"})


# -- row 9: memory bounded by bytes ------------------------------------------------------


def test_a_stuck_subscriber_is_dropped_by_bytes_not_after_10000_events(manager: Any) -> None:
    """A subscriber that never returns holds at most ``subscriber_backlog_bytes`` of
    events of a big task (then DROPPED), long before ``subscriber_backlog`` events."""
    m = manager(max_workers=1)
    m.register_animator("COOP", animators.Cooperative())
    release = threading.Event()
    stuck: list[dict[str, Any]] = []

    def never_returns(event: dict[str, Any]) -> None:
        stuck.append(event)
        release.wait(TIMEOUT)

    m.subscribe(never_returns)
    # progress about 20 times a second, events of about 1 MiB each: the byte bound is
    # reached after ~64 events, the count bound would take 10,000 (over 8 minutes)
    tid = m.run_task({"operation": "COOP", "args": padded_args(MiB)})
    events = 2 * CONSTS.subscriber_backlog_bytes // MiB  # twice what the bytes allow
    assert events < CONSTS.subscriber_backlog
    wait_for(lambda: m.get_snapshot(tid).version > events, timeout=TIMEOUT + events / 10)
    m.cancel_task(tid)
    assert wait_terminal(m, tid)["state"] == "CANCELED"
    release.set()
    wait_for(lambda: stuck and stuck[-1]["method"] == "DROPPED",
             message=lambda: f"{len(stuck)} events, the last {stuck[-1]['method']}")
    # at most the first event was being delivered; all queued behind it was dropped
    assert len(stuck) <= 2, [event["method"] for event in stuck]


def test_subscribers_share_one_immutable_event(manager: Any) -> None:
    """Publishing copies nothing: every raw subscriber gets the very same event object,
    and a plain subscriber gets a fresh dict it may change without harming anybody."""
    m = manager(max_workers=1)
    m.register_animator("TALK", animators.Talker())
    first: list[Any] = []
    second: list[Any] = []
    plain: list[dict[str, Any]] = []
    m.subscribe_changes(first.append)
    m.subscribe_changes(second.append)

    def scribble(event: dict[str, Any]) -> None:
        event["task"]["args"]["pad"].clear()  # a subscriber may change its copy
        plain.append(event)

    m.subscribe(scribble)
    tid = m.run_task({"operation": "TALK", "args": padded_args(64 * 1024, count=3)})
    assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
    wait_for(lambda: len(first) == len(second) == len(plain) >= 5)
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert [e.to_dict()["task"]["meta"]["version"] for e in first] == \
        [e["task"]["meta"]["version"] for e in plain]
    assert len(m.get_task(tid)["args"]["pad"]) == 32 * 1024


@pytest.fixture
def demo_server() -> Iterator[LiveServer]:
    """``housekeeping serve`` with its defaults (the demo animators), on loopback."""
    live = LiveServer("--max-workers", "2")
    try:
        live.start()
        yield live
    finally:
        live.close()


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_a_never_read_event_stream_beside_a_big_task_stays_bounded(
        demo_server: LiveServer) -> None:
    """A client that opens the event stream and never reads it, beside a running task of
    almost 1 MiB that reports progress: the server's memory grows by far less than one
    copy of the task per event."""
    assert demo_server.proc is not None
    pid = demo_server.proc.pid
    parts = urlsplit(demo_server.url)
    reader = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        reader.sendall(b"GET /api/v1/task-events HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: demo_server.get("/healthz").json()["eventStreams"] == 1)
        body = {"operation": "SLEEP", "args": padded_args(MiB - 4096, seconds=60)}
        answer = post_compact(demo_server, body)
        assert answer.status_code == 201, answer.text
        task_id = answer.json()["meta"]["id"]
        before = rss(pid)
        events = 150  # progress versions at ~20 per second: old code kept a copy of each

        def version() -> int:
            return int(demo_server.get(f"{TASKS}/{task_id}").json()["meta"]["version"])

        wait_for(lambda: version() >= events, timeout=TIMEOUT + events / 10)
        grown = rss(pid) - before
        assert grown <= 100 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over {events} events"
        assert demo_server.post(f"{TASKS}/{task_id}/cancel").status_code == 200
    finally:
        reader.close()


# -- row 10: no I/O to a child under the manager's lock ------------------------------------


def warm_processes(server: LiveServer) -> list[psutil.Process]:
    """The server's idle task processes: the children of its starter, or in PID
    namespaces the children of the inits that are the starter's children."""
    assert server.proc is not None
    starters = [p for p in psutil.Process(server.proc.pid).children()
                if "workers.starter" in " ".join(p.cmdline())]
    assert len(starters) == 1, [describe(p) for p in starters]
    found = []
    for child in starters[0].children():
        try:  # NOTE: an init may exit meanwhile (retired after a Preload)
            found.extend(child.children() if _is_an_init(child) else [child])
        except (psutil.Error, OSError):
            continue
    return found


def _is_an_init(proc: psutil.Process) -> bool:
    """True for PID 1 of a PID namespace (the init in front of a task process)."""
    with open(f"/proc/{proc.pid}/status") as f:
        nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
    return nspid[-1] == "1"


def timed(call: Any) -> tuple[float, Any]:
    start = time.monotonic()
    result = call()
    return time.monotonic() - start, result


def test_stopped_warm_processes_do_not_stall_posts_or_reads(demo_server: LiveServer) -> None:
    """Every warm process stopped (SIGSTOP), then a task of 900 KB posted: it cannot be
    written to the stopped process at once, yet POST and /healthz answer promptly, and
    the task can still be canceled and its process killed."""
    # NOTE: tried again (bounded) when the task did not go to a process stopped here:
    # one stopped before it said Ready is not warm yet, and those forked before the
    # starter's Preload of the demo module are replaced, so the task may go to a
    # process forked after the stopping, or wait NEW and be canceled there.
    for _ in range(3):
        if _stop_warm_post_and_cancel(demo_server):
            return
    pytest.fail("the task never went to a stopped warm process in 3 tries:\n"
                + demo_server.log()[-4000:])


def _stop_warm_post_and_cancel(server: LiveServer) -> bool:
    """One try: False when the task ran elsewhere than in a stopped process."""
    warm: list[psutil.Process] = []

    def all_stopped() -> bool:
        warm[:] = warm_processes(server)
        running = []
        for proc in warm:
            try:
                if proc.status() != psutil.STATUS_STOPPED:
                    proc.send_signal(signal.SIGSTOP)
                    running.append(proc)
            except psutil.NoSuchProcess:  # NOTE: replaced after the Preload; look again
                running.append(proc)
        return len(warm) >= 2 and not running

    try:
        wait_for(all_stopped)
        body = {"operation": "SLEEP", "args": padded_args(900_000, seconds=60)}
        took, answer = timed(lambda: post_compact(server, body))
        assert answer.status_code == 201, answer.text
        health_took, health = timed(lambda: server.get("/healthz"))
        assert health.status_code == 200
        # NOTE: generous: the old code blocked 5 s on the pipe under the lock.
        assert took < 2.0 and health_took < 2.0, (took, health_took)
        task_id = answer.json()["meta"]["id"]
        assert server.post(f"{TASKS}/{task_id}/cancel").status_code == 200

        def ended() -> bool:
            return server.get(f"{TASKS}/{task_id}").json()["state"] in {
                "CANCELED", "FAILED"}

        wait_for(ended)
        started = re.search(rf"task {task_id} started in process (\d+)", server.log())
        handed = [p for p in warm if started is not None and p.pid == int(started[1])]
        if not handed:
            return False
        # the process that was handed the task (stopped, then killed) is gone
        wait_for(lambda: not is_alive(handed[0]), message=lambda: describe(handed[0]))
        return True
    finally:
        for proc in warm:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass


# -- row 11: counting without copying; bounded by default ----------------------------------


def test_serve_bounds_its_queue_by_default() -> None:
    assert DEFAULT_MAX_QUEUED == 10_000
    assert build_parser().parse_args(["serve"]).max_queued == 10_000


def test_counts_and_metrics_never_copy_the_table(
        manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``counts()``, ``counts_by_operation()`` and ``/metrics`` come from counts kept as
    the table changes: they stay right through creation, start, cancel and purge, and a
    scrape reads no task at all."""
    m: Manager = manager(max_workers=1, purge_delay=0.5)
    m.register_animator("COOP", animators.Cooperative())
    m.register_animator("QUICK", animators.Quick())
    running = m.run_task({"operation": "COOP"})
    queued = [m.run_task({"operation": "QUICK"}) for _ in range(50)]
    wait_for(lambda: m.get_task(running)["state"] == "ACTIVE")
    m.cancel_task(queued[0])

    def by_listing() -> dict[str, dict[str, int]]:
        found = {op: dict.fromkeys((s.value for s in TaskState), 0) for op in ("COOP", "QUICK")}
        for task in m.list_tasks():
            found[task["operation"]][task["state"]] += 1
        return found

    assert m.counts_by_operation() == by_listing()
    assert m.counts()["NEW"] == 49 and m.counts()["CANCELED"] == 1
    app = create_app(m, options=RestOptions(metrics=True))
    client = testing.TestClient(app)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a scrape copied the table")

    with monkeypatch.context() as patched:
        for name in ("list_tasks", "list_snapshots", "get_task", "get_snapshot"):
            patched.setattr(m, name, refuse)
        scrape = client.simulate_get("/metrics")
        assert scrape.status_code == 200, scrape.text
        assert 'housekeeping_tasks{operation="QUICK",state="NEW"} 49.0' in scrape.text
        assert 'housekeeping_tasks{operation="COOP",state="ACTIVE"} 1.0' in scrape.text
        assert client.simulate_get("/healthz").json["NEW"] == 49
    m.cancel_task(running)
    wait_for(lambda: m.counts()["total"] == 0, timeout=TIMEOUT * 2,
             message=lambda: f"{m.counts()} {m.counts_by_operation()}")
    assert m.counts_by_operation() == by_listing()
